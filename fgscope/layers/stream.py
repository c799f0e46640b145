"""The numbers of `fgscope.inspect`, accumulated while the batches flow.

Nothing here keeps a layer's activations: each forward batch's records are reduced as they
are produced (`capture(on_record=)`), so memory is set by the batch, the model and the
layer widths, never by the number of images.

- per image (`LayerStream.add`): sparsity, fraction negative, mean, max, spatial
  concentration and participation ratio, the same functions as on all images at once
  (`fgscope.metrics`), so each image's numbers are those of the all-in-memory computation.
- across images (`PooledCovariance`): the participation ratio of the average-pooled
  features, from their running F x F scatter (exact; below 2F images the pooled rows
  themselves are kept and `metrics.participation_ratio` runs on them, as before).
- debiased CKA to the input and to the output (`CkaStream`): per forward batch the unbiased
  HSIC (Song et al. 2012) of every layer with the input pixels, with the model's output and
  with itself, summed over batches; CKA = S_xy / sqrt(S_xx S_yy), the minibatch estimator of
  Nguyen, Raghu & Kornblith 2021 (`fgscope.similarity.cka.CkaAccumulator` computes it). Its
  95% interval is a delete-a-group jackknife over images: image i belongs to group i mod G,
  so a group holds at most one image of each batch, and each batch adds, per group, how its
  HSIC changes when that image is left out (`hsic_deletions`). With one batch (all images
  fit in one forward batch) the value and interval are those of the full-batch estimator,
  `metrics.jackknife_cka` on the n x n Grams. Definitions: docs/concepts.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fgscope import metrics
from fgscope.metrics import Estimate
from fgscope.similarity.cka import CkaAccumulator, centered_gram

__all__ = [
    "MIN_CKA_BATCH",
    "MAX_PR_FEATURES",
    "JACKKNIFE_GROUPS",
    "PooledCovariance",
    "LayerStream",
    "CkaStream",
    "hsic_deletions",
]

MIN_CKA_BATCH = 5
"""A batch adds to the CKA sums only with 5 or more images: unbiased HSIC needs 4, and its
jackknife leaves one of them out."""

MAX_PR_FEATURES = 4096
"""The across-images participation ratio keeps an F x F scatter; wider pooled features (a
flattened map) are left empty rather than costing F^2 memory."""

JACKKNIFE_GROUPS = 20
"""At least this many jackknife groups (more when a batch holds more images), as many as
images when there are fewer."""


def _nan_to_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


@dataclass
class PooledCovariance:
    """Participation ratio of pooled features across images, accumulated batch by batch.

    Below `2 * F` images the (n, F) float32 rows are kept and the result is exactly
    `metrics.participation_ratio(rows)`; beyond, the scatter of the rows shifted by the first
    batch's mean (float64, shift-invariant, so no cancellation from a large mean) replaces
    them: S = sum (f - r)(f - r)^T - n m m^T with m the mean shift; PR = (tr S)^2 / ||S||_F^2,
    NaN when tr S is below float64 eps times sum ||f||^2 (as `participation_ratio`).
    """

    rows: list[Tensor] = field(default_factory=list)
    n: int = 0
    dim: int = 0
    ref: Tensor | None = None
    scatter: Tensor | None = None
    total: Tensor | None = None
    energy: float = 0.0

    def add(self, f: Tensor) -> None:
        """Add (b, F) pooled features (float32, CPU)."""
        self.dim = f.shape[1]
        self.n += len(f)
        if self.dim > MAX_PR_FEATURES:
            return
        if self.scatter is None and self.n <= 2 * self.dim:
            self.rows.append(f)
            return
        if self.scatter is None:  # fold the kept rows in, then continue with the scatter
            kept, self.rows = torch.cat([*self.rows, f]) if self.rows else f, []
            self.ref = kept.double().mean(0)
            self.scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64)
            self.total = torch.zeros(self.dim, dtype=torch.float64)
            f = kept
        d = f.double() - self.ref  # (b, F)
        self.scatter += d.T @ d
        self.total += d.sum(0)
        self.energy += float(f.double().square().sum())

    def value(self) -> float:
        """The participation ratio (NaN: no variation, or too few images)."""
        if self.scatter is None:
            if not self.rows or self.n < 2:
                return math.nan
            return float(metrics.participation_ratio(torch.cat(self.rows)))
        s = self.scatter - torch.outer(self.total, self.total) / self.n  # centred scatter
        tr, tr2 = float(s.diagonal().sum()), float(s.square().sum())
        return tr * tr / tr2 if tr > self.energy * torch.finfo(torch.float64).eps else math.nan


@dataclass
class LayerStream:
    """One record name's running numbers (see the module docstring)."""

    name: str
    shape: list[int] | None = None
    signed: bool = False
    per: dict[str, list[float | None]] = field(default_factory=lambda: {
        k: [] for k in ("sparsity", "negative_frac", "mean", "max", "concentration", "pr_spatial")})
    pooled: PooledCovariance = field(default_factory=PooledCovariance)

    def add(self, x: Tensor) -> None:
        """Add one batch of the layer's outputs, (b, C, H, W) maps or (b, ...) vectors."""
        x = x.float()
        if self.shape is None:
            self.shape = [int(s) for s in x.shape[1:]]
        self.signed = self.signed or bool((x < 0).any())
        per = self.per
        per["sparsity"] += metrics.sparsity(x).tolist()
        per["negative_frac"] += metrics.negative_fraction(x).tolist()
        per["mean"] += metrics.mean_activation(x).tolist()
        per["max"] += metrics.max_activation(x).tolist()
        if x.dim() == 4:
            per["concentration"] += [_nan_to_none(v) for v in metrics.spatial_concentration(x).tolist()]
            per["pr_spatial"] += [_nan_to_none(v) for v in metrics.participation_ratio(x).tolist()]
        else:
            per["concentration"] += [None] * len(x)
            per["pr_spatial"] += [None] * len(x)
        self.pooled.add((x.mean((2, 3)) if x.dim() == 4 else x.reshape(len(x), -1)).cpu())

    @property
    def n(self) -> int:
        return len(self.per["mean"])


def hsic_deletions(k: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:  # noqa: E741
    """Unbiased HSIC (Song et al. 2012, `metrics.hsic_unbiased`) of two Grams, and its value
    with each example left out.

    Args:
        k, l: (..., b, b) symmetric Gram matrices (broadcastable), b >= 5.

    Returns:
        (full (...), deleted (..., b)): `deleted[..., i]` is the HSIC of the Grams without
        row and column i, computed from row sums in O(b^2), not b re-centrings.
    """
    b = k.shape[-1]
    eye = torch.eye(b, dtype=torch.float64, device=k.device)
    kt, lt = k.double() * (1 - eye), l.double() * (1 - eye)  # zero diagonals: K~, L~
    kl = kt * lt  # (..., b, b)
    rk, rl = kt.sum(-1), lt.sum(-1)  # (..., b) row sums
    trace, sk, sl, cross = kl.sum((-1, -2)), rk.sum(-1), rl.sum(-1), (rk * rl).sum(-1)

    def hsic(tr: Tensor, s_k: Tensor, s_l: Tensor, c: Tensor, n: int) -> Tensor:
        return (tr + s_k * s_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * c) / (n * (n - 3))

    full = hsic(trace, sk, sl, cross, b)
    row_kl = kl.sum(-1)  # (..., b)
    tr_i = trace[..., None] - 2 * row_kl
    sk_i, sl_i = sk[..., None] - 2 * rk, sl[..., None] - 2 * rl
    lrk = (lt * rk[..., None, :]).sum(-1)  # (L rK)_i
    krl = (kt * rl[..., None, :]).sum(-1)  # (K rL)_i
    c_i = cross[..., None] - lrk - krl + row_kl - rk * rl
    return full, hsic(tr_i, sk_i, sl_i, c_i, b - 1)


class CkaStream:
    """Debiased CKA of each layer to the input and to the output, over minibatches.

    Per batch: `add(grams, input_gram, output_gram)` with one (b, b) Gram per layer (in
    layer order; `similarity.cka.centered_gram`). `estimates()` gives per layer the input
    and output `Estimate`s (NaN where undefined), or None for a side without a Gram.

    Args:
        n_layers: layers per batch.
        groups: jackknife groups (at least the largest batch).
    """

    def __init__(self, n_layers: int, groups: int) -> None:
        self.n_layers, self.groups = n_layers, groups
        self.acc: CkaAccumulator | None = None
        self.first: tuple[list[Tensor], Tensor, Tensor | None] | None = None
        self.delta: Tensor | None = None  # (G, L, 5): per group, the change of each sum
        self.sums: Tensor | None = None  # (L, 5): HSIC(x, in), (x, out), (x, x), (in), (out)
        self.batches = 0
        self.images = 0
        self.skipped = 0
        self.has_output = True

    def add(self, grams: list[Tensor], input_gram: Tensor, output_gram: Tensor | None) -> None:
        b = input_gram.shape[0]
        grams, input_gram = [g.cpu() for g in grams], input_gram.cpu()  # (b, b) each: small
        output_gram = output_gram.cpu() if output_gram is not None else None
        if b < MIN_CKA_BATCH:
            self.skipped += b
            return
        self.has_output = self.has_output and output_gram is not None
        out = output_gram if output_gram is not None else torch.zeros_like(input_gram)
        if self.batches == 0:
            self.first = (grams, input_gram, output_gram)
        else:
            self.first = None
        targets = [input_gram, out]
        if self.acc is None:
            self.acc = CkaAccumulator(self.n_layers, 2)
        self.acc.update(grams, targets)
        kx = torch.stack([g.double() for g in grams])  # (L, b, b)
        kt = torch.stack([t.double() for t in targets])  # (2, b, b)
        cross, cross_d = hsic_deletions(kx[:, None], kt[None])  # (L, 2), (L, 2, b)
        own, own_d = hsic_deletions(kx, kx)  # (L,), (L, b)
        tgt, tgt_d = hsic_deletions(kt, kt)  # (2,), (2, b)
        full = torch.cat([cross, own[:, None], tgt[None].expand(self.n_layers, 2)], 1)  # (L, 5)
        dele = torch.cat([cross_d, own_d[:, None], tgt_d[None].expand(self.n_layers, 2, b)], 1)
        if self.sums is None:
            self.sums = torch.zeros_like(full)
            self.delta = torch.zeros(self.groups, *full.shape, dtype=torch.float64)
        self.sums += full
        for j in range(b):  # image (images + j) is in group (images + j) mod G
            self.delta[(self.images + j) % self.groups] += dele[:, :, j] - full
        self.batches += 1
        self.images += b

    def estimates(self) -> list[tuple[Estimate | None, Estimate | None]]:
        """Per layer (input, output) estimates; None for the output without output Grams."""
        if self.acc is None or self.sums is None or self.delta is None:
            return [(None, None)] * self.n_layers
        if self.batches == 1 and self.first is not None:  # the full-batch estimator
            grams, kin, kout = self.first
            return [(metrics.jackknife_cka(g, kin), metrics.jackknife_cka(g, kout) if kout is not None else None)
                    for g in grams]
        _, cka = self.acc.compute()  # (L, 2) debiased
        used = min(self.groups, self.images)
        s = self.sums[None] + self.delta[:used]  # (g, L, 5): sums without group g
        reps = [s[:, :, side] / (s[:, :, 2] * s[:, :, 3 + side]).sqrt() for side in (0, 1)]  # (g, L)
        out = []
        for i in range(self.n_layers):
            ests = [metrics.jackknife(float(cka[i, side]), [float(v) for v in reps[side][:, i]])
                    for side in (0, 1)]
            out.append((ests[0], ests[1] if self.has_output else None))
        return out


def layer_gram(x: Tensor) -> Tensor:
    """(b, ...) -> (b, b) centred float64 Gram (`similarity.cka.centered_gram`)."""
    return centered_gram(x)
