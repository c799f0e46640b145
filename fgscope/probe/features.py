"""Pooled features for `fgscope probe`: every image runs once and each selected layer's output
is pooled on the fly (`avg`, `max`, `bilinear`, `hypercolumn`; the poolings are defined in
`fgscope.probe`'s docstring), so memory is n x dim, never the raw maps."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fgscope.errors import ConfigError, ImageError
from fgscope.forward import forward

if TYPE_CHECKING:
    import torch

    from fgscope.models import LoadedModel

__all__ = [
    "POOLS",
    "GRANULARITIES",
    "BILINEAR_CHANNELS",
    "HYPERCOLUMN_GRID",
    "check_pools",
    "ProbeLayer",
    "Features",
    "bilinear_features",
    "hypercolumn_features",
    "extract_features",
]

POOLS = ("avg", "max", "bilinear", "hypercolumn")
GRANULARITIES = ("fine", "coarse")
BILINEAR_CHANNELS = 64
"""Bilinear pooling reduces layers with more channels to this many first (random projection)."""
HYPERCOLUMN_GRID = 28
"""Hypercolumns are fused on a grid no larger than this many units per side."""


def check_pools(pools: Sequence[str]) -> tuple[str, ...]:
    """Validate pool names (order kept, repeats dropped). Raises ConfigError."""
    out = tuple(dict.fromkeys(p.strip().lower() for p in pools if p.strip()))
    if not out:
        raise ConfigError("no pooling given", hint=f"use one or more of {', '.join(POOLS)}")
    bad = [p for p in out if p not in POOLS]
    if bad:
        raise ConfigError(f"unknown pooling {', '.join(bad)}; choose from {', '.join(POOLS)}")
    return out


@dataclass(frozen=True)
class ProbeLayer:
    """A probed layer: record name, position in execution order and geometry."""

    name: str
    index: int
    stage: str
    stride: float | None
    rf: float | None
    shape: tuple[int, ...]


# --- pooled features -------------------------------------------------------------------------


def _projection(channels: int, out: int, seed: int, name: str) -> torch.Tensor:
    """Fixed Gaussian (out, channels) projection, the same for the same seed and layer name."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(out, channels, generator=g) / math.sqrt(out)


def bilinear_features(
    x: torch.Tensor, *, channels: int = BILINEAR_CHANNELS, projection: torch.Tensor | None = None
) -> torch.Tensor:
    """Bilinear pooling with channel reduction: (N, C, H, W) -> (N, k (k + 1) / 2).

    k = C when C <= `channels`, else x is first projected to k = `channels` with
    `projection` ((k, C); required then). The B-CNN matrix (`metrics.bilinear_pool`: mean
    of x x^T over positions, signed sqrt, L2 norm) is symmetric; its upper triangle (row
    major, diagonal included) is returned.
    """
    import torch

    from fgscope import metrics

    c = x.shape[1]
    if c > channels:
        if projection is None or projection.shape != (channels, c):
            raise ValueError(f"a ({channels}, {c}) projection is needed for {c} channels")
        x = torch.einsum("kc,nchw->nkhw", projection.to(x.device, x.dtype), x)  # (N, k, H, W)
    k = x.shape[1]
    z = metrics.bilinear_pool(x)  # (N, k*k), symmetric per sample
    iu = torch.triu_indices(k, k, device=z.device)
    return z.reshape(-1, k, k)[:, iu[0], iu[1]]  # (N, k (k + 1) / 2)


def hypercolumn_features(maps: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Hypercolumn pooling: (N, C_i, H_i, W_i) maps -> (N, sum C_i).

    Definition: every map is brought to `grid` (per axis: bilinear upsampling with
    align_corners=False where it is shorter, area averaging as `adaptive_avg_pool2d` where
    it is longer), the maps are concatenated
    along channels (`metrics.hypercolumns`) and averaged over the grid. Both resizings are
    linear and separable, so the grid average of a resized map is a weighted sum of the map,
    sum_ij x_ij a_i b_j, with per-axis weights `_grid_weights`; computing it that way gives
    the same numbers without materialising the (N, sum C, grid) tensor.
    """
    import torch

    out = []
    for m in maps:
        a = _grid_weights(m.shape[2], grid[0]).to(m.device, m.dtype)  # (H,)
        b = _grid_weights(m.shape[3], grid[1]).to(m.device, m.dtype)  # (W,)
        out.append(torch.einsum("nchw,h,w->nc", m, a, b))  # (N, C)
    return torch.cat(out, 1)  # (N, sum C)


_WEIGHTS: dict[tuple[int, int], torch.Tensor] = {}


def _grid_weights(n: int, g: int) -> torch.Tensor:
    """(n,) float64: the mean over `g` outputs of resizing a length-n axis to g, per input.

    Upsampling (n < g) is `F.interpolate(mode="linear", align_corners=False)`, downsampling
    (n > g) `adaptive_avg_pool1d`, equal sizes the identity; each row of the identity matrix
    goes through the operation and is averaged."""
    import torch
    import torch.nn.functional as F

    key = (n, g)
    if key not in _WEIGHTS:
        eye = torch.eye(n, dtype=torch.float64)[None]  # (1, n, n): n one-hot signals of length n
        if n < g:
            out = F.interpolate(eye, size=g, mode="linear", align_corners=False)
        elif n > g:
            out = F.adaptive_avg_pool1d(eye, g)
        else:
            out = eye
        _WEIGHTS[key] = out[0].mean(1)  # (n,)
    return _WEIGHTS[key]


@dataclass
class Features:
    """Pooled features of every probed layer, and what went in.

    Attributes:
        layers: the probed layers in execution order.
        values: (layer name, pool) -> (n, dim) float32 array; `hypercolumn` per single layer
            holds that layer's part of the fused vector (cumulative fusion is done later).
        kept: indices (into the given paths) of the images that loaded, in order.
        hashes: sha256 of each kept image's file, in the order of `kept`.
        failures: (path, reason) of images that could not be read.
        grid: the hypercolumn grid, None when no map was probed.
        pools: the poolings asked for, in the order given (the order of the probe's rows).
    """

    layers: list[ProbeLayer]
    values: dict[tuple[str, str], np.ndarray]
    kept: list[int]
    hashes: list[str]
    failures: list[tuple[str, str]]
    grid: tuple[int, int] | None
    pools: tuple[str, ...] = ()

    def hypercolumn(self, upto: int) -> tuple[np.ndarray, tuple[str, ...]]:
        """Cumulative hypercolumn: maps among layers[0..upto] concatenated -> (n, dim), names."""
        names = tuple(
            layer.name for layer in self.layers[: upto + 1] if (layer.name, "hypercolumn") in self.values
        )
        return np.concatenate([self.values[(n, "hypercolumn")] for n in names], 1), names


def _grid_for(shapes: Sequence[tuple[int, ...]]) -> tuple[int, int] | None:
    maps = [s for s in shapes if len(s) == 3]
    if not maps:
        return None
    return (min(max(s[1] for s in maps), HYPERCOLUMN_GRID), min(max(s[2] for s in maps), HYPERCOLUMN_GRID))


def extract_features(
    lm: LoadedModel,
    paths: Sequence[Path],
    layers: Any = "stages",
    pools: Sequence[str] = ("avg",),
    *,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
    seed: int = 0,
    bilinear_channels: int = BILINEAR_CHANNELS,
    on_batch: Callable[[int], None] | None = None,
) -> Features:
    """Run every image once and pool each selected layer's output on the fly.

    Args:
        lm: the loaded model.
        paths: image files; unreadable ones are skipped and reported in `failures`.
        layers: selection as in `fgscope.selection`.
        pools: from `POOLS`; bilinear and hypercolumn apply to maps only.
        seed: seed of the bilinear random projections.
        bilinear_channels: layers with more channels are projected to this many before
            bilinear pooling.
        on_batch: called with the number of paths handled after each batch (progress).

    Raises:
        ImageError: no image could be read.
        LayerNotFoundError: an unknown layer (before any forward).
    """
    import torch

    from fgscope import metrics
    from fgscope.capture import capture
    from fgscope.device import autocast, resolve_device, resolve_dtype, to_device
    from fgscope.images import LoadedImage, iter_images
    from fgscope.places import trace_places
    from fgscope.selection import select_layers

    pools = check_pools(pools)
    batch_size = min(batch_size, lm.max_batch or batch_size)  # a static-batch .pt2 takes no more
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    module = lm.module
    module.to(dev)
    example = torch.zeros(1, 3, *lm.input_size, device=dev)
    selected = list(select_layers(module, layers, example))
    shapes: dict[str, tuple[int, ...]] = {}  # record name -> shape without batch, in run order

    def probe_shapes(rec: Any, _geometry: Any) -> None:
        if rec.tensor.dim() in (2, 4):  # vectors and maps; other outputs are not probed
            shapes.setdefault(rec.name, tuple(int(s) for s in rec.tensor.shape[1:]))

    places, _ = trace_places(module, example, selected, on_record=probe_shapes)  # model-wide stages
    names = list(shapes)
    grid = _grid_for(list(shapes.values())) if "hypercolumn" in pools else None
    proj = {
        n: _projection(s[0], bilinear_channels, seed, n).to(dev)
        for n, s in shapes.items() if "bilinear" in pools and len(s) == 3 and s[0] > bilinear_channels
    }
    # One (len(paths), dim) float32 array per (layer, pool), filled batch by batch and cut
    # to the images that loaded: memory is n x dim, with no second copy at the end.
    values: dict[tuple[str, str], np.ndarray] = {}
    row = [0]  # first row of the current batch

    def on_record(rec: Any) -> None:
        if rec.name not in shapes:
            return
        t = rec.tensor.float()
        is_map = t.dim() == 4
        for how in pools:
            if how in ("avg", "max"):
                f = metrics.pool(t, how)
            elif not is_map:
                continue
            elif how == "bilinear":
                f = bilinear_features(t, channels=bilinear_channels, projection=proj.get(rec.name))
            else:
                assert grid is not None
                f = hypercolumn_features([t], grid)
            f = f.float().cpu().numpy()
            buf = values.get((rec.name, how))
            if buf is None:
                buf = values[(rec.name, how)] = np.empty((len(paths), f.shape[1]), np.float32)
            buf[row[0] : row[0] + len(f)] = f

    kept: list[int] = []
    hashes: list[str] = []
    failures: list[tuple[str, str]] = []
    done = 0
    with capture(module, selected, on_record=on_record, to=None):
        for start in range(0, len(paths), batch_size):
            part = paths[start : start + batch_size]
            tensors = []
            for j, item in enumerate(iter_images(part, resize_size=lm.preprocess.resize_size)):
                if isinstance(item, LoadedImage):
                    tensors.append(lm.preprocess(item.image))
                    kept.append(start + j)
                    hashes.append(item.sha256)
                else:
                    failures.append((str(item.path), item.reason))
            if tensors:
                row[0] = len(kept) - len(tensors)
                with autocast(dev, dt):
                    forward(module, to_device(torch.stack(tensors), dev))
            done += len(part)
            if on_batch is not None:
                on_batch(done)
    if not kept:
        reasons = "; ".join(r for _, r in failures[:3])
        raise ImageError(f"none of the {len(failures)} image(s) could be read: {reasons}")
    values = {k: v[: len(kept)] for k, v in values.items()}
    infos = [
        ProbeLayer(n, i, places[n].stage, places[n].stride, places[n].rf, shapes[n])
        for i, n in enumerate(names)
    ]
    return Features(infos, values, kept, hashes, failures, grid, pools)
