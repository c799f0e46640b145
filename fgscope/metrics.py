"""Pure tensor metrics of feature maps: statistics, dimensionality, similarity and pooling.

Every function is pure: it never modifies its inputs, never prints, and returns new tensors on
the input's device (or a python float where documented). Shapes use N = samples, C =
channels, H x W = spatial size. Dtypes: half-precision inputs are upcast before any arithmetic
(squares overflow float16); per-sample statistics and pooling run in float32 (float64 stays
float64); the dimensionality, concentration and CKA metrics run in float64, except on MPS,
which has no float64: there they use float32 on the device (CKA moves to the CPU instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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

_RANKINGS = ("mean", "max", "std", "energy")
_POOLS = ("avg", "max", "bilinear", "none")


def _check_ndim(x: Tensor, ndims: tuple[int, ...], expected: str) -> None:
    if x.ndim not in ndims:
        raise ValueError(f"expected a tensor of shape {expected}, got shape {tuple(x.shape)}")


def _float(x: Tensor) -> Tensor:
    """float32 unless already float32/float64 (float16, bfloat16, ints are upcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def _wide(x: Tensor) -> Tensor:
    """float64 on x's device; float32 on MPS, which has no float64."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def _f64(x: Tensor | np.ndarray) -> Tensor:
    """float64 tensor for CKA; MPS tensors move to the CPU (no float64 there)."""
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    return t.to("cpu" if t.device.type == "mps" else t.device, torch.float64)


# --- per-sample statistics -------------------------------------------------------------------


def sparsity(x: Tensor) -> Tensor:
    """Fraction of entries that are <= 0, per sample (post-ReLU: the fraction of dead units)."""
    _check_ndim(x, (2, 3, 4, 5), "(N, ...)")
    return (x.reshape(len(x), -1) <= 0).to(torch.float32).mean(1)  # (N, ...) -> (N,)


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
    """Effective dimensionality PR = (tr S)^2 / tr(S^2) = (sum l)^2 / sum l^2 of a covariance S.

    Gao et al. 2017 ("A theory of multineuronal dimensionality, dynamics and measurement");
    Recanatesi et al. 2019 ("Dimensionality compression and expansion in deep neural
    networks"). k orthogonal directions of equal variance give exactly k.

    4-D input (N, C, H, W): one PR per sample; the H*W positions are the observations of a
    C-dimensional vector (centred over positions). NaN when H*W < 2 or the variance is zero
    (up to rounding: below eps times the uncentred energy).
    2-D input (N, F): the N samples are the observations; returns one 0-d tensor (NaN when
    N < 2 or the variance is zero).

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


# --- CKA -------------------------------------------------------------------------------------


def gram_linear(x: Tensor) -> Tensor:
    """Linear-kernel Gram matrix x x^T (extra dims are flattened: (n, ...) -> (n, -1))."""
    x = _float(torch.as_tensor(x)).flatten(1)
    return x @ x.T  # (n, p) -> (n, n)


def center_gram(k: Tensor, unbiased: bool = False) -> Tensor:
    """Double-centre a symmetric Gram matrix, as `center_gram` in Kornblith et al. 2019's code.

    Biased: H K H with H = I - 11^T/n. Unbiased: the U-centring (Szekely & Rizzo 2014) that
    makes <K~, L~> / (n (n-3)) the unbiased HSIC of Song et al. 2012: zero the diagonal,
    column means with an n-2 denominator, subtract them from rows and columns, zero the
    diagonal again (google-research/representation_similarity/Demo.ipynb).

    Raises:
        ValueError: not a square symmetric matrix, or n < 3 with `unbiased`.
    """
    k = _float(torch.as_tensor(k))
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"expected a square (n, n) Gram matrix, got shape {tuple(k.shape)}")
    if not torch.allclose(k, k.T):
        raise ValueError("expected a symmetric Gram matrix")
    n = k.shape[0]
    if unbiased:
        if n < 3:
            raise ValueError(f"unbiased centring needs n >= 3 samples, got {n}")
        k = k.clone().fill_diagonal_(0)
        means = k.sum(0) / (n - 2)  # (n,)
        means = means - means.sum() / (2 * (n - 1))
        return (k - means[:, None] - means[None, :]).fill_diagonal_(0)  # (n, n)
    means = k.mean(0)
    means = means - means.mean() / 2
    return k - means[:, None] - means[None, :]  # (n, n)


def _debiased_dot(xty: Tensor, rows_x: Tensor, rows_y: Tensor, n: int) -> Tensor:
    """Unbiased-HSIC numerator <K~, L~> from feature-space quantities (Kornblith et al. code)."""
    return (
        xty - n / (n - 2) * rows_x.dot(rows_y) + rows_x.sum() * rows_y.sum() / ((n - 1) * (n - 2))
    )


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray, debiased: bool = False) -> float:
    """Linear centred kernel alignment between two representations of the same n examples.

    Kornblith, Norouzi, Lee & Hinton 2019 ("Similarity of neural network representations
    revisited"): with column-centred X, Y, CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),
    computed in feature space or in Gram space (<K~, L~> / (||K~|| ||L~||)), whichever is
    cheaper. `debiased` replaces each HSIC by the unbiased estimator of Song et al. 2012
    (Nguyen, Raghu & Kornblith 2021), i.e. the Gram formula on `center_gram(., unbiased=True)`;
    it can be slightly negative for unrelated features. NaN for a constant representation.

    Args:
        x: (n, p) or (n, ...), numpy array or tensor of any float dtype.
        y: (n, q) or (n, ...).

    Raises:
        ValueError: different n, or n < 2 (n < 4 with `debiased`).
    """
    xs, ys = _f64(x).flatten(1), _f64(y).flatten(1)  # (n, ...) -> (n, p), (n, q)
    ys = ys.to(xs.device)
    n = xs.shape[0]
    if ys.shape[0] != n:
        raise ValueError(f"x and y need the same number of examples, got {n} and {ys.shape[0]}")
    if n < (4 if debiased else 2):
        raise ValueError(f"linear_cka needs n >= {4 if debiased else 2} examples, got {n}")
    xs, ys = xs - xs.mean(0), ys - ys.mean(0)
    p, q = xs.shape[1], ys.shape[1]
    if n < p + q:  # Gram route: n^2 (p + q) against n (p + q)^2 for the feature route
        kx, ky = center_gram(xs @ xs.T, debiased), center_gram(ys @ ys.T, debiased)
        cka = (kx * ky).sum() / (kx.norm() * ky.norm())
    else:
        xty = (ys.T @ xs).square().sum()  # ||Y^T X||_F^2
        xtx, yty = (xs.T @ xs).square().sum(), (ys.T @ ys).square().sum()
        if debiased:
            rx, ry = xs.square().sum(1), ys.square().sum(1)  # (n,) squared row norms
            xty = _debiased_dot(xty, rx, ry, n)
            xtx, yty = _debiased_dot(xtx, rx, rx, n), _debiased_dot(yty, ry, ry, n)
        cka = xty / (xtx.sqrt() * yty.sqrt())
    return float(cka)


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741  (the paper's names)
    """Unbiased HSIC estimator, Song et al. 2012 ("Feature selection via dependence
    maximization", JMLR) eq. (5), with K~, L~ the Gram matrices with zeroed diagonals:

        HSIC_1 = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))

    Args:
        k, l: (n, n) symmetric Gram matrices, n >= 4.

    Returns:
        A 0-d tensor (float64, or float32 on MPS).
    """
    kw = _wide(torch.as_tensor(k))
    lw = _wide(torch.as_tensor(l)).to(kw.device)
    n = kw.shape[0]
    if kw.shape != (n, n) or lw.shape != (n, n):
        raise ValueError(
            f"expected two (n, n) matrices, got {tuple(kw.shape)} and {tuple(lw.shape)}"
        )
    if n < 4:
        raise ValueError(f"unbiased HSIC needs n >= 4 samples, got {n}")
    kt, lt = kw.clone().fill_diagonal_(0), lw.clone().fill_diagonal_(0)  # K~, L~
    ones = torch.ones(n, dtype=kt.dtype, device=kt.device)
    total = (
        torch.trace(kt @ lt)
        + (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (ones @ kt @ lt @ ones)
    )
    return total / (n * (n - 3))  # () scalar


def _stacked_grams(xs: Sequence[Tensor]) -> Tensor:
    """Per-layer linear Grams with zeroed diagonals: L x (b, ...) -> (L, b, b), float64."""
    grams = torch.stack([(f := _f64(t).flatten(1)) @ f.T for t in xs])  # one matmul per layer
    return grams * (1 - torch.eye(grams.shape[1], dtype=grams.dtype, device=grams.device))


def _pairwise_hsic(ka: Tensor, kb: Tensor) -> Tensor:
    """Song et al.'s unbiased HSIC for every pair: (A, b, b), (B, b, b) -> (A, B).

    Same formula as `hsic_unbiased`, written as three matrix products over stacked Grams
    (diagonals already zero, matrices symmetric so tr(K L) = <K, L>).
    """
    n = ka.shape[1]
    tr = ka.flatten(1) @ kb.flatten(1).T  # (A, B)
    ra, rb = ka.sum(2), kb.sum(2)  # row sums K 1: (A, b), (B, b)
    sums = ra.sum(1)[:, None] * rb.sum(1)[None, :]  # 1^T K 1 1^T L 1: (A, B)
    cross = ra @ rb.T  # 1^T K L 1 = (K 1) . (L 1): (A, B)
    return (tr + sums / ((n - 1) * (n - 2)) - 2 / (n - 2) * cross) / (n * (n - 3))


def _self_hsic(k: Tensor) -> Tensor:
    """The diagonal of `_pairwise_hsic(k, k)` without the off-diagonal pairs: (A, b, b) -> (A,)."""
    n = k.shape[1]
    rows = k.sum(2)  # (A, b)
    tr, sums, cross = k.square().sum((1, 2)), rows.sum(1).square(), rows.square().sum(1)
    return (tr + sums / ((n - 1) * (n - 2)) - 2 / (n - 2) * cross) / (n * (n - 3))


class MinibatchCKA:
    """Debiased linear CKA between layers, accumulated over minibatches.

    Nguyen, Raghu & Kornblith 2021 ("Do wide and deep networks learn the same things?"): for
    each minibatch of b examples, with K = X_b X_b^T and L = Y_b Y_b^T, add up the unbiased
    HSIC(K, L), HSIC(K, K) and HSIC(L, L); then CKA = mean HSIC_KL / sqrt(mean HSIC_KK *
    mean HSIC_LL). Unlike `linear_cka` on all n examples this needs only O(b^2) memory per
    layer, and it converges to the full debiased CKA as b grows (one batch of all n equals it).

    Args:
        n_x: number of layers on the row side.
        n_y: number of layers on the column side; None compares the n_x layers with themselves
            (a symmetric matrix with ones on the diagonal).
    """

    def __init__(self, n_x: int, n_y: int | None = None) -> None:
        if n_x < 1 or (n_y is not None and n_y < 1):
            raise ValueError(f"need at least one layer on each side, got n_x={n_x}, n_y={n_y}")
        self.n_x, self.n_y = n_x, n_y
        self.batches = 0
        self._xy: Tensor | None = None  # (n_x, n_y) summed HSIC(K, L)
        self._xx: Tensor | None = None  # (n_x,) summed HSIC(K, K)
        self._yy: Tensor | None = None  # (n_y,) summed HSIC(L, L)

    def update(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None) -> None:
        """Add one minibatch: `xs` (and `ys` unless symmetric) hold one (b, ...) tensor per layer.

        Raises:
            ValueError: wrong number of layers, mismatched batch sizes, or b < 4.
        """
        if len(xs) != self.n_x:
            raise ValueError(f"expected {self.n_x} tensors in xs, got {len(xs)}")
        if (ys is None) != (self.n_y is None):
            raise ValueError("pass ys exactly when n_y was given")
        if ys is not None and len(ys) != self.n_y:
            raise ValueError(f"expected {self.n_y} tensors in ys, got {len(ys)}")
        sizes = {len(t) for t in [*xs, *(ys or [])]}
        if len(sizes) != 1 or min(sizes) < 4:
            raise ValueError(f"all tensors need the same batch size b >= 4, got {sorted(sizes)}")
        kx = _stacked_grams(xs)  # (n_x, b, b)
        if ys is None:
            xy = _pairwise_hsic(kx, kx)  # (n_x, n_x)
            xy = (xy + xy.T) / 2  # exactly symmetric despite rounding
            xx = yy = xy.diagonal()
        else:
            ky = _stacked_grams(ys).to(kx.device)  # (n_y, b, b)
            xy = _pairwise_hsic(kx, ky)  # (n_x, n_y)
            xx, yy = _self_hsic(kx), _self_hsic(ky)  # (n_x,), (n_y,)
        if self._xy is None:
            self._xy, self._xx, self._yy = xy, xx.clone(), yy.clone()
        else:
            self._xy, self._xx, self._yy = self._xy + xy, self._xx + xx, self._yy + yy
        self.batches += 1

    def compute(self) -> Tensor:
        """The (n_x, n_y) CKA matrix (n_y = n_x when symmetric), float64.

        Raises:
            RuntimeError: no minibatch was added.
        """
        if self._xy is None or self._xx is None or self._yy is None:
            raise RuntimeError("MinibatchCKA.compute() called before any update()")
        return self._xy / (self._xx[:, None] * self._yy[None, :]).sqrt()  # (n_x, n_y)


# --- pooling ---------------------------------------------------------------------------------


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
