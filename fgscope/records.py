"""What `fgscope.capture` collects: one `LayerRecord` per call of a selected module (or
element of its output), gathered in a `Recorder`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LayerRecord", "Recorder"]


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """One call of one selected module, and (one element of) what it returned.

    Attributes:
        name: unique name within one forward: `module_name`, `:k` for the k-th call (k >= 2),
            `[key]` per element of a tuple/list/dict/namedtuple output, e.g. `layer1.0.relu:2`.
        module_name: qualified name of the module in the model (`""` for the model itself).
        module_type: class name of the module, e.g. `Conv2d`.
        call: 1-based index of this call of the module within the forward.
        key: element key for structured outputs (`"0"`, `"out"`), None for a plain tensor.
        step: 0-based index of the forward pass of the model within this capture (a batch).
        index: 0-based position of this record in execution order within its forward.
        tensor: the value, detached; `(N, C, H, W)` for feature maps, `(N, F)` for vectors
            (channels-last and token layouts as produced: see `fgscope.layouts`).
        op: for a functional operation (`fgscope.functional`), its name (`add`, `relu`,
            `cat`); None for a module's output. `module_name` is then the module it ran in
            and `module_type` the operation (`add()`).
    """

    name: str
    module_name: str
    module_type: str
    call: int
    key: str | None
    step: int
    index: int
    tensor: torch.Tensor
    op: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape without the batch dimension."""
        return tuple(self.tensor.shape[1:])


@dataclass
class Recorder:
    """What a `capture` collected. `records` grows with every forward inside the context."""

    modules: dict[str, nn.Module]
    records: list[LayerRecord] = field(default_factory=list)
    steps: int = 0

    def names(self) -> list[str]:
        """Record names of the first forward, in execution order."""
        return [r.name for r in self.records if r.step == 0]

    def by_name(self) -> dict[str, list[LayerRecord]]:
        """All records per name, one per forward (batch)."""
        out: dict[str, list[LayerRecord]] = {}
        for r in self.records:
            out.setdefault(r.name, []).append(r)
        return out

    def stacked(self) -> dict[str, torch.Tensor]:
        """One tensor per record name, batches concatenated along dim 0."""
        return {
            name: recs[0].tensor if len(recs) == 1 else torch.cat([r.tensor for r in recs])
            for name, recs in self.by_name().items()
        }

    def clear(self) -> None:
        self.records.clear()
