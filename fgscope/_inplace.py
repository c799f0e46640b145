"""Copy-on-write for recorded tensors: watch the in-place operations of a forward.

PyTorch models overwrite tensors right after producing them (`ReLU(inplace=True)` after
BatchNorm, `out += identity`, `x[...] = v`, `torch._foreach_add_(tensors, ...)`). `fgscope.capture` keeps records by reference
while nothing writes into them; this `TorchFunctionMode` sees every operation of the forward
and asks the recorder to copy the records that share a storage with the tensor an operation
is about to write into (views included), just before the write.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Callable
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
# func -> how it writes in place: 0 never, 1 into args[0], or an `_InplaceArg` (a function
# with an `inplace` parameter). Decided once per function: this runs for every op of the forward.
_WRITE_KIND: dict[Any, Any] = {}


class _InplaceArg:
    """Where a Python-level functional (`F.relu(x, inplace=True)`) takes its `inplace` flag,
    read from the call without `inspect.Signature.bind` (35 calls per MobileNetV2 forward)."""

    def __init__(self, sig: _inspect.Signature) -> None:
        params = list(sig.parameters.values())
        positional = (_inspect.Parameter.POSITIONAL_ONLY, _inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.first = params[0].name
        self.pos = next((i for i, p in enumerate(params) if p.name == "inplace" and p.kind in positional),
                        None)
        self.default = sig.parameters["inplace"].default

    def _positional(self, args: tuple) -> bool:
        return self.pos is not None and len(args) > self.pos

    def target(self, args: tuple, kwargs: dict) -> Any:
        """The tensor this call writes into (its first argument), or None: not in place."""
        flag = args[self.pos] if self._positional(args) else kwargs.get("inplace", self.default)
        if flag is not True:
            return None
        return args[0] if args else kwargs.get(self.first)

    def out_of_place(self, func: Any, args: tuple, kwargs: dict) -> Callable[[], Any]:
        """The same call with `inplace=False`."""
        if self._positional(args):
            args = args[:self.pos] + (False,) + args[self.pos + 1:]
            return lambda: func(*args, **kwargs)
        return lambda: func(*args, **{**kwargs, "inplace": False})


def _write_kind(func: Any) -> Any:
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
        return 1
    try:
        sig = _inspect.signature(func)
    except (TypeError, ValueError):
        return 0
    return _InplaceArg(sig) if "inplace" in sig.parameters else 0


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
        first = kind.target(args, kwargs)
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
    """Keeps recorded tensors as they were produced when an operation writes into them.

    Under `torch.inference_mode()` (capture's default) an in-place write into a tensor whose
    storage only the model's tensor and the records share is run out of place instead, and
    the model's tensor is pointed at the result (`Tensor.set_`): the records keep the old
    storage, the model sees the new values in the same tensor object, and no copy is made
    (one pass over the data instead of a copy plus the write). Anything else (views or other
    aliases of the storage, `out=` and `x[...] = v` writes, list ops, a result of another
    shape or dtype, grad mode) copies the records just before the write, as before.
    """

    def __init__(self, recorder: _Watcher) -> None:
        super().__init__()
        self._recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Fast exit (this runs for every operation of the forward): nothing recorded is held
        # by reference, or an operation that never writes in place and has no `out=`.
        if not self._recorder.watched or (
            _WRITE_KIND.get(func) == 0 and not (kwargs and "out" in kwargs)
        ):
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        targets = inplace_targets(func, args, kwargs)
        if len(targets) == 1 and kwargs.get("out") is None:
            swapped = self._out_of_place(func, args, kwargs, targets[0])
            if swapped is not None:
                return swapped
        for target in targets:
            self._recorder.before_write(target)
        return func(*args, **kwargs)

    def _out_of_place(self, func: Any, args: tuple, kwargs: dict, target: torch.Tensor) -> Any:
        """`target` holding `func`'s result without writing into its old storage, or None."""
        key = storage_key(target)
        held = self._recorder.watched.get(key) if key is not None else None
        if not held or not torch.is_inference_mode_enabled() or target.requires_grad:
            return None
        twin = _twin(func, args, kwargs)
        if twin is None:
            return None
        # the model's tensor, the records' tensors and the temporary storage object: no alias
        if torch._C._storage_Use_Count(target.untyped_storage()._cdata) != 2 + len(held):
            return None
        result = twin()
        if (not isinstance(result, torch.Tensor) or result.shape != target.shape
                or result.dtype != target.dtype or result.device != target.device):
            return None  # the write runs in place after a copy (the result is discarded)
        self._recorder.watched.pop(key)  # the records alone hold the old storage now
        target.set_(result)
        return target


# in-place dunder -> its out-of-place twin on Tensor
_DUNDER_TWINS = {f"__i{op}__": f"__{op}__" for op in
                 "add sub mul matmul truediv floordiv mod pow lshift rshift and xor or".split()}


def _twin(func: Any, args: tuple, kwargs: dict) -> Callable[[], Any] | None:
    """A call of the out-of-place twin of the in-place call `func(*args, **kwargs)`, or None."""
    kind = _WRITE_KIND.get(func)
    if isinstance(kind, _InplaceArg):  # a functional called with inplace=True
        return kind.out_of_place(func, args, kwargs)
    name = getattr(func, "__name__", "")
    if name in _DUNDER_TWINS:
        twin = getattr(torch.Tensor, _DUNDER_TWINS[name], None)
    elif name.endswith("_") and not name.startswith("_"):
        twin = next((getattr(space, name[:-1], None) for space in (torch.Tensor, torch)
                     if getattr(space, name, None) is func), None)
    else:
        twin = None
    return None if twin is None else lambda: twin(*args, **kwargs)
