"""Input checks and dtype promotion shared by the metric modules (`fgscope.metrics`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__: list[str] = []  # private helpers only


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
