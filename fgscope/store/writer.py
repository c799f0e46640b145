"""Writing a dump: shards (one safetensors file each, atomically, from a background thread),
their input records, and the locks that keep two processes from writing the same part.

`write_shard` streams the tensors' memory into a file byte for byte what
`safetensors.torch.save` writes; `ShardWriter` writes shards in order in a thread and records
each (its input record, then the part's progress file). `part_lock` and `folder_lock` are
`flock` locks on hidden files of the dump folder. Re-exported by `fgscope.store`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import secrets
import socket
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fgscope.errors import OutputError
from fgscope.runs import write_text
from fgscope.store.format import (
    FORMAT,
    INPUT_INDEX,
    VERSION,
    PartState,
    PendingShard,
    ShardRecord,
    files_name,
    part_tag,
    shard_name,
    write_progress,
)

try:
    import fcntl
except ImportError:  # Windows: no flock; dumps there are not locked (docs/dump.md)
    fcntl = None  # type: ignore[assignment]

__all__ = ["write_shard", "write_files", "ShardWriter", "DumpLock", "part_lock", "folder_lock",
           "other_part_locks"]

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
        # Not mkstemp, which creates files 0600: with mode 0666 the kernel applies the umask,
        # so shards get the mode of every other dump file (runs.atomic_write_bytes).
        tmp = str(path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def write_files(root: Path, part: int, parts: int, pending: PendingShard, identity: str) -> None:
    """Record what the input files of a shard were (atomically), one line per input.

    Raises:
        OutputError: the file cannot be written.
    """
    head = json.dumps({"format": FORMAT, "version": VERSION, "hash": identity, "part": part,
                       "parts": parts, "shard": pending.shard, "inputs": list(pending.inputs)})
    if pending.files is None:
        text = head[:-1] + ', "files": null}\n'
    else:
        assert len(pending.files) == pending.inputs[1] - pending.inputs[0], "one per input"
        lines = ",\n".join(json.dumps(list(f) if f is not None else None) for f in pending.files)
        text = head[:-1] + f', "files": [\n{lines}\n]}}\n'
    write_text(Path(root) / files_name(part, parts, pending.shard), text)


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
                part, parts = self.state.part, self.state.parts
                rec = write_shard(self.root, part, parts, item, self.identity)
                write_files(self.root, part, parts, item, self.identity)  # before progress lists it
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



# --- locks ---------------------------------------------------------------------------------

_LOCK = ".fgscope-lock"  # hidden: not a dump file (remove_dump keeps it), not a foreign one
_HELD: set[DumpLock] = set()  # locks this process holds (strong: a held lock stays known)


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the copies of held lock files.

    A flock belongs to the open file, which a fork shares: workers would keep the lock held
    after their parent is killed (until they notice and exit), refusing the resume with the
    dead parent's pid. Closing the child's copy leaves the parent the only holder.
    """
    for lock in list(_HELD):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None  # and the child never removes the parent's lock file


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class DumpLock:
    """An exclusive `flock` on a hidden file of a dump folder, holding `PID HOST` of its holder.

    The kernel releases a flock when its process dies (kill -9 included), so the file a
    killed run leaves behind is simply taken over by the next one (`stale` then names the
    dead holder). The holder removes the file before it releases the lock; a process that
    opened the file before that and then got the lock sees that the path no longer names its
    file, and tries again, so two processes never both hold it.

    Args:
        path: the lock file.
        root: the dump folder (for messages).
        wait: block until the lock is free, instead of failing at once.
    """

    def __init__(self, path: Path, root: Path, wait: bool) -> None:
        self.path, self.root, self.wait = Path(path), Path(root), wait
        self.stale: str | None = None
        self.supported = fcntl is not None
        self._fd: int | None = None

    def acquire(self) -> DumpLock:
        """Take the lock.

        Raises:
            OutputError: another process holds it (without `wait`), or it cannot be created.
        """
        if fcntl is None:
            return self
        flags = fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {self.path}: {exc.strerror or exc}",
                                  hint="check permissions, or choose another --out") from None
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputError(
                    f"another fgscope dump is writing {self.root} ({holder or 'pid unknown'})",
                    hint="wait for it to end or stop it; a killed run's lock is taken over",
                ) from None
            except OSError as exc:  # a file system without locks (Lustre -o noflock, old NFS)
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    self.supported = False
                    return self
                raise OutputError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file we had opened: take the new one
        self.stale = _holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (in that order, see above)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        _HELD.discard(self)

    def __enter__(self) -> DumpLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str | None:
    """`pid 123` (or `pid 123 on node7` from another machine) from a lock file's content."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return None
    if not pid.isdigit():
        return None
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def part_lock(root: Path, part: int, parts: int) -> DumpLock:
    """The lock a process holds while it writes part `part` of `parts` (never waits)."""
    return DumpLock(Path(root) / f"{_LOCK}-{part_tag(part, parts)}", Path(root), wait=False)


def folder_lock(root: Path) -> DumpLock:
    """The lock held briefly while `dump.json` is checked and written, or `index.json` (waits)."""
    return DumpLock(Path(root) / _LOCK, Path(root), wait=True)


def other_part_locks(root: Path, own: DumpLock) -> Iterator[DumpLock]:
    """The part lock files in `root` other than `own` (of parts of any count)."""
    for path in sorted(Path(root).glob(f"{_LOCK}-*-of-*")):
        if path != own.path:
            yield DumpLock(path, Path(root), wait=False)
