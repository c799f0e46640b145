"""Where a tensor's image axes are: every dim as a product of factors, followed through reshapes.

A traced tensor's dims are each a product of *factors*, outer to inner (row-major, the way
torch lays out a reshape): the batch (`n`), a run of the map's rows (`h`) or columns (`w`), or
anything else (channels, heads, groups: kind None). An `h` factor of size 8 and step 7 holds
rows 0, 7, 14, ... (in units of the map): Swin's window partition splits 56 rows into the
window index (8, step 7) and the row within the window (7, step 1), and moves the window
index into the batch dim; a channel shuffle splits channels into two None factors and swaps
them; `torch.stack` adds a None factor. A reshape regroups the factors, splitting one where a
new dim boundary falls inside it; only a reshape that would need to split a factor unevenly,
or to break a dim with extra entries, cannot be followed.

A factor also says whether a unit's receptive field *moves* along it (`moves`). Along a
plain map axis it does: unit i sees `start + i * stride`. After attention within each
window every unit of a window sees the whole window, so the within-window factor stops
moving the field while the window index still moves it; after attention over all tokens no
factor moves it. A unit's position along an axis is the sum of index x step over the moving
factors of that axis, and its field starts at `start + position * stride`.

A dim may hold entries outside its factor grid, `before` and `after` it (ViT's class token
concatenated in front of the patch tokens).

Everything here is pure: dims in, dims out, None where a mapping cannot be followed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

__all__ = [
    "Factor", "Dim", "Dims", "SPATIAL", "seed_dims", "plain_dims", "reshape", "permute",
    "refine", "factors_of", "plain_dim", "set_moves", "moving", "sizes",
]

SPATIAL = ("h", "w")


@dataclass(frozen=True)
class Factor:
    """One factor of a dim.

    Attributes:
        kind: `"n"` (the batch), `"h"` / `"w"` (map rows / columns), None (anything else).
        size: number of entries.
        step: for `h` / `w`: map units between neighbouring entries of this factor.
        moves: for `h` / `w`: whether a unit's receptive field moves along this factor.
    """

    kind: str | None
    size: int
    step: int = 1
    moves: bool = True

    def split(self, outer: int) -> tuple[Factor, Factor]:
        """(outer, inner) factors with `outer` entries outside; `outer` divides `size`."""
        inner = self.size // outer
        return replace(self, size=outer, step=self.step * inner), replace(self, size=inner)


@dataclass(frozen=True)
class Dim:
    """One tensor dim: `before` extra entries, the factor grid (outer to inner), `after`."""

    factors: tuple[Factor, ...] = ()
    before: int = 0
    after: int = 0

    @property
    def grid(self) -> int:
        return math.prod(f.size for f in self.factors)

    @property
    def size(self) -> int:
        return self.before + self.grid + self.after

    @property
    def atomic(self) -> bool:
        """A dim with extra entries cannot be split or merged by a reshape."""
        return bool(self.before or self.after)

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.factors)


Dims = tuple[Dim, ...]


def other(size: int) -> Dim:
    return Dim((Factor(None, int(size)),)) if size != 1 else Dim()


def seed_dims(shape: Sequence[int]) -> Dims:
    """The dims of an input image batch `(N, C, H, W)` (or `(C, H, W)`)."""
    *lead, h, w = (int(s) for s in shape)
    dims = [Dim((Factor("n", lead[0]),))] + [other(s) for s in lead[1:]] if lead else []
    return (*dims, Dim((Factor("h", h),)), Dim((Factor("w", w),)))


def plain_dims(shape: Sequence[int]) -> Dims:
    """Dims without image axes (a fresh tensor, a vector)."""
    return tuple(other(s) for s in shape)


def sizes(dims: Dims) -> tuple[int, ...]:
    return tuple(d.size for d in dims)


def _pieces(dims: Dims) -> list[Factor | Dim] | None:
    """Every factor in row-major order; atomic dims (extra entries) stay whole."""
    out: list[Factor | Dim] = []
    for d in dims:
        if d.atomic:
            out.append(d)
        else:
            out.extend(d.factors)
    return out


def _merged(factors: list[Factor]) -> tuple[Factor, ...]:
    """Neighbouring factors that together are one run of an axis, as one factor (a window
    partition undone gives the plain rows back)."""
    out: list[Factor] = []
    for f in factors:
        prev = out[-1] if out else None
        if (
            prev is not None and prev.kind == f.kind and prev.kind is not None
            and prev.moves == f.moves and prev.step == f.step * f.size
        ):
            out[-1] = replace(f, size=prev.size * f.size)
        else:
            out.append(f)
    return tuple(out)


def _regroup(pieces: list[Factor | Dim], shape: Sequence[int]) -> Dims | None:
    # Size-1 factors carry no position: dropped, but for the batch (a batch of one), which
    # goes to the next size-1 dim.
    pieces = [p for p in pieces if isinstance(p, Dim) or p.size > 1 or p.kind == "n"]
    out: list[Dim] = []
    i = 0
    for target in (int(s) for s in shape):
        cur: list[Factor] = []
        prod = 1
        if target == 1:
            if i < len(pieces) and isinstance(pieces[i], Factor) and pieces[i].size == 1:
                cur.append(pieces[i])
                i += 1
            out.append(Dim(tuple(cur)))
            continue
        while prod < target:
            if i >= len(pieces):
                return None
            p = pieces[i]
            if isinstance(p, Dim):  # extra entries: only as a whole dim of its own
                if cur or p.size != target:
                    return None
                break
            if target % (prod * p.size) == 0:
                cur.append(p)
                prod *= p.size
                i += 1
            elif target % prod == 0 and p.size % (target // prod) == 0:
                outer, inner = p.split(target // prod)
                cur.append(outer)
                pieces[i] = inner
                prod = target
            else:
                return None
        if prod < target:  # an atomic dim, kept whole
            out.append(pieces[i])
            i += 1
        else:
            out.append(Dim(_merged(cur)))
    if any(not (isinstance(p, Factor) and p.size == 1) for p in pieces[i:]):
        return None
    return tuple(out)


def reshape(dims: Dims, shape: Sequence[int]) -> Dims | None:
    """The dims after `reshape(shape)` (no -1; the output's real shape), None if the
    factors cannot be regrouped into `shape`."""
    shape = tuple(int(s) for s in shape)
    if sizes(dims) == shape:
        return dims
    if math.prod(shape) != math.prod(sizes(dims)):
        return None
    return _regroup(_pieces(dims), shape)


def permute(dims: Dims, order: Sequence[int]) -> Dims:
    return tuple(dims[i] for i in order)


def refine(a: Dim, b: Dim) -> tuple[Dim, Dim] | None:
    """`a` and `b` (same size) cut into the same factor sizes, None if their grids differ."""
    if (a.before, a.after, a.grid) != (b.before, b.after, b.grid):
        return None
    fa, fb = list(a.factors), list(b.factors)
    oa: list[Factor] = []
    ob: list[Factor] = []
    while fa and fb:
        x, y = fa[0], fb[0]
        if x.size == y.size:
            oa.append(fa.pop(0))
            ob.append(fb.pop(0))
        elif x.size % y.size == 0:  # cut x: its outer y.size entries first
            outer, inner = x.split(y.size)
            oa.append(outer)
            ob.append(fb.pop(0))
            fa[0] = inner
        elif y.size % x.size == 0:
            outer, inner = y.split(x.size)
            ob.append(outer)
            oa.append(fa.pop(0))
            fb[0] = inner
        else:
            return None
    oa += fa
    ob += fb
    return replace(a, factors=tuple(oa)), replace(b, factors=tuple(ob))


def factors_of(dims: Dims, kind: str) -> list[tuple[int, int, Factor]]:
    """(dim index, factor index, factor) of every factor of `kind`."""
    return [(i, j, f) for i, d in enumerate(dims) for j, f in enumerate(d.factors) if f.kind == kind]


def moving(dims: Dims, kind: str) -> list[tuple[int, int, Factor]]:
    return [t for t in factors_of(dims, kind) if t[2].moves]


def plain_dim(dims: Dims, kind: str) -> int | None:
    """The dim that holds all of axis `kind` as one moving factor of step 1 (a map axis a
    convolution can slide along), None when the axis is split, reduced or elsewhere."""
    found = factors_of(dims, kind)
    if len(found) != 1:
        return None
    i, _, f = found[0]
    d = dims[i]
    if len(d.factors) != 1 or d.atomic or f.step != 1 or not (f.moves or f.size == 1):
        return None
    return i


def set_moves(dims: Dims, which: Callable[[int, int, Factor], bool], moves: bool = False) -> Dims:
    """`dims` with `moves` set on the spatial factors `which(dim, index, factor)` selects."""
    out = []
    for i, d in enumerate(dims):
        fs = tuple(
            replace(f, moves=moves) if f.kind in SPATIAL and which(i, j, f) else f
            for j, f in enumerate(d.factors)
        )
        out.append(replace(d, factors=fs))
    return tuple(out)
