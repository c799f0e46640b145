"""Streaming per-unit accumulators: running top-K, a quantile sketch, mean/max and the class
means behind the selectivity index. Each is updated batch by batch and holds O(C x K) or
O(C x BINS) numbers, never the maps themselves.

- `RunningTopK`: per unit (channel), the K images whose *peak* activation (the map's
  spatial maximum) is largest, with each peak's position (row, column of the map). One entry
  per image, so the K examples are K different images. Exact.
- `QuantileSketch`: per unit, a histogram of every activation (all images, all positions)
  over a range that grows by doubling: when a value falls outside, the range doubles towards
  it and pairs of bins merge. A quantile is read from the cumulative histogram with linear
  interpolation inside its bin, so its absolute error is at most one bin width,
  `span / BINS`, where `span` (the final range, reported) is below 2 x (max - min) seen
  plus the first batch's range. `BINS` = 4096.
- `ClassMeans`: per class and unit, the mean over images of the unit's spatial mean.
  `selectivity_index` is Morcos et al. 2018's (mu_max - mu_-max) / (mu_max + mu_-max), with
  mu_max the largest class mean and mu_-max the mean of the other classes' means.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "BINS",
    "QUANTILES",
    "RunningTopK",
    "QuantileSketch",
    "ChannelStats",
    "ClassMeans",
    "selectivity_index",
    "peaks",
]

BINS = 4096
QUANTILES = (0.5, 0.9, 0.99, 0.995)
"""Quantile levels kept per unit; 0.995 is Network Dissection's top-quantile threshold."""


def peaks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial peak per image and unit: (N, C, H, W) -> values (N, C), flat positions (N, C)
    (row * W + column). The first maximum wins on ties."""
    v, i = x.flatten(2).max(2)
    return v, i


class RunningTopK:
    """Per unit, the `k` largest peak activations seen, with image index and map position.

    Attributes after updates: `values` (C, k) descending (-inf where fewer than k images),
    `images` (C, k) int64 global image indices (-1 where empty), `positions` (C, k) flat
    map positions (row * W + column).
    """

    def __init__(self, channels: int, k: int) -> None:
        self.k = k
        self.values = torch.full((channels, k), -math.inf, dtype=torch.float64)
        self.images = torch.full((channels, k), -1, dtype=torch.int64)
        self.positions = torch.full((channels, k), -1, dtype=torch.int64)

    def update(self, x: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Merge one batch: x (N, C, H, W) maps, image_ids (N,) global indices."""
        v, pos = peaks(x)  # (N, C)
        v = v.detach().to("cpu", torch.float64).T  # (C, N)
        pos = pos.to("cpu").T
        ids = image_ids.to("cpu", torch.int64)[None].expand_as(pos)
        allv = torch.cat([self.values, v], 1)  # (C, k + N)
        alli = torch.cat([self.images, ids], 1)
        allp = torch.cat([self.positions, pos], 1)
        # Stable order: equal values keep the earlier image (the running entries come first).
        order = torch.sort(allv, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values = allv.gather(1, order)
        self.images = alli.gather(1, order)
        self.positions = allp.gather(1, order)


class QuantileSketch:
    """Per-unit histogram with a doubling range (module docstring); `quantiles(qs)` reads it."""

    def __init__(self, channels: int, bins: int = BINS) -> None:
        self.bins = bins
        self.lo = torch.zeros(channels, dtype=torch.float64)
        self.span = torch.zeros(channels, dtype=torch.float64)  # 0 until the first batch
        self.counts = torch.zeros(channels, bins, dtype=torch.float64)

    def _grow(self, c: int, lo: float, hi: float) -> None:
        """Double channel c's range (towards the side that is exceeded) until [lo, hi] fits."""
        while lo < self.lo[c] or hi > self.lo[c] + self.span[c]:
            h = self.counts[c].reshape(-1, 2).sum(1)  # pairs merged: bins/2 bins of width 2w
            new = torch.zeros(self.bins, dtype=torch.float64, device=self.counts.device)
            if hi > self.lo[c] + self.span[c]:  # grow upwards: old range is the lower half
                new[: self.bins // 2] = h
            else:  # grow downwards: old range is the upper half
                new[self.bins // 2:] = h
                self.lo[c] -= self.span[c]
            self.span[c] *= 2
            self.counts[c] = new

    def update(self, x: torch.Tensor) -> None:
        """Add every value of x (N, C, H, W) to its unit's histogram."""
        c = x.shape[1]
        if self.counts.device != x.device:  # the histogram lives where the maps are (GPU: no copy)
            self.counts = self.counts.to(x.device)
        v = x.detach().transpose(0, 1).reshape(c, -1).float()  # (C, M)
        vmin, vmax = v.amin(1).double().cpu(), v.amax(1).double().cpu()
        fresh = self.span == 0
        if fresh.any():
            lo, hi = vmin[fresh], vmax[fresh]
            span = torch.where(hi > lo, hi - lo, torch.clamp(hi.abs(), min=1e-6))
            self.lo[fresh] = torch.where(hi > lo, lo, lo - span / 2)
            self.span[fresh] = span * (1 + 1e-9)
        out = (vmin < self.lo) | (vmax > self.lo + self.span)
        for ch in torch.nonzero(out).flatten().tolist():
            self._grow(ch, float(vmin[ch]), float(vmax[ch]))
        scale = (self.bins / self.span).float()[:, None].to(v.device)
        # float32 bin index: a value within float32 rounding of a bin edge may land in the
        # neighbouring bin, well inside the one-bin error bound.
        lo = self.lo.float()[:, None].to(v.device)
        idx = ((v - lo) * scale).floor_().clamp_(0, self.bins - 1).to(torch.int64)
        idx += torch.arange(c, device=v.device)[:, None] * self.bins
        self.counts += torch.bincount(idx.flatten(), minlength=c * self.bins).view(c, self.bins)

    def quantiles(self, qs: tuple[float, ...] = QUANTILES) -> np.ndarray:
        """(C, len(qs)) quantile estimates (error <= one bin width, `span / bins`)."""
        self.counts = self.counts.cpu()
        cum = torch.cumsum(self.counts, 1)  # (C, B)
        total = cum[:, -1:]
        width = (self.span / self.bins)[:, None]
        out = []
        for q in qs:
            target = q * total  # (C, 1)
            j = torch.searchsorted(cum, target).clamp_(max=self.bins - 1)  # first bin reaching it
            before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
            inbin = self.counts.gather(1, j)
            frac = torch.where(inbin > 0, (target - before) / inbin, torch.zeros_like(target))
            out.append((self.lo[:, None] + (j + frac.clamp(0, 1)) * width)[:, 0])
        return torch.stack(out, 1).numpy()

    def error_bound(self) -> np.ndarray:
        """(C,) the largest absolute error of any quantile: one bin width."""
        return (self.span / self.bins).numpy()


class ChannelStats:
    """Per-unit mean (over all images and positions) and maximum, streamed."""

    def __init__(self, channels: int) -> None:
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.count = 0
        self.max = torch.full((channels,), -math.inf, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add x (N, C, H, W)."""
        x = x.detach()
        self.total += x.sum((0, 2, 3), dtype=torch.float64).cpu()
        self.count += x.shape[0] * x.shape[2] * x.shape[3]
        self.max = torch.maximum(self.max, x.amax((0, 2, 3)).cpu().double())

    @property
    def mean(self) -> np.ndarray:
        return (self.total / max(self.count, 1)).numpy()


class ClassMeans:
    """Per class and unit, the sum and count of the unit's per-image spatial mean."""

    def __init__(self, classes: int, channels: int) -> None:
        self.sums = torch.zeros(classes, channels, dtype=torch.float64)
        self.counts = torch.zeros(classes, dtype=torch.float64)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """x (N, C, H, W), labels (N,) class indices."""
        m = x.detach().mean((2, 3), dtype=torch.float64).cpu()  # (N, C)
        lab = labels.to("cpu", torch.int64)
        self.sums.index_add_(0, lab, m)
        self.counts += torch.bincount(lab, minlength=self.counts.shape[0]).double()

    def means(self) -> np.ndarray:
        """(classes, C) class-conditional means; NaN rows for classes without images."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.sums / self.counts[:, None]).numpy()


def selectivity_index(class_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Morcos et al. 2018's class selectivity: (K classes, C) means -> (index (C,), best class (C,)).

    index = (mu_max - mu_-max) / (mu_max + mu_-max): mu_max the largest class mean, mu_-max the
    mean of the other K - 1 class means. It lies in [0, 1] for non-negative activity (0: the
    same for every class, 1: active for one class only). NaN where it is undefined: a class
    mean below 0 (the index assumes non-negative activity, e.g. after a ReLU), both means 0,
    fewer than two classes with images. The input is not modified.
    """
    m = np.asarray(class_means, dtype=np.float64)
    m = m[~np.isnan(m).any(1)] if m.ndim == 2 else m
    c = m.shape[1]
    if m.shape[0] < 2:
        return np.full(c, np.nan), np.full(c, -1)
    best = m.argmax(0)
    mu_max = m.max(0)
    mu_rest = (m.sum(0) - mu_max) / (m.shape[0] - 1)
    denom = mu_max + mu_rest
    with np.errstate(invalid="ignore", divide="ignore"):
        si = (mu_max - mu_rest) / denom
    si[(m < 0).any(0) | (denom == 0)] = np.nan
    full_best = np.asarray(class_means, dtype=np.float64)
    keep = np.flatnonzero(~np.isnan(full_best).any(1))
    return si, keep[best]
