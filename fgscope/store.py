"""Activation dumps on disk: sharded safetensors files, a JSON index, and a lazy reader.

A dump folder (`fgscope dump ... --out DIR`):

    dump.json                                what the dump is: its identity (model, inputs,
                                             layers, pooling, dtypes, shard size, parts), hash,
                                             stored layers and versions; written first
    inputs.json                              every input path in input order, labels, classes
    shards/PPPPP-of-NNNNN-SSSSSS.safetensors shard S of part P of N: one tensor per layer,
                                             `(rows, *shape)`, rows in input order, plus
                                             `__input_index__` (int64 input index per row)
    parts/PPPPP-of-NNNNN/progress.json       part P's completed shards and failures
    parts/PPPPP-of-NNNNN/manifest.json       how part P was run (argv, device, timings)
    index.json                               the union of all parts, written once all are
                                             complete: layers, shards with their row
                                             ranges, paths, labels, failures, manifest
    manifest.json                            the parts' manifests together

Every file is written atomically (a temporary file in the same folder, then a rename), so an
interrupted run (Ctrl-C, kill -9, a full disk) never leaves a half-written file under its
final name, and every shard listed in a progress file is complete. Files are not fsynced
(a crash of the process cannot damage them; after a power loss, `fgscope dump-merge --verify`
checks every shard against the sha256 recorded when it was written). `index.json` holds no
timestamps: the same data gives the same bytes, whether the run was interrupted or not.

Shards are plain safetensors files, byte for byte what `safetensors.torch.save` writes (but
streamed from the tensors' memory, without a serialised copy), readable with `safetensors`,
with `torch`, or with numpy alone (docs/dump.md). `open(DIR)` gives a per-layer, lazily
loaded view across all shards.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import queue
import shutil
import struct
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, LayerNotFoundError, OutputError
from .runs import write_json

__all__ = [
    "FORMAT",
    "VERSION",
    "INPUT_INDEX",
    "StoredLayer",
    "Failure",
    "ShardRecord",
    "PartState",
    "PendingShard",
    "ShardWriter",
    "Dump",
    "LayerView",
    "open",
    "part_tag",
    "shard_name",
    "split_inputs",
    "identity_hash",
    "read_identity",
    "write_identity",
    "read_inputs",
    "write_inputs",
    "load_part",
    "write_progress",
    "write_shard",
    "build_index",
    "write_index",
    "remove_dump",
    "DUMP_FILES",
]

FORMAT = "fgscope-dump"
VERSION = 1
INPUT_INDEX = "__input_index__"
"""Name of the int64 tensor in every shard holding each row's position in the input list."""

DUMP_FILES = ("dump.json", "inputs.json", "index.json", "manifest.json", "parts", "shards")
"""The names a dump folder holds (anything else in it is not fgscope's)."""

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# The order of safetensors' Dtype enum: its writer puts tensors of later dtypes first.
_ST_RANK = {name: i for i, name in enumerate(
    "BOOL U8 I8 F8_E5M2 F8_E4M3 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64".split()
)}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RESUME_HINT = "completed shards are kept: fix it and run the same command again to continue"


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredLayer:
    """How one recorded layer is stored.

    Attributes:
        name: record name (`features.3`, `layer1.0.relu:2`); the tensor's name in each shard.
        module: qualified module name.
        type: module class name.
        source_shape: the layer's output shape without the batch, e.g. `(24, 56, 56)`.
        shape: the stored row shape, e.g. `(24,)` after average pooling.
        dtype: storage dtype: float32, float16 or bfloat16.
        pool: pooling applied: none, avg, max or bilinear (vectors are stored as they are).
        resize: (H, W) the raw map was reduced to with adaptive average pooling, or None.
    """

    name: str
    module: str
    type: str
    source_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    pool: str
    resize: tuple[int, int] | None = None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _TORCH_DTYPES[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "module": self.module, "type": self.type,
            "source_shape": list(self.source_shape), "shape": list(self.shape),
            "dtype": self.dtype, "pool": self.pool,
            "resize": list(self.resize) if self.resize else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StoredLayer:
        return cls(
            d["name"], d["module"], d["type"], tuple(d["source_shape"]), tuple(d["shape"]),
            d["dtype"], d["pool"], tuple(d["resize"]) if d.get("resize") else None,
        )


@dataclass(frozen=True)
class Failure:
    """An input that was skipped: its position in the input list, its path, and why."""

    input: int
    path: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input, "path": self.path, "reason": self.reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Failure:
        return cls(int(d["input"]), str(d["path"]), str(d["reason"]))


@dataclass(frozen=True)
class ShardRecord:
    """A complete shard file.

    Attributes:
        file: path relative to the dump folder.
        shard: shard number within its part.
        inputs: `[start, stop)` input indices it covers (failed inputs have no row).
        rows: rows it holds.
        bytes: file size.
        sha256: hex digest of the file.
    """

    file: str
    shard: int
    inputs: tuple[int, int]
    rows: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "shard": self.shard, "inputs": list(self.inputs),
            "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardRecord:
        return cls(
            d["file"], int(d["shard"]), (int(d["inputs"][0]), int(d["inputs"][1])),
            int(d["rows"]), int(d["bytes"]), d["sha256"],
        )


@dataclass(frozen=True)
class PartState:
    """Progress of one part (the inputs of one rank): what is done, in shard order.

    Attributes:
        part: this part's number, 0-based.
        parts: how many parts the inputs are split into.
        inputs: `[start, stop)`: the contiguous block of input indices of this part.
        rows_per_shard: inputs per shard (the last shard of a part may be shorter).
        shards: the completed shards, 0, 1, ... in order.
        failures: inputs of the completed shards that were skipped.
    """

    part: int
    parts: int
    inputs: tuple[int, int]
    rows_per_shard: int
    shards: tuple[ShardRecord, ...] = ()
    failures: tuple[Failure, ...] = ()

    @property
    def n_shards(self) -> int:
        start, stop = self.inputs
        return -(-(stop - start) // self.rows_per_shard)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.n_shards

    @property
    def done_inputs(self) -> int:
        return sum(s.inputs[1] - s.inputs[0] for s in self.shards)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = self.inputs[0] + shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.inputs[1])

    def with_shard(self, record: ShardRecord, failures: Sequence[Failure]) -> PartState:
        assert record.shard == len(self.shards), "shards are recorded in order"
        return replace(self, shards=(*self.shards, record), failures=(*self.failures, *failures))

    def to_json(self, identity: str) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "hash": identity,
            "part": self.part, "parts": self.parts, "inputs": list(self.inputs),
            "rows_per_shard": self.rows_per_shard, "n_shards": self.n_shards,
            "complete": self.complete,
            "shards": [s.to_json() for s in self.shards],
            "failures": [f.to_json() for f in self.failures],
        }


@dataclass(frozen=True)
class PendingShard:
    """A filled shard on its way to disk.

    Attributes:
        shard: shard number within its part.
        inputs: `[start, stop)` input indices it covers.
        tensors: layer name -> `(rows, *shape)` CPU tensor in the storage dtype.
        input_index: `(rows,)` int64 input index of each row.
        failures: skipped inputs within `inputs`.
    """

    shard: int
    inputs: tuple[int, int]
    tensors: Mapping[str, torch.Tensor]
    input_index: torch.Tensor
    failures: tuple[Failure, ...] = ()

    @property
    def rows(self) -> int:
        return len(self.input_index)


# --- names and small files -----------------------------------------------------------------


def part_tag(part: int, parts: int) -> str:
    """`00001-of-00004`: the name of part 1 of 4 (sorts in part order)."""
    return f"{part:05d}-of-{parts:05d}"


def shard_name(part: int, parts: int, shard: int) -> str:
    """Relative path of a shard file: `shards/00001-of-00004-000012.safetensors`."""
    return f"shards/{part_tag(part, parts)}-{shard:06d}.safetensors"


def split_inputs(n: int, part: int, parts: int) -> tuple[int, int]:
    """The contiguous block `[start, stop)` of `n` inputs that part `part` of `parts` takes.

    Blocks are in input order and differ in size by at most one, so the union of all parts,
    read part after part, is the input order.
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in 0..{parts - 1}")
    return n * part // parts, n * (part + 1) // parts


def identity_hash(identity: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a dump's identity."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OutputError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
            hint="the dump folder is damaged; use a new --out",
        ) from None


def read_identity(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The content of `dump.json`, or None when the folder holds no dump."""
    doc = _read_json(Path(root) / "dump.json")
    if doc is not None and doc.get("format") != FORMAT:
        raise OutputError(f"{Path(root) / 'dump.json'} is not an fgscope dump description")
    return doc


def write_identity(
    root: Path,
    identity: Mapping[str, Any],
    layers: Sequence[StoredLayer],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write `dump.json` (identity, its hash, stored layers, `extra` such as versions).

    Returns:
        The identity hash.
    """
    digest = identity_hash(identity)
    write_json(root / "dump.json", {
        "format": FORMAT, "version": VERSION, "hash": digest, "identity": dict(identity),
        "layers": [layer.to_json() for layer in layers], **(extra or {}),
    })
    return digest


def read_inputs(root: Path) -> dict[str, Any]:
    doc = _read_json(Path(root) / "inputs.json")
    if doc is None:
        raise OutputError(f"{Path(root) / 'inputs.json'} is missing", hint="use a new --out")
    return doc


def write_inputs(root: Path, doc: Mapping[str, Any]) -> None:
    write_json(root / "inputs.json", dict(doc))


def write_progress(root: Path, state: PartState, identity: str) -> None:
    """Record a part's progress (atomically): the resume point of its next run."""
    write_json(root / "parts" / part_tag(state.part, state.parts) / "progress.json",
               state.to_json(identity))


def load_part(root: Path, fresh: PartState, identity: str) -> PartState:
    """A part's progress from an earlier run, or `fresh` when there is none.

    Only shards listed in the progress file whose file exists with the recorded size count;
    the listing stops at the first one that does not (it is computed again). Stale temporary
    files of this part (left by a killed run) are removed.
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
        failures = [
            Failure.from_json(f) for f in doc.get("failures", [])
            if rec.inputs[0] <= int(f["input"]) < rec.inputs[1]
        ]
        state = state.with_shard(rec, failures)
    return state


def remove_dump(root: Path) -> None:
    """Delete a dump's files from `root` (other files are left alone)."""
    for name in DUMP_FILES:
        path = Path(root) / name
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot remove {path}: {exc.strerror or exc}") from None


# --- writing shards ------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _write_chunks(fh: Any, chunks: Sequence[memoryview | bytes], digest: Any) -> int:
    """Write and hash `chunks`; returns the bytes written (a seam for fault-injection tests)."""
    size = 0
    for chunk in chunks:
        fh.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size


def write_shard(
    root: Path, part: int, parts: int, pending: PendingShard, identity: str
) -> ShardRecord:
    """Write one shard as a safetensors file, atomically, and return its record.

    The bytes are those `safetensors.torch.save` gives (tensors ordered by dtype, then name;
    header padded to 8 bytes), written from the tensors' memory without a copy and holds one metadata entry, `fgscope`, a JSON string
    with the shard's part, number, input range and the dump's identity hash (one entry, so
    that the bytes are deterministic).

    Raises:
        OutputError: the file cannot be written (disk full, no permission); no partial file
            is left under the final name.
    """
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    tensors = {**pending.tensors, INPUT_INDEX: pending.input_index.to(torch.int64)}
    order = sorted(tensors, key=lambda k: (-_ST_RANK[_ST_DTYPES[tensors[k].dtype]], k))
    header: dict[str, Any] = {"__metadata__": {"fgscope": json.dumps({
        "format": FORMAT, "version": VERSION, "hash": identity, "part": part, "parts": parts,
        "shard": pending.shard, "inputs": list(pending.inputs), "rows": pending.rows,
    }, sort_keys=True)}}
    offset = 0
    chunks: list[memoryview | bytes] = []
    for name in order:
        t = tensors[name]
        if t.device.type != "cpu":
            raise ValueError(f"shard tensor {name} is on {t.device}, expected the CPU")
        data = _tensor_bytes(t)
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        chunks.append(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the library pads it
    chunks[:0] = [struct.pack("<Q", len(text)), text]

    rel = shard_name(part, parts, pending.shard)
    path = Path(root) / rel
    digest = hashlib.sha256()
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            size = _write_chunks(fh, chunks, digest)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputError(
            f"cannot write shard {path}: {exc.strerror or exc}", hint=_RESUME_HINT
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return ShardRecord(rel, pending.shard, pending.inputs, pending.rows, size, digest.hexdigest())


class ShardWriter:
    """Writes shards in a background thread, so that the forward and the disk overlap.

    Shards are written in submission order; after each, the part's progress file is
    rewritten (atomically) to list it. `submit` blocks while `queue_size` shards wait, so
    memory stays bounded by a few shards. An error in the thread (disk full) is raised in
    the caller by the next `submit` or by `close`.

    Args:
        root: the dump folder.
        state: the part's progress so far.
        identity: the dump's identity hash.
        queue_size: shards that may wait while one is written.
    """

    def __init__(self, root: Path, state: PartState, identity: str, queue_size: int = 1) -> None:
        self.root = Path(root)
        self.state = state
        self.identity = identity
        self.bytes_written = 0
        self.shards_written = 0
        self._queue: queue.Queue[PendingShard | None] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fgscope-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._abort.is_set() or self._error is not None:
                continue  # drain without writing
            try:
                rec = write_shard(self.root, self.state.part, self.state.parts, item, self.identity)
                state = self.state.with_shard(rec, item.failures)
                write_progress(self.root, state, self.identity)
                self.state = state
                self.bytes_written += rec.bytes
                self.shards_written += 1
            except BaseException as exc:  # surfaced in the caller's thread
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("the shard writer thread stopped")

    def submit(self, shard: PendingShard) -> None:
        """Queue a filled shard (blocks while the queue is full).

        Raises:
            OutputError: an earlier shard could not be written.
        """
        while True:
            self._check()
            try:
                self._queue.put(shard, timeout=0.05)
                return
            except queue.Full:
                continue

    def close(self, abort: bool = False) -> PartState:
        """Wait for queued shards (with `abort`, only the one being written) and stop.

        Returns:
            The part's progress.

        Raises:
            OutputError: a shard could not be written (not with `abort`).
        """
        if abort:
            self._abort.set()
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._error is not None and not abort:
            raise self._error
        return self.state


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
            sl = self._dump._handle(self._dump._shards[k]["file"]).get_slice(self.name)
            parts.append(sl[lo - s0 : hi - s0])
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
    """

    def __init__(self, root: Path, index: dict[str, Any], backend: str = "numpy") -> None:
        if backend not in ("numpy", "torch"):
            raise ConfigError(f"backend must be numpy or torch, got {backend!r}")
        self.root = Path(root)
        self.index = index
        self.backend = backend
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

    def _handle(self, file: str) -> Any:
        from safetensors import safe_open

        h = self._handles.get(file)
        if h is None:
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


def open(path: str | os.PathLike[str], *, backend: str = "numpy") -> Dump:  # noqa: A001
    """Open a dump for reading: `fgscope.store.open(DIR)["features.3"][10:20]`.

    Reads `index.json`; a dump whose parts are not all complete yet (no index) is read from
    its progress files and shows the completed shards only (`complete` is False).

    Args:
        path: the dump folder (or its `index.json`).
        backend: "numpy" (default) or "torch": what indexing a layer returns.

    Raises:
        ConfigError: the folder is not an fgscope dump.
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
    return Dump(root, index, backend)
