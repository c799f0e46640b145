"""Invariance to nuisance transformations within one image: seeded random views of an image
and of its layout-shuffled copy, and the view-invariance index of a layer's pooled features.

After Goodfellow, Le, Saxe, Lee & Ng 2009 ("Measuring invariances in deep networks"), who
score a unit by how much more it keeps responding across transformations of an input than
across arbitrary inputs (their local / global firing rate): here the "arbitrary input" for an
image is its own tile-shuffled copy, so the measure needs a single image.

For one image A, `view_pairs` draws K views (random resized crop, horizontal flip, small
rotation, brightness / contrast / saturation jitter; parameters in `ViewSpec`, drawn from
`seed`) and applies the *same* K transformations to B, A with its tiles shuffled (same
pixels and colours, layout destroyed). With z the layer's average-pooled features and
d = squared Euclidean distance,

    invariance = 1 - D_same / D_cross,
    D_same  = mean over k != j of [d(z(A_k), z(A_j)) + d(z(B_k), z(B_j))] / 2   (same content)
    D_cross = mean over k != j of d(z(A_k), z(B_j))                        (different content)

Both means run over the same pairs of transformations, so the transformations' own spread
cancels in the comparison. In an additive model z = content + view + noise it is the
intraclass correlation var(content) / (var(content) + var(view) + var(noise)): 1 = views do
not move the features at all, 0 = views move them as much as destroying the image's layout
(chance: e.g. any network on pure noise, whose shuffled copy is the same noise), below 0 =
views move them more. Pure functions; no model runs here (`fgscope.layers` runs the views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from fgscope.metrics._common import _check_ndim, _wide
from fgscope.metrics.intervals import Estimate, jackknife

__all__ = ["ViewSpec", "shuffle_tiles", "nuisance_views", "view_pairs", "view_invariance",
           "view_invariance_estimate"]


@dataclass(frozen=True)
class ViewSpec:
    """The nuisance transformations of `nuisance_views`, applied in this order.

    Attributes:
        views: K, views per image (and as many of its shuffled copy): 2K forwards per image.
        scale: range of the crop's area as a fraction of the image (then resized back).
        ratio: range of the crop's aspect ratio (log-uniform).
        flip: probability of a horizontal flip.
        degrees: rotation uniform in [-degrees, degrees]; corners filled with the view's mean
            colour.
        brightness, contrast, saturation: each factor uniform in [1 - b, 1 + b].
        tiles: the shuffled copy cuts the image into tiles x tiles and permutes them (no tile
            stays in place).
    """

    views: int = 8
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    tiles: int = 4

    def __post_init__(self) -> None:
        if self.views < 3:
            raise ValueError(f"the invariance interval needs at least 3 views, got {self.views}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if self.tiles < 2:
            raise ValueError(f"tiles must be at least 2, got {self.tiles}")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def shuffle_tiles(x: Tensor, tiles: int, seed: int) -> Tensor:
    """x cut into tiles x tiles equal tiles, permuted so that no tile stays in place (a seeded
    derangement); rows and columns left over when H or W do not divide stay where they are.

    (C, H, W) -> (C, H, W), a new tensor.
    """
    _check_ndim(x, (3,), "(C, H, W)")
    c, h, w = x.shape
    th, tw = h // tiles, w // tiles
    if th < 1 or tw < 1:
        raise ValueError(f"a {h}x{w} image cannot be cut into {tiles}x{tiles} tiles")
    g = torch.Generator().manual_seed(seed)
    n = tiles * tiles
    while True:
        perm = torch.randperm(n, generator=g)
        if bool((perm != torch.arange(n)).all()):
            break
    grid = x[:, : th * tiles, : tw * tiles].reshape(c, tiles, th, tiles, tw)
    grid = grid.permute(1, 3, 0, 2, 4).reshape(n, c, th, tw)[perm]  # (n, C, th, tw)
    out = x.clone()
    out[:, : th * tiles, : tw * tiles] = (
        grid.reshape(tiles, tiles, c, th, tw).permute(2, 0, 3, 1, 4).reshape(c, th * tiles, tw * tiles)
    )
    return out


def nuisance_views(x: Tensor, spec: ViewSpec, seed: int) -> Tensor:
    """K random views of an RGB image in [0, 1], seeded: the same `seed` gives the same
    transformations whatever the image (so `view_pairs` can apply them to two images).

    (3, H, W) -> (K, 3, H, W), values clamped to [0, 1].
    """
    _check_ndim(x, (3,), "(3, H, W)")
    _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    out = []
    for _ in range(spec.views):
        area = _uniform(g, *spec.scale) * h * w
        ar = math.exp(_uniform(g, math.log(spec.ratio[0]), math.log(spec.ratio[1])))
        ch = max(1, min(h, round(math.sqrt(area / ar))))
        cw = max(1, min(w, round(math.sqrt(area * ar))))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        flip = _uniform(g, 0, 1) < spec.flip
        angle = _uniform(g, -spec.degrees, spec.degrees)
        b, c, s = (_uniform(g, 1 - v, 1 + v) for v in (spec.brightness, spec.contrast, spec.saturation))
        v = TF.resized_crop(x, top, left, ch, cw, [h, w], antialias=True)  # (3, H, W)
        if flip:
            v = TF.horizontal_flip(v)
        if spec.degrees > 0:  # corners: the mean colour. Rotating v - mean with a zero fill,
            # because torchvision blends a non-zero fill into bilinear edges twice (darker rims)
            m = v.mean((1, 2), keepdim=True)  # (3, 1, 1)
            v = TF.rotate(v - m, angle, interpolation=TF.InterpolationMode.BILINEAR) + m
        v = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(v, b), c), s)
        out.append(v.clamp(0, 1))
    return torch.stack(out)  # (K, 3, H, W)


def view_pairs(x: Tensor, spec: ViewSpec, seed: int) -> tuple[Tensor, Tensor]:
    """K views of x and the same K transformations of its tile-shuffled copy.

    (3, H, W) in [0, 1] -> ((K, 3, H, W), (K, 3, H, W)).
    """
    shuffled = shuffle_tiles(x, spec.tiles, seed)
    return nuisance_views(x, spec, seed), nuisance_views(shuffled, spec, seed)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances between rows: (M, K, F), (M, K, F) -> (M, K, K)."""
    return (a.square().sum(2)[:, :, None] + b.square().sum(2)[:, None, :] - 2 * a @ b.mT).clamp_min(0)


def _index(daa: Tensor, dbb: Tensor, dab: Tensor, keep: Tensor, scale: Tensor) -> Tensor:
    """The index per image over the views in `keep`: (M, K, K) x 3, (K,) bool -> (M,)."""
    pair = keep[:, None] & keep[None, :]
    pair = pair & ~torch.eye(len(keep), dtype=torch.bool, device=keep.device)  # k != j, both kept
    n = pair.sum()
    same = ((daa + dbb) / 2 * pair).sum((1, 2)) / n  # (M,)
    cross = (dab * pair).sum((1, 2)) / n  # (M,)
    ok = cross > scale * 1e-12
    return torch.where(ok, 1 - same / cross.where(ok, torch.ones_like(cross)), torch.full_like(cross, math.nan))


def view_invariance(a: Tensor, b: Tensor) -> Tensor:
    """The view-invariance index of each of M images (module docstring).

    Args:
        a: (M, K, F) pooled features of K views of each image (or (M, K, C, H, W) maps,
            average-pooled here).
        b: the same for the same K transformations of each image's shuffled copy.

    Returns:
        (M,) in (-inf, 1], float64 (float32 on MPS); NaN where the features do not vary.
    """
    return _invariance_parts(a, b)[0]


def _invariance_parts(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"a and b need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_ndim(a, (3, 5), "(M, K, F) or (M, K, C, H, W)")
    if a.shape[1] < 2:
        raise ValueError(f"need at least 2 views per image, got {a.shape[1]}")
    za, zb = (_wide(t.mean((3, 4)) if t.ndim == 5 else t) for t in (a, b))  # (M, K, F)
    centre = torch.cat([za, zb], 1).mean(1, keepdim=True)  # (M, 1, F): distances are unchanged
    za, zb = za - centre, zb - centre
    scale = torch.cat([za, zb], 1).square().sum((1, 2))  # (M,) for the "does not vary" test
    daa, dbb, dab = _sq_dists(za, za), _sq_dists(zb, zb), _sq_dists(za, zb)  # (M, K, K) each
    dab = (dab + dab.mT) / 2  # d(A_k, B_j) and d(A_j, B_k) for the same pair of views
    keep = torch.ones(a.shape[1], dtype=torch.bool, device=daa.device)
    return _index(daa, dbb, dab, keep, scale), daa, dbb, dab, scale


def view_invariance_estimate(a: Tensor, b: Tensor) -> Estimate:
    """The mean index over the M images with a 95% jackknife interval over views: replicate k
    deletes view k (of A and of B) from every image (K >= 3).

    Args:
        a, b: as for `view_invariance`.

    Returns:
        An `Estimate` (NaN when an image's features do not vary).
    """
    full, daa, dbb, dab, scale = _invariance_parts(a, b)
    k = a.shape[1]
    if k < 3:
        raise ValueError(f"the jackknife over views needs at least 3 views, got {k}")
    reps = []
    for drop in range(k):
        keep = torch.ones(k, dtype=torch.bool, device=daa.device)
        keep[drop] = False
        reps.append(float(_index(daa, dbb, dab, keep, scale).mean()))
    return jackknife(float(full.mean()), reps)
