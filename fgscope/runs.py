"""Run folders and their `manifest.json`: how a run can be understood and reproduced later.

Every command that writes files writes them into one folder with a manifest (fgscope and
torch versions, model source and hash, image list and hashes, the exact command line,
device, dtype, timings). An existing folder is never overwritten silently: without
`overwrite`, a new numbered run folder is made beside it and an `OutputRedirected` warning
names it (`choose_run_dir` returns the same as data).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import secrets
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgscope.errors import OutputError

__all__ = [
    "RunDir",
    "new_run_dir",
    "choose_run_dir",
    "OutChoice",
    "OutputRedirected",
    "owned_files",
    "JOURNAL",
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
        # Created 0666 & ~umask by the kernel (mkstemp would make it 0600, and reading the
        # umask means setting it, which races with other threads).
        fd, tmp = _create_temp(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
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


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, opened for writing, with the umask's mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def write_text(path: Path, text: str) -> None:
    # backslashreplace: a file name that is not UTF-8 (b"\xff.jpg") becomes a valid escape
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


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


JOURNAL = ".fgscope-files"  # one relative path per line, appended as each file is written


class OutputRedirected(UserWarning):
    """`--out` held files, so the run writes into a new folder beside it (named in the
    message). `fgscope` turns it into a `warning:` line on stderr; in Python it is an
    ordinary warning (`warnings.simplefilter("error", OutputRedirected)` makes it an error)."""


@dataclass(frozen=True)
class OutChoice:
    """Where a run writes, and why there.

    Attributes:
        path: the folder to write into (exists, empty or emptied of fgscope's own files).
        requested: the `out` that was asked for (absolute), None for the default folder.
        redirected: `requested` held files and `overwrite` was not given, so `path` is a new
            numbered folder beside it (`DIR-2`, `DIR-3`, ...).
    """

    path: Path
    requested: Path | None
    redirected: bool = False

    def message(self) -> str:
        """The one-line warning of a redirected run ("" when it was not redirected)."""
        if not self.redirected:
            return ""
        return (f"--out {self.requested} holds files: writing into {self.path} instead "
                f"(--overwrite reuses {self.requested}, removing only an earlier fgscope "
                "run's files)")


def choose_run_dir(
    out: Path | None,
    command: str,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
) -> OutChoice:
    """The folder to write into, created, and whether it is the one asked for.

    Args:
        out: requested folder; None = a new folder `fgscope-out/<command>-<timestamp>`.
        command: the command's name, used in default folder names.
        overwrite: reuse an existing `out`, removing only the files an earlier fgscope run
            wrote there (those its manifest and journal list); a folder holding anything else
            is refused, never emptied. Without it, an `out` that holds files is left alone
            and a new numbered folder beside it is used (`OutChoice.redirected`).
        inputs: the run's input paths (images, folders, run folders); `out` may not be one of
            them or lie inside one (outputs would be read back as inputs, or deleted inputs).

    Returns:
        The chosen folder: existing, empty (or, with `overwrite`, emptied of fgscope's files).

    Raises:
        OutputError: `out` is a file, an input or inside one, holds files fgscope did not
            write (with `overwrite`), or cannot be created.
    """
    requested = None if out is None else Path(os.path.abspath(Path(out).expanduser()))
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = DEFAULT_ROOT / f"{command}-{stamp}"
    out = Path(os.path.abspath(Path(out).expanduser()))  # `--out .` has a name only once absolute
    _refuse_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder", hint="choose another --out")
    redirected = False
    if out.exists() and any(out.iterdir()):
        if overwrite:
            _remove_own_files(out)
        else:
            n = 2
            while (cand := out.with_name(f"{out.name}-{n}")).exists():
                n += 1
            out, redirected = cand, requested is not None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    return OutChoice(out, requested, redirected)


def new_run_dir(
    out: Path | None,
    command: str,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
) -> Path:
    """`choose_run_dir(...).path`; a run redirected away from the `out` asked for is told
    with an `OutputRedirected` warning (library code does not print; the CLI shows it as a
    `warning:` line on stderr naming the folder actually used).

    Raises:
        OutputError: see `choose_run_dir`.
    """
    choice = choose_run_dir(out, command, overwrite, inputs)
    if choice.redirected:
        warnings.warn(OutputRedirected(choice.message()), stacklevel=2)
    return choice.path


def _refuse_inputs(out: Path, inputs: Sequence[str | os.PathLike[str] | None]) -> None:
    real = Path(os.path.realpath(out))
    for item in inputs:
        if item is None or not os.path.exists(item):  # globs and missing paths hold nothing yet
            continue
        src = Path(os.path.realpath(item))
        if real == src or src in real.parents:
            what = "is" if real == src else "is inside"
            raise OutputError(
                f"--out {out} {what} the input {item}: fgscope never writes into its inputs",
                hint="choose an --out outside the inputs",
            )


def owned_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Split what `folder` holds into fgscope's own files (listed in the manifest or the
    journal of the run that wrote them, sub-runs included) and everything else.

    Returns:
        (owned, foreign): paths of owned files; paths of foreign files and folders.
    """
    listed = {"manifest.json", JOURNAL}
    manifest = folder / "manifest.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
        listed.update(str(f) for f in data.get("files", []) if isinstance(f, str))
    except (OSError, ValueError, AttributeError):
        pass  # an unreadable manifest vouches for nothing
    try:
        listed.update(x for x in (folder / JOURNAL).read_text(encoding="utf-8").splitlines() if x)
    except OSError:
        pass
    if not manifest.exists() and not (folder / JOURNAL).exists():
        return [], sorted(folder.iterdir())  # no run of fgscope's was ever written here
    owned: list[Path] = []
    foreign: list[Path] = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for d in list(dirs):
            sub = base / d
            if sub.is_symlink():
                foreign.append(sub)
                dirs.remove(d)
            elif (sub / "manifest.json").exists() or (sub / JOURNAL).exists():
                o, f = owned_files(sub)  # a sub-run (report's layers/, cam/, ...)
                owned += o
                foreign += f
                dirs.remove(d)
        for name in files:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            temp = name.startswith(".") and name.endswith(".tmp")  # atomic_write_bytes leftovers
            (owned if rel in listed or temp else foreign).append(path)
        if not files and not dirs and base != folder:
            foreign.append(base)  # an empty folder fgscope did not make (it makes none)
    return owned, foreign


def _remove_own_files(out: Path) -> None:
    owned, foreign = owned_files(out)
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputError(
            f"--overwrite: {out} holds files fgscope did not write ({names}{more}); "
            "nothing was removed",
            hint="choose an empty or new --out, or move those files away",
        )
    for path in owned:
        with _suppress():
            path.unlink()
    for root, _dirs, _files in sorted(os.walk(out), key=lambda t: -len(t[0])):
        if Path(root) != out:
            with _suppress():
                os.rmdir(root)  # only folders the removal emptied


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
        self._listed = set(self.manifest["files"])

    def file(self, name: str) -> Path:
        """Path of an output file inside the run folder (parents created)."""
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def wrote(self, path: Path) -> None:
        """Record a file as this run's: listed in the manifest, and at once in the journal
        (so that `--overwrite` knows fgscope's files even after an interrupted run)."""
        rel = Path(path).relative_to(self.path).as_posix()
        if rel not in self._listed:
            self._listed.add(rel)
            self.manifest["files"].append(rel)
            try:
                with open(self.path / JOURNAL, "a", encoding="utf-8") as fh:
                    fh.write(rel + "\n")
            except OSError as exc:
                raise OutputError(f"cannot write {self.path / JOURNAL}: {exc.strerror or exc}") from None

    def time(self, what: str, seconds: float) -> None:
        self.manifest["timings_s"][what] = round(seconds, 4)

    def finish(self) -> Path:
        """Write `manifest.json` (atomically) and return its path."""
        self.manifest["timings_s"]["total"] = round(time.perf_counter() - self.started, 4)
        self.manifest["finished_at"] = _dt.datetime.now().astimezone().isoformat()
        self.manifest["peak_rss_mb"] = _peak_rss_mb()
        path = self.path / "manifest.json"
        write_json(path, self.manifest)
        with _suppress():  # the manifest now lists every file the journal did
            os.unlink(self.path / JOURNAL)
        return path


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (MB), None where the OS does not say. Taken
    when the run's files are written: the interpreter's exit, which touches hundreds of MB of
    torch's shared libraries, comes after."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


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
    from fgscope import __version__

    out = {"fgscope": __version__, "python": platform.python_version()}
    for mod in ("torch", "torchvision", "numpy", "PIL"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod if mod != "PIL" else "pillow"] = getattr(m, "__version__", "?")
    return out
