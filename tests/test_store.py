"""fgscope.store: the shard format (what safetensors writes, readable with numpy alone), the
background writer and its failures, resume bookkeeping, the union index and the lazy reader."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save

from fgscope import store
from fgscope.errors import ConfigError, LayerNotFoundError, OutputError
from fgscope.store import Failure, PartState, PendingShard, StoredLayer
from fgscope.store import reader as store_reader
from fgscope.store import writer as store_writer

# --- a reader that needs nothing but numpy (the one in docs/dump.md) -----------------------

_NP = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "F64": "<f8", "I32": "<i4", "U8": "u1"}


def numpy_only_read(path: Path) -> dict[str, np.ndarray]:
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int(np.frombuffer(raw[:8].tobytes(), "<u8")[0])
    header = json.loads(raw[8 : 8 + n].tobytes())
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        data = raw[8 + n + a : 8 + n + b]
        if info["dtype"] == "BF16":  # bfloat16 = the upper half of a float32
            u16 = data.view("<u2").astype(np.uint32) << 16
            out[name] = u16.view("<f4").reshape(info["shape"])
        else:
            out[name] = data.view(_NP[info["dtype"]]).reshape(info["shape"])
    return out


def _pending(shard: int, inputs: tuple[int, int], rows: list[int], seed: int = 0) -> PendingShard:
    g = torch.Generator().manual_seed(seed + shard)
    n = len(rows)
    return PendingShard(
        shard=shard,
        inputs=inputs,
        tensors={
            "a.map": torch.randn(n, 2, 3, 3, generator=g),
            "b.vec": torch.randn(n, 5, generator=g).to(torch.float16),
            "c:2": torch.randn(n, 4, generator=g).to(torch.bfloat16),
        },
        input_index=torch.tensor(rows, dtype=torch.int64),
        failures=tuple(Failure(i, f"img{i}.png", "broken") for i in range(*inputs) if i not in rows),
    )


# --- the shard file ------------------------------------------------------------------------


def test_shard_bytes_are_what_safetensors_writes_and_numpy_reads(tmp_path):
    pending = _pending(0, (0, 4), [0, 1, 3])
    rec = store.write_shard(tmp_path, 0, 1, pending, "abc")
    path = tmp_path / rec.file
    assert rec.file == "shards/00000-of-00001-000000.safetensors"
    data = path.read_bytes()
    assert rec.bytes == len(data)
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    meta = json.loads(header["__metadata__"]["fgscope"])
    assert meta["hash"] == "abc" and meta["inputs"] == [0, 4] and meta["rows"] == 3
    # byte for byte what the safetensors library writes for the same tensors and metadata
    ref = save({**pending.tensors, store.INPUT_INDEX: pending.input_index}, header["__metadata__"])
    assert data == ref
    import hashlib

    assert rec.sha256 == hashlib.sha256(data).hexdigest()
    # readable with safetensors (torch), safetensors (numpy) and numpy alone
    back = load_file(path)
    for name, t in pending.tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
        np.testing.assert_array_equal(numpy_only_read(path)[name], t.float().numpy())
    f16_only = store.write_shard(tmp_path, 0, 2, PendingShard(0, (0, 1), {
        "x": torch.ones(1, 2, dtype=torch.float16)}, torch.zeros(1, dtype=torch.int64)), "h")
    assert np_load_file(tmp_path / f16_only.file)["x"].tolist() == [[1.0, 1.0]]  # no bf16 in numpy
    assert numpy_only_read(path)[store.INPUT_INDEX].tolist() == [0, 1, 3]
    assert not list(path.parent.glob(".*.tmp"))


def test_empty_shard_is_valid(tmp_path):
    rec = store.write_shard(tmp_path, 0, 1, _pending(0, (0, 2), []), "h")
    back = load_file(tmp_path / rec.file)
    assert rec.rows == 0 and back["a.map"].shape == (0, 2, 3, 3)


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    def full(fh, chunks, digest):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_writer, "_write_chunks", full)
    with pytest.raises(OutputError) as exc:
        store.write_shard(tmp_path, 0, 1, _pending(0, (0, 2), [0, 1]), "h")
    message = str(exc.value)
    assert "No space left on device" in message and "run the same command again" in message
    assert "\n" not in message
    assert list((tmp_path / "shards").iterdir()) == []


# --- the writer thread and progress ---------------------------------------------------------


def _state(parts: int = 1, part: int = 0, n: int = 10, rows_per_shard: int = 4) -> PartState:
    return PartState(part, parts, store.split_inputs(n, part, parts), rows_per_shard)


def test_split_inputs_is_contiguous_balanced_and_complete():
    for n in (0, 1, 7, 10, 101):
        for parts in (1, 2, 3, 8):
            blocks = [store.split_inputs(n, p, parts) for p in range(parts)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1


def test_part_state_shard_ranges():
    s = PartState(1, 2, (5, 15), 4)
    assert s.n_shards == 3 and [s.shard_range(k) for k in range(3)] == [(5, 9), (9, 13), (13, 15)]
    assert PartState(0, 4, (0, 0), 4).n_shards == 0 and PartState(0, 4, (0, 0), 4).complete


def test_writer_writes_in_order_and_records_progress(tmp_path):
    state = _state()
    writer = store.ShardWriter(tmp_path, state, "h")
    for k in range(state.n_shards):
        a, b = state.shard_range(k)
        writer.submit(_pending(k, (a, b), [i for i in range(a, b) if i != 5]))
    final = writer.close()
    assert final.complete and [s.shard for s in final.shards] == [0, 1, 2]
    assert [f.input for f in final.failures] == [5]
    doc = json.loads((tmp_path / "parts/00000-of-00001/progress.json").read_text())
    assert doc["complete"] and len(doc["shards"]) == 3 and doc["hash"] == "h"
    assert writer.bytes_written == sum(s.bytes for s in final.shards)
    # a second run finds everything done
    again = store.load_part(tmp_path, _state(), "h")
    assert again.complete and again.shards == final.shards and again.failures == final.failures
    # another identity starts afresh
    assert store.load_part(tmp_path, _state(), "other").shards == ()


def test_writer_error_surfaces_and_completed_shards_stay_valid(tmp_path, monkeypatch):
    real = store_writer._write_chunks
    calls = []

    def flaky(fh, chunks, digest):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, chunks, digest)

    monkeypatch.setattr(store_writer, "_write_chunks", flaky)
    state = _state()
    writer = store.ShardWriter(tmp_path, state, "h")
    with pytest.raises(OutputError, match="No space left"):
        for k in range(state.n_shards):
            a, b = state.shard_range(k)
            writer.submit(_pending(k, (a, b), list(range(a, b))))
        writer.close()
    writer.close(abort=True)
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == ["00000-of-00001-000000.safetensors"]  # no temporary file left
    resumed = store.load_part(tmp_path, _state(), "h")
    assert len(resumed.shards) == 1
    assert torch.equal(load_file(tmp_path / "shards" / files[0])["a.map"],
                       _pending(0, (0, 4), [0, 1, 2, 3]).tensors["a.map"])


def test_load_part_stops_at_missing_or_damaged_shard_and_removes_temporaries(tmp_path):
    state = _state()
    writer = store.ShardWriter(tmp_path, state, "h")
    for k in range(3):
        a, b = state.shard_range(k)
        writer.submit(_pending(k, (a, b), list(range(a, b))))
    writer.close()
    stale = tmp_path / "shards" / ".00000-of-00001-000003.abc.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / "shards" / ".00001-of-00002-000000.abc.tmp"  # another part's: kept
    other.write_bytes(b"half")
    (tmp_path / "shards/00000-of-00001-000001.safetensors").write_bytes(b"truncated")
    resumed = store.load_part(tmp_path, _state(), "h")
    assert [s.shard for s in resumed.shards] == [0]
    assert not stale.exists() and other.exists()


# --- union index and reader ----------------------------------------------------------------

LAYERS = [
    StoredLayer("a.map", "a", "Conv2d", (2, 6, 6), (2, 3, 3), "float32", "none", (3, 3)),
    StoredLayer("b.vec", "b", "Linear", (5,), (5,), "float16", "none"),
    StoredLayer("c:2", "c", "ReLU", (4, 2, 2), (4,), "bfloat16", "avg"),
]


def _make_dump(root: Path, n: int = 11, parts: int = 2, rps: int = 3, bad: tuple[int, ...] = (4, 9),
               finish: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """A dump with `parts` parts written shard by shard; returns the expected union arrays."""
    identity = {"parts": parts, "inputs": {"count": n, "sha256": "x"}, "rows_per_shard": rps}
    digest = store.write_identity(root, identity, LAYERS, {"versions": {"fgscope": "t"}})
    store.write_inputs(root, {"count": n, "paths": [f"img{i}.png" for i in range(n)],
                              "labels": [i % 3 for i in range(n)], "classes": ["x", "y", "z"]})
    expected: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in LAYERS}
    for p in range(parts):
        state = PartState(p, parts, store.split_inputs(n, p, parts), rps)
        writer = store.ShardWriter(root, state, digest)
        todo = range(state.n_shards) if finish is None or p in finish else range(1)
        for k in todo:
            a, b = state.shard_range(k)
            pend = _pending(k, (a, b), [i for i in range(a, b) if i not in bad], seed=100 * p)
            writer.submit(pend)
            for name, t in pend.tensors.items():
                expected[name].append(t)
        writer.close()
    return {k: torch.cat(v).float().numpy() for k, v in expected.items()}


def test_union_of_parts_reads_as_one_data_set(tmp_path):
    expected = _make_dump(tmp_path)
    index = store.build_index([tmp_path])
    assert index["complete"] and index["rows"] == 9
    assert index["paths"] == [f"img{i}.png" for i in range(11) if i not in (4, 9)]
    assert index["input_index"] == [i for i in range(11) if i not in (4, 9)]
    assert [f["input"] for f in index["failures"]] == [4, 9]
    rows = [s["rows"] for s in index["shards"]]
    assert rows[0][0] == 0 and rows[-1][1] == 9
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    store.write_index(tmp_path, index)
    d = store.open(tmp_path)
    assert len(d) == 9 and d.complete and d.layers == ("a.map", "b.vec", "c:2")
    assert d.classes == ("x", "y", "z") and d.labels.tolist() == [i % 3 for i in index["input_index"]]
    assert [f.input for f in d.failures] == [4, 9]
    for name, full in expected.items():
        view = d[name]
        assert view.shape == full.shape and len(view) == 9
        np.testing.assert_array_equal(view.numpy(), full)
        np.testing.assert_array_equal(np.asarray(view), full)
        for key in (0, -1, 5, slice(None), slice(2, 8), slice(1, 9, 3), slice(8, 2, -2),
                    slice(5, 5), [7, 0, 7, 3], np.array([-1, 2]), np.arange(9) % 2 == 0,
                    (slice(2, 7), 0), (4, 1)):
            np.testing.assert_array_equal(view[key], full[key], err_msg=f"{name}[{key!r}]")
    assert d["c:2"].dtype == np.float32 and d["b.vec"].dtype == np.float16  # bf16 read as f32
    with pytest.raises(IndexError):
        d["a.map"][9]
    t = store.open(tmp_path, backend="torch")["c:2"]
    assert t.dtype == torch.bfloat16 and t[2:5].dtype == torch.bfloat16
    assert torch.equal(t[2:5].float(), torch.from_numpy(expected["c:2"][2:5]))


def test_unknown_layer_and_not_a_dump(tmp_path):
    _make_dump(tmp_path)
    with pytest.raises(LayerNotFoundError, match="did you mean a.map"):
        store.open(tmp_path)["a.mpa"]
    with pytest.raises(ConfigError, match="not an fgscope dump"):
        store.open(tmp_path / "shards")


def test_incomplete_dump_reads_completed_shards_and_refuses_merge(tmp_path):
    _make_dump(tmp_path, finish=(0,))  # part 1 stopped after its first shard
    with pytest.raises(OutputError, match=r"incomplete: part 00001-of-00002 \(1/2 shards\)"):
        store.build_index([tmp_path])
    d = store.open(tmp_path)  # no index.json: built from the progress files
    assert not d.complete and len(d) == 4 + 3  # part 0: inputs 0-4 but 4; part 1: 5, 6, 7
    assert d.paths[-1] == "img7.png"


def test_remove_dump_leaves_other_files(tmp_path):
    _make_dump(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    store.remove_dump(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- verified reading ----------------------------------------------------------------------


def _one_line(exc: BaseException, *needles: str) -> str:
    text = str(exc)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def test_reader_checks_each_shard_once_and_names_a_damaged_one(tmp_path, monkeypatch):
    expected = _make_dump(tmp_path)
    store.write_index(tmp_path, store.build_index([tmp_path]))
    checked: list[str] = []
    real = store.check_shard

    def counting(root, record):
        checked.append(record["file"])
        return real(root, record)

    monkeypatch.setattr(store_reader, "check_shard", counting)  # where the reader looks it up
    d = store.open(tmp_path)
    for _ in range(3):  # every shard read three times: hashed once each, lazily
        np.testing.assert_array_equal(d["a.map"][:], expected["a.map"])
        np.testing.assert_array_equal(d["c:2"][[8, 0]], expected["c:2"][[8, 0]])
    assert sorted(checked) == sorted({s["file"] for s in d.index["shards"] if s["rows"][1] > s["rows"][0]})
    checked.clear()
    d["b.vec"][0:2]
    assert checked == []  # still verified; a new open() checks again
    store.open(tmp_path)["b.vec"][0]
    assert len(checked) == 1

    # one flipped byte in the data of the second shard: the values would be silently wrong
    victim = d.index["shards"][1]
    path = tmp_path / victim["file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = store.open(tmp_path)
    np.testing.assert_array_equal(fresh["a.map"][0:2], expected["a.map"][0:2])  # shard 0 is fine
    with pytest.raises(OutputError) as exc:
        fresh["a.map"][victim["rows"][0]]
    _one_line(exc.value, Path(victim["file"]).name, "damaged", "sha256 differs",
              f"fgscope dump-merge --verify {tmp_path}")
    # truncated: named too (not a raw SafetensorError), with and without hashing
    path.write_bytes(bytes(data[: len(data) // 2]))
    for verify in (True, False):
        with pytest.raises(OutputError) as exc:
            store.open(tmp_path, verify=verify)["b.vec"][victim["rows"][0]:]
        _one_line(exc.value, Path(victim["file"]).name, "damaged", "dump-merge --verify")
    with pytest.raises(OutputError, match="truncated"):
        store.open(tmp_path)["b.vec"][:]
    path.unlink()
    with pytest.raises(OutputError, match="missing"):
        store.open(tmp_path)["b.vec"][:]


# --- input records ---------------------------------------------------------------------------


def test_input_records_notice_changed_removed_and_appeared_files(tmp_path):
    files = []
    for i in range(4):
        f = tmp_path / f"in{i}.bin"
        f.write_bytes(bytes([i]) * 100)
        files.append(str(f))
    paths = [*files, str(tmp_path / "absent.bin")]
    state = PartState(0, 1, (0, 5), 3)
    writer = store.ShardWriter(tmp_path / "d", state, "h")
    for k in range(2):
        a, b = state.shard_range(k)
        pend = _pending(k, (a, b), list(range(a, b)))
        writer.submit(PendingShard(**{**pend.__dict__, "files": tuple(
            store.file_fingerprint(p) for p in paths[a:b])}))
    writer.close()
    record = (tmp_path / "d" / store.files_name(0, 1, 1)).read_text()
    assert record.count("\n") == 4 and "null" in record  # one line per input; absent: null
    loaded = store.load_part(tmp_path / "d", PartState(0, 1, (0, 5), 3), "h")
    assert loaded.complete
    assert store.find_input_change(tmp_path / "d", loaded, paths, "h") is None
    os.utime(files[1], ns=(0, 0))  # touched (stat differs), same content: not a change
    assert store.find_input_change(tmp_path / "d", loaded, paths, "h") is None
    old = os.stat(files[2])
    Path(files[2]).write_bytes(bytes([9]) * 100)  # same size, same mtime: ctime shows it
    os.utime(files[2], ns=(old.st_atime_ns, old.st_mtime_ns))
    change = store.find_input_change(tmp_path / "d", loaded, paths, "h")
    assert (change.input, change.shard, change.what) == (2, 0, "changed (sha256 differs)")
    Path(files[2]).write_bytes(bytes([2]) * 100)
    Path(files[3]).unlink()
    assert store.find_input_change(tmp_path / "d", loaded, paths, "h").what == "was removed or cannot be read"
    Path(files[3]).write_bytes(bytes([3]) * 100)
    Path(paths[4]).write_bytes(b"new")
    assert "can be read now" in store.find_input_change(tmp_path / "d", loaded, paths, "h").what
    # a shard whose input record is missing is not done (it is computed again)
    (tmp_path / "d" / store.files_name(0, 1, 1)).unlink()
    assert len(store.load_part(tmp_path / "d", PartState(0, 1, (0, 5), 3), "h").shards) == 1


# --- locks and modes -------------------------------------------------------------------------


def test_part_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
    first = store.part_lock(tmp_path, 1, 4).acquire()
    lock_file = tmp_path / ".fgscope-lock-00001-of-00004"
    assert lock_file.read_text().split()[0] == str(os.getpid())
    with pytest.raises(OutputError) as exc:  # flock: even a second open in this process
        store.part_lock(tmp_path, 1, 4).acquire()
    _one_line(exc.value, f"another fgscope dump is writing {tmp_path} (pid {os.getpid()})")
    with store.part_lock(tmp_path, 2, 4) as other:  # another part: its own lock
        assert [p.path.name for p in store.other_part_locks(tmp_path, other)] == [lock_file.name]
    first.release()
    assert not lock_file.exists()  # released locks leave nothing behind
    lock_file.write_text("4194999 node7\n")  # what a run killed with SIGKILL leaves
    with store.part_lock(tmp_path, 1, 4) as taken:
        assert taken.stale == "pid 4194999 on node7"
    with store.folder_lock(tmp_path) as folder:
        assert folder.stale is None


def test_shards_get_the_umask_mode_like_every_other_file(tmp_path):
    before = os.umask(0o027)
    try:
        rec = store.write_shard(tmp_path, 0, 1, _pending(0, (0, 2), [0, 1]), "h")
        store.write_index(tmp_path, {"x": 1})
    finally:
        os.umask(before)
    mode = (tmp_path / rec.file).stat().st_mode & 0o777
    assert mode == (tmp_path / "index.json").stat().st_mode & 0o777 == 0o640
