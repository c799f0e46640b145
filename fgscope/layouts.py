"""Which axes of a layer's output are the map: NCHW, channels-last NHWC, tokens, windows.

A CNN's maps are `(N, C, H, W)`, but ConvNeXt's inner layers and Swin's blocks produce
channels-last `(N, H, W, C)`, a ViT produces tokens `(N, L, C)` (with a class token in front
of the `H x W` patch tokens), and Swin's attention layers see windows `(N * windows, 49, C)`.
The geometry trace (`fgscope.geometry`) follows where the map's rows and columns go
(`fgscope.dims`); `layout_of` names the result and `to_nchw` turns any such tensor back into
`(N, C, H, W)` so that it is measured, ranked and drawn on the right axes.

    to_nchw(x, geometry.layout)   # (N, H, W, C) / (N, L, C) / windows -> (N, C, H, W)
    to_nchw(x, "NHWC")            # also by name: NCHW, NHWC, NLC, NCL (tokens: square grid,
                                  # after 0 or 1 extra tokens)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fgscope.dims import SPATIAL, Dims

__all__ = ["Layout", "layout_of", "to_nchw", "as_map", "LAYOUT_LABELS"]

LAYOUT_LABELS = {
    "NCHW": "NCHW", "NHWC": "NHWC", "NLC": "tokens", "NCL": "tokens (NCL)", "NC": "vector", "NCDHW": "NCDHW",
    "windows": "windows", "mixed": "mixed", "other": "other",
}
"""How tables show each layout kind."""

_FactorSpec = tuple[str | None, int, int]  # kind, size, step


@dataclass(frozen=True)
class Layout:
    """Where the map is in a layer's output.

    Attributes:
        kind: `NCHW`, `NHWC`, `NLC` (tokens, channels last), `NCL` (tokens, channels first),
            `NCDHW` (a 3-D convolution's output: depth is taken as channels),
            `NC` (a vector), `windows` (map positions split between batch and tokens, as in
            Swin's attention), `mixed` (another arrangement that can still be undone) or
            `other` (no map, or one that cannot be undone).
        grid: (H, W) of the map, None without one.
        extra: entries outside the map grid along the token dim (ViT's class token).
        factors: per dim (without the batch's size): the factors `(kind, size, step)` with
            kind `n`, `h`, `w` or None, and the extra entries before and after the grid.
    """

    kind: str
    grid: tuple[int, int] | None = None
    extra: int = 0
    factors: tuple[tuple[tuple[_FactorSpec, ...], int, int], ...] = ()

    @property
    def label(self) -> str:
        """The name tables show: `NCHW`, `NHWC`, `tokens`, `vector`, `windows`, ..."""
        return LAYOUT_LABELS.get(self.kind, self.kind)

    @property
    def is_map(self) -> bool:
        """`to_nchw` can turn outputs of this layout into `(N, C, H, W)` maps."""
        return self.grid is not None

    def __str__(self) -> str:
        return self.kind


def _radix(specs: list[_FactorSpec]) -> bool:
    """Factors of one axis, outer to inner by step, tile the axis without gaps."""
    specs = sorted(specs, key=lambda f: -f[2])
    return all(o[2] == i[2] * i[1] for o, i in zip(specs, specs[1:]))


def layout_of(dims: Dims) -> Layout:
    """Name the layout of a tensor with these dims (`fgscope.dims`)."""
    factors = tuple(
        (tuple((f.kind, f.size, f.step) for f in d.factors), d.before, d.after) for d in dims
    )
    if factors and not any(k == "n" for fs, _, _ in factors for k, _, _ in fs) and not any(
        k in SPATIAL for k, _, _ in factors[0][0]
    ):  # the batch dim lost its mark (a fresh tensor): dim 0 is the batch
        factors = (((("n", dims[0].grid, 1),), factors[0][1], factors[0][2]), *factors[1:])
    if len(dims) <= 2:  # a vector, even one that holds a flattened map
        return Layout("NC" if len(dims) == 2 else "other", factors=factors)
    where = {k: [i for i, d in enumerate(dims) for f in d.factors if f.kind == k] for k in SPATIAL}
    specs = {k: [(f.kind, f.size, f.step) for d in dims for f in d.factors if f.kind == k] for k in SPATIAL}
    if not where["h"] or not where["w"] or not all(_radix(specs[k]) for k in SPATIAL):
        if not where["h"] and not where["w"]:
            return Layout("NC" if len(dims) == 2 else "other", factors=factors)
        return Layout("other", factors=factors)
    grid = tuple(math.prod(s[1] for s in specs[k]) for k in SPATIAL)
    extra = sum(d.before + d.after for d in dims)
    hs, ws = set(where["h"]), set(where["w"])
    nd = len(dims)
    kind = "mixed"
    if nd == 4 and hs == {2} and ws == {3}:
        kind = "NCHW"
    elif nd == 4 and hs == {1} and ws == {2}:
        kind = "NHWC"
    elif nd == 5 and hs == {3} and ws == {4}:
        kind = "NCDHW"
    elif nd == 3 and hs == ws == {1} and _row_major(dims[1]):
        kind = "NLC"
    elif nd == 3 and hs == ws == {2} and _row_major(dims[2]):
        kind = "NCL"
    elif 0 in hs or 0 in ws:
        kind = "windows"
    return Layout(kind, grid=(int(grid[0]), int(grid[1])), extra=extra, factors=factors)


def _row_major(d) -> bool:
    """A token dim whose rows come before its columns (`flatten(2)` of a map)."""
    kinds = [f.kind for f in d.factors if f.kind in SPATIAL]
    return kinds == sorted(kinds)  # all h before all w


def _square_tokens(n: int) -> tuple[int, int]:
    for extra in (0, 1):
        side = math.isqrt(n - extra)
        if side * side == n - extra and side > 0:
            return side, extra
    raise ValueError(f"{n} tokens are not a square grid (after 0 or 1 extra tokens)")


def _by_name(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "NCHW":
        return x
    if kind == "NHWC":
        return x.permute(0, 3, 1, 2)
    if kind in ("NLC", "NCL"):
        t = x if kind == "NLC" else x.transpose(1, 2)
        side, extra = _square_tokens(int(t.shape[1]))
        t = t[:, extra:]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    raise ValueError(f"layout {kind!r} has no map to turn into (N, C, H, W)")


def to_nchw(x: torch.Tensor, layout: Layout | str) -> torch.Tensor:
    """`x` as `(N, C, H, W)`: the map of a layer output in `layout`.

    Args:
        x: a layer output with any batch size (the layout's batch is not fixed).
        layout: from `LayerGeometry.layout`, or a name (`NCHW`, `NHWC`, `NLC`, `NCL`).

    Returns:
        `x` itself for NCHW, else a view or copy: extra tokens dropped, channels first.

    Raises:
        ValueError: the layout has no map, or `x` does not have the layout's shape.
    """
    if isinstance(layout, str):
        return _by_name(x, layout)
    if layout.kind == "NCHW":
        return x
    if not layout.is_map:
        raise ValueError(f"layout {layout.kind!r} has no map to turn into (N, C, H, W)")
    if x.dim() != len(layout.factors):
        raise ValueError(f"a {layout.kind} output has {len(layout.factors)} dims, got shape {tuple(x.shape)}")
    t = x
    for i, (_, before, after) in enumerate(layout.factors):
        if before or after:
            t = t.narrow(i, before, t.shape[i] - before - after)
    flat: list[_FactorSpec] = [f for fs, _, _ in layout.factors for f in fs]
    shape = [-1 if k == "n" else s for k, s, _ in flat]
    if shape.count(-1) > 1:
        raise ValueError("the batch is split across dims; cannot undo this layout")
    t = t.reshape(shape)
    idx = list(range(len(flat)))
    order = (
        [i for i in idx if flat[i][0] == "n"]
        + [i for i in idx if flat[i][0] is None]
        + sorted((i for i in idx if flat[i][0] == "h"), key=lambda i: -flat[i][2])
        + sorted((i for i in idx if flat[i][0] == "w"), key=lambda i: -flat[i][2])
    )
    t = t.permute(order)
    n = math.prod(t.shape[: sum(1 for i in idx if flat[i][0] == "n")])
    h, w = layout.grid
    return t.reshape(n, -1, h, w)


def as_map(x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """`x` as `(N, C, H, W)` when its layout holds a map in another arrangement (NHWC,
    tokens, windows), else `x` unchanged (NCHW maps, vectors, unknown layouts)."""
    if layout is None or layout.kind in ("NCHW", "NC") or not layout.is_map:
        return x
    try:
        return to_nchw(x, layout)
    except (ValueError, RuntimeError):  # a batch the layout does not fit: leave it as it is
        return x
