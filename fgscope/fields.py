"""The receptive field a traced tensor carries: one `Axis` per map axis, the tensor's dims
(`fgscope.dims`), whether it is exact and, if not, why.

Per map axis a field holds the effective stride `j`, the receptive field size `r` and the
start `u` of the unit at position 0 (Araujo, Norris & Sim, Distill 2019; see
`fgscope.geometry`). A tensor entry's position along the axis is the sum of index x step
over the axis' *moving* factors (`fgscope.dims`); its field is `[u + position * j,
u + position * j + r)`. Mixing along a factor (attention, a reduction, a softmax over
tokens) makes the factor stop moving and grows `r` by what it covers, which keeps windowed
attention exact: every unit of a window then sees the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from fgscope.dims import SPATIAL, Dim, Dims, Factor, factors_of, moving, refine, set_moves

__all__ = ["Axis", "Field", "union", "union_all", "plain", "kinds_in", "lost", "has_spatial", "placeholder", "same_layout"]


@dataclass(frozen=True)
class Axis:
    """Geometry along one map axis, in input pixels.

    Attributes:
        stride: effective stride `j` (may be fractional after upsampling).
        rf: receptive field size `r` of one unit.
        start: input coordinate where unit 0's receptive field starts (`-start` = padding).
    """

    stride: float
    rf: float
    start: float

    def conv(self, k: int, s: int, p: float, d: int = 1) -> Axis:
        keff = d * (k - 1) + 1
        return Axis(self.stride * s, self.rf + (keff - 1) * self.stride, self.start - p * self.stride)

    def union(self, other: Axis) -> Axis:
        lo = min(self.start, other.start)
        hi = max(self.start + self.rf, other.start + other.rf)
        return Axis(max(self.stride, other.stride), hi - lo, lo)

    def reduce(self, n: int) -> Axis:
        """All `n` units of the axis merged into one (global pooling)."""
        return Axis(self.stride * n, self.rf + (n - 1) * self.stride, self.start)

    def grow(self, units: float) -> Axis:
        """The union of the fields of this unit and the next `units` units."""
        return replace(self, rf=self.rf + units * self.stride)

    def shift(self, units: float) -> Axis:
        """The field of the unit `units` positions further on."""
        return replace(self, start=self.start + units * self.stride)

    def covers(self, other: Axis) -> bool:
        return self.start <= other.start and self.start + self.rf >= other.start + other.rf


@dataclass(frozen=True)
class Field:
    """What a traced tensor's units see.

    Attributes:
        h, w: geometry along the map's rows and columns.
        dims: where the map axes are in the tensor (`fgscope.dims`).
        exact: False once an approximation was involved (`notes` says which).
        notes: why the field is approximate (each once, in order).
        global_context: a broadcast global gate (squeeze-excitation) or a normalisation over
            the whole map feeds in; not counted in the field (see `fgscope.geometry`).
    """

    h: Axis
    w: Axis
    dims: Dims
    exact: bool = True
    notes: tuple[str, ...] = ()
    global_context: bool = False

    def axis(self, kind: str) -> Axis:
        return self.h if kind == "h" else self.w

    def with_axis(self, kind: str, axis: Axis) -> Field:
        return replace(self, h=axis) if kind == "h" else replace(self, w=axis)

    def flag(self, note: str) -> Field:
        """Approximate, because of `note`."""
        notes = self.notes if note in self.notes else (*self.notes, note)
        return replace(self, exact=False, notes=notes)

    def positioned(self, kind: str) -> bool:
        return bool(moving(self.dims, kind))

    @property
    def spatial(self) -> bool:
        """Units still have map positions along both axes (not a vector after pooling)."""
        return self.positioned("h") and self.positioned("w")

    def mix(self, which: Callable[[int, int, Factor], bool]) -> Field:
        """Units mixed along the moving map factors `which(dim, index, factor)` selects: the
        field grows by what they cover and stops moving along them (exact)."""
        f = self
        for kind in SPATIAL:
            grow = sum((fa.size - 1) * fa.step for i, j, fa in moving(self.dims, kind) if which(i, j, fa))
            if grow:
                f = f.with_axis(kind, f.axis(kind).grow(grow))
        return replace(f, dims=set_moves(self.dims, which))

    def mix_dims(self, dims: set[int]) -> Field:
        return self.mix(lambda i, j, fa: i in dims)

    def mix_all(self) -> Field:
        return self.mix(lambda i, j, fa: True)

    def normalized(self) -> Field:
        """Steps in units of the finest step: a strided slice of a map gives a plain map of
        a larger stride (so a convolution can slide over it)."""
        f = self
        for kind in SPATIAL:
            steps = [fa.step for _, _, fa in factors_of(f.dims, kind)]
            g = math.gcd(*steps) if steps else 1
            if g > 1:
                dims = tuple(
                    replace(d, factors=tuple(replace(fa, step=fa.step // g) if fa.kind == kind else fa
                                             for fa in d.factors))
                    for d in f.dims
                )
                ax = f.axis(kind)
                f = replace(f.with_axis(kind, replace(ax, stride=ax.stride * g)), dims=dims)
        return f

    def merge_flags(self, other: Field) -> Field:
        notes = self.notes + tuple(n for n in other.notes if n not in self.notes)
        return replace(
            self, exact=self.exact and other.exact, notes=notes,
            global_context=self.global_context or other.global_context,
        )


def _growth(dims: Dims, kind: str, keys: set[tuple[int, int]]) -> int:
    return sum((f.size - 1) * f.step for i, j, f in moving(dims, kind) if (i, j) in keys)


def union(a: Field, b: Field) -> Field:
    """The field of units that combine `a` and `b` entry by entry (same shape): `+`, `*`,
    `torch.cat` along channels. Where only one side's field moves along a factor, the
    result is exact when the other side's field covers it there (a window attention's
    output added to its input); otherwise the union over that factor, flagged."""
    pairs = [refine(x, y) for x, y in zip(a.dims, b.dims)]
    if len(a.dims) != len(b.dims) or any(p is None for p in pairs) or any(
        [(f.kind, f.step) for f in x.factors if f.kind in SPATIAL]
        != [(f.kind, f.step) for f in y.factors if f.kind in SPATIAL]
        or [f.kind for f in x.factors] != [f.kind for f in y.factors]
        for x, y in pairs
    ):
        out = replace(a.mix_all(), dims=a.dims)
        other = b.mix_all()
        out = replace(out, h=out.h.union(other.h), w=out.w.union(other.w)).merge_flags(b)
        return out.flag("merges maps laid out differently: field approximate")
    da = tuple(p[0] for p in pairs)
    db = tuple(p[1] for p in pairs)
    out = replace(a, dims=da).merge_flags(b)
    keep: set[tuple[int, int]] = set()
    for kind in SPATIAL:
        ma = {(i, j) for i, j, _ in moving(da, kind)}
        mb = {(i, j) for i, j, _ in moving(db, kind)}
        common = ma & mb
        ea, eb = ma - common, mb - common
        ax_a = a.axis(kind).grow(_growth(da, kind, ea))
        ax_b = b.axis(kind).grow(_growth(db, kind, eb))
        merged = ax_a.union(ax_b)
        if ea and eb or ea and not ax_b.covers(ax_a) or eb and not ax_a.covers(ax_b):
            out = out.flag("merges fields that move differently over the map: field approximate")
        out = out.with_axis(kind, merged)
        keep |= common
    dims = set_moves(da, lambda i, j, f: (i, j) not in keep)
    return replace(out, dims=dims)


def union_all(fields: list[Field]) -> Field:
    out = fields[0]
    for f in fields[1:]:
        out = union(out, f)
    return out


def plain(dims: Dims, i: int, kind: str, size: int, moves: bool = True) -> Dims:
    """`dims` with dim `i` replaced by one factor of `kind` (a map axis of `size` units)."""
    d = Dim((Factor(kind, int(size), 1, moves),)) if kind is not None and size > 0 else (
        Dim((Factor(None, int(size)),)) if size != 1 else Dim()
    )
    return (*dims[:i], d, *dims[i + 1 :])


def kinds_in(dim: Dim) -> set[str]:
    return {f.kind for f in dim.factors if f.kind in SPATIAL}


def lost(f: Field, dims: Dims, note: str) -> Field:
    """A mapping fgscope cannot follow: every unit is taken to see everything the input's
    units saw (the union), flagged with `note`; `dims` are the output's (no map axes)."""
    return replace(f.mix_all(), dims=dims).flag(note)


def placeholder(d: Dim) -> Dim:
    """`d` for an operand that does not vary along it (broadcast): its factors do not move."""
    return replace(d, factors=tuple(replace(f, moves=False) if f.kind in SPATIAL else f for f in d.factors))


def same_layout(a: Dim, b: Dim) -> bool:
    """`a` and `b` hold the same map factors (after cutting them alike)."""
    p = refine(a, b)
    return p is not None and [(f.kind, f.step) for f in p[0].factors] == [(f.kind, f.step) for f in p[1].factors]


def has_spatial(dims: Dims) -> bool:
    return any(factors_of(dims, k) for k in SPATIAL)
