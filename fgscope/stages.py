"""Which layers are early, middle and late: a rule from the model's own downsampling.

The rule (no table of known architectures):
1. A layer's *resolution level* is the rank of its effective stride among the distinct
   strides of the model's spatial layers (ResNet-50 at 224 px: strides 2, 4, 8, 16, 32 are
   levels 0..4). Layers without spatial axes (after global pooling) belong after the last
   level; layers without known geometry take the level of the layer before them.
2. With L levels, the first ceil(L/3) levels are `early`, the last floor(L/3) levels and
   everything after global pooling are `late`, the levels between are `middle`. With 5
   levels: strides 2-4 early, 8-16 middle, 32 late — the usual reading of ResNets and
   MobileNets (edges and textures; parts; objects).
3. With a single level (no downsampling at all), depth decides: thirds of the layer order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["STAGES", "resolution_levels", "assign_stages", "last_at_each_resolution"]

STAGES = ("early", "middle", "late")


def resolution_levels(strides: Sequence[float | None], spatial: Sequence[bool]) -> list[int]:
    """Level index per layer (see module docstring); non-spatial layers get L (one past the
    last level)."""
    known = sorted({s for s, sp in zip(strides, spatial) if sp and s is not None})
    rank = {s: i for i, s in enumerate(known)}
    levels: list[int] = []
    prev = 0
    for s, sp in zip(strides, spatial):
        if not sp:
            level = len(known)
        elif s is None:
            level = prev
        else:
            level = rank[s]
        levels.append(level)
        prev = level
    return levels


def assign_stages(strides: Sequence[float | None], spatial: Sequence[bool]) -> list[str]:
    """`early`/`middle`/`late` per layer, in the given (execution) order."""
    n = len(strides)
    levels = resolution_levels(strides, spatial)
    n_levels = len({s for s, sp in zip(strides, spatial) if sp and s is not None})
    if n_levels <= 1:
        out = []
        for i, sp in enumerate(spatial):
            if not sp and n_levels == 1:
                out.append("late")
            else:
                out.append(STAGES[min(3 * i // max(n, 1), 2)])
        return out
    n_early = math.ceil(n_levels / 3)
    n_late = n_levels // 3
    stages = []
    for lvl in levels:
        if lvl < n_early:
            stages.append("early")
        elif lvl >= n_levels - n_late:
            stages.append("late")
        else:
            stages.append("middle")
    return stages


def last_at_each_resolution(sizes: Sequence[Sequence[int] | None]) -> list[int]:
    """Indices of the last map before each change of spatial size, in order.

    `sizes` holds each layer's (H, W), or None for layers without a map; None and 1x1 maps
    are passed over. This picks the `stages` selection and the hierarchy figure's columns.
    """
    maps = [i for i, hw in enumerate(sizes) if hw is not None and hw[0] * hw[1] > 1]
    return [
        i
        for k, i in enumerate(maps)
        if k + 1 == len(maps) or tuple(sizes[maps[k + 1]]) != tuple(sizes[i])
    ]
