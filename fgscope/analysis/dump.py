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
hashed into `dump.json`; another command against the folder is refused. Batch size, workers
and device may change between runs: they change values only by float rounding.

Scale-out: the inputs are split into `parts` contiguous blocks (`--shard i/N`, or RANK and
WORLD_SIZE under torchrun; both together give part `i * WORLD_SIZE + RANK` of
`N * WORLD_SIZE`). Each part writes only its own files, so no process group is needed; the
part that completes last writes the union `index.json` (or `fgscope dump-merge`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn

# The code lives in two more modules, re-exported here as the public API:
#   dump_plan  options (parse_hw, parse_shard, resolve_part), stored layers, identity, --out
#   dump_loop  the streaming loop: shard buffers, the forward, the writer thread
from .. import store
from ..device import resolve_dtype
from ..errors import ConfigError, OutputError
from ..runs import RunDir, write_json
from ..store import PartState, StoredLayer
from .dump_loop import _loop, _LoopResult
from .dump_plan import _make_plan, _Plan, _prepare_out, parse_hw, parse_shard, resolve_part
from .dump_plan import _transform as _transform  # read by tests/test_dump.py

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

POOLS = ("none", "avg", "max", "bilinear")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DumpConfig:
    """Options of one `fgscope dump` run (see the command's help for each).

    Attributes:
        model: a model spec for `fgscope.load_model`, or a module.
        inputs: a folder (ImageFolder layout gives labels), globs, files, or a `.txt` list.
        layers: layer selection (`stages`, `blocks`, names, globs, `re:`).
        pool: none (raw maps), avg, max or bilinear (B-CNN: outer products summed over
            locations, signed square root, L2 normalisation).
        resize_to: (H, W): reduce raw maps (pool none) to at most this size with adaptive
            average pooling (never upsampled).
        dtype: storage dtype.
        precision: compute dtype (float16/bfloat16 run the forward under autocast).
        out: the dump folder; None makes a new one under fgscope-out/.
        overwrite: replace an existing dump in `out` instead of continuing or refusing it.
        batch_size: images per forward.
        workers: decoding processes (0: decode in this process).
        shard: (i, N): process only part i of N of the inputs.
        shard_mb: target shard size in MiB (sets the rows per shard).
        shard_rows: rows (inputs) per shard, overriding `shard_mb`.
        device: auto, cpu, cuda, cuda:N or mps (under torchrun, auto = cuda:LOCAL_RANK).
        model_kwargs: extra arguments for `load_model` (weights, arch, trust, size, ...).
        seed: seed for random-init weights, so that every rank and run builds the same model.
    """

    model: str | nn.Module = "mobilenet_v2"
    inputs: tuple[str, ...] = ()
    layers: str = "stages"
    pool: str = "avg"
    resize_to: tuple[int, int] | None = None
    dtype: str = "float32"
    precision: str = "float32"
    out: Path | None = None
    overwrite: bool = False
    batch_size: int = 32
    workers: int = 2
    shard: tuple[int, int] | None = None
    shard_mb: float = 128.0
    shard_rows: int | None = None
    device: str = "auto"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def check(self) -> None:
        """Raises ConfigError for malformed or contradictory options."""
        if self.pool not in POOLS:
            raise ConfigError(f"--pool {self.pool!r} is not one of {', '.join(POOLS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        resolve_dtype(self.precision)
        if self.resize_to is not None and self.pool != "none":
            raise ConfigError(
                f"--resize-to applies to raw maps, but --pool is {self.pool}",
                hint="use --pool none with --resize-to",
            )
        if self.resize_to is not None and min(self.resize_to) < 1:
            raise ConfigError(f"--resize-to must be positive, got {self.resize_to}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if not self.shard_mb > 0:
            raise ConfigError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.shard is not None:
            i, n = self.shard
            if n < 1 or not 0 <= i < n:
                raise ConfigError(f"--shard {i}/{n}: need 0 <= i < N", hint="e.g. --shard 0/4")


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

    from .. import __version__

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
            different dump in `out`; OutputError when a shard cannot be written (completed
            shards stay valid and the same command continues after them).
    """
    console = console or Console(quiet=True)
    config.check()
    t0 = time.perf_counter()
    started_at = _dt.datetime.now().astimezone().isoformat()
    plan = _make_plan(config)
    part, parts, digest = plan.part, plan.parts, plan.digest
    out = _prepare_out(config, parts, plan.identity, digest)
    if store.read_identity(out) is None:
        src = plan.lm.source
        store.write_inputs(out, plan.inputs_doc)
        store.write_identity(out, plan.identity, plan.layers, {
            "model": {"spec": src.spec, "path": src.path, "sha256": src.sha256,
                      "notes": list(src.notes)},
            "versions": _versions(),
        })
    run = RunDir(out / "parts" / store.part_tag(part, parts), "dump",
                 manifest={"started_at": started_at}, started=t0)
    run.time("setup", time.perf_counter() - t0)

    span = store.split_inputs(len(plan.inputs), part, parts)
    rows_per_shard = plan.identity["rows_per_shard"]
    state = store.load_part(out, PartState(part, parts, span, rows_per_shard), digest)
    resumed_at = len(state.shards)
    if resumed_at == 0:
        store.write_progress(out, state, digest)
    tag = f"part {part + 1}/{parts}: " if parts > 1 else ""
    if resumed_at and not state.complete:
        console.print(
            f"{tag}continuing {out}: {resumed_at} of {state.n_shards} shards already complete"
        )
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

    complete = all(_part_done(out, p, parts, digest) for p in range(parts))
    if complete:
        _write_union([out], store.build_index([out], require_complete=True))
    _summary(console, tag, out, plan, done, resumed_at, complete, rate)
    result = DumpResult(
        out=out, part=part, parts=parts, layers=plan.layers, inputs=span[1] - span[0],
        images=done.images, failures=done.failed, shards_written=done.shards_written,
        bytes_written=done.bytes_written, seconds=done.seconds, images_per_s=rate,
        resumed_at=resumed_at, part_complete=done.state.complete, complete=complete,
    )
    return out, result


def _summary(console: Console, tag: str, out: Path, plan: _Plan, done: _LoopResult,
             resumed_at: int, complete: bool, rate: float) -> None:
    """The final line: images, failures, bytes written, throughput."""
    state = done.state
    if resumed_at == state.n_shards:
        rows = f" ({len(store.open(out))} rows, index.json)" if complete else ""
        console.print(f"{tag}nothing to do: {out} already holds every shard of this part{rows}")
        return
    where = "index.json" if complete else f"parts/{store.part_tag(state.part, state.parts)}/progress.json"
    listed = f" (listed in {where})" if done.failed else ""
    total = f"; the dump holds {len(store.open(out))} rows" if complete and resumed_at else ""
    later = "" if complete or plan.parts == 1 else " (index.json follows when every part is done)"
    console.print(
        f"{tag}dumped {done.images} images, {done.failed} failed{listed}; "
        f"{_count(len(plan.layers), 'layer')}, {_human(done.bytes_written)} in "
        f"{_count(done.shards_written, 'shard')}; {rate:.1f} images/s -> [bold]{out}[/]"
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
                digest = hashlib.sha256()
                try:
                    with (roots[0] / s["file"]).open("rb") as fh:
                        while chunk := fh.read(1 << 22):
                            digest.update(chunk)
                    if digest.hexdigest() != s["sha256"]:
                        bad.append(f"{s['file']} (sha256 differs)")
                except OSError as exc:
                    bad.append(f"{s['file']} ({exc.strerror or exc})")
                bar.advance(task)
        if bad:
            raise OutputError(
                f"{len(bad)} damaged shard(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}",
                hint="delete the part's progress.json entries or rerun that part into a new --out",
            )
    _write_union(roots, index)
    console.print(
        f"index.json: {index['rows']} rows from {len(index['shards'])} shards of "
        f"{_count(index['manifest']['identity']['parts'], 'part')}, "
        f"{_count(len(index['failures']), 'failure')}"
        f"{', every shard verified' if verify else ''} -> [bold]{roots[0]}[/]"
    )
    return roots[0] / "index.json"
