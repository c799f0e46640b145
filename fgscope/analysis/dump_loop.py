"""The streaming loop of a dump: decode, forward, pool into shard buffers, write.

`_loop` runs the shards of a part that are not done yet: a DataLoader decodes in worker
processes, `capture(on_record=)` hands each layer's output to `_ShardBuffers`, which pools,
resizes and casts it straight into the current shard's buffers, and a `ShardWriter` thread
writes each full shard. Used by `fgscope.analysis.dump.run_dump`; nothing here is public.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
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

from .. import store
from ..capture import LayerRecord, capture
from ..data import ImageDataset, make_loader, shard_batches
from ..device import autocast, resolve_dtype, to_device
from ..errors import ConfigError
from ..store import Failure, PartState, PendingShard, StoredLayer
from .dump_plan import _Plan, _transform

if TYPE_CHECKING:  # annotations only: dump.py imports this module
    from .dump import DumpConfig

__all__: list[str] = []  # internal to run_dump

_MAX_FAILURE_LINES = 10


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
        self.seen: set[str] = set()

    def start(self, shard: int, span: tuple[int, int]) -> None:
        size = span[1] - span[0]
        self.shard, self.span, self.rows = shard, span, 0
        self.tensors = {
            name: torch.empty((size, *layer.shape), dtype=self.dtypes[name], pin_memory=self.cuda)
            for name, layer in self.layers.items()
        }
        self.index, self.failures = [], []

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
            module(to_device(images, dev))
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
        )
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
    dataset = ImageDataset(plan.inputs.paths, plan.lm.preprocess, plan.inputs.labels)
    loader = make_loader(dataset, batches, workers=min(config.workers, len(batches)),
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
            for batch in batch_iter:
                if buffers.shard is None:
                    k = (batch.span[0] - span[0]) // state.rows_per_shard
                    buffers.start(k, state.shard_range(k))
                for i, reason in batch.failures:
                    buffers.failures.append(Failure(i, plan.inputs.paths[i], reason))
                    if failed < _MAX_FAILURE_LINES:
                        console.print(f"[yellow]skipped[/] {reason}")
                    failed += 1
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

