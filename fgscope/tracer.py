"""The geometry trace: a `TorchFunctionMode` that attaches a receptive field to every tensor.

It sees every operation of one forward (modules' internals and functional calls alike) and
computes each output's `Field` (`fgscope.fields`) from its inputs' with the rule for what the
operation is: views and indexing (`fgscope.views`), sliding windows (`fgscope.kernels`),
mixing along dims (`fgscope.mixing`). Everything else that keeps the shape is taken as
elementwise: where tensors of the same shape meet (`+`, `*`, `torch.where`) the field is
the union of theirs (Araujo et al., "Handling multiple paths"); an operand broadcast over the
map (a squeeze-excitation gate) is not counted but flags `global_context`. An operation that
changes a map's shape and has no rule is taken as the union of everything, flagged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fgscope.dims import Dim, Factor, plain_dims, seed_dims, sizes
from fgscope.fields import (
    Axis,
    Field,
    has_spatial,
    lost,
    placeholder,
    same_layout,
    union,
    union_all,
)
from fgscope.kernels import RULES as KERNEL_RULES
from fgscope.kernels import unfold_rule
from fgscope.mixing import RULES as MIXING_RULES
from fgscope.views import RULES as VIEW_RULES
from fgscope.views import Call, other_dim, unfold_dim_rule

__all__ = ["Tracer", "tensors_in", "SKIP", "rule_name", "elementwise"]

_SKIP = frozenset(
    "__get__ __set__ dim size numel data_ptr __len__ stride is_contiguous element_size "
    "is_floating_point is_complex get_device item tolist __bool__ __int__ __float__ __index__ "
    "__format__ __repr__ __hash__ storage_offset untyped_storage nelement ndimension "
    "__contains__ _assert __reversed__ __array__ __deepcopy__ is_nonzero "
    "__eq__ __ne__ equal".split()
)
SKIP = _SKIP
"""Functions that only ask about a tensor (its size, its device): never an operation."""

# Results that do not depend on the values of their tensor inputs (or overwrite them).
_CONSTANT = frozenset(
    "new_zeros new_ones new_full new_empty new_tensor zeros_like ones_like empty_like full_like "
    "rand_like randn_like randint_like fill_ zero_ normal_ uniform_ random_ bernoulli_ "
    "exponential_ geometric_ cauchy_ log_normal_ ".split()
)
_ARITH = frozenset("add sub mul matmul truediv floordiv mod pow and or xor lshift rshift div".split())
RULES: dict[str, Callable[[Call], Any]] = {**VIEW_RULES, **KERNEL_RULES, **MIXING_RULES}
_MULTI_INPUT = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm",
                "einsum", "scaled_dot_product_attention", "multi_head_attention_forward",
                "cat", "concat", "concatenate", "stack"}


def rule_name(name: str) -> str:
    """`add_` / `__iadd__` / `__radd__` -> `add` (in-place and reflected forms share a rule)."""
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        for prefix in ("i", "r"):
            if core.startswith(prefix) and core[1:] in _ARITH and core != "rmatmul":
                return core[1:]
        return core if core in _ARITH else name
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1]
    return name


def tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    return []


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False


def elementwise(c: Call) -> Field | None:
    out = c.outs[0]
    shape = tuple(int(s) for s in out.shape)
    fulls = [c.get(t) for t in c.inputs if tuple(t.shape) == shape]
    partial = [(t, c.get(t)) for t in c.inputs if tuple(t.shape) != shape]
    if not fulls:
        ok = all(t.dim() <= len(shape) and all(
            a in (1, b) for a, b in zip(t.shape[::-1], shape[::-1])) for t, _ in partial)
        f0 = partial[0][1]
        if not ok or not has_spatial(f0.dims):
            res = replace(union_all([f.mix_all() for _, f in partial]), dims=plain_dims(shape))
            if any(has_spatial(f.dims) for _, f in partial):
                res = res.flag(f"`{c.name}` changes the map's shape in a way fgscope does not follow")
            return res
        t0 = max((t for t, _ in partial), key=lambda t: t.numel())
        g = c.get(t0)
        lead = len(shape) - t0.dim()
        dims = [other_dim(shape[i]) for i in range(lead)]
        dims += [d if d.size == shape[lead + i] else other_dim(shape[lead + i]) for i, d in enumerate(g.dims)]
        fulls = [replace(g, dims=tuple(dims))]
        partial = [(t, f) for t, f in partial if t is not t0]
    res = union_all(fulls)
    for t, f in partial:
        lead = len(shape) - t.dim()
        if lead < 0:
            continue
        dims, gate = [], False
        for i in range(len(shape)):
            if i < lead:
                dims.append(placeholder(res.dims[i]))
                continue
            d = f.dims[i - lead]
            if d.size == shape[i]:
                dims.append(d if same_layout(d, res.dims[i]) else placeholder(res.dims[i]))
            else:  # broadcast along dim i
                gate = gate or has_spatial((res.dims[i],))
                dims.append(placeholder(res.dims[i]))
        if gate:
            res = replace(res, global_context=True)
        else:
            res = union(res, replace(f, dims=tuple(dims)))
    return res


class Tracer(TorchFunctionMode):
    """Follows every operation of one forward and attaches a `Field` to the tensors it makes.

    Args:
        on_op: called after each operation on traced tensors with the `Call` and the fields of
            its tensor outputs (the functional-op report of `fgscope.geometry` listens here).
    """

    def __init__(self, on_op: Callable[[Call, list[Field | None]], None] | None = None) -> None:
        super().__init__()
        self.geo: dict[int, tuple[torch.Tensor, Field]] = {}  # id -> (tensor held, field)
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}  # untraced slices
        self.macs = 0
        self.on_op = on_op

    def get(self, t: Any) -> Field | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.geo.get(id(t))
        if entry is None or entry[0] is not t:
            return None
        return entry[1]

    def set(self, t: torch.Tensor, f: Field, op: str = "") -> None:
        # Holding the tensor keeps its id unique for the forward; cleared after the trace.
        if sizes(f.dims) != tuple(int(s) for s in t.shape):
            f = lost(f, plain_dims(t.shape), f"fgscope lost track of the map at `{op}`")
        self.geo[id(t)] = (t, f.normalized())

    def seed(self, x: torch.Tensor) -> None:
        one = Axis(1.0, 1.0, 0.0)
        self.set(x, Field(one, one, seed_dims(x.shape)))

    def clear(self) -> None:
        self.geo.clear()
        self.views.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__iter__" and args and self.get(args[0]) is not None:
            # Iterating a tensor unbinds dim 0 (a batch of images into a list): follow it.
            parts = list(out)
            self._follow(torch.Tensor.unbind, "unbind", (args[0], 0), {}, tuple(parts))
            return iter(parts)
        if name == "__get__" and isinstance(out, torch.Tensor) and args and self.get(args[0]) is not None:
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            self._attribute(attr, args[0], out)  # x.real, x.T, x.mT, x.data
        elif name not in _SKIP:
            self._follow(func, name, args, kwargs, out)
        return out

    def _attribute(self, attr: str, x: torch.Tensor, out: torch.Tensor) -> None:
        f = self.get(x)
        if attr in ("T", "H"):
            self.set(out, replace(f, dims=tuple(reversed(f.dims))), attr)
        elif attr in ("mT", "mH"):
            self.set(out, replace(f, dims=(*f.dims[:-2], f.dims[-1], f.dims[-2])), attr)
        elif tuple(out.shape) == tuple(x.shape):  # real, imag, data, grad
            self.set(out, f, attr)
        else:
            self.set(out, lost(f, plain_dims(out.shape), f"`x.{attr}` is not followed"))

    def _follow(self, func: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        outs = tensors_in(out)
        if name in _CONSTANT:
            for o in outs:
                self.geo.pop(id(o), None)
            return
        if name == "__setitem__":
            self._setitem(args)
            return
        inputs = [t for t in tensors_in(args) + tensors_in(kwargs) if self.get(t) is not None]
        if not inputs:
            if name == "__getitem__" and outs and isinstance(args[0], torch.Tensor) and _shares(outs[0], args[0]):
                self.views[id(outs[0])] = (outs[0], args[0], args[1] if len(args) > 1 else None)
            return
        if not outs:
            return
        self._count_macs(name, args, kwargs, outs[0])
        c = Call(name, func, args, kwargs, inputs, out, outs, self.get)
        try:
            res = self._copy(c) if name == "copy_" else self._apply(c)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError,
                ZeroDivisionError) as exc:
            # A rule must never break the user's forward: the output is flagged instead.
            f = union_all([self.get(t).mix_all() for t in inputs])
            res = lost(f, plain_dims(outs[0].shape), f"`{name}` not followed ({type(exc).__name__}: {exc})")
        fields = res if isinstance(res, list) else [res] * len(outs)
        for o, f in zip(outs, fields):
            if f is not None:
                self.set(o, f, name)
        if self.on_op is not None:
            self.on_op(c, [self.get(o) for o in outs])

    def _apply(self, c: Call) -> Field | list[Field | None] | None:
        base = rule_name(c.name)
        if base == "unfold":
            rule = unfold_rule if c.func is torch.nn.functional.unfold else unfold_dim_rule
        else:
            rule = RULES.get(base) or RULES.get(c.name)
        first = c.args[0] if c.args else None
        if rule is not None and base not in _MULTI_INPUT and isinstance(first, torch.Tensor) and self.get(first) is None:
            rule = None
        res = rule(c) if rule is not None else None
        return res if res is not None else elementwise(c)

    def _copy(self, c: Call) -> Field | None:
        target, src = c.args[0], c.args[1]
        f = self.get(src)
        if f is None:
            self.geo.pop(id(target), None)
            return None
        if tuple(src.shape) != tuple(target.shape):
            f = elementwise(Call("copy_", c.func, (src,), {}, [src], target, [target], self.get))
        self._into_base(target, f)
        return f

    def _setitem(self, args: tuple) -> None:
        target, value = args[0], args[2]
        fv = self.get(value)
        if fv is None:
            return
        ft = self.get(target)
        if ft is not None:
            self.set(target, ft.flag("written in place by `x[...] = ...`: field approximate"))
            return
        self.set(target, replace(fv.mix_all(), dims=plain_dims(target.shape)).flag(
            "made by `x[...] = ...`: field approximate"))

    def _into_base(self, view: torch.Tensor, f: Field) -> None:
        """A map copied into the top-left of a fresh tensor (batching images of different
        sizes into one zero-padded batch) gives that tensor the map's field."""
        entry = self.views.get(id(view))
        if entry is None or entry[0] is not view:
            return
        _, base, idx = entry
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis or i is None for i in idx) or self.get(base) is not None:
            return
        idx = idx + (slice(None),) * (base.dim() - len(idx))
        dims, k = [], 0
        for i, it in enumerate(idx):
            n = int(base.shape[i])
            if isinstance(it, int):
                dims.append(Dim((Factor("n", n),)) if i == 0 else other_dim(n))
                continue
            if not isinstance(it, slice) or it.indices(n)[0] != 0 or it.indices(n)[2] != 1:
                return
            d = f.dims[k]
            k += 1
            if len(d.factors) == 1 and d.factors[0].kind in ("h", "w") and not d.atomic:
                dims.append(Dim((replace(d.factors[0], size=n),)))
            elif not has_spatial((d,)):
                dims.append(other_dim(n, d.has("n")))
            else:
                return
        self.set(base, replace(f, dims=tuple(dims)))

    def _count_macs(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        if name.startswith("conv") and "transpose" not in name and len(args) > 1:
            w = args[1]
            if isinstance(w, torch.Tensor):
                self.macs += out.numel() * math.prod(w.shape[1:])
        elif name.startswith("conv_transpose") and len(args) > 1:
            w, x = args[1], args[0]
            if isinstance(w, torch.Tensor) and isinstance(x, torch.Tensor):
                self.macs += x.numel() * math.prod(w.shape[1:])
        elif name == "linear" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.macs += out.numel() * args[1].shape[-1]
