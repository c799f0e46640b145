"""The union index of a dump: every part's completed shards as one `index.json`.

Re-exported by `fgscope.store`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputError
from .runs import write_json
from .store_format import FORMAT, VERSION, _read_json, part_tag, read_identity, read_inputs

__all__ = ["build_index", "write_index"]


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
