"""Reading a dump's parts back: a part's resume point, the checks of a resume (are the
input files what they were?) and of a shard (is it what was written?), and the union index
of every part's completed shards (`index.json`).

Re-exported by `fgscope.store`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fgscope.errors import ConfigError, OutputError
from fgscope.runs import write_json
from fgscope.store.format import (
    FORMAT,
    VERSION,
    Failure,
    FileFingerprint,
    PartState,
    ShardRecord,
    _read_json,
    file_fingerprint,
    files_name,
    part_tag,
    read_identity,
    read_inputs,
    same_stat,
)

__all__ = [
    "load_part",
    "read_files",
    "InputChange",
    "find_input_change",
    "check_shard",
    "build_index",
    "write_index",
]

# Threads that stat (and, for changed ones, hash) input files on a resume: stat waits on the
# file system (NFS, Lustre), not on the CPU, and releases the GIL.
_CHECK_THREADS = 8


# --- a part's resume point -----------------------------------------------------------------


def read_files(
    root: Path, part: int, parts: int, record: ShardRecord, identity: str
) -> list[FileFingerprint | None] | None | bool:
    """The input record of a completed shard (`parts/<part>/files/SSSSSS.json`).

    Returns:
        The fingerprint of each input of the shard (None for one that could not be opened),
        None when the shard was written without them, False when the record is missing or
        belongs to other data (the shard then counts as not done).
    """
    doc = _read_json(Path(root) / files_name(part, parts, record.shard))
    if (doc is None or doc.get("hash") != identity
            or tuple(doc.get("inputs", ())) != record.inputs):
        return False
    files = doc.get("files")
    if files is None:
        return None
    if len(files) != record.inputs[1] - record.inputs[0]:
        return False
    return [tuple(f) if f is not None else None for f in files]  # type: ignore[misc]


def load_part(root: Path, fresh: PartState, identity: str) -> PartState:
    """A part's progress from an earlier run, or `fresh` when there is none.

    Only shards listed in the progress file whose file exists with the recorded size, and
    whose input record exists, count; the listing stops at the first one that does not (it
    is computed again). Stale temporary files of this part (left by a killed run) are
    removed: call this only while holding the part's lock (`store.part_lock`).
    """
    root = Path(root)
    tag = part_tag(fresh.part, fresh.parts)
    shard_dir = root / "shards"
    if shard_dir.is_dir():
        for stale in shard_dir.glob(f".{tag}-*.tmp"):
            stale.unlink(missing_ok=True)
    doc = _read_json(root / "parts" / tag / "progress.json")
    if doc is None or doc.get("hash") != identity:
        return fresh
    state = fresh
    for rec in (ShardRecord.from_json(s) for s in doc.get("shards", [])):
        path = root / rec.file
        if rec.shard != len(state.shards) or rec.inputs != state.shard_range(rec.shard):
            break
        if not path.is_file() or path.stat().st_size != rec.bytes:
            break
        if read_files(root, fresh.part, fresh.parts, rec, identity) is False:
            break
        failures = [
            Failure.from_json(f) for f in doc.get("failures", [])
            if rec.inputs[0] <= int(f["input"]) < rec.inputs[1]
        ]
        state = state.with_shard(rec, failures)
    return state


@dataclass(frozen=True)
class InputChange:
    """An input file that is not what it was when a completed shard was computed.

    Attributes:
        input: its position in the input list; path: its path; shard: the shard.
        what: `changed (sha256 differs)`, `was removed or cannot be read`, or
            `can be read now (it could not be then)`.
    """

    input: int
    path: str
    shard: int
    what: str


def _compare(recorded: FileFingerprint | None, path: str) -> str | None:
    """What happened to one input since it was fingerprinted (None: nothing)."""
    if recorded is None:  # it could not be opened then: it must not open now
        now = file_fingerprint(path) if os.path.exists(path) else None
        return None if now is None else "can be read now (it could not be then)"
    if same_stat(recorded, path):  # the fast pre-check: size, mtime, ctime, inode
        return None
    now = file_fingerprint(path)
    if now is None:
        return "was removed or cannot be read"
    return None if now[4] == recorded[4] else "changed (sha256 differs)"


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def find_input_change(
    root: Path, state: PartState, paths: Sequence[str], identity: str
) -> InputChange | None:
    """The first input of the part's completed shards whose file is not what was dumped.

    Each input's size, mtime, ctime and inode are compared with its record; only files
    where one of them differs are hashed again (a different sha256 is a change). Costs one
    `stat` per input (in threads), the reading of the files that were touched, and one input
    record in memory at a time.
    """
    with ThreadPoolExecutor(_CHECK_THREADS, thread_name_prefix="fgscope-check") as pool:
        for rec in state.shards:
            files = read_files(root, state.part, state.parts, rec, identity)
            if not files:  # None: written without records, nothing to compare
                continue
            start = rec.inputs[0]
            for batch in _chunks(range(*rec.inputs), 4096):
                got = pool.map(_compare, [files[i - start] for i in batch], [paths[i] for i in batch])
                for i, what in zip(batch, got):
                    if what is not None:
                        return InputChange(i, paths[i], rec.shard, what)
    return None


def check_shard(root: Path, record: Mapping[str, Any]) -> str | None:
    """What is wrong with a shard file (`missing`, `N bytes, M recorded`, `sha256 differs`),
    or None when its size and sha256 are those recorded when it was written."""
    path = Path(root) / record["file"]
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != record["bytes"]:
                return f"{size} bytes, {record['bytes']} recorded: truncated or replaced"
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if digest.hexdigest() == record["sha256"] else "sha256 differs"


# --- the union index -----------------------------------------------------------------------


def _find_progress(roots: Sequence[Path], tag: str) -> tuple[Path, dict[str, Any]] | None:
    for root in roots:
        doc = _read_json(root / "parts" / tag / "progress.json")
        if doc is not None:
            return root, doc
    return None


def build_index(
    roots: Sequence[str | os.PathLike[str]], *, require_complete: bool = True
) -> dict[str, Any]:
    """The union of all parts of a dump as one index (what `index.json` holds).

    Args:
        roots: the dump folder, then any folders holding more of its parts (shard paths in
            the index are relative to the first).
        require_complete: raise unless every part is complete; otherwise the index covers
            the completed shards only (`"complete": false`).

    Raises:
        ConfigError: a folder is not a dump, or holds a different dump.
        OutputError: parts are missing or incomplete (with `require_complete`).
    """
    paths = [Path(r) for r in roots]
    desc = read_identity(paths[0])
    if desc is None:
        raise ConfigError(f"{paths[0]} is not an fgscope dump (no dump.json)")
    for other in paths[1:]:
        d = read_identity(other)
        if d is None:
            raise ConfigError(f"{other} is not an fgscope dump (no dump.json)")
        if d["hash"] != desc["hash"]:
            raise ConfigError(f"{other} holds a different dump than {paths[0]} (identity differs)")
    identity = desc["identity"]
    inputs = read_inputs(paths[0])
    all_paths, all_labels = inputs["paths"], inputs.get("labels")
    n_parts = int(identity["parts"])
    shards: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    rows: list[int] = []
    missing: list[str] = []
    row = 0
    for p in range(n_parts):
        tag = part_tag(p, n_parts)
        found = _find_progress(paths, tag)
        if found is None or found[1].get("hash") != desc["hash"]:
            missing.append(f"{tag} (not started)")
            continue
        where, doc = found
        if not doc.get("complete"):
            missing.append(f"{tag} ({len(doc['shards'])}/{doc['n_shards']} shards)")
        failed = {int(f["input"]) for f in doc["failures"]}
        failures.extend(doc["failures"])
        for s in doc["shards"]:
            a, b = s["inputs"]
            kept = [i for i in range(a, b) if i not in failed]
            assert len(kept) == s["rows"], f"{s['file']}: rows disagree with failures"
            rel = os.path.relpath(where / s["file"], paths[0]) if where != paths[0] else s["file"]
            shards.append({
                "file": Path(rel).as_posix(), "part": p, "shard": s["shard"],
                "rows": [row, row + s["rows"]], "inputs": [a, b], "bytes": s["bytes"],
                "sha256": s["sha256"],
            })
            rows.extend(kept)
            row += s["rows"]
    if missing and require_complete:
        raise OutputError(
            f"the dump in {paths[0]} is incomplete: part {', '.join(missing)}",
            hint="run the missing parts (the same command with their --shard), then merge again",
        )
    failures.sort(key=lambda f: f["input"])
    return {
        "format": FORMAT,
        "version": VERSION,
        "hash": desc["hash"],
        "complete": not missing,
        "rows": row,
        "layers": desc["layers"],
        "shards": shards,
        "paths": [all_paths[i] for i in rows],
        "labels": [all_labels[i] for i in rows] if all_labels is not None else None,
        "classes": inputs.get("classes"),
        "input_index": rows,
        "failures": failures,
        "inputs": {"count": len(all_paths), "sha256": identity["inputs"]["sha256"]},
        "manifest": {
            "command": "fgscope dump",
            "identity": identity,
            **{k: desc[k] for k in ("model", "versions") if k in desc},
        },
    }


def write_index(root: Path, index: Mapping[str, Any]) -> Path:
    """Write `index.json` (atomically) and return its path."""
    path = Path(root) / "index.json"
    write_json(path, dict(index))
    return path
