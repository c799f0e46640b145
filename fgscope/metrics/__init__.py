"""Pure tensor metrics of feature maps: statistics, dimensionality, similarity, invariance,
pooling and their uncertainty.

Every function is pure: it never modifies its inputs, never prints, and returns new tensors on
the input's device (or a python float where documented). Shapes use N = samples, C =
channels, H x W = spatial size. Dtypes: half-precision inputs are upcast before any arithmetic
(squares overflow float16); per-sample statistics and pooling run in float32 (float64 stays
float64); the dimensionality, concentration, invariance and CKA metrics run in float64,
except on MPS, which has no float64: there they use float32 on the device (CKA moves to the
CPU instead).

One module per topic, every name re-exported here (`fgscope.metrics.linear_cka`):

- `fgscope.metrics.stats`: per-map statistics (sparsity as exact zeros, the fraction
  negative), spatial concentration, participation ratio, channel ranking.
- `fgscope.metrics.cka`: Gram matrices, centring, linear CKA (from features or Grams, with a
  jackknife interval), unbiased HSIC, `MinibatchCKA`.
- `fgscope.metrics.invariance`: seeded nuisance views of an image and of its tile-shuffled
  copy, the view-invariance index (after Goodfellow et al. 2009).
- `fgscope.metrics.intervals`: `Estimate`, the delete-a-group jackknife and t quantiles.
- `fgscope.metrics.pooling`: average, max, bilinear and hypercolumn pooling, `pool`.
"""

from __future__ import annotations

from fgscope.metrics.cka import (
    MinibatchCKA,
    center_gram,
    cka_from_grams,
    gram_linear,
    hsic_unbiased,
    jackknife_cka,
    linear_cka,
)
from fgscope.metrics.intervals import Estimate, jackknife, t_quantile
from fgscope.metrics.invariance import (
    ViewSpec,
    nuisance_views,
    shuffle_tiles,
    view_invariance,
    view_invariance_estimate,
    view_pairs,
)
from fgscope.metrics.pooling import avg_pool, bilinear_pool, hypercolumns, max_pool, pool
from fgscope.metrics.stats import (
    channel_ranking,
    max_activation,
    mean_activation,
    negative_fraction,
    participation_ratio,
    sparsity,
    spatial_concentration,
    spatial_energy,
)

__all__ = [
    "sparsity",
    "negative_fraction",
    "mean_activation",
    "max_activation",
    "spatial_energy",
    "spatial_concentration",
    "participation_ratio",
    "channel_ranking",
    "gram_linear",
    "center_gram",
    "linear_cka",
    "cka_from_grams",
    "jackknife_cka",
    "hsic_unbiased",
    "MinibatchCKA",
    "Estimate",
    "jackknife",
    "t_quantile",
    "ViewSpec",
    "shuffle_tiles",
    "nuisance_views",
    "view_pairs",
    "view_invariance",
    "view_invariance_estimate",
    "bilinear_pool",
    "hypercolumns",
    "avg_pool",
    "max_pool",
    "pool",
]
