"""Keeping recorded tensors exact while the model goes on writing into its tensors.

PyTorch models overwrite tensors right after producing them (`ReLU(inplace=True)` after
BatchNorm, `out += identity`, `x[...] = v`, `torch._foreach_add_(tensors, ...)`, and writes
inside TorchScript or C++ code that no Python hook sees). Two mechanisms keep records exact:

- `snapshot` (inference mode, capture's default): a record is a copy-on-write clone of the
  output (`torch._lazy_clone`, c10's COW storage). It shares the output's memory, so nothing
  is copied while nothing writes; any later write into the output's storage, through any
  alias and from any code (Python, TorchScript, C++), first gives the writer its own copy.
  The record owns a storage that nothing else references, so nothing can change it.
  `InplaceModules` spares that copy for the commonest write, an in-place activation module
  (`ReLU6(inplace=True)` after BatchNorm): it runs out of place and the model's tensor is
  pointed at the result (`Tensor.set_`), one pass over the data instead of a copy plus a write.
- `CopyOnWrite` (grad mode, where records must stay on the autograd graph): a
  `TorchFunctionMode` watches the in-place operations of the forward and copies the records
  that share a storage with the tensor an operation is about to write into (views included),
  just before the write.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["CopyOnWrite", "InplaceModules", "inplace_targets", "snapshot", "storage_key"]


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
    """Keeps recorded tensors as they were produced when an operation writes into them (grad
    mode: records held by reference stay on the autograd graph): the records that share a
    storage with the tensor an operation is about to write into are copied just before the
    write."""

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
        for target in inplace_targets(func, args, kwargs):
            self._recorder.before_write(target)
        return func(*args, **kwargs)


# --- snapshots (inference mode) ------------------------------------------------------------

_lazy_clone = getattr(torch, "_lazy_clone", None)
_is_cow = getattr(torch._C, "_is_cow_tensor", None)
_use_count = torch._C._storage_Use_Count


def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` that no later write into `t` (or any alias of its storage) changes.

    Copy-on-write where torch supports it for `t`'s storage (no data is copied now; a later
    writer into the shared memory copies first), else a real copy (`clone`: storages that
    wrap foreign memory, such as `torch.from_numpy`, tensors without storage, and tensor
    types COW does not cover).
    """
    if t.requires_grad:
        t = t.detach()
    if _lazy_clone is not None and type(t) is torch.Tensor and t.layout == torch.strided:
        try:
            return _lazy_clone(t)
        except (RuntimeError, NotImplementedError):
            pass
    return t.clone()


# torch.nn activations whose `inplace=True` forward writes into the input and returns it, and
# whose `inplace=False` forward computes the same values into a new tensor. Exact types only:
# a subclass may override forward.
_INPLACE_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Threshold,
)


class InplaceModules:
    """Runs in-place activation modules out of place when they would write into a snapshot.

    Without it, `ReLU6(inplace=True)` after a recorded BatchNorm makes copy-on-write copy the
    BatchNorm output, then clamps the copy in place (two passes over the map). Here, when the
    module's input shares its memory with a record and nothing else aliases the input's
    storage, the module runs with `inplace=False` for that call and the input tensor is then
    pointed at the result (`set_`): every Python reference to the input sees the new values,
    exactly as after a real in-place write, and the module returns that tensor, as in place.
    Flags are restored after each call and, whatever happens, by `restore()`.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = [m for m in modules
                        if type(m) in _INPLACE_ACTIVATIONS and m.__dict__.get("inplace") is True]
        self.pending: dict[nn.Module, torch.Tensor] = {}

    def register(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks on every in-place activation module; register before the recording hooks so
        that they see (and record) the tensor the model goes on with."""
        if _is_cow is None:
            return []
        handles = []
        for m in self.modules:
            handles.append(m.register_forward_pre_hook(self._before))
            handles.append(m.register_forward_hook(self._after))
        return handles

    def _before(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if len(args) == 1 else None
        # 2 users of the storage: the input tensor and the temporary from untyped_storage()
        if (type(x) is torch.Tensor and _is_cow(x) and not x.requires_grad
                and torch.is_inference_mode_enabled() and _use_count(x.untyped_storage()._cdata) == 2):
            module.__dict__["inplace"] = False
            self.pending[module] = x

    def _after(self, module: nn.Module, args: tuple, out: Any) -> Any:
        x = self.pending.pop(module, None)
        if x is None:
            return None
        module.__dict__["inplace"] = True
        if (type(out) is not torch.Tensor or out is x or out.shape != x.shape
                or out.dtype != x.dtype or out.device != x.device):
            return None
        x.set_(out)
        return x

    def restore(self) -> None:
        """Every flag back to `inplace=True` (a forward that raised leaves some flipped)."""
        for m in self.pending:
            m.__dict__["inplace"] = True
        self.pending.clear()
