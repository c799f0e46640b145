"""Functional operations as records, named the way `torchvision.models.feature_extraction`
names them: `relu_1`, `add`, `layer1.0.add`, `cat`, `flatten`, `features.3.getitem_2`.

Hooks see modules only: `F.relu` after a convolution, `x + y`, `torch.cat` and functional
pooling are invisible to them. `fgscope.capture` records them too when a selection names
them (or asks for all of them with `ops`), by value at the moment they were produced, like
module records.

Names: the model is traced with torch.fx exactly as `get_graph_node_names` traces it
(torchvision's `NodePathTracer`, its leaf modules and autowrapped functions), and the traced
graph is run once on the example input while a `TorchFunctionMode` notes which torch
operation produced each node's value. During the real (eager) forward the same mode sees the
same operations in the same module scopes, in the same order, and gives each its FX name.
Where torch.fx cannot trace a model (data-dependent control flow), names are made the same
way from the eager forward itself (`{module}.{op}`, `_1`, `_2` for repeats in one module).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fgscope.tracer import SKIP, tensors_in

__all__ = ["OpNames", "op_names", "OpScope", "fx_base", "is_leaf"]


def fx_base(name: str) -> str:
    """The FX spelling of an eager operation, as the key that matches it to its node:
    `__add__`, `__iadd__` and `add_` -> `add` (torch.fx traces `x += y` as `add`, and eager
    `x += y` arrives as `add_`), `__getitem__` -> `getitem`."""
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core[:1] in ("i", "r") and core[1:] in _ARITH:
            return core[1:]
        return core
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1]
    return name


_ARITH = frozenset("add sub mul matmul truediv floordiv mod pow and or xor lshift rshift".split())


def _op_leaf_types() -> tuple[type, ...]:
    import torchvision

    return tuple(
        obj for _, obj in inspect.getmembers(torchvision.ops)
        if inspect.isclass(obj) and issubclass(obj, nn.Module)
    )


def is_leaf(m: nn.Module) -> bool:
    """A module torch.fx (with torchvision's settings) does not trace into."""
    if isinstance(m, torch.jit.ScriptModule):
        return True
    if isinstance(m, _op_leaf_types()):
        return True
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(m, nn.Sequential)


@dataclass
class OpNames:
    """The functional operations of a model, by FX name.

    Attributes:
        ops: FX name -> (scope, op, occurrence, element): the `occurrence`-th operation `op`
            (FX spelling) run directly in module `scope` (not inside a leaf module), and the
            element of its output (None: the output itself; k: `out[k]` of a tuple).
        modules: FX name of a module call -> (module name, call number) (`relu_1` -> 2nd
            call of `relu`).
        order: every name in execution order.
        traced: True when torch.fx traced the model (names are FX's own); False when they
            were made from the eager forward.
        nodes: every FX node name (empty when not traced).
        aligned: False when there was no example input to find the operations in a forward
            (then `ops` is empty and only `nodes` and `modules` are known).
    """

    ops: dict[str, tuple[str, str, int, int | None]] = field(default_factory=dict)
    modules: dict[str, tuple[str, int]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    traced: bool = True
    nodes: list[str] = field(default_factory=list)
    aligned: bool = True

    def by_event(self) -> dict[tuple[str, str, int], list[tuple[str, int | None]]]:
        out: dict[tuple[str, str, int], list[tuple[str, int | None]]] = {}
        for name, (scope, op, k, element) in self.ops.items():
            out.setdefault((scope, op, k), []).append((name, element))
        return out


class OpScope(TorchFunctionMode):
    """Sees the functional operations of a forward with the module scope they run in.

    `enter(model)` hooks every module to keep the scope stack; each tensor-valued operation
    run directly in a non-leaf module calls `on_op(scope, op, occurrence, func, out)`.
    Operations are counted per (scope, op) as torch.fx names them. `paused` (a counter)
    hides the recorder's own operations.
    """

    def __init__(self, on_op: Callable[[str, str, int, Any, Any], None]) -> None:
        super().__init__()
        self.on_op = on_op
        self.stack: list[tuple[str, bool]] = []  # (module name, is leaf)
        self.counts: dict[tuple[str, str], int] = {}
        self.paused = 0
        self.inputs: set[int] = set()  # ids of tensors passed into modules (for reports)
        self.last_args: tuple = ()  # the arguments of the operation `on_op` is told about

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or (self.stack and self.stack[-1][1]):
            return out
        name = getattr(func, "__name__", "")
        if name in SKIP or not tensors_in(out):
            return out
        scope = self.stack[-1][0] if self.stack else ""
        op = fx_base(name)
        k = self.counts.get((scope, op), 0)
        self.counts[(scope, op)] = k + 1
        self.paused += 1
        self.last_args = (args, kwargs)
        try:
            self.on_op(scope, op, k, func, out)
        finally:
            self.paused -= 1
        return out

    @contextlib.contextmanager
    def hooked(self, model: nn.Module, leaves: Callable[[nn.Module], bool] = is_leaf) -> Iterator[None]:
        handles = []
        try:
            for name, m in model.named_modules():
                if isinstance(m, torch.jit.ScriptModule):
                    continue
                leaf = leaves(m)
                handles.append(m.register_forward_pre_hook(
                    lambda mod, a, _n=name, _l=leaf: self._push(_n, _l, a)))
                handles.append(m.register_forward_hook(
                    lambda mod, a, o, _n=name: self._pop(_n), always_call=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _push(self, name: str, leaf: bool, args: tuple) -> None:
        if not self.paused:
            self.inputs.update(id(t) for t in tensors_in(args))
        self.stack.append((name, leaf or bool(self.stack and self.stack[-1][1])))

    def _pop(self, name: str) -> None:
        while self.stack:
            if self.stack.pop()[0] == name:
                break

    def start(self) -> None:
        self.counts.clear()
        self.stack.clear()


# --- naming -----------------------------------------------------------------------------------

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def op_names(model: nn.Module, example: torch.Tensor | None) -> OpNames:
    """The FX names of `model`'s functional operations (cached per model and input shape).

    Raises:
        ValueError: the model cannot be traced with torch.fx and there is no example input
            to name the operations from an eager forward.
    """
    key = (tuple(example.shape), str(example.dtype), str(example.device)) if example is not None else None
    per = _CACHE.setdefault(model, {})
    if key in per:
        return per[key]
    names = _fx_names(model, example)
    if names is None:
        if example is None:
            raise ValueError("the model cannot be traced with torch.fx; functional operations are "
                             "named from one forward of an example input")
        names = _eager_names(model, example)
    per[key] = names
    return names


def _fx_names(model: nn.Module, example: torch.Tensor | None) -> OpNames | None:
    import torchvision
    from torch import fx
    from torchvision.models.feature_extraction import NodePathTracer

    class _Tracer(NodePathTracer):
        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
            scopes[proxy.node] = self.current_module_qualname
            return proxy

    scopes: dict[Any, str] = {}
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        tracer = _Tracer(autowrap_modules=(math, torchvision.ops), leaf_modules=list(_op_leaf_types()))
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
    except Exception:  # torch.fx refuses many models (control flow); names come from eager
        return None
    finally:
        for m, flag in training.items():
            m.training = flag
    qual = tracer.node_to_qualname
    out = OpNames()
    calls: dict[str, int] = {}
    for node, name in qual.items():
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            out.modules[name] = (str(node.target), calls[node.target])
    out.nodes = list(qual.values())
    if example is None:  # finding the operations needs one run of the graph
        out.aligned = False
        return out
    try:
        _align(gm, qual, scopes, example, out)
    except Exception:  # the graph does not run like the model: names come from eager
        return None
    return out


def _align(gm, qual: dict, scopes: dict, example: torch.Tensor, out: OpNames) -> None:
    from torch import fx

    fired: list[tuple[tuple[str, str, int], Any]] = []
    state = {"node": None}

    def on_op(scope: str, op: str, k: int, func: Any, value: Any) -> None:
        fired.append(((scope, op, k), value))

    mode = OpScope(on_op)

    class _Run(fx.Interpreter):
        def run_node(self, n):
            state["node"] = n
            if n.op == "call_module":
                mode.paused += 1
                try:
                    return super().run_node(n)
                finally:
                    mode.paused -= 1
            mode.stack[:] = [(scopes.get(n, ""), False)]
            before = len(fired)
            result = super().run_node(n)
            name = qual.get(n)
            if name is not None and n.op in ("call_function", "call_method") and _is_value(result):
                ref = _find(fired[before:], result) or _find(fired[::-1], result)
                if ref is not None:
                    out.ops[name] = ref
            return result

    training = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.inference_mode(), mode:
            _Run(gm).run(example)
    finally:
        for m, flag in training.items():
            m.training = flag
    out.order = [n for n in qual.values() if n in out.ops or n in out.modules]


def _is_value(v: Any) -> bool:
    """A tensor, or a tuple or list of tensors (`chunk`, `split`)."""
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and bool(v) and all(isinstance(t, torch.Tensor) for t in v)


def _find(events: list, value: torch.Tensor) -> tuple[str, str, int, int | None] | None:
    for (scope, op, k), v in events:
        if v is value:
            return scope, op, k, None
        if isinstance(v, (tuple, list)):
            for i, e in enumerate(v):
                if e is value:
                    return scope, op, k, i
    return None


def _eager_names(model: nn.Module, example: torch.Tensor) -> OpNames:
    out = OpNames(traced=False)
    used: dict[str, int] = {}

    def on_op(scope: str, op: str, k: int, func: Any, value: Any) -> None:
        base = f"{scope}.{op}" if scope else op
        base = re.sub(r"_[0-9]+$", "", base)
        n = used.get(base)
        used[base] = 0 if n is None else n + 1
        name = base if n is None else f"{base}_{n + 1}"
        out.ops[name] = (scope, op, k, None)
        out.order.append(name)

    from fgscope.forward import forward

    mode = OpScope(on_op)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with mode.hooked(model), torch.inference_mode(), mode:
            forward(model, example)
    finally:
        for m, flag in training.items():
            m.training = flag
    return out
