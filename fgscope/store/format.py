"""The dump format: what each file of a dump folder holds, and the small files around shards.

The records (`StoredLayer`, `Failure`, `ShardRecord`, `PartState`, `PendingShard`), the
names of parts and shards, reading/writing `dump.json`, `inputs.json`, each part's
`progress.json` (the resume point) and its per-shard `files/SSSSSS.json` (what each input
file was when the shard was computed: size, mtime, ctime, inode and sha256, so that a resume
can tell whether the images changed). The layout of a dump folder is described in
`fgscope.store`, which re-exports everything here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat as _stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgscope.errors import OutputError
from fgscope.runs import write_json

__all__ = [
    "FORMAT",
    "VERSION",
    "INPUT_INDEX",
    "DUMP_FILES",
    "StoredLayer",
    "Failure",
    "ShardRecord",
    "PartState",
    "PendingShard",
    "part_tag",
    "shard_name",
    "split_inputs",
    "identity_hash",
    "read_identity",
    "write_identity",
    "read_inputs",
    "write_inputs",
    "write_progress",
    "FileFingerprint",
    "CHANGED_WHILE_READ",
    "file_fingerprint",
    "same_stat",
    "files_name",
    "remove_dump",
]

FORMAT = "fgscope-dump"
VERSION = 1
INPUT_INDEX = "__input_index__"
"""Name of the int64 tensor in every shard holding each row's position in the input list."""

DUMP_FILES = ("dump.json", "inputs.json", "index.json", "manifest.json", "parts", "shards")
"""The names a dump folder holds (anything else in it is not fgscope's)."""

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        files: one `FileFingerprint` (or None: could not be opened) per input of `inputs`,
            taken as the input was read; None when not tracked (then a resume cannot check
            that the files are unchanged).
    """

    shard: int
    inputs: tuple[int, int]
    tensors: Mapping[str, torch.Tensor]
    input_index: torch.Tensor
    failures: tuple[Failure, ...] = ()
    files: tuple[FileFingerprint | None, ...] | None = None

    @property
    def rows(self) -> int:
        return len(self.input_index)


# --- input files ---------------------------------------------------------------------------

FileFingerprint = tuple[int, int, int, int, str]
"""What an input file was when it was read: (size, mtime_ns, ctime_ns, inode, sha256 hex).

The four stat fields are the fast pre-check of a resume (as git's index and rsync do; ctime
cannot be set from user space, so a copy that keeps the mtime, `cp -p`, still shows); when
any of them differs, the file is hashed again and only a different sha256 counts as a change.
"""

CHANGED_WHILE_READ: FileFingerprint = (-1, -1, -1, -1, "")
"""Recorded for a file that changed between hashing and decoding: never equal to the disk."""

_CHUNK = 1 << 20


def file_fingerprint(path: str | os.PathLike[str]) -> FileFingerprint | None:
    """Stat and sha256 of a file, from one open file (None: it cannot be opened or read)."""
    try:
        if not _stat.S_ISREG(os.stat(path).st_mode):  # a folder, a FIFO (open would block)
            return None
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            digest = hashlib.sha256()
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest.hexdigest())


def same_stat(fp: FileFingerprint, path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` still has the size, mtime, ctime and inode of `fp`."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == tuple(fp[:4])


# --- names and small files -----------------------------------------------------------------


def part_tag(part: int, parts: int) -> str:
    """`00001-of-00004`: the name of part 1 of 4 (sorts in part order)."""
    return f"{part:05d}-of-{parts:05d}"


def shard_name(part: int, parts: int, shard: int) -> str:
    """Relative path of a shard file: `shards/00001-of-00004-000012.safetensors`."""
    return f"shards/{part_tag(part, parts)}-{shard:06d}.safetensors"


def files_name(part: int, parts: int, shard: int) -> str:
    """Relative path of a shard's input record: `parts/00001-of-00004/files/000012.json`."""
    return f"parts/{part_tag(part, parts)}/files/{shard:06d}.json"


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

