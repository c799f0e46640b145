"""Pooling of feature maps into vectors: global average and max, bilinear (B-CNN)
second-order pooling, hypercolumns across depths, and the `pool` dispatcher.

Pure functions over (N, C, H, W) maps; half-precision inputs are upcast to float32 (float64
stays float64), `hypercolumns` keeps the maps' promoted dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fgscope.metrics._common import _check_ndim, _float

__all__ = [
    "bilinear_pool",
    "hypercolumns",
    "avg_pool",
    "max_pool",
    "pool",
]

_POOLS = ("avg", "max", "bilinear", "none")


def bilinear_pool(x: Tensor, signed_sqrt: bool = True, normalize: bool = True) -> Tensor:
    """Bilinear (second-order) pooling, B-CNN (Lin, RoyChowdhury & Maji 2015).

    z = (1 / HW) sum_l x_l x_l^T over the H*W locations, flattened; then sign(z) sqrt(|z|)
    and L2 normalisation per sample. The paper sums; averaging only rescales z by 1/HW, which
    the L2 normalisation removes (it keeps values comparable across sizes when it is off).
    """
    _check_ndim(x, (4,), "(N, C, H, W)")
    n, c, h, w = x.shape
    feats = _float(x).reshape(n, c, h * w)  # (N, C, HW)
    z = (feats @ feats.mT / (h * w)).reshape(n, c * c)  # (N, C, C) -> (N, C*C)
    if signed_sqrt:
        z = z.sign() * z.abs().sqrt()
    return F.normalize(z, dim=1) if normalize else z  # (N, C*C)


def hypercolumns(
    maps: Sequence[Tensor], size: tuple[int, int] | None = None, mode: str = "bilinear"
) -> Tensor:
    """Upsample maps from several depths to one size and stack their channels per pixel.

    Hariharan, Arbelaez, Girshick & Malik 2015 ("Hypercolumns for object segmentation and
    fine-grained localization"); the same fusion as FPN's lateral concatenation. Each map is
    resized with `F.interpolate` (align_corners=False for the interpolating modes) to `size`,
    by default the largest H and the largest W among the inputs; maps already at `size` are
    copied unchanged.

    Args:
        maps: (N, C_i, H_i, W_i) tensors with the same N.

    Returns:
        (N, sum C_i, H, W) in the maps' promoted dtype.
    """
    if not maps:
        raise ValueError("hypercolumns needs at least one feature map")
    for m in maps:
        _check_ndim(m, (4,), "(N, C, H, W)")
    if len({m.shape[0] for m in maps}) != 1:
        raise ValueError(f"all maps need the same N, got {[tuple(m.shape) for m in maps]}")
    if size is None:
        size = (max(m.shape[2] for m in maps), max(m.shape[3] for m in maps))
    dtype = maps[0].dtype
    for m in maps[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    out = [
        m.to(dtype)
        if tuple(m.shape[2:]) == tuple(size)
        else F.interpolate(m.to(dtype), size=size, mode=mode, align_corners=align)
        for m in maps
    ]  # each (N, C_i, H, W)
    return torch.cat([o.to(maps[0].device) for o in out], 1)  # (N, sum C_i, H, W)


def avg_pool(x: Tensor) -> Tensor:
    """Global average pooling; (N, F) input is returned as is."""
    _check_ndim(x, (2, 4), "(N, C, H, W) or (N, F)")
    return x if x.ndim == 2 else x.mean((2, 3))  # (N, C, H, W) -> (N, C)


def max_pool(x: Tensor) -> Tensor:
    """Global max pooling; (N, F) input is returned as is."""
    _check_ndim(x, (2, 4), "(N, C, H, W) or (N, F)")
    return x if x.ndim == 2 else x.amax((2, 3))  # (N, C, H, W) -> (N, C)


def pool(x: Tensor, how: str) -> Tensor:
    """Dispatch: "avg" and "max" -> (N, C), "bilinear" -> (N, C*C), "none" -> (N, C*H*W).

    Raises:
        ValueError: unknown `how`.
    """
    if how == "avg":
        return avg_pool(x)
    if how == "max":
        return max_pool(x)
    if how == "bilinear":
        return bilinear_pool(x)
    if how == "none":
        return x.reshape(len(x), -1)  # (N, ...) -> (N, -1)
    raise ValueError(f"unknown pooling {how!r}; choose one of {', '.join(_POOLS)}")
