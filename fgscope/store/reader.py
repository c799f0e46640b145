"""The lazy reader of a dump folder: `open`, `Dump`, `LayerView` (re-exported by `fgscope.store`)."""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgscope.errors import ConfigError, LayerNotFoundError, StoreError
from fgscope.store.format import (
    _TORCH_DTYPES,
    FORMAT,
    Failure,
    StoredLayer,
    _read_json,
    read_identity,
)
from fgscope.store.index import (
    build_index,
    check_shard,
)

__all__ = ["Dump", "LayerView", "open"]


# --- reading -------------------------------------------------------------------------------


class LayerView:
    """One layer of a dump across all its shards, loaded lazily (only the rows asked for).

    Indexing takes rows first: `view[10]`, `view[10:20]`, `view[[3, 1, 4]]`, a boolean mask,
    or `view[10:20, :8]` (further axes apply to the rows read). Returns numpy arrays (bfloat16
    as float32, which holds every bfloat16 value exactly) or torch tensors, as the dump was
    opened.
    """

    def __init__(self, dump: Dump, info: StoredLayer) -> None:
        self._dump = dump
        self.info = info
        self.name = info.name

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._dump), *self.info.shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.info.shape)

    @property
    def dtype(self) -> Any:
        """numpy dtype (float32 for bfloat16) or torch dtype, as the dump was opened."""
        t = _TORCH_DTYPES[self.info.dtype]
        if self._dump.backend == "torch":
            return t
        return np.dtype(np.float32) if t == torch.bfloat16 else torch.empty(0, dtype=t).numpy().dtype

    def __len__(self) -> int:
        return len(self._dump)

    def __repr__(self) -> str:
        return f"LayerView({self.name!r}, shape={self.shape}, dtype={self.info.dtype})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self._convert(self._rows(0, len(self)), "numpy")
        return out.astype(dtype) if dtype is not None else out

    def numpy(self) -> np.ndarray:
        """All rows as one numpy array."""
        return self._convert(self._rows(0, len(self)), "numpy")

    def torch(self) -> torch.Tensor:
        """All rows as one torch tensor (in the storage dtype)."""
        return self._rows(0, len(self))

    def __getitem__(self, key: Any) -> Any:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} is out of range for {n} rows")
            out = self._rows(i, i + 1)[0]
            return self._convert(out[rest] if rest else out, self._dump.backend)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                out = self._rows(start, max(start, stop))
            else:
                out = self._take(np.arange(start, stop, step))
        else:
            idx = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"a boolean mask needs shape ({n},), got {idx.shape}")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            if ((idx < -n) | (idx >= n)).any():
                raise IndexError(f"row index out of range for {n} rows")
            out = self._take(np.where(idx < 0, idx + n, idx))
        if rest:
            out = out[(slice(None), *rest)]
        return self._convert(out, self._dump.backend)

    @staticmethod
    def _convert(t: torch.Tensor, backend: str) -> Any:
        if backend == "torch":
            return t
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` as one tensor, read from the shards that hold them."""
        parts: list[torch.Tensor] = []
        starts = self._dump._starts
        first = max(int(np.searchsorted(starts, start, side="right")) - 1, 0)
        for k in range(first, len(self._dump._shards)):
            s0, s1 = self._dump._shards[k]["rows"]
            if s0 >= stop:
                break
            lo, hi = max(start, s0), min(stop, s1)
            if hi <= lo:
                continue
            parts.append(self._dump._read(k, self.name, lo - s0, hi - s0))
        if not parts:
            return torch.empty((0, *self.info.shape), dtype=_TORCH_DTYPES[self.info.dtype])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _take(self, idx: np.ndarray) -> torch.Tensor:
        """Rows at arbitrary indices: each run of consecutive indices is read once."""
        if len(idx) == 0:
            return self._rows(0, 0)
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = [self._rows(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, breaks)]
        got = torch.cat(runs) if len(runs) > 1 else runs[0]  # rows of `uniq`, in order
        out = torch.empty((len(idx), *got.shape[1:]), dtype=got.dtype)
        out[torch.from_numpy(order)] = got[torch.from_numpy(inverse)]
        return out


class Dump:
    """A dump folder opened for reading: the union of all its parts as one data set.

    Attributes:
        root: the folder.
        index: the union index (the content of `index.json`, or built from the parts).
        backend: "numpy" or "torch": what indexing a layer returns.
        layers: stored layer names, in execution order.
        paths: image path of each row.
        labels: `(rows,)` int64 labels, or None.
        classes: class names, or None.
        failures: skipped inputs with their reasons.
        complete: False while parts are missing (only completed shards are visible).
        verify: check each shard's size and sha256 against the index the first time it is
            read (once per shard and open Dump).
    """

    def __init__(self, root: Path, index: dict[str, Any], backend: str = "numpy",
                 verify: bool = True) -> None:
        if backend not in ("numpy", "torch"):
            raise ConfigError(f"backend must be numpy or torch, got {backend!r}")
        self.root = Path(root)
        self.index = index
        self.backend = backend
        self.verify = verify
        self._verified: set[str] = set()
        self._infos = {d["name"]: StoredLayer.from_json(d) for d in index["layers"]}
        self._shards = [s for s in index["shards"] if s["rows"][1] > s["rows"][0]]
        self._starts = np.array([s["rows"][0] for s in self._shards], dtype=np.int64)
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self.layers: tuple[str, ...] = tuple(self._infos)
        self.paths: tuple[str, ...] = tuple(index["paths"])
        labels = index.get("labels")
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.classes = tuple(index["classes"]) if index.get("classes") is not None else None
        self.failures = tuple(Failure.from_json(f) for f in index["failures"])
        self.complete = bool(index["complete"])

    def __len__(self) -> int:
        return int(self.index["rows"])

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self) -> str:
        state = "" if self.complete else ", incomplete"
        return f"Dump({str(self.root)!r}, rows={len(self)}, layers={len(self.layers)}{state})"

    def __getitem__(self, name: str) -> LayerView:
        if name not in self._infos:
            close = difflib.get_close_matches(str(name), self.layers, n=3, cutoff=0.5)
            found = f"; did you mean {', '.join(close)}?" if close else ""
            raise LayerNotFoundError(
                f"no layer {name!r} in the dump {self.root}{found}",
                hint=f"stored layers: {', '.join(self.layers)}",
            )
        return LayerView(self, self._infos[name])

    def layer(self, name: str) -> StoredLayer:
        """How a layer is stored (shape, dtype, pooling, source shape)."""
        return self[name].info

    @property
    def input_index(self) -> np.ndarray:
        """`(rows,)` position of each row in the input list (`inputs.json`)."""
        return np.asarray(self.index["input_index"], dtype=np.int64)

    def _damaged(self, file: str, problem: str) -> StoreError:
        return StoreError(
            f"shard {file} of the dump {self.root} is damaged ({problem})",
            hint=f"run `fgscope dump-merge --verify {self.root}` to check every shard",
        )

    def _read(self, k: int, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows `[lo, hi)` of layer `name` from shard k (checked on its first read)."""
        from safetensors import SafetensorError

        record = self._shards[k]
        try:
            return self._handle(record).get_slice(name)[lo:hi]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            # e.g. a shard replaced while open, or opened with verify=False
            raise self._damaged(record["file"], " ".join(str(exc).split())) from None

    def _handle(self, record: dict[str, Any]) -> Any:
        from safetensors import safe_open

        file = record["file"]
        h = self._handles.get(file)
        if h is None:
            if self.verify and file not in self._verified:
                # A flipped byte would give silently wrong values: hash the whole file once
                # (about 1 GB/s) the first time this Dump reads it.
                problem = check_shard(self.root, record)
                if problem is not None:
                    raise self._damaged(file, problem)
                self._verified.add(file)
            h = safe_open(str(self.root / file), framework="pt")
            self._handles[file] = h
            if len(self._handles) > 16:  # bounded open files
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(file)
        return h

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(  # noqa: A001
    path: str | os.PathLike[str], *, backend: str = "numpy", verify: bool = True
) -> Dump:
    """Open a dump for reading: `fgscope.store.open(DIR)["features.3"][10:20]`.

    Reads `index.json`; a dump whose parts are not all complete yet (no index) is read from
    its progress files and shows the completed shards only (`complete` is False).

    Args:
        path: the dump folder (or its `index.json`).
        backend: "numpy" (default) or "torch": what indexing a layer returns.
        verify: check each shard's size and sha256 the first time it is read (default); a
            damaged shard is a `StoreError` naming it. False skips the hashing.

    Raises:
        ConfigError: the folder is not an fgscope dump.
        StoreError: (when reading rows) a shard is missing, truncated or damaged.
    """
    root = Path(os.path.expanduser(os.fspath(path)))
    if root.name == "index.json" and root.is_file():
        root = root.parent
    index = _read_json(root / "index.json")
    if index is None:
        if read_identity(root) is None:
            raise ConfigError(
                f"{root} is not an fgscope dump (no index.json or dump.json)",
                hint="pass the --out folder of `fgscope dump`",
            )
        index = build_index([root], require_complete=False)
    elif index.get("format") != FORMAT:
        raise ConfigError(f"{root / 'index.json'} is not an fgscope dump index")
    return Dump(root, index, backend, verify)
