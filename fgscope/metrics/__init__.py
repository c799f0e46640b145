"""Pure tensor metrics of feature maps: statistics, dimensionality, similarity and pooling.

Every function is pure: it never modifies its inputs, never prints, and returns new tensors on
the input's device (or a python float where documented). Shapes use N = samples, C =
channels, H x W = spatial size. Dtypes: half-precision inputs are upcast before any arithmetic
(squares overflow float16); per-sample statistics and pooling run in float32 (float64 stays
float64); the dimensionality, concentration and CKA metrics run in float64, except on MPS,
which has no float64: there they use float32 on the device (CKA moves to the CPU instead).

One module per topic, every name re-exported here (`fgscope.metrics.linear_cka`):

- `fgscope.metrics.stats`: per-map statistics, spatial concentration, participation ratio,
  channel ranking.
- `fgscope.metrics.cka`: Gram matrices, centring, linear CKA, unbiased HSIC, `MinibatchCKA`.
- `fgscope.metrics.pooling`: average, max, bilinear and hypercolumn pooling, `pool`.
"""

from __future__ import annotations

from fgscope.metrics.cka import MinibatchCKA, center_gram, gram_linear, hsic_unbiased, linear_cka
from fgscope.metrics.pooling import avg_pool, bilinear_pool, hypercolumns, max_pool, pool
from fgscope.metrics.stats import (
    channel_ranking,
    max_activation,
    mean_activation,
    participation_ratio,
    sparsity,
    spatial_concentration,
    spatial_energy,
)

__all__ = [
    "sparsity",
    "mean_activation",
    "max_activation",
    "spatial_energy",
    "spatial_concentration",
    "participation_ratio",
    "channel_ranking",
    "gram_linear",
    "center_gram",
    "linear_cka",
    "hsic_unbiased",
    "MinibatchCKA",
    "bilinear_pool",
    "hypercolumns",
    "avg_pool",
    "max_pool",
    "pool",
]
