"""Search folders and expand glob patterns without looping, hanging or stopping on one bad entry.

The file-system half of `fgscope.images.discover`. `Walker.tree` lists every non-hidden folder
and file under a folder, following symbolic links to folders (a link to a folder elsewhere is
searched once) but never into a loop: a directory is known by `(st_dev, st_ino)`, whatever
path reaches it, and a link back to a folder being searched (or to one of its ancestors) is
skipped and listed. A folder that cannot be listed (no permission, an I/O error) is skipped and
listed too; listed means an `ImageFailure` appended to the walker's `failures`.

`expand_glob` is `glob.glob(pattern, recursive=True)` on top of the walker: the standard
`glob` follows links inside `**`, so two links to `.` make `**` enumerate 2**40 paths.

Nothing here opens a file: entries are classified with `os.scandir`, `lstat` and `stat` only.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path

from fgscope.errors import ImageError
from fgscope.image_decode import ImageFailure, reason, show_path

__all__ = [
    "DirKey",
    "GLOB_CHARS",
    "Walker",
    "dir_key",
    "expand_glob",
    "files_under",
    "glob_files",
    "real_chain",
]

DirKey = tuple[int, int]  # (st_dev, st_ino): a directory's identity, whatever path reaches it
GLOB_CHARS = re.compile(r"[*?\[]")


def dir_key(path: str | os.PathLike[str]) -> DirKey:
    """The identity of the folder `path` (links followed). Raises OSError."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def real_chain(folder: Path) -> frozenset[DirKey]:
    """Keys of `folder` and of every real ancestor of it: a link to any of them is a loop."""
    keys: set[DirKey] = set()
    real = Path(os.path.realpath(folder))
    for path in (real, *real.parents):
        try:
            keys.add(dir_key(path))
        except OSError:  # an ancestor we cannot stat cannot be searched into either
            continue
    return frozenset(keys)


def _why(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return " ".join(str(exc.strerror or exc).split())


class Walker:
    """Lists folders without entering any directory twice.

    Args:
        failures: where skipped folders are appended (shared with the caller).
        stop: keys of folders that count as being searched already (e.g. an ImageFolder's
            root, so that a class linking back to the root is a loop).
    """

    def __init__(self, failures: list[ImageFailure], stop: Iterable[DirKey] = ()) -> None:
        self.failures = failures
        self.stop = frozenset(stop)
        self.visited: set[DirKey] = set()

    def skip(self, path: Path, message: str, hint: str) -> None:
        """List `path` as skipped, with a one-line reason."""
        self.failures.append(ImageFailure(path, reason(ImageError(message, hint))))

    def listing(self, folder: Path) -> list[os.DirEntry[str]] | None:
        """The entries of `folder` sorted by name, hidden ones included; None (and `folder`
        listed as skipped) when it cannot be read."""
        try:
            with os.scandir(folder) as entries:
                return sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            self.skip(
                folder,
                f"cannot search folder {show_path(folder)}: {_why(exc)}",
                "check its permissions",
            )
            return None

    def loop(self, path: Path) -> None:
        """List the folder link `path` as a loop (it leads back to a folder that contains it)."""
        self.skip(
            path,
            f"skipped folder {show_path(path)}: a symbolic link loop, it leads back to "
            f"{show_path(os.path.realpath(path))}, which contains it",
            "remove the link, or pass the folder it points to",
        )

    def enter(self, path: Path, key: DirKey, chain: frozenset[DirKey]) -> bool:
        """Whether to search the folder `path`: not if it loops back into `chain` (listed) or
        was searched already through another path (its files are found there)."""
        if key in chain:
            self.loop(path)
            return False
        if key in self.visited:
            return False
        self.visited.add(key)
        return True

    def subfolders(self, folder: Path) -> list[Path] | None:
        """Non-hidden folders in `folder` (links followed), in name order, except links back
        to `folder` or to a `stop` folder (listed as loops); None when it cannot be read."""
        entries = self.listing(folder)
        if entries is None:
            return None
        chain = self.stop | real_chain(folder)
        out: list[Path] = []
        for entry in entries:
            if entry.name.startswith(".") or not _is_dir(entry):
                continue
            key = self._key(folder / entry.name, entry)
            if key is not None and key in chain:
                self.loop(folder / entry.name)
            elif key is not None:
                out.append(folder / entry.name)
        return out

    def _key(self, path: Path, entry: os.DirEntry[str]) -> DirKey | None:
        """The key of the folder `entry` leads to; None (and listed) when it cannot be had."""
        try:
            info = entry.stat()  # follows a link: the key of the folder it reaches
        except OSError as exc:
            self.skip(
                path,
                f"cannot search folder {show_path(path)}: {_why(exc)}",
                "check its permissions",
            )
            return None
        return info.st_dev, info.st_ino

    def tree(self, top: Path) -> tuple[list[Path], list[Path]]:
        """(folders, files) under `top`, recursively, hidden entries skipped, in walk order.

        `top` itself is the first folder. Files are all non-folder entries (FIFOs and broken
        links included: loading lists them with the reason). A link to a folder is followed
        unless it loops; an unreadable folder is skipped and listed.
        """
        try:
            key = dir_key(top)
        except (OSError, ValueError) as exc:
            why = _why(exc) if isinstance(exc, OSError) else "the path contains a NUL byte"
            self.skip(top, f"cannot search folder {show_path(top)}: {why}", "check the path")
            return [], []
        chain = self.stop | real_chain(top)
        if key in self.visited:
            return [], []
        self.visited.add(key)
        folders: list[Path] = []
        files: list[Path] = []
        stack = [(top, chain)]  # explicit stack: a deep tree must not hit the recursion limit
        while stack:
            folder, chain = stack.pop()
            folders.append(folder)
            entries = self.listing(folder)
            below = []
            for entry in entries or ():
                if entry.name.startswith("."):
                    continue
                path = folder / entry.name
                if not _is_dir(entry):
                    files.append(path)
                    continue
                key = self._key(path, entry)
                if key is not None and self.enter(path, key, chain):
                    below.append((path, chain | {key}))
            stack.extend(reversed(below))  # depth first, in name order
        return folders, files


def files_under(
    folder: Path,
    extensions: Collection[str],
    failures: list[ImageFailure],
    stop: Iterable[DirKey] = (),
    walker: Walker | None = None,
) -> list[Path]:
    """Files under `folder` ending in one of `extensions` (lower case, with the dot; matched
    case-insensitively), recursively, hidden entries skipped, sorted by path parts.

    Args:
        walker: a walker to share (folders it searched already are not searched again);
            None: a new one with `failures` and `stop`.
    """
    _, files = (walker or Walker(failures, stop)).tree(folder)
    found = [p for p in files if p.suffix.lower() in extensions]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def glob_files(
    pattern: str, extensions: Collection[str], failures: list[ImageFailure]
) -> list[Path]:
    """Files matched by `pattern` that end in one of `extensions`, and those under the
    folders it matches (each folder searched once), in the order of the sorted matches."""
    walker = Walker(failures)
    paths: list[Path] = []
    for match in expand_glob(pattern, failures):
        if os.path.isdir(match):
            paths.extend(files_under(match, extensions, failures, walker=walker))
        elif match.suffix.lower() in extensions:
            paths.append(match)
    return paths


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is a folder or a link to one; a link that cannot be followed (a loop,
    no permission) counts as a file, which loading then lists with the reason."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _split(pattern: str) -> tuple[Path, list[str]]:
    """(the literal folder a pattern starts from, its remaining parts), `**/**` as `**`."""
    parts = Path(pattern).parts
    i = 0
    while i < len(parts) and not GLOB_CHARS.search(parts[i]):
        i += 1
    rest: list[str] = []
    for part in parts[i:]:
        if not (part == "**" and rest and rest[-1] == "**"):  # same matches, searched once
            rest.append(part)
    return Path(*parts[:i]), rest


def expand_glob(pattern: str, failures: list[ImageFailure]) -> list[Path]:
    """Paths matching `pattern`, sorted, as `glob.glob(pattern, recursive=True)` gives them.

    `*`, `?` and `[...]` match within one name; `**` as a whole part matches any number of
    folders (as the last part, every folder and file below too); names starting with `.` are
    matched only by a part starting with `.`, and `**` never enters them. Unlike `glob`, each
    directory is searched once per part of the pattern (a directory reached by several paths
    gives its matches under the first path) and links never loop. Unreadable folders are
    listed in `failures`.
    """
    base, parts = _split(pattern)
    found = [base]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        walker = Walker(failures)  # one per part: a later `**` searches the same folders again
        matched: list[Path] = []
        for folder in found:
            if part == "**":
                folders, files = walker.tree(folder)
                matched.extend(folders)
                if last:
                    matched.extend(files)
            elif GLOB_CHARS.search(part):
                matched.extend(_match_one(walker, folder, part, dirs_only=not last))
            else:
                path = folder / part
                if os.path.lexists(path) if last else os.path.isdir(path):
                    matched.append(path)
        found = matched if last else _distinct_folders(matched)
    return sorted(set(found), key=str)


def _match_one(walker: Walker, folder: Path, part: str, *, dirs_only: bool) -> list[Path]:
    """Entries of `folder` whose name matches the glob `part` (folders only if `dirs_only`)."""
    if not os.path.isdir(folder):
        return []
    hidden = part.startswith(".")
    return [
        folder / e.name
        for e in walker.listing(folder) or ()
        if (hidden or not e.name.startswith("."))
        and fnmatch.fnmatch(e.name, part)
        and (not dirs_only or _is_dir(e))
    ]


def _distinct_folders(paths: list[Path]) -> list[Path]:
    """Folders among `paths`, one path per directory: a loop of links gives the same
    directory under ever longer paths, and the rest of the pattern matches the same there."""
    seen: set[DirKey] = set()
    out: list[Path] = []
    for path in paths:
        try:
            key = dir_key(path)
        except OSError:
            continue
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out
