"""How views, reshapes, permutes, indexing, `torch.cat` and `torch.stack` move the map.

Rules of the geometry trace (`fgscope.tracer`) for operations that move entries around
without computing anything: they only rearrange a field's dims (`fgscope.dims`) and, where
they pick entries of a map axis (a slice, an index), shift where unit 0's field starts.
A channel shuffle, grouped channels, `torch.stack(...).sum(1)`, a flatten of the channels,
Swin's window partition and ViT's patch tokens are followed exactly. What cannot be followed
(a reshape that cuts a map factor unevenly, a flip, advanced indexing along the map) is
taken as the union of everything, flagged with the operation's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from fgscope.dims import Dim, Factor, permute, plain_dims, reshape
from fgscope.fields import Field, has_spatial, lost, union_all

__all__ = ["Call", "RULES", "index_field", "other_dim"]


@dataclass
class Call:
    """One operation the trace saw.

    Attributes:
        name: the function's name (`view`, `conv2d`, `__getitem__`).
        func: the function itself.
        args, kwargs: as called.
        inputs: the tensors among them that carry a field, in argument order.
        out: what it returned; outs: the tensors in it, in order.
        get: the field of a tensor, None for tensors without one.
    """

    name: str
    func: Any
    args: tuple
    kwargs: dict
    inputs: list[torch.Tensor]
    out: Any
    outs: list[torch.Tensor]
    get: Any

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[i] if len(self.args) > i else default

    def field(self, t: Any) -> Field | None:
        return self.get(t) if isinstance(t, torch.Tensor) else None


def other_dim(size: int, batch: bool = False) -> Dim:
    """A dim of `size` entries without map axes (`batch`: the batch dim)."""
    if batch:
        return Dim((Factor("n", int(size)),))
    return Dim((Factor(None, int(size)),)) if size != 1 else Dim()


def _ints(v: Any) -> list[int]:
    if isinstance(v, (tuple, list, torch.Size)):
        if len(v) == 1 and isinstance(v[0], (tuple, list, torch.Size)):
            v = v[0]
        return [int(x) for x in v]
    return [int(v)]


# --- reshapes and permutes -------------------------------------------------------------------


def reshape_rule(c: Call) -> Field | None:
    f = c.field(c.args[0])
    out = c.outs[0]
    dims = reshape(f.dims, out.shape)
    if dims is None:  # units that share fields regrouped differently: taken as plain axes
        flat = _plainified(f.dims)
        dims = reshape(flat, out.shape) if flat is not None else None
        if dims is not None:
            note = f"`{c.name}` regroups units that share fields: field approximate"
            return replace(f, dims=dims).flag(note)
        return lost(f, plain_dims(out.shape), f"`{c.name}` to {tuple(out.shape)} mixes map positions")
    return replace(f, dims=dims)


def _plainified(dims):
    """Each dim holding one map axis in several factors, as one moving factor; None if none."""
    out, changed = [], False
    for d in dims:
        kinds = {fa.kind for fa in d.factors if fa.kind in ("h", "w")}
        if len(kinds) == 1 and len(d.factors) > 1 and not d.atomic and all(
            fa.kind in kinds for fa in d.factors
        ):
            kind = kinds.pop()
            out.append(Dim((Factor(kind, d.size, min(fa.step for fa in d.factors)),)))
            changed = True
        else:
            out.append(d)
    return tuple(out) if changed else None


def permute_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    nd = x.dim()
    if c.name == "permute":
        order = _ints(c.args[1:] if len(c.args) > 2 else c.arg(1, "dims"))
    elif c.name in ("movedim", "moveaxis"):
        src = [d % nd for d in _ints(c.arg(1, "source"))]
        dst = [d % nd for d in _ints(c.arg(2, "destination"))]
        rest = iter(d for d in range(nd) if d not in src)
        placed = dict(zip(dst, src))
        order = [placed[i] if i in placed else next(rest) for i in range(nd)]
    elif c.name == "t" or nd < 2:
        order = list(range(nd))[::-1]
    else:
        a, b = c.arg(1, "dim0", 0) % nd, c.arg(2, "dim1", 1) % nd
        order = list(range(nd))
        order[a], order[b] = order[b], order[a]
    return replace(f, dims=permute(f.dims, [d % nd for d in order]))


def expand_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    out = c.outs[0]
    lead = out.dim() - x.dim()
    dims = [other_dim(out.shape[i]) for i in range(lead)]
    for i, d in enumerate(f.dims):
        n = int(out.shape[lead + i])
        dims.append(d if d.size == n else other_dim(n, batch=d.has("n")))
    return replace(f, dims=tuple(dims))


def repeat_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    reps = _ints(c.args[1:] if len(c.args) > 2 else c.arg(1, "repeats", c.arg(1, "dims")))
    lead = len(reps) - x.dim()
    if lead < 0:  # torch.tile pads the repeats with ones on the left
        reps, lead = [1] * -lead + reps, 0
    dims = [other_dim(r) for r in reps[:lead]]
    for d, r in zip(f.dims, reps[lead:]):
        if r == 1:
            dims.append(d)
        elif d.atomic:
            return lost(f, plain_dims(c.outs[0].shape), f"`{c.name}` repeats tokens with extra entries")
        else:
            dims.append(Dim((Factor(None, r), *d.factors)))
    return replace(f, dims=tuple(dims))


# --- picking entries: slices, indices, chunks ---------------------------------------------


def _pick(f: Field, d: Dim, i: int) -> Field:
    """The field of entry `i` of dim `d` (the dim goes away)."""
    if i < d.before or i >= d.before + d.grid:  # an extra token: what every unit saw
        return f.mix_all()
    i -= d.before
    for fa in reversed(d.factors):  # mixed radix, inner factor first
        k = i % fa.size
        i //= fa.size
        if fa.kind in ("h", "w") and fa.moves and k:
            f = f.with_axis(fa.kind, f.axis(fa.kind).shift(k * fa.step))
    return f


def _slice(f: Field, d: Dim, start: int, length: int, step: int, op: str) -> tuple[Dim, Field]:
    """The dim and field after taking `length` entries from `start` by `step`."""
    n = d.size
    if start == 0 and step == 1 and length == n:
        return d, f
    spatial = [fa for fa in d.factors if fa.kind in ("h", "w")]
    if d.atomic:
        b, g = d.before, d.grid
        if step == 1 and start <= b and start + length >= b + g:
            return replace(d, before=b - start, after=start + length - b - g), f
        if start + (length - 1) * step < b or start >= b + g:  # extra tokens only
            return other_dim(length), f.mix_all()
        return other_dim(length), lost(f, f.dims, f"`{op}` cuts into the token grid")
    if not spatial:
        return other_dim(length, batch=d.has("n")), f
    if len(d.factors) == 1:
        fa = d.factors[0]
        if fa.moves and start:
            f = f.with_axis(fa.kind, f.axis(fa.kind).shift(start * fa.step))
        return Dim((replace(fa, size=length, step=fa.step * step),)), f
    inner = math.prod(fa.size for fa in d.factors[1:])
    if step == 1 and start % inner == 0 and length % inner == 0:
        outer, f = _slice(f, Dim(d.factors[:1]), start // inner, length // inner, 1, op)
        return Dim(outer.factors + d.factors[1:]), f
    kinds = {fa.kind for fa in spatial}
    if len(kinds) == 1:  # units that share fields, sliced apart: taken as a plain axis
        kind = kinds.pop()
        step0 = min(fa.step for fa in spatial)
        new, f = _slice(f, Dim((Factor(kind, n, step0),)), start, length, step, op)
        return new, f.flag(f"`{op}` slices units that share fields: field approximate")
    return other_dim(length), lost(f, f.dims, f"`{op}` cuts flattened map positions")


def _norm_index(idx: Any, nd: int) -> tuple | None:
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) or (i is not None and not isinstance(i, (int, slice)) and i is not Ellipsis) for i in idx):
        return None  # advanced indexing
    real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (nd - real) + idx[e + 1 :]
    return idx + (slice(None),) * (nd - sum(1 for i in idx if i is not None))


def index_field(f: Field, x: torch.Tensor, idx: Any, op: str, out_shape: Any = None) -> Field:
    norm = _norm_index(idx, x.dim())
    if norm is None:
        return _advanced(f, x, idx, op, out_shape)
    dims: list[Dim] = []
    k = 0
    for it in norm:
        if it is None:
            dims.append(Dim())
            continue
        d, n = f.dims[k], int(x.shape[k])
        k += 1
        if isinstance(it, int):
            f = _pick(f, d, it % n)
        else:
            start, stop, step = it.indices(n)
            new, f = _slice(f, d, start, len(range(start, stop, step)), step, op)
            dims.append(new)
    dims += list(f.dims[k:])
    return replace(f, dims=tuple(dims))


def _advanced(f: Field, x: torch.Tensor, idx: Any, op: str, out_shape: Any) -> Field:
    idx = idx if isinstance(idx, tuple) else (idx,)
    touched = [i for i, it in enumerate(idx) if isinstance(it, (torch.Tensor, list))]
    shape = tuple(out_shape) if out_shape is not None else None
    if shape is not None and len(shape) == x.dim() and all(
        not has_spatial((f.dims[i],)) for i in touched if i < len(f.dims)
    ):
        dims = tuple(
            d if d.size == shape[i] else other_dim(shape[i], batch=d.has("n")) for i, d in enumerate(f.dims)
        )
        return replace(f, dims=dims)
    return lost(f, plain_dims(shape or ()), f"`{op}` picks map entries by index tensor")


def getitem_rule(c: Call) -> Field | None:
    return index_field(c.field(c.args[0]), c.args[0], c.arg(1, "idx"), "x[...]", c.outs[0].shape)


def _along(c: Call, dim: int, pieces: list[tuple[int, int]]) -> list[Field]:
    """Fields of pieces `(start, length)` along `dim` (chunk, split, unbind: length 0)."""
    x = c.args[0]
    f = c.field(x)
    nd = x.dim()
    out = []
    for start, length in pieces:
        idx = [slice(None)] * nd
        idx[dim % nd] = start if length == 0 else slice(start, start + length)
        out.append(index_field(f, x, tuple(idx), c.name))
    return out


def split_rule(c: Call) -> list[Field] | Field | None:
    x = c.args[0]
    if c.name == "unbind":
        dim = c.arg(1, "dim", 0)
        return _along(c, dim, [(i, 0) for i in range(x.shape[dim])])
    if c.name == "select":
        dim = c.arg(1, "dim")
        return _along(c, dim, [(c.arg(2, "index") % x.shape[dim], 0)])[0]
    if c.name == "narrow":
        dim = c.arg(1, "dim")
        start = c.arg(2, "start")
        return _along(c, dim, [(int(start) % x.shape[dim], int(c.arg(3, "length")))])[0]
    dim = c.arg(2, "dim", 0) if c.name != "tensor_split" else c.arg(2, "dim", 0)
    dim = int(dim) % x.dim()
    pieces, start = [], 0
    for o in c.outs:
        n = int(o.shape[dim])
        pieces.append((start, n))
        start += n
    return _along(c, dim, pieces)


def index_select_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    dim = int(c.arg(1, "dim")) % x.dim()
    out = c.outs[0]
    if has_spatial((f.dims[dim],)):
        return lost(f, plain_dims(out.shape), f"`{c.name}` picks map entries by index")
    d = f.dims[dim]
    return replace(f, dims=(*f.dims[:dim], other_dim(out.shape[dim], d.has("n")), *f.dims[dim + 1 :]))


# --- joining: cat and stack ---------------------------------------------------------------


def _seq(c: Call) -> list:
    ts = c.arg(0, "tensors")
    return list(ts) if isinstance(ts, (tuple, list)) else [ts]


def cat_rule(c: Call) -> Field | None:
    parts = _seq(c)
    out = c.outs[0]
    dim = int(c.arg(1, "dim", 0)) % out.dim()
    fields = [c.field(t) for t in parts]
    traced = [(t, f) for t, f in zip(parts, fields) if f is not None]
    along = [(t, f) for t, f in traced if has_spatial((f.dims[dim],))]
    if not along:  # channels (or other non-map entries): the union of the parts
        fs = [replace(f, dims=(*f.dims[:dim], other_dim(out.shape[dim], f.dims[dim].has("n")), *f.dims[dim + 1 :]))
              for _, f in traced]
        return union_all(fs)
    if len(along) == 1:  # a map plus extra entries (a class token in front of the patches)
        t, f = along[0]
        i = next(k for k, p in enumerate(parts) if p is t)
        before = sum(int(p.shape[dim]) for p in parts[:i])
        after = sum(int(p.shape[dim]) for p in parts[i + 1 :])
        d = f.dims[dim]
        d = replace(d, before=d.before + before, after=d.after + after)
        g = replace(f, dims=(*f.dims[:dim], d, *f.dims[dim + 1 :]))
        others = [replace(h.mix_all(), dims=g.dims) for p, h in traced if p is not t]
        return union_all([g, *others]) if others else g
    return lost(union_all([f.mix_all() for _, f in traced]), plain_dims(out.shape),
                f"`{c.name}` joins different parts of maps along a map axis")


def stack_rule(c: Call) -> Field | None:
    parts = _seq(c)
    out = c.outs[0]
    dim = int(c.arg(1, "dim", 0)) % out.dim()
    traced = [c.field(t) for t in parts if c.field(t) is not None]
    fs = [replace(f, dims=(*f.dims[:dim], other_dim(len(parts)), *f.dims[dim:])) for f in traced]
    return union_all(fs)


# --- moving entries along the map -------------------------------------------------------------


def flip_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    if c.name == "flip":
        dims = [d % x.dim() for d in _ints(c.arg(1, "dims"))]
    else:  # fliplr, flipud, rot90: the first two dims (of the last two for rot90's default)
        dims = list(range(x.dim()))
    if any(has_spatial((f.dims[d],)) for d in dims):
        return lost(f, plain_dims(x.shape), f"`{c.name}` mirrors the map")
    return f


def roll_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    shifts = _ints(c.arg(1, "shifts"))
    dims = c.arg(2, "dims")
    if dims is None:
        return lost(f, f.dims, "`roll` of the flattened tensor") if has_spatial(f.dims) else f
    note = None
    for s, d in zip(shifts, _ints(dims)):
        d %= x.dim()
        dim = f.dims[d]
        fs = [fa for fa in dim.factors if fa.kind in ("h", "w")]
        if not fs or s % dim.size == 0:
            continue
        kind = fs[0].kind
        # unit i now holds unit i - s: its field starts s units earlier (wrapping at the edge)
        f = f.with_axis(kind, f.axis(kind).shift(-s))
        if len(dim.factors) > 1 or not fs[0].moves:
            f = replace(f, dims=(*f.dims[:d], Dim((Factor(kind, dim.size),)), *f.dims[d + 1 :]))
        note = f"`roll` by {s} wraps units around the map (shifted windows): field approximate"
    return f.flag(note) if note else f


def unfold_dim_rule(c: Call) -> Field | None:
    """`Tensor.unfold(dim, size, step)`: sliding windows along one dim, as a new last dim."""
    x = c.args[0]
    f = c.field(x)
    dim = int(c.arg(1, "dimension")) % x.dim()
    size, step = int(c.arg(2, "size")), int(c.arg(3, "step"))
    out = c.outs[0]
    d = f.dims[dim]
    fs = d.factors
    if len(fs) == 1 and fs[0].kind in ("h", "w") and fs[0].moves and not d.atomic:
        fa = fs[0]
        win = Dim((replace(fa, size=int(out.shape[dim]), step=fa.step * step),))
        new = Dim((replace(fa, size=size),))
        return replace(f, dims=(*f.dims[:dim], win, *f.dims[dim + 1 :], new))
    if has_spatial((d,)):
        return lost(f, plain_dims(out.shape), "`unfold` along a split map axis")
    return replace(f, dims=(*f.dims[:dim], other_dim(out.shape[dim]), *f.dims[dim + 1 :], other_dim(size)))


RULES = {
    **dict.fromkeys(
        ["view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze",
         "unsqueeze", "_unsafe_view", "ravel"], reshape_rule),
    **dict.fromkeys(["permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"],
                    permute_rule),
    **dict.fromkeys(["expand", "expand_as", "broadcast_to"], expand_rule),
    **dict.fromkeys(["repeat", "tile"], repeat_rule),
    "__getitem__": getitem_rule,
    **dict.fromkeys(["chunk", "split", "tensor_split", "unbind", "select", "narrow",
                     "split_with_sizes", "hsplit", "vsplit"], split_rule),
    "index_select": index_select_rule,
    **dict.fromkeys(["cat", "concat", "concatenate"], cat_rule),
    "stack": stack_rule,
    **dict.fromkeys(["flip", "fliplr", "flipud", "rot90"], flip_rule),
    "roll": roll_rule,
}
