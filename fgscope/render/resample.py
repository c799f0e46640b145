"""Resampling of `(..., h, w)` maps with numpy: nearest-neighbour indices for grid tiles,
bilinear upsampling for overlays (matching PIL/torch with `align_corners=False`)."""

from __future__ import annotations

import numpy as np

__all__ = ["upsample_bilinear"]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # Pixel-centre nearest neighbour; equals np.repeat for integer factors.
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`(n_out, n_in)` weights of bilinear resampling (half-pixel centres, edges clamped)."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = x - i0
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, i0), 1.0 - f)
    np.add.at(mat, (rows, i1), f)
    return mat


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(..., h, w)` -> `(..., H, W)` float32 for `size = (H, W)`, bilinear (like PIL/torch
    with `align_corners=False`), a convex combination so per-map min/max never grow."""
    m = np.asarray(maps, dtype=np.float32)
    ry = _bilinear_matrix(m.shape[-2], size[0])
    rx = _bilinear_matrix(m.shape[-1], size[1])
    return ry @ m @ rx.T
