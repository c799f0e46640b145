"""Linear CKA from Gram matrices, for `fgscope similarity`: centred Grams of a batch of
features (`centered_gram`) and their minibatch accumulation into CKA matrices
(`CkaAccumulator`). The method is described in `fgscope.similarity.run`'s docstring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fgscope.metrics import center_gram

__all__ = ["centered_gram", "CkaAccumulator"]

_GRAM_CHUNK_BYTES = 64 << 20  # float64 working set per Gram chunk


# --- CKA from Grams -----------------------------------------------------------------------


def centered_gram(x: Tensor) -> Tensor:
    """Linear Gram matrix of features centred over the batch: (b, ...) -> (b, b) float64.

    H X X^T H with H = I - 11^T / b (`metrics.center_gram` of the linear Gram), accumulated
    over float64 chunks of columns, so a wide layer never needs a float64 copy of all its
    features at once; centring the b x b result is exact in float64 up to rounding (relative
    1e-16 of the uncentred entries). Runs on x's device (the CPU for MPS, which has no
    float64). x is not modified.
    """
    f = x.reshape(len(x), -1)  # (b, p)
    if f.device.type == "mps":
        f = f.cpu()
    b, p = f.shape
    step = max(1, _GRAM_CHUNK_BYTES // (8 * max(b, 1)))
    k = torch.zeros(b, b, dtype=torch.float64, device=f.device)
    for i in range(0, p, step):
        c = f[:, i : i + step].to(torch.float64)
        k += c @ c.T
    kc = center_gram((k + k.T) / 2)  # (b, b), exactly symmetric
    # A constant layer centres to rounding noise, not to zero: call that zero (NaN CKA).
    if float(kc.abs().max()) <= 8 * b * torch.finfo(torch.float64).eps * float(k.abs().max()):
        kc.zero_()
    return kc


class CkaAccumulator:
    """Linear CKA, biased and debiased, accumulated over minibatches of centred Grams.

    For each batch of b examples, with K, L the Grams of two layers:
    biased HSIC = <HKH, HLH> / (b-1)^2 (Gretton et al. 2005), unbiased HSIC =
    <K~, L~> / (b (b-3)) with K~ the U-centred Gram (Song et al. 2012; equal to
    `metrics.hsic_unbiased`). Per pair of layers the per-batch estimates are summed and
    CKA = S_KL / sqrt(S_KK S_LL) (Nguyen, Raghu & Kornblith 2021). One batch of all n
    examples gives exactly `metrics.linear_cka(x, y)` and `linear_cka(x, y, debiased=True)`;
    the debiased matrix over several batches equals `metrics.MinibatchCKA`.

    Args:
        n_x: layers on the row side.
        n_y: layers on the column side; None compares the n_x layers with themselves.
    """

    def __init__(self, n_x: int, n_y: int | None = None) -> None:
        if n_x < 1 or (n_y is not None and n_y < 1):
            raise ValueError(f"need at least one layer on each side, got n_x={n_x}, n_y={n_y}")
        self.n_x, self.n_y = n_x, n_y
        self.batches = 0
        self.examples = 0
        self._sums: dict[str, Tensor] = {}

    @staticmethod
    def _centre(grams: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(L, b*b) biased- and U-centred Grams, flattened."""
        kc = torch.stack([center_gram(k.to(torch.float64)) for k in grams])
        ku = torch.stack([center_gram(k, unbiased=True) for k in kc])
        return kc.flatten(1), ku.flatten(1)

    def update(self, kx: Sequence[Tensor], ky: Sequence[Tensor] | None = None) -> None:
        """Add one batch: one (b, b) Gram per layer (from `centered_gram`; any symmetric Gram
        is centred again here), for the rows and, unless symmetric, the columns.

        Raises:
            ValueError: wrong number of Grams, mismatched or non-square shapes, or b < 4.
        """
        if len(kx) != self.n_x:
            raise ValueError(f"expected {self.n_x} Grams in kx, got {len(kx)}")
        if (ky is None) != (self.n_y is None):
            raise ValueError("pass ky exactly when n_y was given")
        if ky is not None and len(ky) != self.n_y:
            raise ValueError(f"expected {self.n_y} Grams in ky, got {len(ky)}")
        shapes = {tuple(k.shape) for k in [*kx, *(ky or [])]}
        b = next(iter(shapes))[0] if len(shapes) == 1 else -1
        if len(shapes) != 1 or shapes != {(b, b)} or b < 4:
            raise ValueError(f"all Grams need the same shape (b, b) with b >= 4, got {sorted(shapes)}")
        xc, xu = self._centre(kx)  # (n_x, b*b)
        yc, yu = (xc, xu) if ky is None else self._centre([k.to(xc.device) for k in ky])
        sums = {
            "xy": xc @ yc.T / (b - 1) ** 2,  # (n_x, n_y) biased HSIC
            "xy_u": xu @ yu.T / (b * (b - 3)),  # (n_x, n_y) unbiased HSIC
            "xx": xc.square().sum(1) / (b - 1) ** 2,  # (n_x,)
            "xx_u": xu.square().sum(1) / (b * (b - 3)),
            "yy": yc.square().sum(1) / (b - 1) ** 2,  # (n_y,)
            "yy_u": yu.square().sum(1) / (b * (b - 3)),
        }
        for k, v in sums.items():
            self._sums[k] = v if k not in self._sums else self._sums[k] + v
        self.batches += 1
        self.examples += b

    def compute(self) -> tuple[Tensor, Tensor]:
        """(cka, cka_debiased), each (n_x, n_y) float64 on the CPU; NaN for a constant layer.

        Raises:
            RuntimeError: no batch was added.
        """
        if not self._sums:
            raise RuntimeError("CkaAccumulator.compute() called before any update()")
        s = {k: v.cpu() for k, v in self._sums.items()}
        out = []
        for suffix in ("", "_u"):
            xy, xx, yy = s["xy" + suffix], s["xx" + suffix], s["yy" + suffix]
            denom = (xx[:, None] * yy[None, :]).sqrt()
            cka = torch.where(denom > 0, xy / denom.clamp_min(1e-300), torch.nan)
            if self.n_y is None:
                cka = (cka + cka.T) / 2  # exactly symmetric despite rounding
            out.append(cka)
        return out[0], out[1]
