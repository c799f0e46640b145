"""Representation similarity: linear Gram matrices, their centring, linear CKA (plain and
debiased), CKA from Gram matrices with a jackknife interval over examples, the unbiased HSIC
estimator, and minibatch CKA accumulated over batches.

Pure functions over (n, ...) representations of the same n examples, numpy arrays or
tensors of any float dtype. CKA and HSIC run in float64; MPS tensors move to the CPU for CKA
(no float64 there) and `hsic_unbiased` uses float32 on MPS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fgscope.metrics._common import _f64, _float, _wide
from fgscope.metrics.intervals import Estimate, jackknife

__all__ = [
    "gram_linear",
    "center_gram",
    "linear_cka",
    "cka_from_grams",
    "jackknife_cka",
    "hsic_unbiased",
    "MinibatchCKA",
]


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


def cka_from_grams(k: Tensor, l: Tensor, debiased: bool = True) -> float:  # noqa: E741
    """Linear CKA from the two linear Gram matrices of the same n examples:
    <K~, L~> / (||K~|| ||L~||) with K~, L~ centred (`center_gram`; U-centred with `debiased`,
    i.e. Song et al.'s unbiased HSIC in numerator and denominator). Equals `linear_cka` on the
    features behind the Grams. NaN when either centred Gram is zero (a constant
    representation).

    Args:
        k, l: (n, n) symmetric Gram matrices (`gram_linear`), n >= 4 with `debiased`, else >= 2.

    Raises:
        ValueError: shapes differ or are not square, or too few examples.
    """
    kw, lw = _f64(k), _f64(l)
    lw = lw.to(kw.device)
    n = kw.shape[0]
    if kw.ndim != 2 or kw.shape != (n, n) or lw.shape != (n, n):
        raise ValueError(f"expected two (n, n) Gram matrices, got {tuple(kw.shape)} and {tuple(lw.shape)}")
    if n < (4 if debiased else 2):
        raise ValueError(f"cka_from_grams needs n >= {4 if debiased else 2} examples, got {n}")
    kc, lc = center_gram(kw, debiased), center_gram(lw, debiased)  # (n, n) each
    kk, ll = (kc * kc).sum(), (lc * lc).sum()
    if not (kk > 0 and ll > 0):
        return math.nan
    return float((kc * lc).sum() / (kk.sqrt() * ll.sqrt()))


def jackknife_cka(
    k: Tensor, l: Tensor, debiased: bool = True, groups: int = 20  # noqa: E741
) -> Estimate:
    """Linear CKA from Gram matrices with a 95% jackknife interval over examples.

    The n examples are split into g = min(n, `groups`) contiguous groups of near-equal size;
    each replicate is `cka_from_grams` on the Grams with one group's rows and columns deleted
    (no example is ever paired with itself, which is what the unbiased estimator needs; see
    `fgscope.metrics.intervals`). Interval: value -/+ t(0.975, g - 1) jackknife se.

    Args:
        k, l: (n, n) symmetric Gram matrices of the same examples; every replicate keeps at
            least 4 examples with `debiased` (2 without), so n >= 5 (n >= 3) when g = n.

    Raises:
        ValueError: too few examples for the replicates.
    """
    kw, lw = _f64(k), _f64(l)
    n = kw.shape[0]
    g = min(n, groups)
    need = 4 if debiased else 2
    bounds = [round(i * n / g) for i in range(g + 1)]  # group i = examples bounds[i]:bounds[i+1]
    if g < 2 or n - max(b - a for a, b in zip(bounds, bounds[1:])) < need:
        raise ValueError(
            f"a jackknife of {'debiased ' if debiased else ''}CKA needs {need + 1} or more examples, got {n}"
        )
    value = cka_from_grams(kw, lw, debiased)
    reps = []
    for a, b in zip(bounds, bounds[1:]):
        keep = torch.cat([torch.arange(0, a), torch.arange(b, n)]).to(kw.device)
        reps.append(cka_from_grams(kw[keep][:, keep], lw.to(kw.device)[keep][:, keep], debiased))
    return jackknife(value, reps)


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
