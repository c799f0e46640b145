"""The one way fgscope calls a model: `forward(module, x)`.

A model that cannot run on the input it is given (an input smaller than its kernels and
pooling windows allow, a 5-D video model fed images, a program exported for other shapes) is a
problem with the user's input, not a crash: torch's error becomes a one-line `ModelRunError`,
and when the input is too small the message names the smallest square input that works,
found by running the model on zeros at growing sizes (only on this error path).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fgscope.errors import FgscopeError, ModelRunError

__all__ = ["forward", "smallest_input_side"]

# Errors a model raises on its input (torch raises RuntimeError for shape problems; models'
# own checks raise ValueError / AssertionError / IndexError).
_RUN_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError, NotImplementedError)
_TOO_SMALL = (
    "output size is too small",
    "kernel size can't be greater than actual input size",
    "smaller than kernel size",
    "padded input size per channel",
    "must be greater than or equal to",
    "input size is too small",
)
_MAX_SIDE = 4096


def forward(module: nn.Module, x: torch.Tensor) -> Any:
    """`module(x)`, with torch's failures on this input turned into a `ModelRunError`.

    Raises:
        ModelRunError: the model cannot run on `x` (says why; names the smallest input side
            that works when `x` is too small).
        UnsupportedModelError: a video model (3-D convolutions only) failed on images.
    """
    try:
        return module(x)
    except FgscopeError:
        raise
    except _RUN_ERRORS as exc:
        raise _explain(module, x, exc) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _explain(module: nn.Module, x: torch.Tensor, exc: BaseException) -> FgscopeError:
    from fgscope.wrappers import video_model_error

    if isinstance(x, torch.Tensor) and x.ndim == 4 and (video := video_model_error(module)):
        return video
    shape = "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else "?"
    message = str(exc).lower()
    if isinstance(x, torch.Tensor) and x.ndim == 4 and (
        any(p in message for p in _TOO_SMALL) or min(x.shape[-2:]) < 32
    ):
        side = smallest_input_side(module, x)
        if side is not None and side > min(x.shape[-2:]):
            h, w = x.shape[-2:]
            return ModelRunError(
                f"input size {h}x{w} is too small for this model ({_first_line(exc)}); "
                f"the smallest square input that works is {side}x{side}",
                hint=f"pass --size {side} or larger",
            )
    if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[0] > 1 and "batch" in message:
        hint = "the model may take a fixed batch size: try --batch-size 1"
    else:
        hint = "check that the model takes images (N, 3, H, W); run with --verbose for torch's traceback"
    return ModelRunError(f"the model failed on an input of shape {shape} ({_first_line(exc)})", hint)


def smallest_input_side(module: nn.Module, x: torch.Tensor) -> int | None:
    """The smallest side `s` such that the model runs on zeros of shape (1, C, s, s), searched
    from `x`'s size up to 4096 px (doubling, then bisection); None when none works.

    Runs on a copy of `module` without hooks and outside any torch-function mode, so that an
    active capture or geometry trace never sees these probing forwards."""
    try:
        probe = copy.deepcopy(module)
    except Exception:  # modules that cannot be copied (some scripted or exported ones)
        return None
    for m in probe.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            if isinstance(getattr(m, attr, None), dict):
                setattr(m, attr, OrderedDict())
    channels, device = int(x.shape[1]), x.device
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32

    def runs(side: int) -> bool:
        try:
            with torch.inference_mode(), torch._C.DisableTorchFunction():
                probe(torch.zeros(1, channels, side, side, device=device, dtype=dtype))
            return True
        except Exception:
            return False

    lo = max(int(min(x.shape[-2:])), 1)
    hi = lo
    while not runs(hi):
        lo = hi
        hi *= 2
        if hi > _MAX_SIDE:
            return None
    while hi - lo > 1:  # runs(hi) holds; runs(lo) does not (or lo is the given size)
        mid = (lo + hi) // 2
        if runs(mid):
            hi = mid
        else:
            lo = mid
    return hi
