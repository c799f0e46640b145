"""Reading a dump for an analysis (`probe`, `similarity`, `advise --from-dump DIR`): open it
with one-line errors for what is missing, pick the stored layers an analysis asks for, and
read a layer in row blocks (so that raw maps never need to be in memory all at once).

A dump written by several processes (torchrun ranks, `--shard i/N`, SLURM array tasks) into
one `--out` folder is read as the union of its parts once every part is complete (the last
part writes `index.json`). Parts written into different folders are joined first with
`fgscope dump-merge A B C` (the index goes into A, which is then the folder to pass).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fgscope.errors import ConfigError, LayerNotFoundError
from fgscope.store.format import StoredLayer
from fgscope.store.reader import Dump, LayerView
from fgscope.store.reader import open as open_dump

__all__ = ["open_for_analysis", "pick_layers", "iter_rows", "describe_storage", "WHOLE_DUMP"]

WHOLE_DUMP = ("", "stages", "blocks", "all")
"""Layer selections that mean "every stored layer" for an analysis of a dump: the dump
already holds the layers its own `--layers` selected (the model is not loaded to resolve
`stages` or `blocks` again)."""


def open_for_analysis(path: str | os.PathLike[str]) -> Dump:
    """Open a complete dump folder for an analysis.

    Raises:
        ConfigError: the folder does not exist, is not a dump, holds no rows, or some of its
            parts are not complete yet (each a one-line message saying what to do).
        StoreError: (later, when rows are read) a shard is missing or damaged.
    """
    root = Path(os.path.expanduser(os.fspath(path)))
    if not root.exists():
        raise ConfigError(f"--from-dump {root} does not exist",
                          hint="pass the --out folder of `fgscope dump`")
    if not root.is_dir():
        raise ConfigError(f"--from-dump {root} is not a folder",
                          hint="pass the --out folder of `fgscope dump`")
    try:
        dump = open_dump(root)
    except (KeyError, TypeError, ValueError) as exc:  # an index.json that is not ours
        raise ConfigError(f"--from-dump {root}: index.json is damaged ({exc})",
                          hint=f"run `fgscope dump-merge {root}` to write it again") from None
    if not dump.complete:
        raise ConfigError(
            f"the dump {root} is not complete ({len(dump)} rows in the shards finished so far)",
            hint="run the same `fgscope dump` command again for the missing parts (it resumes), "
            f"then `fgscope dump-merge {root}` if the parts were written to different folders",
        )
    if len(dump) == 0:
        raise ConfigError(f"the dump {root} holds no rows (no input could be read)",
                          hint="see the failures in its index.json")
    return dump


def pick_layers(dump: Dump, spec: str | None) -> list[str]:
    """The stored layers a selection means, in execution order.

    `stages`, `blocks`, `all` or nothing: every stored layer (see `WHOLE_DUMP`). Otherwise a
    comma-separated list of record names, globs (`layer3.*`) or regexes (`re:...`, searched
    as in `fgscope.selection`), matched against the stored names.

    Raises:
        LayerNotFoundError: an item matches no stored layer (close names and the stored ones
            are listed).
        ConfigError: an invalid regular expression.
    """
    text = (spec or "").strip()
    if text.lower() in WHOLE_DUMP:
        return list(dump.layers)
    chosen: set[str] = set()
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item.startswith("re:"):
            try:
                rx = re.compile(item[3:])
            except re.error as exc:
                raise ConfigError(f"invalid regular expression {item[3:]!r}: {exc}") from None
            hits = [n for n in dump.layers if rx.search(n)]
        elif item in dump.layers:
            hits = [item]
        else:
            hits = [n for n in dump.layers if fnmatch.fnmatchcase(n, item)]
        if not hits:
            close = difflib.get_close_matches(item, dump.layers, n=3, cutoff=0.5)
            found = f"; did you mean {', '.join(close)}?" if close else ""
            raise LayerNotFoundError(
                f"no stored layer {item!r} in the dump {dump.root}{found}",
                hint=f"stored layers: {', '.join(dump.layers)}; dump others with "
                "`fgscope dump --layers ...`",
            )
        chosen.update(hits)
    return [n for n in dump.layers if n in chosen]


def iter_rows(view: LayerView, rows: np.ndarray | None = None, block: int = 256
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, values) in blocks of at most `block` rows, as float32 numpy arrays.

    Args:
        view: a layer of an open dump.
        rows: which rows, in this order (None: all); `positions` are offsets into it.
        block: rows per block (bounds memory for raw maps).
    """
    idx = np.arange(len(view)) if rows is None else np.asarray(rows, dtype=np.int64)
    for start in range(0, len(idx), block):
        part = idx[start : start + block]
        contiguous = len(part) > 0 and bool(np.all(np.diff(part) == 1))
        vals = view[int(part[0]) : int(part[-1]) + 1] if contiguous else view[part]
        yield np.arange(start, start + len(part)), np.asarray(vals, dtype=np.float32)


def describe_storage(info: StoredLayer) -> str:
    """`avg-pooled (C,)`, `raw map (C, H, W)`, ... : what a stored layer holds, in words."""
    shape = "(" + ", ".join(str(s) for s in info.shape) + (",)" if len(info.shape) == 1 else ")")
    if len(info.source_shape) == 1:
        what = "vector"
    elif info.pool == "none":
        what = f"raw map resized to {info.resize[0]}x{info.resize[1]}" if info.resize else "raw map"
    else:
        what = f"{info.pool}-pooled"
    return f"{what} {shape} {info.dtype}"
