"""The `fgscope dump` job: activations of a whole data set, streamed to sharded files.

    inputs ─▶ DataLoader (decoding in worker processes)
           ─▶ forward in batches; `capture(on_record=)` hands each layer's output over
           ─▶ pooled / resized / cast straight into the current shard's buffers
           ─▶ ShardWriter thread: safetensors file (atomic) ─▶ parts/<part>/progress.json
           ─▶ index.json once every part is complete

Memory is bounded by the batch and a few shards, never by the data set. A run is resumable:
the same command against the same `--out` continues after the last complete shard and ends
with the same bytes as an uninterrupted run (batches never cross shard boundaries, so every
shard is computed from the same batches). What a dump *is* (its identity: the model's
weights, the input list, the stored layers, pooling, dtypes, shard size, number of parts) is
hashed into `dump.json`; another command against the folder is refused, and so is a resume
after an input file changed (each completed shard records what its files were). Batch size,
workers and device may change between runs: they change values only by float rounding.
A process holds a lock on its part for the whole run: a second dump of the same part is
refused at once; the lock of a killed run is taken over.

Scale-out: the inputs are split into `parts` contiguous blocks (`--shard i/N`, or RANK and
WORLD_SIZE under torchrun; both together give part `i * WORLD_SIZE + RANK` of
`N * WORLD_SIZE`). Each part writes only its own files, so no process group is needed; the
part that completes last writes the union `index.json` (or `fgscope dump-merge`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn

# The code lives in two more modules, re-exported here as the public API:
#   dump_plan  options (DumpConfig, parse_hw, parse_shard, resolve_part), stored layers, identity
#   dump_loop  the --out folder and its checks; the streaming loop (shard buffers, the forward,
#              the writer thread)
# They import in one direction only: dump -> dump_loop -> dump_plan.
from fgscope import store
from fgscope.dump.loop import _check_inputs, _claim_out, _loop, _LoopResult, _out_dir
from fgscope.dump.plan import (
    DTYPES,
    POOLS,
    DumpConfig,
    _make_plan,
    _Plan,
    parse_hw,
    parse_shard,
    resolve_part,
)
from fgscope.dump.plan import _transform as _transform  # read by tests/test_dump.py
from fgscope.errors import ImageError, StoreError
from fgscope.runs import RunDir, write_json
from fgscope.store import PartState, StoredLayer

__all__ = [
    "POOLS",
    "DTYPES",
    "DumpConfig",
    "DumpResult",
    "run_dump",
    "merge_dump",
    "parse_hw",
    "parse_shard",
    "resolve_part",
]


@dataclass(frozen=True)
class DumpResult:
    """What one run of `run_dump` did.

    Attributes:
        out: the dump folder.
        part: this process's part; parts: how many parts.
        layers: how each layer is stored.
        inputs: inputs of this part.
        images: images this run processed (rows written).
        failures: inputs this run skipped.
        shards_written: shard files this run wrote; bytes_written: their size.
        seconds: time of the batch loop; images_per_s: images / seconds.
        resumed_at: first shard this run computed (0 = from the start).
        part_complete: every shard of this part exists.
        complete: every part is complete and `index.json` was written.
    """

    out: Path
    part: int
    parts: int
    layers: tuple[StoredLayer, ...]
    inputs: int
    images: int
    failures: int
    shards_written: int
    bytes_written: int
    seconds: float
    images_per_s: float
    resumed_at: int
    part_complete: bool
    complete: bool


# --- the run -------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torchvision

    from fgscope import __version__

    return {"fgscope": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _part_done(out: Path, part: int, parts: int, digest: str) -> bool:
    path = out / "parts" / store.part_tag(part, parts) / "progress.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return doc.get("hash") == digest and bool(doc.get("complete"))


def _write_union(roots: Sequence[Path], index: Mapping[str, Any]) -> None:
    """index.json and manifest.json (the parts' manifests together) in roots[0]."""
    store.write_index(roots[0], index)
    manifests = []
    n = index["manifest"]["identity"]["parts"]
    for p in range(n):
        tag = store.part_tag(p, n)
        for root in roots:
            path = root / "parts" / tag / "manifest.json"
            if path.is_file():
                try:
                    manifests.append(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    manifests.append({"part": tag, "error": f"unreadable {path}"})
                break
    write_json(roots[0] / "manifest.json", {
        "command": "dump",
        "finished_at": _dt.datetime.now().astimezone().isoformat(),
        "rows": index["rows"],
        "failures": len(index["failures"]),
        "files": ["index.json", "inputs.json", "dump.json", *(s["file"] for s in index["shards"])],
        "parts": manifests,
    })


def run_dump(config: DumpConfig, console: Console | None = None) -> tuple[Path, DumpResult]:
    """Run (or continue) one part of a dump; returns the folder and what this run did.

    Raises:
        FgscopeError: bad model, inputs, layers or options (before anything is written); a
            different dump in `out`, or input files that changed since their shards were
            computed (ConfigError); another process writing this part (OutputError); an
            OutputError when a shard cannot be written (completed shards stay valid and the
            same command continues after them); ImageError when the finished dump holds no
            row because every input failed.
    """
    console = console or Console(quiet=True)
    config.check()
    t0 = time.perf_counter()
    started_at = _dt.datetime.now().astimezone().isoformat()
    part, parts, _ = resolve_part(config.shard)
    out = _out_dir(config, parts)
    tag = f"part {part}/{parts}: " if parts > 1 else ""  # 0-based, as --shard i/N is given
    # Held for the whole run, taken before the model loads: a second dump of this part is
    # refused at once, before it could touch this run's files (its temporary shard above all).
    with store.part_lock(out, part, parts) as lock:
        if lock.stale:
            console.print(f"{tag}note: took over the lock left in {escape(str(out))} by {lock.stale} "
                          "(that run ended without releasing it)")
        if not lock.supported:
            console.print(f"{tag}note: the file system of {escape(str(out))} has no file locks: do not run "
                          "two dumps of the same part into it at once")
        plan = _make_plan(config)
        with store.folder_lock(out):  # dump.json is checked and written by one process at a time
            if _claim_out(out, config, plan, lock):
                src = plan.lm.source
                store.write_inputs(out, plan.inputs_doc)
                store.write_identity(out, plan.identity, plan.layers, {
                    "model": {"spec": src.spec, "path": src.path, "sha256": src.sha256,
                              "notes": list(src.notes)},
                    "versions": _versions(),
                })
        return out, _run_part(config, plan, out, console, tag, t0, started_at)


def _run_part(config: DumpConfig, plan: _Plan, out: Path, console: Console, tag: str,
              t0: float, started_at: str) -> DumpResult:
    """The shards of this part that are not done yet, then the union index if it is the last."""
    part, parts, digest = plan.part, plan.parts, plan.digest
    run = RunDir(out / "parts" / store.part_tag(part, parts), "dump",
                 manifest={"started_at": started_at}, started=t0)
    run.time("setup", time.perf_counter() - t0)

    span = store.split_inputs(len(plan.inputs), part, parts)
    rows_per_shard = plan.identity["rows_per_shard"]
    state = store.load_part(out, PartState(part, parts, span, rows_per_shard), digest)
    _check_inputs(out, state, plan)
    resumed_at = len(state.shards)
    if resumed_at == 0:
        store.write_progress(out, state, digest)
    if resumed_at and not state.complete:
        console.print(
            f"{tag}continuing {escape(str(out))}: {resumed_at} of {state.n_shards} shards already complete"
        )
    if plan.lm.max_batch is not None and config.batch_size > plan.lm.max_batch:
        config = replace(config, batch_size=plan.lm.max_batch)  # a static-batch .pt2 takes no more
    done = _loop(plan, config, out, state, console, tag)

    run.time("loop", done.seconds)
    rate = done.images / done.seconds if done.seconds > 0 else 0.0
    run.manifest.update(
        part=part, parts=parts, inputs=list(span), device=str(plan.device),
        precision=config.precision, resumed_at_shard=resumed_at, images=done.images,
        failures=done.failed, shards_written=done.shards_written,
        bytes_written=done.bytes_written, images_per_s=round(rate, 3), loop_wall=list(done.wall),
        options={k: (str(v) if isinstance(v, (Path, nn.Module)) else v)
                 for k, v in config.__dict__.items() if k != "model_kwargs"},
        model_kwargs=dict(config.model_kwargs),
        shards=[s.file for s in done.state.shards],
    )
    run.finish()

    index: dict[str, Any] | None = None
    if all(_part_done(out, p, parts, digest) for p in range(parts)):
        with store.folder_lock(out):  # parts that finish together write it one after another
            index = store.build_index([out], require_complete=True)
            _write_union([out], index)
    _summary(console, tag, out, plan, done, resumed_at, index)
    _no_rows(console, tag, out, done.state, index)
    return DumpResult(
        out=out, part=part, parts=parts, layers=plan.layers, inputs=span[1] - span[0],
        images=done.images, failures=done.failed, shards_written=done.shards_written,
        bytes_written=done.bytes_written, seconds=done.seconds, images_per_s=rate,
        resumed_at=resumed_at, part_complete=done.state.complete, complete=index is not None,
    )


def _no_rows(console: Console, tag: str, out: Path, state: PartState,
             index: Mapping[str, Any] | None) -> None:
    """A finished dump without a single row is an error; a part without one, a warning.

    A part of several whose inputs all failed is not an error of its own: torchrun would
    stop the other ranks for it, and the union may still hold rows. The part that finishes
    the dump raises when the union is empty.

    Raises:
        ImageError: the dump is complete and every input failed.
    """
    if index is not None:
        if index["rows"] == 0 and index["failures"]:
            raise ImageError(
                f"none of the {len(index['failures'])} inputs could be read "
                f"(first: {index['failures'][0]['reason']})",
                hint=f"the reasons are listed in {out / 'index.json'}; fix the inputs, then run "
                "again with --overwrite",
            )
        return
    if state.complete and state.failures and not any(s.rows for s in state.shards):
        console.print(
            f"{tag}[yellow]warning[/]: none of the {len(state.failures)} inputs of this part "
            f"could be read (first: {escape(state.failures[0].reason)}); the other parts go on"
        )


def _summary(console: Console, tag: str, out: Path, plan: _Plan, done: _LoopResult,
             resumed_at: int, index: Mapping[str, Any] | None) -> None:
    """The final line: images, failures, bytes written, throughput."""
    state = done.state
    if resumed_at == state.n_shards:
        rows = f" ({index['rows']} rows, index.json)" if index is not None else ""
        console.print(f"{tag}nothing to do: {escape(str(out))} already holds every shard of this part{rows}")
        return
    complete = index is not None
    rate = done.images / done.seconds if done.seconds > 0 else 0.0
    where = "index.json" if complete else f"parts/{store.part_tag(state.part, state.parts)}/progress.json"
    listed = f" (listed in {where})" if done.failed else ""
    total = f"; the dump holds {index['rows']} rows" if index is not None and resumed_at else ""
    later = "" if complete or plan.parts == 1 else " (index.json follows when every part is done)"
    console.print(
        f"{tag}dumped {done.images} images, {done.failed} failed{listed}; "
        f"{_count(len(plan.layers), 'layer')}, {_human(done.bytes_written)} in "
        f"{_count(done.shards_written, 'shard')}; {rate:.1f} images/s -> [bold]{escape(str(out))}[/]"
        f"{total}{later}"
    )


def merge_dump(
    dirs: Sequence[str | os.PathLike[str]], console: Console | None = None, verify: bool = False
) -> Path:
    """Write the union `index.json` (and `manifest.json`) of a dump's parts into dirs[0].

    Args:
        dirs: the dump folder, then folders holding more of its parts (if they were written
            elsewhere); shard paths in the index are relative to dirs[0].
        verify: check every shard's size and sha256 against its progress record.

    Returns:
        The index path.

    Raises:
        ConfigError: not a dump, or folders of different dumps.
        OutputError: parts missing or incomplete; a shard missing or damaged (with verify).
    """
    console = console or Console(quiet=True)
    roots = [Path(os.path.expanduser(os.fspath(d))) for d in dirs]
    index = store.build_index(roots, require_complete=True)
    if verify:
        bad: list[str] = []
        with Progress(
            TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=True,
        ) as bar:
            task = bar.add_task("verify", total=len(index["shards"]))
            for s in index["shards"]:
                problem = store.check_shard(roots[0], s)
                if problem is not None:
                    bad.append(f"{s['file']} ({problem})")
                bar.advance(task)
        if bad:
            raise StoreError(
                f"{len(bad)} damaged shard(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}",
                hint="delete the part's progress.json entries or rerun that part into a new --out",
            )
    with store.folder_lock(roots[0]):
        _write_union(roots, index)
    console.print(
        f"index.json: {index['rows']} rows from {len(index['shards'])} shards of "
        f"{_count(index['manifest']['identity']['parts'], 'part')}, "
        f"{_count(len(index['failures']), 'failure')}"
        f"{', every shard verified' if verify else ''} -> [bold]{escape(str(roots[0]))}[/]"
    )
    return roots[0] / "index.json"
