"""Running one part of a dump: its `--out` folder, and the streaming loop.

The folder: made (or refused when it holds other files), checked against the dump it holds
(`_claim_out`: the same identity, or replaced with --overwrite) and, on a resume, against
the input files (`_check_inputs`: a file changed since its shard was computed refuses the
run, so old and new data are never mixed).

The loop: `_loop` runs the shards of a part that are not done yet: a DataLoader decodes in
worker processes (fingerprinting each file as it reads it), `capture(on_record=)` hands each
layer's output to `_ShardBuffers`, which pools, resizes and casts it straight into the
current shard's buffers, and a `ShardWriter` thread writes each full shard with its input
record. Used by `fgscope.dump.run.run_dump`; nothing here is public.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import nn
from torch.utils.data import DataLoader

from fgscope import store
from fgscope.capture import LayerRecord, capture
from fgscope.data import Batch, ImageDataset, Sample, collate, shard_batches
from fgscope.device import autocast, resolve_dtype, to_device
from fgscope.dump.plan import DumpConfig, _Plan, _transform
from fgscope.errors import ConfigError, OutputError
from fgscope.forward import forward
from fgscope.runs import new_run_dir
from fgscope.store import Failure, FileFingerprint, PartState, PendingShard, StoredLayer
from fgscope.store.format import CHANGED_WHILE_READ, same_stat

__all__: list[str] = []  # internal to run_dump

_MAX_FAILURE_LINES = 10
_AGAIN = "choose another --out, or delete {out} (or pass --overwrite) to dump again"


# --- the --out folder ----------------------------------------------------------------------


def _out_dir(config: DumpConfig, parts: int) -> Path:
    """The dump folder, created: new, empty, or holding a dump (checked under its lock).

    Raises:
        ConfigError: several parts were asked for without --out.
        OutputError: the folder holds files that are not a dump, or cannot be created.
    """
    if config.out is None:
        if parts > 1:
            raise ConfigError(
                "several parts need one shared --out folder",
                hint="pass --out DIR (the same for every rank and --shard)",
            )
        return new_run_dir(None, "dump")
    out = Path(os.path.expanduser(os.fspath(config.out)))
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder", hint="choose another --out")
    if out.is_dir() and store.read_identity(out) is None:
        foreign = sorted(  # hidden files (lock files included) are not counted
            p.name for p in out.iterdir()
            if not p.name.startswith(".") and p.name not in store.DUMP_FILES
        )
        if foreign:
            raise OutputError(
                f"--out {out} holds files that are not an fgscope dump "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})",
                hint="choose a new or empty --out",
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out


def _inputs_change(out: Path, new: Mapping[str, Any]) -> str:
    """`x.png was added`: the first difference between the input list of the dump in `out`
    and this command's."""
    try:
        old = store.read_inputs(out)
    except OutputError:
        return "inputs.json is unreadable"
    old_paths, new_paths = list(old.get("paths") or ()), list(new["paths"])
    old_set, new_set = set(old_paths), set(new_paths)
    if (added := next((p for p in new_paths if p not in old_set), None)) is not None:
        return f"{added} was added"
    if (gone := next((p for p in old_paths if p not in new_set), None)) is not None:
        return f"{gone} was removed"
    if old_paths != new_paths:
        i = next((i for i, (a, b) in enumerate(zip(old_paths, new_paths)) if a != b),
                 min(len(old_paths), len(new_paths)))
        return f"the order or repeats of the inputs differ from input {i}"
    return "the labels or class names differ"


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], out: Path,
                         inputs_doc: Mapping[str, Any]) -> str:
    """`pool avg -> max, layers` : what differs between two identities, in a few words."""
    parts: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "inputs":
            parts.append(f"inputs: {_inputs_change(out, inputs_doc)}")
        elif key == "model":
            subs = [k for k in sorted(set(a or {}) | set(b or {})) if (a or {}).get(k) != (b or {}).get(k)]
            parts.append("model " + "/".join(subs))
        elif isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            parts.append(key)
        else:
            parts.append(f"{key} {a} -> {b}")
    return ", ".join(parts) or "format"


def _claim_out(out: Path, config: DumpConfig, plan: _Plan, own: store.DumpLock) -> bool:
    """Check the dump in `out` against this command (call it under `store.folder_lock`).

    Returns:
        True when `out` holds no dump (any more): the caller writes dump.json and inputs.json.

    Raises:
        ConfigError: `out` holds a different dump (without --overwrite), or --overwrite with
            several parts.
        OutputError: --overwrite while another process writes a part of that dump.
    """
    desc = store.read_identity(out)
    if desc is not None and (config.overwrite or desc["hash"] != plan.digest):
        if not config.overwrite:
            old = desc.get("identity", {})
            if {k for k in set(old) | set(plan.identity) if old.get(k) != plan.identity.get(k)} == {"inputs"}:
                raise ConfigError(
                    f"--out {out} holds a dump of other inputs ({_inputs_change(out, plan.inputs_doc)} "
                    "since it was started), so it cannot be continued without mixing old and new data",
                    hint=_AGAIN.format(out=out),
                )
            what = _describe_difference(old, plan.identity, out, plan.inputs_doc)
            raise ConfigError(
                f"--out {out} holds a dump made by a different command (differs in: {what}), "
                "so it cannot be continued",
                hint="choose a new --out, or pass --overwrite to replace that dump",
            )
        if plan.parts > 1:
            raise ConfigError(
                "--overwrite cannot be used with several parts (ranks would delete each "
                "other's shards)",
                hint=f"delete {out} first, then start all parts",
            )
        for other in store.other_part_locks(out, own):
            other.acquire().release()  # refused while another process writes a part
        store.remove_dump(out)
        desc = None
    try:
        (out / "shards").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out / 'shards'}: {exc.strerror or exc}") from None
    return desc is None


def _check_inputs(out: Path, state: PartState, plan: _Plan) -> None:
    """Refuse a resume whose completed shards were computed from files that changed since.

    Raises:
        ConfigError: names the first such file and what happened to it.
    """
    change = store.find_input_change(out, state, plan.inputs.paths, plan.digest)
    if change is not None:
        raise ConfigError(
            f"--out {out} holds a dump of other image contents: {change.path} {change.what} "
            f"since shard {change.shard} was computed from it, so it cannot be continued "
            "without mixing old and new data",
            hint=_AGAIN.format(out=out),
        )


# --- reading the inputs --------------------------------------------------------------------


class _FingerprintingDataset(ImageDataset):
    """An `ImageDataset` whose items also carry each file's fingerprint (stat and sha256),
    taken in the worker as the file is read: a resume compares the files with it."""

    def __getitem__(self, index: int) -> tuple[Sample, FileFingerprint | None]:  # type: ignore[override]
        path = self.paths[index]
        fp = store.file_fingerprint(path)
        sample = super().__getitem__(index)  # reads the file again, from the page cache
        if fp is not None and not same_stat(fp, path):
            fp = CHANGED_WHILE_READ  # replaced between the hash and the decode
        return sample, fp


@dataclass(frozen=True)
class _Fingerprinted:
    """A collated batch and the fingerprint of every input of its span, in order."""

    batch: Batch
    files: tuple[FileFingerprint | None, ...]

    def pin_memory(self) -> _Fingerprinted:  # called by the DataLoader's pinning thread
        return _Fingerprinted(self.batch.pin_memory(), self.files)


def _collate(items: Sequence[tuple[Sample, FileFingerprint | None]]) -> _Fingerprinted:
    return _Fingerprinted(collate([s for s, _ in items]), tuple(f for _, f in items))


def _make_loader(dataset: ImageDataset, batches: Sequence[Sequence[int]], *, workers: int,
                 pin_memory: bool) -> DataLoader:
    """`data.make_loader` with `_collate` (which keeps the fingerprints)."""
    extra = {"prefetch_factor": 2, "persistent_workers": False} if workers > 0 else {}
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                      pin_memory=pin_memory, **extra)


# --- the run -------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """images/s, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} img/s" if speed else "– img/s", style="progress.data.speed")


class _ShardBuffers:
    """The shard being filled: one preallocated tensor per layer; batches append rows.

    Records are pooled/resized on the device that produced them and copied (cast to the
    storage dtype) straight into the buffer in the capture callback, so nothing else of a
    record is kept. On CUDA the buffers are pinned and the copies non-blocking.
    """

    def __init__(
        self, layers: Sequence[StoredLayer], paths: Sequence[str], device: torch.device,
        mixed: bool,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.mixed = mixed
        self.layers = {layer.name: layer for layer in layers}
        self.transforms = {layer.name: _transform(layer) for layer in layers}
        self.dtypes = {layer.name: resolve_dtype(layer.dtype) for layer in layers}
        self.paths = paths
        self.shard: int | None = None
        self.span = (0, 0)
        self.tensors: dict[str, torch.Tensor] = {}
        self.rows = 0
        self.batch = 0
        self.index: list[torch.Tensor] = []
        self.failures: list[Failure] = []
        self.files: list[FileFingerprint | None] = []
        self.seen: set[str] = set()

    def start(self, shard: int, span: tuple[int, int]) -> None:
        size = span[1] - span[0]
        self.shard, self.span, self.rows = shard, span, 0
        self.tensors = {
            name: torch.empty((size, *layer.shape), dtype=self.dtypes[name], pin_memory=self.cuda)
            for name, layer in self.layers.items()
        }
        self.index, self.failures, self.files = [], [], []

    def on_record(self, rec: LayerRecord) -> None:
        layer = self.layers.get(rec.name)
        if layer is None:
            return
        if self.mixed:  # pool in float32 even inside the forward's autocast
            with torch.autocast(rec.tensor.device.type, enabled=False):
                x = self.transforms[rec.name](rec.tensor)
        else:
            x = self.transforms[rec.name](rec.tensor)
        dst = self.tensors[rec.name][self.rows : self.rows + self.batch]
        if tuple(x.shape) != tuple(dst.shape):
            raise ConfigError(
                f"layer {rec.name} gave shape {tuple(x.shape)[1:]} where {layer.shape} was "
                "expected; its output size must not depend on the image",
            )
        dst.copy_(x, non_blocking=self.cuda)
        self.seen.add(rec.name)

    def forward(self, module: nn.Module, images: torch.Tensor, indices: torch.Tensor,
                dev: torch.device, precision: torch.dtype) -> None:
        self.batch, self.seen = len(indices), set()
        with autocast(dev, precision):
            forward(module, to_device(images, dev))
        missing = [n for n in self.layers if n not in self.seen]
        if missing:
            first = self.paths[int(indices[0])]
            raise ConfigError(
                f"layer {missing[0]} did not run for the batch starting at {first}",
                hint="dump layers that run for every input",
            )
        self.index.append(indices)
        self.rows += self.batch

    def finish(self) -> PendingShard:
        assert self.shard is not None
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the non-blocking copies have landed
        pending = PendingShard(
            shard=self.shard,
            inputs=self.span,
            tensors={n: t[: self.rows] for n, t in self.tensors.items()},
            input_index=torch.cat(self.index) if self.index else torch.empty(0, dtype=torch.int64),
            failures=tuple(self.failures),
            files=tuple(self.files),
        )
        assert len(self.files) == self.span[1] - self.span[0], "one fingerprint per input"
        self.shard, self.tensors = None, {}
        return pending


@dataclass(frozen=True)
class _LoopResult:
    state: PartState
    images: int
    failed: int
    shards_written: int
    bytes_written: int
    seconds: float
    wall: tuple[float, float]


def _loop(plan: _Plan, config: DumpConfig, out: Path, state: PartState, console: Console,
          tag: str) -> _LoopResult:
    """Decode, forward, pool into shard buffers and write, for the shards not done yet."""
    ranges = [state.shard_range(k) for k in range(len(state.shards), state.n_shards)]
    batches = shard_batches(ranges, config.batch_size)
    dataset = _FingerprintingDataset(plan.inputs.paths, plan.lm.preprocess, plan.inputs.labels)
    loader = _make_loader(dataset, batches, workers=min(config.workers, len(batches)),
                          pin_memory=plan.device.type == "cuda")
    buffers = _ShardBuffers(plan.layers, plan.inputs.paths, plan.device,
                            plan.precision != torch.float32)
    wall_start, t0 = time.time(), time.perf_counter()
    # Start the decoding processes (fork) before any thread of ours exists.
    batch_iter = iter(loader)
    writer = store.ShardWriter(out, state, plan.digest)
    images = failed = 0
    span = state.inputs
    try:
        with Progress(
            TextColumn(f"{tag}dump"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeRemainingColumn(), console=console, transient=True,
            disable=plan.local_rank not in (None, 0),
        ) as bar, capture(plan.module, config.layers, to=None, on_record=buffers.on_record,
                          example_input=plan.example):
            task = bar.add_task("dump", total=span[1] - span[0], completed=state.done_inputs)
            for item in batch_iter:
                batch = item.batch
                if buffers.shard is None:
                    k = (batch.span[0] - span[0]) // state.rows_per_shard
                    buffers.start(k, state.shard_range(k))
                for i, reason in batch.failures:
                    buffers.failures.append(Failure(i, plan.inputs.paths[i], reason))
                    if failed < _MAX_FAILURE_LINES:
                        console.print(f"[yellow]skipped[/] {escape(reason)}")
                    failed += 1
                buffers.files.extend(item.files)
                if batch.images is not None:
                    buffers.forward(plan.module, batch.images, batch.indices, plan.device,
                                    plan.precision)
                    images += len(batch)
                bar.advance(task, batch.span[1] - batch.span[0])
                if batch.span[1] == buffers.span[1]:
                    writer.submit(buffers.finish())
        state = writer.close()
    except BaseException:
        writer.close(abort=True)
        raise
    assert state.complete, "every shard of the part was submitted"
    return _LoopResult(state, images, failed, writer.shards_written, writer.bytes_written,
                       time.perf_counter() - t0, (wall_start, time.time()))

