"""Record what every selected layer of a model produced, exactly, every time it ran.

`capture(model, layers=...)` is a context manager that registers forward hooks on the selected
modules and always removes them again (also when the forward raises), restoring each module's
`training` flag and each parameter's `requires_grad`. Inside it, every forward of `model`
appends one `LayerRecord` per call of each selected module, in execution order:

    with capture(model, layers="stages") as rec:
        model(x)
    rec.records  # [LayerRecord(name="features.3", ...), ...]

Which modules a selection means (`all`, `blocks`, `stages`, names, globs, regexes) is decided
in `fgscope.selection`, before anything runs; its names are re-exported here.

Correctness guarantees, each covered by tests:
- a module called twice in one forward gives two records, `relu` and `relu:2`;
- a record holds the value at the moment the module produced it. Later in-place operations
  (`ReLU(inplace=True)`, `out += identity`, `x[...] = v`) do not change it: while recording,
  a `TorchFunctionMode` watches in-place operations and copies a recorded tensor just before
  anything writes into its storage (copy-on-write), so unmodified records cost no copy. CUDA
  records bound for the CPU are copied when produced (pinned memory, non-blocking, stream
  ordered), so they need no watching;
- tuple, list, dict and namedtuple outputs are recorded element by element (`name[0]`,
  `name[out]`, `name[field]`);
- with `on_record=`, records are streamed to a callback as they are produced and not kept.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fgscope._inplace import CopyOnWrite, storage_key
from fgscope.selection import LayerSpec, block_modules, leaf_modules, select_layers

__all__ = [
    "LayerRecord",
    "Recorder",
    "capture",
    "first_tensor",
    # re-exported from fgscope.selection
    "select_layers",
    "leaf_modules",
    "block_modules",
    "LayerSpec",
]


@dataclass(frozen=True)
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
        tensor: the value, detached; `(N, C, H, W)` for feature maps, `(N, F)` for vectors.
    """

    name: str
    module_name: str
    module_type: str
    call: int
    key: str | None
    step: int
    index: int
    tensor: torch.Tensor

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


# --- hooks -------------------------------------------------------------------------------


def _flatten(output: Any, key: str | None = None) -> Iterator[tuple[str | None, torch.Tensor]]:
    """(key, tensor) for each tensor in a (nested) module output; other values are skipped."""
    if isinstance(output, torch.Tensor):
        yield key, output
        return

    def sub(k: object) -> str:
        return f"{key}][{k}" if key is not None else str(k)

    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        for fname in output._fields:
            yield from _flatten(getattr(output, fname), sub(fname))
    elif isinstance(output, (tuple, list)):
        for i, v in enumerate(output):
            yield from _flatten(v, sub(i))
    elif isinstance(output, dict):
        for k, v in output.items():
            yield from _flatten(v, sub(k))


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of a (nested) module output, in record order; None if there is none."""
    return next((t for _, t in _flatten(output)), None)


class _Hooks:
    """The state behind one `capture` context: call counters, pending copies, watch list."""

    def __init__(
        self,
        recorder: Recorder,
        to: str | torch.device | None,
        on_record: Callable[[LayerRecord], None] | None,
        keep_graph: bool = False,
    ) -> None:
        self.recorder = recorder
        self.to = torch.device(to) if to is not None else None
        self.on_record = on_record
        self.keep_graph = keep_graph
        self.calls: dict[str, int] = {}
        self.index = 0
        self.step = -1
        self.pending_cuda = False
        # storage data_ptr -> indices into recorder.records of records held by reference
        self.watched: dict[int, list[int]] = {}

    def start_forward(self) -> None:
        self.step += 1
        self.recorder.steps = self.step + 1
        self.calls.clear()
        self.index = 0

    def end_forward(self, output: Any) -> None:
        if self.pending_cuda:
            torch.cuda.synchronize()
            self.pending_cuda = False
        # The model's output is the caller's to modify: detach records that share its storage.
        for _, t in _flatten(output):
            self.before_write(t)

    def before_write(self, target: torch.Tensor) -> None:
        key = storage_key(target)
        if key is None or key not in self.watched:
            return
        records = self.recorder.records
        for i in self.watched.pop(key):
            records[i] = replace(records[i], tensor=records[i].tensor.clone())

    def _place(self, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The tensor to keep and whether it is still shared with the model (needs watching)."""
        t = t if self.keep_graph else t.detach()
        dest = self.to
        if dest is None or dest == t.device or (dest.type == t.device.type and dest.index is None):
            return t, True
        if t.device.type == "cuda" and dest.type == "cpu":
            # Stream-ordered copy: it reads the value before any later kernel can change it.
            if self.on_record is not None:
                return t.to("cpu"), False
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            self.pending_cuda = True
            return buf, False
        return t.to(dest), False

    def hook(self, module_name: str, module: nn.Module, output: Any) -> None:
        call = self.calls.get(module_name, 0) + 1
        self.calls[module_name] = call
        label = module_name or "output"  # the model itself (a leaf-only or TorchScript model)
        base = label if call == 1 else f"{label}:{call}"
        for key, t in _flatten(output):
            tensor, shared = self._place(t)
            rec = LayerRecord(
                name=base if key is None else f"{base}[{key}]",
                module_name=module_name,
                module_type=type(module).__name__,
                call=call,
                key=key,
                step=max(self.step, 0),
                index=self.index,
                tensor=tensor,
            )
            self.index += 1
            if self.on_record is not None:
                # Streaming: the callback sees the value now; it must copy what it keeps.
                self.on_record(rec)
                continue
            self.recorder.records.append(rec)
            if shared:
                key_ = storage_key(tensor)
                if key_ is not None:
                    self.watched.setdefault(key_, []).append(len(self.recorder.records) - 1)


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: LayerSpec = "all",
    *,
    to: str | torch.device | None = "cpu",
    on_record: Callable[[LayerRecord], None] | None = None,
    grad: bool = False,
    eval_mode: bool = True,
    example_input: torch.Tensor | None = None,
) -> Iterator[Recorder]:
    """Record the outputs of the selected modules for every forward inside the context.

    Args:
        model: any `nn.Module`; it is not changed (hooks removed, `training` and
            `requires_grad` restored on exit, also when the body raises).
        layers: which modules to record (`LayerSpec`, see `fgscope.selection`); resolved
            before anything runs.
        to: where kept records live: `"cpu"` (default), a device, or None to leave them on
            the device that produced them.
        on_record: stream each record to this callback instead of keeping it. The tensor is
            exact at the moment of the call; the callback must copy what it keeps.
        grad: run with autograd and keep records attached to the graph (for Grad-CAM:
            `torch.autograd.grad(score, record.tensor)`); by default the body runs under
            `torch.inference_mode()` and records are detached.
        eval_mode: put the model in eval mode for the duration (restored on exit).
        example_input: needed only for `layers="stages"`.

    Yields:
        A `Recorder` whose `records` fill as the model runs.

    Raises:
        LayerNotFoundError: before any forward, when a layer name matches nothing.
    """
    selected = select_layers(model, layers, example_input)
    recorder = Recorder(modules=selected)
    state = _Hooks(recorder, to, on_record, keep_graph=grad)
    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        handles.append(model.register_forward_pre_hook(lambda m, a: state.start_forward()))
        for name, module in selected.items():
            handles.append(
                module.register_forward_hook(
                    lambda m, a, out, _name=name: state.hook(_name, m, out)
                )
            )
        # Registered last so that it runs after a hook on the model itself.
        handles.append(model.register_forward_hook(lambda m, a, out: state.end_forward(out)))
        if eval_mode:
            model.eval()
        with contextlib.ExitStack() as stack:
            if not grad:
                stack.enter_context(torch.inference_mode())
            if on_record is None:
                stack.enter_context(CopyOnWrite(state))
            yield recorder
        if state.pending_cuda:
            torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires_grad.items():
            if p.requires_grad != flag:
                p.requires_grad_(flag)


class _CallableModule(types.ModuleType):
    """`fgscope.capture` is both this module and the context manager: once the submodule is
    imported, Python binds the package attribute `fgscope.capture` to the module, so the
    module forwards calls to `capture()` and `fgscope.capture(model)` always works."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
