"""Which layers are early, middle and late: a rule from the model's own downsampling.

The rule (no table of known architectures), applied to the *whole model*, so that a layer
gets the same stage whichever layers are selected and whichever command asks:
1. The model's *resolution levels* are the distinct effective strides of its spatial
   reference layers, ascending (its building blocks, `fgscope.selection.block_modules`;
   ResNet-50 at 224 px: strides 2, 4, 8, 16, 32 are levels 0..4). A spatial layer's level is
   the first level whose stride is >= its own (a layer inside a block gets the level of the
   block it belongs to; an exact match is its rank). Layers without spatial axes (after
   global pooling) belong after the last level; layers without known geometry take the level
   of the layer before them.
2. With L levels, the first ceil(L/3) levels are `early`, the last floor(L/3) levels and
   everything after global pooling are `late`, the levels between are `middle`. With 5
   levels: strides 2-4 early, 8-16 middle, 32 late — the usual reading of ResNets and
   MobileNets (edges and textures; parts; objects).
3. With a single level (no downsampling at all), depth decides: thirds of the reference
   layers in execution order (a layer between references counts as the next reference).

`fgscope.places.locate_layers` runs the one geometry pass (the model's blocks plus the
selection) that feeds this rule; every command takes its stages from there.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["STAGES", "resolution_levels", "assign_stages", "last_at_each_resolution"]

STAGES = ("early", "middle", "late")


def _model_levels(
    strides: Sequence[float | None], spatial: Sequence[bool], reference: Sequence[bool]
) -> list[float]:
    return sorted({s for s, sp, r in zip(strides, spatial, reference) if r and sp and s is not None})


def resolution_levels(
    strides: Sequence[float | None],
    spatial: Sequence[bool],
    reference: Sequence[bool] | None = None,
) -> list[int]:
    """Level index per layer (see module docstring); non-spatial layers get L (one past the
    last level).

    Args:
        strides: effective stride per layer (None: unknown or no spatial axes).
        spatial: whether each layer's output has spatial axes.
        reference: which layers define the levels (the model's blocks); None = all of them.
    """
    ref = [True] * len(strides) if reference is None else list(reference)
    known = _model_levels(strides, spatial, ref)
    levels: list[int] = []
    prev = 0
    for s, sp in zip(strides, spatial):
        if not sp:
            level = len(known)
        elif s is None or not known:
            level = prev
        else:
            level = min(bisect.bisect_left(known, s), len(known) - 1)
        levels.append(level)
        prev = level
    return levels


def _depth_thirds(spatial: Sequence[bool], reference: Sequence[bool], one_level: bool) -> list[str]:
    n_ref = max(sum(reference), 1)
    out: list[str] = []
    seen = 0  # reference layers finished before this one
    for sp, r in zip(spatial, reference):
        if not sp and one_level:
            out.append("late")
        else:
            out.append(STAGES[min(3 * min(seen, n_ref - 1) // n_ref, 2)])
        seen += bool(r)
    return out


def assign_stages(
    strides: Sequence[float | None],
    spatial: Sequence[bool],
    reference: Sequence[bool] | None = None,
) -> list[str]:
    """`early`/`middle`/`late` per layer, in the given (execution) order.

    Args:
        strides, spatial: as for `resolution_levels`, one entry per layer.
        reference: which entries are the model's reference layers (its blocks), from which
            the levels are taken; None = every entry. Pass the whole model's blocks here and
            the selection's stages no longer depend on what else was selected.
    """
    ref = [True] * len(strides) if reference is None else list(reference)
    if not (len(strides) == len(spatial) == len(ref)):
        raise ValueError(
            f"strides, spatial and reference need one entry per layer, got "
            f"{len(strides)}, {len(spatial)}, {len(ref)}"
        )
    n_levels = len(_model_levels(strides, spatial, ref))
    if n_levels <= 1:
        return _depth_thirds(spatial, ref, n_levels == 1)
    levels = resolution_levels(strides, spatial, ref)
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
