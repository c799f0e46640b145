"""Run folders and their `manifest.json`: how a run can be understood and reproduced later.

Every command that writes files writes them into one folder with a manifest (fgscope and
torch versions, model source and hash, image list and hashes, the exact command line,
device, dtype, timings). An existing folder is never overwritten silently: without
`overwrite`, a new numbered run folder is made beside it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputError

__all__ = [
    "RunDir",
    "new_run_dir",
    "write_json",
    "write_text",
    "atomic_write_bytes",
    "model_entry",
]

DEFAULT_ROOT = Path("fgscope-out")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so
    that an interrupted run never leaves a half-written file under the final name."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            # mkstemp creates files 0600; give the final file the usual umask-based mode.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            with _suppress():
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="check free disk space and permissions, or choose another --out",
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def new_run_dir(out: Path | None, command: str, overwrite: bool = False) -> Path:
    """The folder to write into.

    Args:
        out: requested folder; None = a new folder `fgscope-out/<command>-<timestamp>`.
        command: the command's name, used in default folder names.
        overwrite: replace the files of an existing `out` instead of making a new folder.

    Returns:
        An existing, empty (or, with `overwrite`, reused) folder.
    """
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = DEFAULT_ROOT / f"{command}-{stamp}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder", hint="choose another --out")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            n = 2
            while (cand := out.with_name(f"{out.name}-{n}")).exists():
                n += 1
            out = cand
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out


@dataclass
class RunDir:
    """An output folder and the manifest that describes what was done in it."""

    path: Path
    command: str
    manifest: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.manifest.setdefault("command", self.command)
        self.manifest.setdefault("argv", [Path(sys.argv[0]).name, *sys.argv[1:]])
        self.manifest.setdefault("cwd", os.getcwd())
        self.manifest.setdefault("started_at", _dt.datetime.now().astimezone().isoformat())
        self.manifest.setdefault("versions", _versions())
        self.manifest.setdefault("timings_s", {})
        self.manifest.setdefault("files", [])

    def file(self, name: str) -> Path:
        """Path of an output file inside the run folder (parents created)."""
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def wrote(self, path: Path) -> None:
        rel = str(Path(path).relative_to(self.path))
        if rel not in self.manifest["files"]:
            self.manifest["files"].append(rel)

    def time(self, what: str, seconds: float) -> None:
        self.manifest["timings_s"][what] = round(seconds, 4)

    def finish(self) -> Path:
        """Write `manifest.json` (atomically) and return its path."""
        self.manifest["timings_s"]["total"] = round(time.perf_counter() - self.started, 4)
        self.manifest["finished_at"] = _dt.datetime.now().astimezone().isoformat()
        path = self.path / "manifest.json"
        write_json(path, self.manifest)
        return path


def model_entry(lm: Any) -> dict[str, Any]:
    """The model part of a manifest: where it came from (spec, kind, arch, weights, file and
    sha256, notes), its input size and preprocessing. `lm` is a `fgscope.models.LoadedModel`."""
    s, p = lm.source, lm.preprocess
    return {
        "spec": s.spec, "kind": s.kind, "arch": s.arch, "weights": s.weights, "path": s.path,
        "sha256": s.sha256, "notes": list(s.notes), "input_size": list(lm.input_size),
        "preprocess": {
            "crop_size": list(p.crop_size), "resize_size": p.resize_size, "mean": list(p.mean),
            "std": list(p.std), "interpolation": p.interpolation,
        },
    }


def _versions() -> dict[str, str]:
    from . import __version__

    out = {"fgscope": __version__, "python": platform.python_version()}
    for mod in ("torch", "torchvision", "numpy", "PIL"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod if mod != "PIL" else "pillow"] = getattr(m, "__version__", "?")
    return out
