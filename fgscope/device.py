"""Devices and dtypes: `auto|cpu|cuda|cuda:N|mps` and `float32|float16|bfloat16`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fgscope.errors import DeviceError

__all__ = ["resolve_device", "resolve_dtype", "autocast", "to_device", "tune_host_allocator"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device named by `spec`; `auto` is CUDA when available, else MPS, else the CPU.

    Raises:
        DeviceError: the device does not exist on this machine.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(
            f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {spec!r} requested but CUDA is not available on this machine",
                hint="use --device cpu",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {spec!r} requested but MPS is not available")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(spec: str | torch.dtype = "float32") -> torch.dtype:
    """`float32`, `float16` or `bfloat16` as a torch dtype."""
    if isinstance(spec, torch.dtype):
        return spec
    try:
        return _DTYPES[spec.strip().lower()]
    except KeyError:
        raise DeviceError(
            f"unknown dtype {spec!r}", hint=f"use one of {', '.join(_DTYPES)}"
        ) from None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for the forward: float32 runs as is; float16/bfloat16 use autocast.

    Raises:
        DeviceError: autocast does not support `dtype` on `device`.
    """
    if dtype == torch.float32:
        yield
        return
    try:
        ctx = torch.autocast(device_type=device.type, dtype=dtype)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"{dtype} is not supported on {device}: {exc}") from None
    with ctx:
        yield


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU batch to `device`; to CUDA through pinned memory without blocking."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


_TUNED = False


def tune_host_allocator() -> bool:
    """Keep freed host memory in the process instead of returning it to the OS (glibc only).

    Recording every layer keeps hundreds of MB alive per batch; by default glibc gives large
    freed blocks back to the kernel and every new batch pays for zero-filled page faults
    again (measured: 243k faults, ~25% of a ResNet-50 forward at batch 8). Raising glibc's
    mmap and trim thresholds lets the process reuse that memory, which also speeds up a
    plain forward. Called once by the CLI and the benchmarks; a no-op elsewhere.

    Returns:
        True when the thresholds were set.
    """
    global _TUNED
    if _TUNED:
        return True
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return False
    _TUNED = ok
    return ok
