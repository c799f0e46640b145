"""Writing shards: one safetensors file per shard, atomically, from a background thread.

`write_shard` streams the tensors' memory into a file byte for byte what
`safetensors.torch.save` writes; `ShardWriter` writes shards in order in a thread and records
each in the part's progress file. Re-exported by `fgscope.store`.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError
from .store_format import (
    FORMAT,
    INPUT_INDEX,
    VERSION,
    PartState,
    PendingShard,
    ShardRecord,
    shard_name,
    write_progress,
)

__all__ = ["write_shard", "ShardWriter"]

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
_RESUME_HINT = "completed shards are kept: fix it and run the same command again to continue"


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

