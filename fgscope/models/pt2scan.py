"""Checking a torch.export `.pt2` archive before torch reads it, without running anything.

`torch.export.load` unpickles parts of an archive with `weights_only=False` (the sample
inputs, weights and constants marked `use_pickle`, custom and opaque objects, legacy files) and
turns strings of the program's JSON into Python code: names go verbatim into the source that
torch.fx compiles, symbolic shapes go through `sympy.sympify` (which calls `eval`) and guards
are `exec`uted. `_scan_pt2` reads the archive with `zipfile` and `json` and mirrors what
`torch.export.pt2_archive._package.load_pt2` will read: every member it would unpickle is checked
with torch's weights_only unpickler, every name must be a plain identifier and every expression
must parse to a small allow-listed grammar. Anything else is an `UnsafeModelError` naming the
member, or a `ModelLoadError` when the archive is not a well-formed one.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fgscope.errors import ModelLoadError, UnsafeModelError
from fgscope.models.pt2grammar import _strings
from fgscope.models.types import _first_line

__all__: list[str] = []

# The archive layout, as torch.export.pt2_archive.constants spells it (copied so that this
# module reads an archive without importing torch.export).
_FORMAT, _VERSION = "archive_format", "archive_version"
_MODELS = "models/"
_SAMPLE_INPUTS = "data/sample_inputs/{}.pt"
_WEIGHTS, _WEIGHTS_CONFIG = "data/weights/", "data/weights/{}_weights_config.json"
_CONSTANTS, _CONSTANTS_CONFIG = "data/constants/", "data/constants/{}_constants_config.json"
_CUSTOM_OBJ, _OPAQUE_OBJ = "custom_obj_", "opaque_obj_"
_AOTI = "data/aotinductor/"
_LEGACY_PROGRAM = "serialized_exported_program.json"  # the zip layout before archive_format
TRUST_HINT = "re-run with --trust if you trust its source"
# Globals a torch.save pickle of plain tensors refers to (skipped when naming what it holds).
_TENSOR_PICKLE_MODULES = (
    "torch._utils",
    "torch._tensor",
    "torch.serialization",
    "collections",
    "builtins",
    "__builtin__",
)

# --- the archive -------------------------------------------------------------------------


def _scan_pt2(path: Path, trust: bool = False) -> None:
    """Check everything `torch.export.load(path)` would unpickle or compile (nothing runs);
    with `trust`, only the archive's layout (so that a broken one is said as such).

    Raises:
        UnsafeModelError: a member holds a pickled Python object, compiled code, or a program
            whose names or expressions would run as Python code.
        ModelLoadError: the archive is damaged or not a torch.export archive.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            _scan_archive(path, zf, trust)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:  # KeyError: a missing member
        raise ModelLoadError(
            f"{path} is a damaged torch.export archive ({_first_line(exc)})"
        ) from exc


def _scan_archive(path: Path, zf: zipfile.ZipFile, trust: bool) -> None:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):  # zip readers disagree on which duplicate they return
        dup = next(n for n in names if names.count(n) > 1)
        raise ModelLoadError(f"{path} is a damaged torch.export archive (two members named {dup})")
    if _LEGACY_PROGRAM in names:  # torch.export.load still reads this layout, if all else fails
        if not trust:
            _scan_legacy(path, zf, names)
        return
    # torch's reader takes the folder of the first member as the archive's root.
    root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    if not root or not all(n.startswith(root) for n in names):
        raise ModelLoadError(
            f"{path} is not a torch.export archive (its members are not all in one folder)",
            "write it with torch.export.save",
        )
    files = {n[len(root) :] for n in names}

    def read(member: str) -> bytes:
        return zf.read(root + member)

    if _FORMAT not in files or _VERSION not in files:
        missing = _FORMAT if _FORMAT not in files else _VERSION
        raise ModelLoadError(f"{path} is not a torch.export archive (it has no {missing} member)")
    version = read(_VERSION).decode("utf-8", "replace").strip()
    programs = [f for f in files if f.startswith(_MODELS)]
    if not programs:
        raise ModelLoadError(
            f"{path} is not a usable torch.export archive: it declares itself one "
            f"(archive version {version!r}) but holds no program (no {_MODELS}*.json)",
            "write it with torch.export.save",
        )
    if trust:
        return
    aoti = sorted(f for f in files if f.startswith(_AOTI))
    if aoti:  # AOTInductor packages hold shared libraries that torch loads and runs
        raise UnsafeModelError(
            f"{path} holds compiled native code in {aoti[0]} (an AOTInductor package); "
            "loading it runs code from the file",
            TRUST_HINT,
        )
    for program in sorted(programs):
        name = program[len(_MODELS) : -len(".json")]  # as load_pt2 slices it
        _check_program(path, program, read(program))
        sample = _SAMPLE_INPUTS.format(name)
        if sample in files:  # a missing one is torch's error to report
            _check_pickle(path, sample, read(sample))
        for kind, legacy, config in (
            ("weights", f"{_WEIGHTS}{name}.pt", _WEIGHTS_CONFIG.format(name)),
            ("constants", f"{_CONSTANTS}{name}.pt", _CONSTANTS_CONFIG.format(name)),
        ):
            if legacy in files:  # old layout: the whole state_dict/constants as one pickle
                _check_pickle(path, legacy, read(legacy))
            elif config in files:
                for member in _pickled_members(path, kind, config, read(config)):
                    if member in files:
                        _check_pickle(path, member, read(member))


def _scan_legacy(path: Path, zf: zipfile.ZipFile, names: list[str]) -> None:
    """The zip layout of torch < 2.7 (top-level serialized_* members), which torch.export.load
    falls back to: its .pt members go through torch.load with weights_only=False."""
    for name in names:
        if name == _LEGACY_PROGRAM:
            _check_program(path, name, zf.read(name))
        elif name.startswith("serialized_") and name.endswith(".pt"):
            _check_pickle(path, name, zf.read(name))


def _pickled_members(path: Path, kind: str, config: str, data: bytes) -> Iterator[str]:
    """The members of a weights/constants payload config that load_pt2 unpickles."""
    doc = _json(path, config, data)
    _check_json(path, config, doc)
    entries = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise ModelLoadError(f"{path} is a damaged torch.export archive ({config} has no config)")
    folder = _WEIGHTS if kind == "weights" else _CONSTANTS
    for entry in entries.values():
        file = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(file, str):
            raise ModelLoadError(
                f"{path} is a damaged torch.export archive (bad entry in {config})"
            )
        member = os.path.join(folder, file)
        if kind == "constants" and file.startswith((_CUSTOM_OBJ, _OPAQUE_OBJ)):
            what = (
                "a TorchScript object"
                if file.startswith(_CUSTOM_OBJ)
                else "a pickled Python object"
            )
            raise UnsafeModelError(
                f"{path} holds {what} in {member}; unpickling runs code from the file", TRUST_HINT
            )
        if entry.get("use_pickle"):  # truthy, as torch tests it
            yield member


# --- pickles -----------------------------------------------------------------------------


def _check_pickle(path: Path, member: str, data: bytes) -> None:
    """`data` must be what torch.load(weights_only=True) accepts: tensors and containers."""
    import torch

    if not data:  # torch reads an empty sample-inputs member as {}
        return
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a global outside torch's allowlist: code, not data
        what = _pickled_global(data)
        raise UnsafeModelError(
            f"{path} holds a pickled Python object{f' ({what})' if what else ''} in {member}; "
            "unpickling runs code from the file",
            TRUST_HINT,
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is a damaged torch.export archive ({member}: {_first_line(exc)})"
        ) from exc


def _pickled_global(data: bytes) -> str | None:
    """The first non-tensor global a pickle (or a torch.save zip's data.pkl, or the pickles of
    torch.save's legacy format one after another) names, read with pickletools (nothing is
    unpickled); None when there is none or it cannot be told."""
    try:
        if data[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        stream = io.BytesIO(data)
        for _ in range(4):  # legacy: magic number, protocol, sys info, then the object
            strings: list[str] = []
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings.append(arg)
                if op.name == "GLOBAL":
                    module, name = arg.split(" ", 1)
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    module, name = strings[-2], strings[-1]
                else:
                    continue
                if module != "torch" and not module.startswith(_TENSOR_PICKLE_MODULES):
                    return f"{module}.{name}"
            if stream.tell() >= len(data):
                break
    except Exception:  # an unusual or truncated pickle: the caller says it generically
        pass
    return None


# --- the program's JSON ------------------------------------------------------------------


def _json(path: Path, member: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ModelLoadError(
            f"{path} is a damaged torch.export archive ({member} is not JSON: {_first_line(exc)})"
        ) from exc


def _check_program(path: Path, member: str, data: bytes) -> None:
    _check_json(path, member, _json(path, member, data))


def _check_json(path: Path, member: str, doc: Any) -> None:
    """Every string torch would compile or evaluate must be a plain name or expression."""
    for key, value, check in _strings(doc):
        if not check(value):
            raise UnsafeModelError(
                f"{path} holds a program whose {key} {value[:60]!r} (in {member}) is not a plain "
                "name or expression; loading it would run it as Python code",
                TRUST_HINT,
            )
