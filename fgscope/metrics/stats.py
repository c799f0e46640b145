"""Per-map statistics: sparsity (exact zeros) and the fraction of negative values, mean and
max, spatial energy and its concentration, the participation ratio and channel ranking.

Pure functions over (N, C, H, W) feature maps (some also take (N, F) vectors); half-precision
inputs are upcast; per-sample statistics run in float32 (float64 stays float64), the
concentration and dimensionality in float64 (float32 on MPS, which has no float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fgscope.metrics._common import _check_ndim, _float, _wide

__all__ = [
    "sparsity",
    "negative_fraction",
    "mean_activation",
    "max_activation",
    "spatial_energy",
    "spatial_concentration",
    "participation_ratio",
    "channel_ranking",
]

_RANKINGS = ("mean", "max", "std", "energy")


def sparsity(x: Tensor) -> Tensor:
    """Fraction of entries that are exactly 0, per sample: the inactive units of a rectified
    map (after ReLU, ReLU6, hard-tanh at 0, ...). For signed outputs (a linear bottleneck, a
    BatchNorm, logits) exact zeros are rare and this is not what "inactive" means: check
    `negative_fraction` and report that instead."""
    _check_ndim(x, (2, 3, 4, 5), "(N, ...)")
    return (x.reshape(len(x), -1) == 0).to(torch.float32).mean(1)  # (N, ...) -> (N,)


def negative_fraction(x: Tensor) -> Tensor:
    """Fraction of entries that are < 0, per sample (0 for a rectified map; about 0.5 for a
    signed, roughly centred one such as a linear bottleneck or logits)."""
    _check_ndim(x, (2, 3, 4, 5), "(N, ...)")
    return (x.reshape(len(x), -1) < 0).to(torch.float32).mean(1)  # (N, ...) -> (N,)


def mean_activation(x: Tensor) -> Tensor:
    """Mean of all entries, per sample."""
    _check_ndim(x, (2, 3, 4, 5), "(N, ...)")
    return _float(x).reshape(len(x), -1).mean(1)  # (N, ...) -> (N,)


def max_activation(x: Tensor) -> Tensor:
    """Largest entry, per sample."""
    _check_ndim(x, (2, 3, 4, 5), "(N, ...)")
    return _float(x).reshape(len(x), -1).amax(1)  # (N, ...) -> (N,)


def spatial_energy(x: Tensor) -> Tensor:
    """Mean over channels of x**2 at each location: where a layer's activity sits."""
    _check_ndim(x, (4,), "(N, C, H, W)")
    return _float(x).square().mean(1)  # (N, C, H, W) -> (N, H, W)


def spatial_concentration(x: Tensor, eps: float = 1e-12) -> Tensor:
    """How concentrated the spatial energy is: 1 - H(p) / log(H*W), per sample.

    p is `spatial_energy` normalised to sum 1 per sample and H(p) = -sum p log p its Shannon
    entropy (0 log 0 = 0), so a single hot location gives 1 and a uniform map gives 0. It is
    one minus the normalised entropy (Pielou's evenness, Pielou 1966) of the energy map.

    Returns NaN where it is undefined: for a 1x1 map (log 1 = 0) and for a sample whose total
    energy is <= `eps` (an all-zero map has no distribution to measure).
    """
    _check_ndim(x, (4,), "(N, C, H, W)")
    e = _wide(spatial_energy(x)).flatten(1)  # (N, C, H, W) -> (N, HW)
    total = e.sum(1, keepdim=True)  # (N, 1)
    p = e / total.clamp_min(eps)
    entropy = -torch.xlogy(p, p).sum(1)  # (N,)
    hw = e.shape[1]
    if hw < 2:
        return torch.full_like(entropy, math.nan)
    out = (1.0 - entropy / math.log(hw)).clamp(0.0, 1.0)
    return torch.where(total[:, 0] > eps, out, torch.full_like(out, math.nan))


def participation_ratio(x: Tensor) -> Tensor:
    """Participation ratio PR = (tr S)^2 / tr(S^2) = (sum l)^2 / sum l^2 of a covariance S.

    The dimensionality measure of Gao et al. 2017 ("A theory of multineuronal dimensionality,
    dynamics and measurement") and Recanatesi et al. 2019 ("Dimensionality compression and
    expansion in deep neural networks"). k orthogonal directions of equal variance give
    exactly k; with m observations it cannot exceed min(dim, m - 1).

    4-D input (N, C, H, W): one PR per sample, *within the image*: the H*W positions are the
    observations of a C-dimensional vector (centred over positions), so it is capped by
    min(C, H*W - 1). This is not the across-stimuli dimensionality of the papers above.
    NaN when H*W < 2 or the variance is zero (up to rounding: below eps times the uncentred
    energy).
    2-D input (N, F): the N samples are the observations (the papers' across-stimuli
    dimensionality, e.g. of pooled features); returns one 0-d tensor (NaN when N < 2 or the
    variance is zero), capped by min(F, N - 1).

    Uses the trace identity, not an eigendecomposition: with centred X (obs, dim),
    tr S ~ ||X||_F^2 and tr S^2 ~ ||X^T X||_F^2 = ||X X^T||_F^2 (the 1/(obs-1) cancels), so the
    smaller of the two Gram matrices is formed.
    """
    _check_ndim(x, (2, 4), "(N, C, H, W) or (N, F)")
    if x.ndim == 2:
        return participation_ratio(x.T[None, :, :, None])[0]  # (N, F) -> (1, F, N, 1) -> ()
    n, c, h, w = x.shape
    obs = _wide(x).reshape(n, c, h * w)  # (N, C, HW)
    # variance at rounding level (a constant map) counts as zero rather than giving noise's PR
    tol = obs.square().sum((1, 2)) * torch.finfo(obs.dtype).eps  # (N,)
    obs = obs - obs.mean(2, keepdim=True)  # centre over positions
    if h * w < 2:
        return torch.full((n,), math.nan, dtype=obs.dtype, device=obs.device)
    gram = obs @ obs.mT if c <= h * w else obs.mT @ obs  # (N, C, C) or (N, HW, HW)
    tr = obs.square().sum((1, 2))  # (N,)
    tr2 = gram.square().sum((1, 2))  # (N,)
    return torch.where(tr > tol, tr.square() / tr2, torch.full_like(tr, math.nan))


def channel_ranking(x: Tensor, by: str = "mean") -> Tensor:
    """Channel indices sorted by descending score over batch and space (ties: lower index first).

    Args:
        x: (N, C, H, W) or (C, H, W).
        by: "mean", "max", "std" (population std) or "energy" (mean of squares).

    Raises:
        ValueError: `by` is not one of the choices.
    """
    if by not in _RANKINGS:
        raise ValueError(f"unknown ranking {by!r}; choose one of {', '.join(_RANKINGS)}")
    _check_ndim(x, (3, 4), "(N, C, H, W) or (C, H, W)")
    per_channel = _float(x if x.ndim == 4 else x[None]).transpose(0, 1).flatten(1)  # (C, N*H*W)
    score = {
        "mean": lambda v: v.mean(1),
        "max": lambda v: v.amax(1),
        "std": lambda v: v.std(1, correction=0),
        "energy": lambda v: v.square().mean(1),
    }[by](per_channel)  # (C,)
    return torch.sort(score, descending=True, stable=True).indices  # (C,)
