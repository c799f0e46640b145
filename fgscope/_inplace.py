"""Copy-on-write for recorded tensors: watch the in-place operations of a forward.

PyTorch models overwrite tensors right after producing them (`ReLU(inplace=True)` after
BatchNorm, `out += identity`, `x[...] = v`, `torch._foreach_add_(tensors, ...)`). `fgscope.capture` keeps records by reference
while nothing writes into them; this `TorchFunctionMode` sees every operation of the forward
and asks the recorder to copy the records that share a storage with the tensor an operation
is about to write into (views included), just before the write.
"""

from __future__ import annotations

import inspect as _inspect
from typing import Any, Protocol

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CopyOnWrite", "inplace_targets", "storage_key"]


class _Watcher(Protocol):
    watched: dict[int, list[int]]

    def before_write(self, target: torch.Tensor) -> None: ...


_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in (
        "add sub mul matmul truediv floordiv mod pow lshift rshift and xor or".split()
    )
) | {"__setitem__"}
# func -> how it writes in place: 0 never, 1 into args[0], or an inspect.Signature with an
# `inplace` parameter. Decided once per function: this runs for every op of the forward.
_WRITE_KIND: dict[Any, Any] = {}


def _write_kind(func: Any) -> Any:
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
        return 1
    try:
        sig = _inspect.signature(func)
    except (TypeError, ValueError):
        return 0
    return sig if "inplace" in sig.parameters else 0


def inplace_targets(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensors that `func(*args, **kwargs)` is about to write into."""
    kind = _WRITE_KIND.get(func)
    if kind is None:
        kind = _WRITE_KIND[func] = _write_kind(func)
    targets: list[torch.Tensor] = []
    if kind == 1:
        if args and isinstance(args[0], torch.Tensor):
            targets.append(args[0])
        elif args and isinstance(args[0], (tuple, list)):
            # list-of-tensor in-place ops: torch._foreach_add_(tensors, ...) writes them all
            targets.extend(t for t in args[0] if isinstance(t, torch.Tensor))
    elif kind != 0:
        # Python-level functionals such as F.relu(x, inplace=True) reach the mode before
        # the in-place kernel they dispatch to: read their `inplace` argument.
        try:
            bound = kind.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {}
        if bound.get("inplace") is True:
            first = next(iter(bound.values()), None)
            if isinstance(first, torch.Tensor):
                targets.append(first)
    if kwargs:
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor):
            targets.append(out)
        elif isinstance(out, (tuple, list)):
            targets.extend(t for t in out if isinstance(t, torch.Tensor))
    return targets


def storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return None


class CopyOnWrite(TorchFunctionMode):
    """Copies a recorded tensor just before an operation writes into its storage."""

    def __init__(self, recorder: _Watcher) -> None:
        super().__init__()
        self._recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._recorder.watched:
            for target in inplace_targets(func, args, kwargs):
                self._recorder.before_write(target)
        return func(*args, **kwargs)
