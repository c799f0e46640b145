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
  (`ReLU(inplace=True)`, `out += identity`, `x[...] = v`, writes inside TorchScript or C++
  code) do not change it: a record is a copy-on-write snapshot of the output
  (`fgscope._inplace.snapshot`), so an output nothing writes into costs no copy, and a write
  into it copies the writer's side first. In grad mode, where records stay on the autograd
  graph, a `TorchFunctionMode` watches in-place operations and copies a recorded tensor just
  before anything writes into its storage. CUDA records bound for the CPU are copied when
  produced (pinned memory, non-blocking, stream ordered), so they need no watching;
- tuple, list, dict and namedtuple outputs are recorded element by element (`name[0]`,
  `name[out]`, `name[field]`);
- every record name is also a selection that gives back exactly that record (`relu` is a
  module's first call, `relu:2` its second, `relu:*` all; `backbone[out]` one element);
- functional operations (`F.relu`, `x + y`, `torch.cat`, functional pooling) are recorded
  when selected by their torch.fx names (`fgscope.functional`), exactly like module outputs;
- copy-on-write also covers list-of-tensor in-place ops (`torch._foreach_add_`);
- with `on_record=`, records are streamed to a callback as they are produced and not kept.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fgscope._inplace import CopyOnWrite, InplaceModules, snapshot, storage_key
from fgscope.device import tune_host_allocator
from fgscope.errors import LayerNotFoundError, ModelRunError
from fgscope.functional import OpScope, op_names
from fgscope.names import RecordPlan, plan_records
from fgscope.outputs import elements, first_tensor, replace_tensors
from fgscope.records import LayerRecord, Recorder
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


# --- hooks -------------------------------------------------------------------------------


class _Hooks:
    """The state behind one `capture` context: call counters, pending copies, watch list."""

    def __init__(
        self,
        recorder: Recorder,
        to: str | torch.device | None,
        on_record: Callable[[LayerRecord], None] | None,
        keep_graph: bool = False,
        plan: RecordPlan | None = None,
    ) -> None:
        self.recorder = recorder
        self.plan = plan or RecordPlan()
        self.scope: OpScope | None = None  # the functional-operation scope, when ops are selected
        # (scope, op, occurrence) -> [(record name, output element)] of selected operations
        self.ops: dict[tuple[str, str, int], list[tuple[str, int | None]]] = {}
        self.to = torch.device(to) if to is not None else None
        self.on_record = on_record
        self.keep_graph = keep_graph
        self.calls: dict[str, int] = {}
        self.index = 0
        self.step = -1
        self.produced: dict[str, list[str]] = {}  # module -> record names of this forward
        self.pending_cuda = False
        # kept records are copy-on-write snapshots; in grad mode they are held by reference
        # and watched (storage data_ptr -> indices into recorder.records)
        self.snapshots = on_record is None and not keep_graph
        self.watched: dict[int, list[int]] = {}

    def start_forward(self) -> None:
        self.produced.clear()
        if self.scope is not None:
            self.scope.start()
        self.step += 1
        self.recorder.steps = self.step + 1
        self.calls.clear()
        self.index = 0

    def end_forward(self, output: Any) -> None:
        self._check_names()
        if self.step == 0 and self.index == 0 and (self.plan.modules or self.plan.ops):
            self._nothing_recorded()
        if self.pending_cuda:
            torch.cuda.synchronize()
            self.pending_cuda = False
        # The model's output is the caller's to modify: detach records that share its storage
        # (snapshots share none).
        if self.watched:
            for _, t in elements(output):
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
            return (snapshot(t), False) if self.snapshots else (t, True)
        if t.device.type == "cuda" and dest.type == "cpu" and not self.keep_graph:
            # Stream-ordered copy: it reads the value before any later kernel can change it.
            if self.on_record is not None:
                return t.to("cpu"), False
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            self.pending_cuda = True
            return buf, False
        return t.to(dest), False

    def hook_for(self, module_name: str, module: nn.Module) -> Callable[[nn.Module, Any, Any], Any]:
        """The forward hook of one selected module. A plain tensor output kept as a snapshot
        on its own device (what `capture(model)` does with every call on the CPU) takes a
        lean path: this runs for every module call of every forward."""
        general = self.hook
        if not self.snapshots or self.scope is not None:
            return lambda m, a, out: general(module_name, m, out)
        calls, produced, plan, recorder = self.calls, self.produced, self.plan, self.recorder
        label, kind = module_name or "output", type(module).__name__
        every = plan.modules.get(module_name) is None
        anywhere = self.to is None
        to_cpu = self.to == torch.device("cpu")

        def hook(m: nn.Module, args: Any, out: Any) -> Any:
            if type(out) is not torch.Tensor or not (anywhere or (to_cpu and out.is_cpu)):
                return general(module_name, m, out)
            call = calls.get(module_name, 0) + 1
            calls[module_name] = call
            name = label if call == 1 else f"{label}:{call}"
            produced.setdefault(module_name, []).append(name)
            if every or plan.wants(module_name, call, None):
                if out.numel() == 0:
                    self._record_module(name, module_name, m, call, None, out)  # raises
                recorder.records.append(LayerRecord(
                    name, module_name, kind, call, None, max(self.step, 0), self.index, snapshot(out)))
                self.index += 1
            return None

        return hook

    def hook(self, module_name: str, module: nn.Module, output: Any) -> Any:
        """Record the wanted elements of one module call; in grad mode, return the output
        the model goes on with (copies of the recorded tensors, see `capture(grad=True)`)."""
        call = self.calls.get(module_name, 0) + 1
        self.calls[module_name] = call
        label = module_name or "output"  # the model itself (a leaf-only or TorchScript model)
        base = label if call == 1 else f"{label}:{call}"
        if type(output) is torch.Tensor and self.scope is None and not self.keep_graph:
            # The common case, without the general path's generator and context.
            self.produced.setdefault(module_name, []).append(base)
            if self.plan.wants(module_name, call, None):
                self._record_module(base, module_name, module, call, None, output)
            return None
        handed: dict[int, torch.Tensor] = {}
        with self.own_ops():
            for key, t in elements(output):
                name = base if key is None else f"{base}[{key}]"
                self.produced.setdefault(module_name, []).append(name)
                if not self.plan.wants(module_name, call, key):
                    continue
                self._record_module(name, module_name, module, call, key, t)
                if self.keep_graph and t.requires_grad:
                    handed[id(t)] = t.clone()
            if handed:
                return replace_tensors(output, handed)
        return None

    def _record_module(self, name: str, module_name: str, module: nn.Module, call: int,
                       key: str | None, t: torch.Tensor) -> None:
        if t.numel() == 0:
            raise ModelRunError(
                f"layer {name} returned an empty tensor of shape {tuple(t.shape)} (a "
                "detector's heads when it finds no boxes); fgscope measures per-image maps",
                hint="select the backbone's layers (--layers stages, or 'backbone.**')",
            )
        self.record(name, module_name, type(module).__name__, call, key, t)

    def _nothing_recorded(self) -> None:
        """The first forward recorded nothing: the selected modules never ran, or returned no
        tensor (a detector's heads return boxes and losses)."""
        names = [n or "output" for n in self.plan.modules] + list(self.plan.ops)
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        ran = [n for n in self.plan.modules if self.produced.get(n)] or [
            n for n in self.plan.modules if self.calls.get(n)]
        what = ("returned no tensor" if ran else "did not run in the model's forward")
        raise LayerNotFoundError(
            f"nothing was recorded: the {len(names)} selected layer(s) ({shown}) {what}",
            hint="select layers the forward calls and that return tensors (run `fgscope summary "
            "MODEL --layers all`); operations written inline in forward() are `--layers ops`",
        )

    def _check_names(self) -> None:
        """A record asked for by a call or an element that this forward did not produce (an
        element key the output does not have, a third call of a module called twice)."""
        for module, names in self.plan.modules.items():
            for rn in names or ():
                if rn.key is None and rn.call in (None, 1):
                    continue
                produced = self.produced.get(module, [])
                if not any(n == str(rn) or n.startswith(str(rn) + "[") for n in produced):
                    gave = ", ".join(produced[:6]) if produced else "no output"
                    raise LayerNotFoundError(
                        f"no record named {str(rn)!r}: the forward gave {gave}",
                        hint="run `fgscope summary MODEL --layers all` to list every record name",
                    )

    def on_op(self, scope: str, op: str, k: int, func: Any, out: Any) -> None:
        """A functional operation ran (`fgscope.functional.OpScope`): record it if selected."""
        for name, element in self.ops.get((scope, op, k), ()):
            value = out[element] if element is not None else out
            for key, t in elements(value):
                self.record(name if key is None else f"{name}[{key}]", scope, f"{op}()", 1, key, t,
                            op=op)

    def own_ops(self) -> contextlib.AbstractContextManager:
        """Hide this recorder's own operations (detach, copies) from the functional scope."""
        scope = self.scope
        if scope is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def paused() -> Iterator[None]:
            scope.paused += 1
            try:
                yield
            finally:
                scope.paused -= 1

        return paused()

    def record(self, name: str, module_name: str, module_type: str, call: int, key: str | None,
               t: torch.Tensor, op: str | None = None) -> None:
        tensor, shared = self._place(t)
        rec = LayerRecord(
            name=name,
            module_name=module_name,
            module_type=module_type,
            call=call,
            key=key,
            step=max(self.step, 0),
            index=self.index,
            tensor=tensor,
            op=op,
        )
        self.index += 1
        if self.on_record is not None:
            # Streaming: the callback sees the value now; it must copy what it keeps.
            self.on_record(rec)
            return
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
        layers: what to record (`LayerSpec`, see `fgscope.selection`): modules, exact
            record names (`layer1.0.relu:2`, `backbone[out]`), torch.fx names of functional
            operations (`layer1.0.add`, `relu_1`) or `ops` for all of them; resolved before
            anything runs.
        to: where kept records live: `"cpu"` (default), a device, or None to leave them on
            the device that produced them.
        on_record: stream each record to this callback instead of keeping it. The tensor is
            exact at the moment of the call; the callback must copy what it keeps.
        grad: run with autograd and keep records attached to the graph (for Grad-CAM:
            `torch.autograd.grad(score, record.tensor)`); by default the body runs under
            `torch.inference_mode()` and records are detached. A recorded module output that
            requires grad is handed on to the model as a copy, so that what the model later
            writes in place (`ReLU(inplace=True)`, `out += x`) leaves the record exact *and*
            on the graph: the gradient is the one with respect to the value as produced.
            What stays off the graph: a record the model writes into without the module
            having made it (an `nn.Identity` output that aliases its input), and records
            copied across devices while the model runs (`to="cpu"` from CUDA is a plain
            differentiable `.to()` in grad mode).
        eval_mode: put the model in eval mode for the duration (restored on exit).
        example_input: needed for `layers="stages"` and for functional operations (they
            are found in one run of the model's torch.fx graph on it).

    Yields:
        A `Recorder` whose `records` fill as the model runs.

    Exactness without copies: a kept record shares the output's memory copy-on-write
    (`fgscope._inplace.snapshot`); what the model later writes into that memory it writes into
    a copy of its own. An in-place activation module (`nn.ReLU(inplace=True)`, `ReLU6`,
    `Hardswish`, ...) whose input is a record runs with `inplace=False` for that one call and
    the input tensor is pointed at the result (`Tensor.set_`), so the model sees exactly what
    an in-place write gives; the flag is restored after the call (and on exit, whatever
    happens). Another thread calling the same module at that moment would see the flag off.

    Speed: the first call tunes glibc's allocator as the CLI does (`device.tune_host_allocator`:
    for the whole process, freed blocks up to 1 GiB stay resident for reuse instead of going back
    to the kernel); Linux only; `FGSCOPE_TUNE_ALLOCATOR=0` keeps glibc's defaults.

    Raises:
        LayerNotFoundError: before any forward, when a layer name matches nothing.
    """
    if os.environ.get("FGSCOPE_TUNE_ALLOCATOR", "1").strip() != "0":
        tune_host_allocator()  # once per process, idempotent: the CLI's speed from the API
    modules = dict(model.named_modules())
    selected = select_layers(model, layers, example_input, modules=modules)
    plan = plan_records(selected, modules)
    recorder = Recorder(modules=selected)
    state = _Hooks(recorder, to, on_record, keep_graph=grad, plan=plan)
    if plan.ops:
        by_event = op_names(model, example_input).by_event()
        wanted = set(plan.ops)
        state.ops = {e: [(n, el) for n, el in refs if n in wanted] for e, refs in by_event.items()}
        state.scope = OpScope(state.on_op)
    training = {m: m.training for m in modules.values()}
    requires_grad = {p: p.requires_grad for m in modules.values()
                     for p in m._parameters.values() if p is not None}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    inplace = InplaceModules(modules.values() if state.snapshots else ())
    try:
        # First, so that the recording hooks see the tensor the model goes on with.
        handles.extend(inplace.register())
        handles.append(model.register_forward_pre_hook(lambda m, a: state.start_forward()))
        for name in plan.modules:
            handles.append(modules[name].register_forward_hook(state.hook_for(name, modules[name])))
        # Registered last so that it runs after a hook on the model itself.
        handles.append(model.register_forward_hook(lambda m, a, out: state.end_forward(out)))
        if eval_mode and any(training.values()):  # eval() walks and sets every module
            model.eval()
        with contextlib.ExitStack() as stack:
            if not grad:
                stack.enter_context(torch.inference_mode())
            if on_record is None and grad:
                stack.enter_context(CopyOnWrite(state))
            if state.scope is not None:
                stack.enter_context(state.scope.hooked(model))
                stack.enter_context(state.scope)
            yield recorder
        if state.pending_cuda:
            torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
        inplace.restore()
        for m, flag in training.items():
            if m.training != flag:
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
