"""torch.export `.pt2` programs: loading them without running code from the file, and checking
that the program is an image model fgscope can feed.

Without `trust`, the archive is first checked member by member (`pt2scan._scan_pt2`), then
`torch.export.load` and `unflatten` run under `_no_code`, which forces every `torch.load` to
`weights_only=True` and refuses plain unpickling, TorchScript object unpickling, AOTInductor
libraries and non-plain shape expressions and guards: a path the scan missed still cannot run
code. torch's own log records (whole tracebacks) are silenced while it reads the file; every
failure becomes one `ModelLoadError` line that says why.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgscope.errors import FgscopeError, ModelLoadError, UnsafeModelError
from fgscope.models.pt2grammar import _is_guard, _is_sym_expr
from fgscope.models.pt2graph import restore
from fgscope.models.pt2scan import TRUST_HINT, _scan_pt2
from fgscope.models.types import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSource,
    Preprocess,
    _first_line,
    _Resolved,
)

__all__: list[str] = []

_NOTE_EXPORT = (
    "torch.export: loaded with torch.export.unflatten, which restores the original module "
    "hierarchy, so forward hooks on its submodules fire as in the original model; ops written "
    "inline in forward() (torch.flatten, +, F.relu) are not modules and cannot be captured, and "
    "train/eval behaviour was fixed when the program was exported"
)
# Loggers torch.export.load, its deserializer and unflatten write to (tracebacks included).
_TORCH_LOGGERS = (
    "torch.export",
    "torch._export",
    "torch.fx",
    "torch._subclasses",
    "torch.utils._sympy",
    "torch._dynamo",
    "torch._guards",
)


def _from_export(spec: str, path: Path, digest: str, trust: bool) -> _Resolved:
    """Load a `.pt2` program; without `trust` nothing in it may run as Python code."""
    _scan_pt2(path, trust)
    caught: list[str] = []
    keep = _Keep()
    with _quiet_torch(caught, keep), contextlib.nullcontext() if trust else _no_code(path):
        try:
            try:
                program = torch.export.load(str(path))
            except Exception as exc:
                if not _register_output_type([exc, *keep.errors], caught):
                    raise
                keep.errors.clear()
                program = torch.export.load(str(path))
        except Exception as exc:
            # torch.export.load logs the real cause, then fails again in its legacy fallback.
            for err in (exc, *keep.errors):
                if (ours := _ours(err)) is not None:
                    raise ours from None
            raise _explain(path, _root(keep.errors[0] if keep.errors else exc)) from exc
        base, max_batch, shape_notes = _check_inputs(path, program)
        notes = [_NOTE_EXPORT]
        try:
            module: nn.Module = torch.export.unflatten(program)
            module.eval()
            restore(module, program)  # BatchNorm records before ReLU_, Linear MACs, types
        except Exception as exc:  # the flat graph still runs, but it calls no submodules
            if (ours := _ours(exc)) is not None:
                raise ours from None
            try:
                module = program.module()
            except Exception as exc2:
                if (ours := _ours(exc2)) is not None:
                    raise ours from None
                raise ModelLoadError(
                    f"{path}: torch cannot rebuild a module from the program ({_first_line(exc2)})"
                ) from exc2
            notes = [
                f"torch.export: unflatten failed ({_first_line(exc)}); the flat graph calls no "
                "submodules, so only the model's output can be captured"
            ]
    notes += shape_notes + list(dict.fromkeys(caught))[:3]
    source = ModelSource(spec, "export", None, None, str(path), digest, tuple(notes))
    return _Resolved(module, base, None, None, source, max_batch)


# Installed libraries whose output types (Hugging Face `ModelOutput`s) register themselves
# with torch's pytree when their module is imported; a program returning one names its type.
_OUTPUT_LIBRARIES = ("transformers",)
_UNREGISTERED = re.compile(r"Deserializing ([A-Za-z_][\w.]*) in pytree is not registered")


def _register_output_type(errors: list[BaseException], caught: list[str]) -> bool:
    """Import the installed library module that defines a program's output type, when torch
    could not rebuild it (a Hugging Face model returns `ImageClassifierOutput...`); True when
    one was imported. Only modules of `_OUTPUT_LIBRARIES` that are installed are imported:
    nothing from the file runs, the file only names an installed module."""
    for err in errors:
        found = _UNREGISTERED.search(str(err))
        if found is None:
            continue
        module = found.group(1).rpartition(".")[0]
        if module.split(".")[0] not in _OUTPUT_LIBRARIES:
            return False
        try:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                return False
            importlib.import_module(module)
        except Exception:  # not installed or broken: the original error stands
            return False
        caught.append(f"torch.export: the program returns {found.group(1)}; {module} was "
                      "imported so that torch could rebuild it")
        return True
    return False


def _check_inputs(path: Path, program: Any) -> tuple[Preprocess | None, int | None, list[str]]:
    """The input a program takes must be one (N, 3, H, W) image batch; returns the preprocessing
    its static H, W imply, the largest batch it takes, and notes."""
    names = program.graph_signature.user_inputs
    vals = [
        n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in names
    ]
    if not vals or all(v is None for v in vals):  # no shapes recorded: nothing to check
        return None, None, []
    shapes = [_dims(v) for v in vals]
    if len(vals) != 1 or shapes[0] is None or len(shapes[0]) != 4 or shapes[0][1] not in (3, "*"):
        took = ", ".join(_show(s) for s in shapes)
        raise ModelLoadError(
            f"{path} is a program that takes "
            + (f"inputs of shape {took}" if len(vals) == 1 else f"{len(vals)} inputs ({took})")
            + "; fgscope needs an image model taking one (N, 3, H, W) tensor",
            "export the image model itself, e.g. torch.export.export(net, (torch.randn(1, 3, 224, 224),))",
        )
    dims = shapes[0]
    notes: list[str] = []
    base = None
    if isinstance(dims[2], int) and isinstance(dims[3], int):
        base = Preprocess((dims[2], dims[3]), None, IMAGENET_MEAN, IMAGENET_STD)
    lo, hi = _batch_range(program, vals[0].shape[0])
    if isinstance(dims[0], int) and dims[0] > 1:
        raise ModelLoadError(
            f"{path} was exported for batches of exactly {dims[0]} images; fgscope runs "
            "batches of any size up to --batch-size (1 for summary)",
            "re-export it with a batch of 1 or a dynamic batch: "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)",
        )
    if lo > 1:
        notes.append(f"torch.export: the program takes batches of at least {lo} images")
    if any(isinstance(d, int) for d in (dims[0], dims[2], dims[3])):
        notes.append(
            f"torch.export: the program takes only inputs of shape {dims} "
            "(N, C, H, W; '*' = dynamic)"
        )
    if hi is not None:
        notes.append(f"torch.export: at most {hi} image(s) per forward; batches are split to fit")
    return base, hi, notes


def _dims(val: Any) -> tuple[int | str, ...] | None:
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else "*" for d in val.shape)  # SymInt = dynamic


def _show(dims: tuple[int | str, ...] | None) -> str:
    return "(a non-tensor)" if dims is None else "(" + ", ".join(map(str, dims)) + ")"


def _batch_range(program: Any, dim: Any) -> tuple[int, int | None]:
    """(min, max) batch the program takes: a static size, or a dynamic one's range."""
    if isinstance(dim, int):
        return dim, dim
    vr = program.range_constraints.get(getattr(getattr(dim, "node", None), "expr", None))
    if vr is None:
        return 0, None

    def bound(v: Any) -> int | None:
        try:
            return int(v)
        except Exception:  # infinite (sympy's oo and torch's int_oo raise different errors)
            return None

    return bound(vr.lower) or 0, bound(vr.upper)


def _explain(path: Path, exc: BaseException) -> ModelLoadError:
    """torch's failure to load an archive, said as what is wrong with it."""
    text, low = _first_line(exc), str(exc).lower()
    if isinstance(exc, (zipfile.BadZipFile, EOFError, KeyError, json.JSONDecodeError)) or any(
        s in low
        for s in (
            "central directory",
            "not found in pt2 archive",
            "ran into an error",
            "failed locating file",
            "failed reading zip",
        )
    ):
        return ModelLoadError(f"{path} is a damaged torch.export archive ({text})")
    if "version" in low and ("match" in low or "schema" in low or "upgrade" in low):
        return ModelLoadError(
            f"{path} was written by another torch version and this torch ({torch.__version__}) "
            f"cannot read it ({text})",
            "re-export it with this torch, or run fgscope with the torch that wrote it",
        )
    if "torch.ops" in low or "operator" in low or "custom" in low or "opset" in low:
        return ModelLoadError(
            f"{path} calls operators this torch does not have ({text})",
            "import the library that registers them (from Python), or export without custom ops",
        )
    if "pytree" in low or "treespec" in low:
        return ModelLoadError(
            f"{path} uses a Python type for its inputs or outputs that is not registered here "
            f"({text})",
            "load it from Python after importing the library that defines the type "
            "(e.g. transformers), or export a model that takes and returns plain tensors",
        )
    return ModelLoadError(f"torch.export.load cannot read {path} ({type(exc).__name__}: {text})")


# --- guards ------------------------------------------------------------------------------


class _Keep(logging.Handler):
    """Keeps the exceptions torch logs (it logs the real cause of a failed load, then raises a
    generic error from its fallback path)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _quiet_torch(caught: list[str], keep: _Keep) -> Iterator[None]:
    """torch's log records go to `keep` instead of stderr (it logs whole tracebacks before
    raising) and its warnings into `caught`; every logger is restored afterwards."""
    prefixes = tuple(n + "." for n in _TORCH_LOGGERS)
    parents = [logging.getLogger(n) for n in _TORCH_LOGGERS]
    loud = [  # children with handlers of their own would print; the rest propagate to `keep`
        lg
        for n, lg in list(logging.Logger.manager.loggerDict.items())
        if isinstance(lg, logging.Logger) and n.startswith(prefixes) and lg.handlers
    ]
    saved = [(lg, lg.level, lg.propagate, lg.handlers, lg.disabled) for lg in parents + loud]
    try:
        for lg in parents:
            lg.handlers, lg.propagate = [keep], False
            lg.setLevel(logging.WARNING)
        for lg in loud:
            lg.disabled = True
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            yield
            caught.extend(f"torch: {_first_line(w.message)}" for w in records)  # type: ignore[arg-type]
    finally:
        for lg, level, propagate, handlers, disabled in saved:
            lg.setLevel(level)
            lg.propagate, lg.handlers, lg.disabled = propagate, handlers, disabled


def _root(exc: BaseException) -> BaseException:
    """The first cause of a chain (torch re-raises node errors with the whole node printed)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _ours(exc: BaseException | None) -> FgscopeError | None:
    """An FgscopeError that torch wrapped (its deserializer re-raises node errors as its own)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, FgscopeError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _no_code(path: Path) -> Iterator[None]:
    """While torch reads an untrusted archive, nothing it unpickles or evaluates may be code.

    Defence in depth behind `_scan_pt2`: torch.load always runs with weights_only=True, and the
    other ways torch.export turns bytes into objects or code refuse with an `UnsafeModelError`.
    """
    import sympy
    import torch.export._unlift as unlift
    import torch.serialization as serialization

    real_load, real_sympify = torch.load, sympy.sympify
    real_guards = getattr(unlift, "_convert_guards_code_to_fn", None)

    def refuse(what: str) -> UnsafeModelError:
        return UnsafeModelError(
            f"{path} holds {what} that torch.export.load would unpickle or run; "
            "unpickling runs code from the file",
            TRUST_HINT,
        )

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        if pickle_module is not None:
            raise refuse("a pickle for a custom unpickler")
        try:
            return real_load(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            raise refuse("a pickled Python object") from exc

    def no_pickle(*args: Any, **kwargs: Any) -> Any:
        raise refuse("a pickled Python object")

    def no_script_object(*args: Any, **kwargs: Any) -> Any:
        raise refuse("a TorchScript object")

    class _NoNativeCode:
        def __getattr__(self, name: str) -> Any:
            raise refuse("compiled native code (AOTInductor)")

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise refuse("compiled native code (AOTInductor)")

    def sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, str) and not _is_sym_expr(a):  # sympify evaluates strings with eval
            raise refuse(f"the shape expression {a[:60]!r}")
        return real_sympify(a, *args, **kwargs)

    def guards(code: list[str], *args: Any, **kwargs: Any) -> Any:
        bad = [g for g in code if not _is_guard(g)]  # these are exec'd as Python
        if bad:
            raise refuse(f"the guard {bad[0][:60]!r}")
        return real_guards(code, *args, **kwargs)

    patches: list[tuple[Any, str, Any]] = [
        (torch, "load", load),
        (serialization, "load", load),
        (pickle, "loads", no_pickle),
        (pickle, "load", no_pickle),
        (torch._C, "_pickle_load_obj", no_script_object),
        (getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", _NoNativeCode()),
        (sympy, "sympify", sympify),
        (unlift, "_convert_guards_code_to_fn", guards),
    ]
    # What this torch does not have, it cannot call either.
    patches = [(obj, name, new) for obj, name, new in patches if hasattr(obj, name)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
