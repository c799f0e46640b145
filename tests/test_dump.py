"""`fgscope dump`: round trip against a direct forward, pooling against its definition,
resume after SIGKILL, resumes refused after the inputs changed, the lock against a second
dump, torchrun ranks, faults, bounded memory, and the CLI's refusals."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fgscope import store
from fgscope.capture import capture
from fgscope.cli import app
from fgscope.data import ImageDataset, collate, resolve_inputs, shard_batches
from fgscope.dump.run import (
    DumpConfig,
    _transform,
    parse_hw,
    parse_shard,
    resolve_part,
    run_dump,
)
from fgscope.errors import ConfigError, ImageError, OutputError
from fgscope.images import load_image
from fgscope.models import load_model
from fgscope.store import StoredLayer
from fgscope.store import writer as store_writer

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
LAYERS = "stem.2,block,down"
# A small random-init torchvision model for the subprocess tests (nothing is downloaded).
R18 = ["resnet18", "--weights", "none", "--size", "32"]


def _images(folder: Path, n: int, size: tuple[int, int] = (40, 48), classes: int = 0,
            seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sub = folder / f"class{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def _config(model, inputs, out: Path, **kw) -> DumpConfig:
    base = dict(model=model, inputs=tuple(str(i) for i in inputs), layers=LAYERS, out=out,
                workers=0, batch_size=2, shard_rows=3, device="cpu", model_kwargs={"size": 32})
    base.update(kw)
    return DumpConfig(**base)


def _direct(model, paths, layers=LAYERS) -> dict[str, torch.Tensor]:
    """The definition: preprocess each image, one forward, the records of that forward."""
    lm = load_model(model, size=32)
    x = torch.stack([lm.preprocess(load_image(p)) for p in paths])
    with capture(lm.module, layers, to="cpu") as rec:
        lm.module(x)
    return rec.stacked()


def _cli(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err, err
    return err


# --- round trip ----------------------------------------------------------------------------


def test_raw_float32_round_trip_equals_direct_forward(tiny, tmp_path):
    paths = _images(tmp_path / "imgs", 7, classes=2)
    out, result = run_dump(_config(tiny, [tmp_path / "imgs"], tmp_path / "d", pool="none"))
    assert result.complete and result.images == 7 and result.shards_written == 3
    ref = _direct(tiny, sorted(paths, key=lambda p: (p.parent.name, p.name)))
    d = store.open(out)
    assert d.layers == ("stem.2", "block", "down") and len(d) == 7
    assert d.classes == ("class0", "class1") and d.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    for name in d.layers:
        assert d[name].shape == (7, *ref[name].shape[1:]) and d[name].dtype == np.float32
        np.testing.assert_allclose(d[name].numpy(), ref[name].numpy(), rtol=1e-5, atol=1e-6)
    # the index describes every shard and layer; readable with safetensors alone
    index = json.loads((out / "index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [[0, 3], [3, 6], [6, 7]]
    assert index["layers"][0]["source_shape"] == [8, 16, 16] and index["layers"][0]["pool"] == "none"
    from safetensors.torch import load_file

    first = load_file(out / index["shards"][1]["file"])
    assert torch.equal(first["block"], torch.from_numpy(d["block"][3:6]))
    assert first[store.INPUT_INDEX].tolist() == [3, 4, 5]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"][0]["images"] == 7 and "loop" in manifest["parts"][0]["timings_s"]


@pytest.mark.parametrize(("dtype", "rtol"), [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_half_storage_within_its_precision(tiny, tmp_path, dtype, rtol):
    paths = _images(tmp_path / "imgs", 5)
    out, _ = run_dump(_config(tiny, paths, tmp_path / "d", pool="none", dtype=dtype))
    ref = _direct(tiny, paths)
    d = store.open(out, backend="torch")
    for name in d.layers:
        got = d[name][:]
        assert got.dtype == getattr(torch, dtype)
        r = ref[name]
        # round to nearest: at most half a unit in the last place (plus float32 noise)
        assert ((got.float() - r).abs() <= rtol * r.abs() + 1e-5).all(), name


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pooled_round_trip(tiny, tmp_path, pool):
    paths = _images(tmp_path / "imgs", 5)
    out, result = run_dump(_config(tiny, paths, tmp_path / "d", pool=pool, layers="block,fc"))
    ref = _direct(tiny, paths, "block,fc")
    d = store.open(out)
    want = ref["block"].mean((2, 3)) if pool == "avg" else ref["block"].amax((2, 3))
    np.testing.assert_allclose(d["block"][:], want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["fc"][:], ref["fc"].numpy(), rtol=1e-5, atol=1e-6)
    assert d.layer("fc").pool == "none" and d.layer("block").pool == pool  # vectors kept as is


def test_resize_to_is_adaptive_average_pooling_never_upsampling(tiny, tmp_path):
    paths = _images(tmp_path / "imgs", 3)
    out, _ = run_dump(_config(tiny, paths, tmp_path / "d", pool="none", resize_to=(3, 20)))
    ref = _direct(tiny, paths)
    d = store.open(out)
    assert d["stem.2"].shape == (3, 8, 3, 16) and d["down"].shape == (3, 16, 3, 8)
    want = torch.nn.functional.adaptive_avg_pool2d(ref["stem.2"], (3, 16))
    np.testing.assert_allclose(d["stem.2"][:], want.numpy(), rtol=1e-5, atol=1e-6)
    assert d.layer("stem.2").resize == (3, 16)


def test_bilinear_pool_equals_its_definition_on_a_hand_built_tensor():
    # channel vectors at the two locations: (1, 3) and (2, -1)
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # (1, 2, 1, 2)
    layer = StoredLayer("x", "x", "T", (2, 1, 2), (4,), "float32", "bilinear")
    # sum of outer products [[1,3],[3,9]] + [[4,-2],[-2,1]] = [[5,1],[1,10]];
    # signed sqrt -> [sqrt5, 1, 1, sqrt10]; L2 norm sqrt(5 + 1 + 1 + 10) = sqrt17
    want = torch.tensor([math.sqrt(5), 1, 1, math.sqrt(10)]) / math.sqrt(17)
    torch.testing.assert_close(_transform(layer)(x)[0], want)
    neg = torch.tensor([[[[1.0, -2.0]], [[0.0, 1.0]]]])  # negative entries keep their sign
    z = torch.tensor([5.0, -2.0, -2.0, 1.0])
    torch.testing.assert_close(
        _transform(layer)(neg)[0], z.sign() * z.abs().sqrt() / (z.abs().sum()).sqrt()
    )
    assert torch.equal(x, torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]]))  # input not mutated


def test_bilinear_dump_equals_definition(tiny, tmp_path):
    paths = _images(tmp_path / "imgs", 4)
    out, _ = run_dump(_config(tiny, paths, tmp_path / "d", pool="bilinear", layers="block"))
    ref = _direct(tiny, paths, "block")["block"].double()  # (N, C, H, W)
    got = store.open(out)["block"][:]
    assert got.shape == (4, 64)
    for i in range(4):
        feats = ref[i].flatten(1)  # (C, HW)
        z = sum(torch.outer(feats[:, j], feats[:, j]) for j in range(feats.shape[1])).flatten()
        z = z.sign() * z.abs().sqrt()
        np.testing.assert_allclose(got[i], (z / z.norm()).numpy(), rtol=1e-4, atol=1e-6)


# --- inputs and faults ---------------------------------------------------------------------


def test_inputs_folder_glob_and_path_list(tmp_path):
    flat = _images(tmp_path / "flat", 3)
    got = resolve_inputs([tmp_path / "flat"])
    assert got.paths == tuple(str(p) for p in flat) and got.labels is None
    assert resolve_inputs([str(tmp_path / "flat" / "img000[02].png")]).paths == (str(flat[0]), str(flat[2]))
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n../flat/img0001.png\n\n{flat[0]}\n../flat/img0001.png\nmissing#1.png\n")
    got = resolve_inputs([listing])
    assert got.paths == (str(listing.parent / "../flat/img0001.png"), str(flat[0]),
                         str(listing.parent / "../flat/img0001.png"), str(listing.parent / "missing#1.png"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ImageError, match="lists no paths"):
        resolve_inputs([tmp_path / "empty.txt"])
    with pytest.raises(ImageError, match="no inputs"):
        resolve_inputs([])


def test_dataset_returns_failures_and_collate_drops_them(tmp_path):
    good = _images(tmp_path, 2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    ds = ImageDataset([good[0], bad, tmp_path / "gone.jpg", good[1]],
                      load_model(torch.nn.Conv2d(3, 1, 1), size=16).preprocess, labels=[0, 1, 2, 3])
    batch = collate([ds[i] for i in range(4)])
    assert batch.span == (0, 4) and batch.indices.tolist() == [0, 3] and batch.labels.tolist() == [0, 3]
    assert batch.images.shape == (2, 3, 16, 16)
    assert [i for i, _ in batch.failures] == [1, 2]
    assert "bad.png" in batch.failures[0][1] and "no such file" in batch.failures[1][1]
    assert collate([ds[1]]).images is None
    assert shard_batches([(0, 5), (5, 7)], 2) == [[0, 1], [2, 3], [4], [5, 6]]


def test_bad_files_are_skipped_and_listed(tiny, tmp_path):
    paths = _images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "img0002.png").write_bytes(b"not a png")
    (tmp_path / "imgs" / "img0004.png").write_bytes(b"")
    from rich.console import Console

    console = Console(record=True, width=200)
    out, result = run_dump(_config(tiny, [tmp_path / "imgs"], tmp_path / "d", pool="avg"), console)
    assert result.images == 4 and result.failures == 2 and result.complete
    d = store.open(out)
    assert len(d) == 4 and d.paths == tuple(str(paths[i]) for i in (0, 1, 3, 5))
    assert [(f.input, Path(f.path).name) for f in d.failures] == [(2, "img0002.png"), (4, "img0004.png")]
    assert "empty" in d.failures[1].reason
    text = console.export_text()
    assert "skipped" in text and "dumped 4 images, 2 failed (listed in index.json)" in text
    ref = _direct(tiny, [paths[i] for i in (0, 1, 3, 5)], "block")["block"].mean((2, 3))
    np.testing.assert_allclose(d["block"][:], ref.numpy(), rtol=1e-5, atol=1e-6)


def test_full_disk_stops_with_clear_error_and_the_same_command_continues(tiny, tmp_path, monkeypatch):
    paths = _images(tmp_path / "imgs", 8)
    ref_out, _ = run_dump(_config(tiny, paths, tmp_path / "ref", pool="none"))
    real = _fill_disk_at(monkeypatch, 3)
    with pytest.raises(OutputError, match="No space left on device") as exc:
        run_dump(_config(tiny, paths, tmp_path / "d", pool="none"))
    assert "run the same command again" in str(exc.value)
    progress = json.loads((tmp_path / "d/parts/00000-of-00001/progress.json").read_text())
    assert len(progress["shards"]) == 2 and not (tmp_path / "d/index.json").exists()
    assert not list((tmp_path / "d/shards").glob(".*"))
    partial = store.open(tmp_path / "d")
    assert not partial.complete and len(partial) == 6
    np.testing.assert_array_equal(partial["block"][:], store.open(ref_out)["block"][:6])
    monkeypatch.setattr(store_writer, "_write_chunks", real)
    out, result = run_dump(_config(tiny, paths, tmp_path / "d", pool="none"))
    assert result.resumed_at == 2 and result.shards_written == 1 and result.complete
    for name in ("dump.json", "inputs.json", "index.json"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    for f in sorted((ref_out / "shards").iterdir()):
        assert (out / "shards" / f.name).read_bytes() == f.read_bytes()


def _fill_disk_at(monkeypatch, n: int):
    """Make the n-th shard write fail with ENOSPC; returns the real writer (to restore)."""
    real, calls = store_writer._write_chunks, []

    def full_at_nth(fh, chunks, digest):
        calls.append(1)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, chunks, digest)

    monkeypatch.setattr(store_writer, "_write_chunks", full_at_nth)
    return real


def _wait_for_first_shard(proc: subprocess.Popen, progress: Path, limit: float = 90) -> None:
    """Return once the dump in `proc` has completed a shard (or ended, or `limit` s passed)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["shards"]:
            return
        time.sleep(0.001)


def _interrupted(tiny, inputs, out: Path, monkeypatch, **kw) -> None:
    """A dump stopped after its first shard (the disk filled up), to be resumed."""
    real = _fill_disk_at(monkeypatch, 2)
    with pytest.raises(OutputError):
        run_dump(_config(tiny, inputs, out, pool="avg", **kw))
    monkeypatch.setattr(store_writer, "_write_chunks", real)
    assert len(json.loads((out / "parts/00000-of-00001/progress.json").read_text())["shards"]) == 1


def _refused(config: DumpConfig, *needles: str) -> None:
    with pytest.raises(ConfigError) as exc:
        run_dump(config)
    text = str(exc.value)
    assert "\n" not in text and "cannot be continued" in text, text
    assert f"delete {config.out}" in text and "another --out" in text, text
    for needle in needles:
        assert needle in text, text


def test_resume_refused_after_an_image_is_replaced_under_the_same_name(tiny, tmp_path, monkeypatch):
    paths = _images(tmp_path / "imgs", 7)
    ref, _ = run_dump(_config(tiny, paths, tmp_path / "ref", pool="avg"))
    out = tmp_path / "d"
    _interrupted(tiny, paths, out, monkeypatch)
    assert (out / store.files_name(0, 1, 0)).is_file()
    os.utime(paths[1], ns=(10**18, 10**18))  # touched, same content: still resumable
    _, result = run_dump(_config(tiny, paths, out, pool="avg"))
    assert result.resumed_at == 1 and result.complete
    for f in sorted((ref / "shards").iterdir()):
        assert (out / "shards" / f.name).read_bytes() == f.read_bytes()
    # another image under the name of one of shard 0, its mtime kept (cp -p, rsync -t)
    old = os.stat(paths[2])
    _images(tmp_path / "other", 3, seed=1)[2].replace(paths[2])
    os.utime(paths[2], ns=(old.st_atime_ns, old.st_mtime_ns))
    _refused(_config(tiny, paths, out, pool="avg"), "other image contents",
             f"{paths[2]} changed (sha256 differs) since shard 0")
    assert store.open(out)["block"][:].shape == (7, 8)  # the dump itself is untouched


def test_resume_refused_after_an_image_is_added_to_the_folder(tiny, tmp_path, monkeypatch):
    _images(tmp_path / "imgs", 7)
    out = tmp_path / "d"
    _interrupted(tiny, [tmp_path / "imgs"], out, monkeypatch)
    extra = _images(tmp_path / "more", 1)[0].replace(tmp_path / "imgs" / "img0003b.png")
    _refused(_config(tiny, [tmp_path / "imgs"], out, pool="avg"), "other inputs",
             f"{extra} was added since it was started")
    extra.unlink()
    (tmp_path / "imgs" / "img0005.png").unlink()
    _refused(_config(tiny, [tmp_path / "imgs"], out, pool="avg"),
             f"{tmp_path / 'imgs' / 'img0005.png'} was removed")


def test_resume_refused_after_a_listed_file_is_removed(tiny, tmp_path, monkeypatch):
    paths = _images(tmp_path / "imgs", 7)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"imgs/{p.name}\n" for p in paths))
    out = tmp_path / "d"
    _interrupted(tiny, [listing], out, monkeypatch)
    paths[6].unlink()  # not dumped yet: it simply fails when its shard is computed
    paths[1].unlink()  # in shard 0, already dumped
    _refused(_config(tiny, [listing], out, pool="avg"),
             f"{tmp_path / 'imgs' / 'img0001.png'} was removed or cannot be read since shard 0")
    _images(tmp_path / "imgs", 2)  # img0001.png is back, identical (same seed): resumable
    _, result = run_dump(_config(tiny, [listing], out, pool="avg"))
    assert result.complete and result.failures == 1 and len(store.open(out)) == 6


def test_shard_mb_must_be_finite_and_positive(tiny, tmp_path):
    _images(tmp_path / "imgs", 2)
    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ConfigError, match="--shard-mb must be a positive number"):
            _config(tiny, [tmp_path / "imgs"], tmp_path / "d", shard_mb=bad, shard_rows=None).check()
    _one_line_error(_cli("dump", *R18, tmp_path / "imgs", "--shard-mb", "inf"), 2, "--shard-mb", "inf")
    assert not (tmp_path / "d").exists()


def test_every_input_failing_is_an_error_but_one_empty_part_is_not(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"not a png")
    err = _one_line_error(_cli("dump", *R18, bad, "--out", tmp_path / "d", "--workers", "0"), 5,
                          "none of the 3 inputs could be read", "x0.png", "index.json")
    assert "--overwrite" in err
    index = json.loads((tmp_path / "d/index.json").read_text())  # the failures stay listed
    assert index["rows"] == 0 and len(index["failures"]) == 3
    _one_line_error(_cli("dump", *R18, bad, "--out", tmp_path / "d", "--workers", "0"), 5, "none of")
    # two parts: the first one's inputs all fail, the second one's load
    good = _images(tmp_path / "good", 3)
    from rich.console import Console

    console = Console(record=True, width=300)
    inputs = [*sorted(bad.iterdir()), *good]
    _, r0 = run_dump(_config(tiny, inputs, tmp_path / "p", shard=(0, 2)), console)
    assert r0.part_complete and r0.images == 0 and not r0.complete
    assert "none of the 3 inputs of this part could be read" in console.export_text()
    _, r1 = run_dump(_config(tiny, inputs, tmp_path / "p", shard=(1, 2)))
    assert r1.complete and len(store.open(tmp_path / "p")) == 3


def test_shards_have_the_mode_of_the_other_dump_files(tiny, tmp_path):
    paths = _images(tmp_path / "imgs", 4)
    before = os.umask(0o022)
    try:
        out, _ = run_dump(_config(tiny, paths, tmp_path / "d"))
    finally:
        os.umask(before)
    want = (out / "index.json").stat().st_mode & 0o777
    assert want == 0o644
    files = [*(out / "shards").iterdir(), *(out / "parts").rglob("*.json"), out / "dump.json"]
    assert {f.stat().st_mode & 0o777 for f in files} == {want}
    assert not list(out.glob(".*"))  # no lock file is left behind


def test_overwrite_is_refused_while_a_part_is_being_written(tiny, tmp_path):
    paths = _images(tmp_path / "imgs", 4)
    out, _ = run_dump(_config(tiny, paths, tmp_path / "d"))
    with store.part_lock(out, 1, 2):  # as if a rank of a two-part dump were writing here
        with pytest.raises(OutputError, match=f"another fgscope dump is writing {out}"):
            run_dump(_config(tiny, paths, out, pool="max", overwrite=True))
    assert store.open(out).layer("block").pool == "avg"  # nothing was removed


# --- parts ---------------------------------------------------------------------------------


def test_options_and_rank_environment():
    assert parse_hw("7x5") == (7, 5) and parse_hw("6") == (6, 6)
    assert parse_shard("3/8") == (3, 8)
    for bad in ("0x3", "ax3", "1x2x3"):
        with pytest.raises(ConfigError, match="HxW"):
            parse_hw(bad)
    for bad in ("8/8", "1", "a/2", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    assert resolve_part(None, {}) == (0, 1, None)
    assert resolve_part((2, 4), {}) == (2, 4, None)
    assert resolve_part(None, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    # a SLURM array task 2 of 4, each running torchrun with 2 ranks: part 5 of 8
    assert resolve_part((2, 4), {"RANK": "1", "WORLD_SIZE": "2"}) == (5, 8, None)
    with pytest.raises(ConfigError, match="RANK"):
        resolve_part(None, {"RANK": "x", "WORLD_SIZE": "2"})


def test_parts_union_equals_one_run_and_merge(tiny, tmp_path):
    _images(tmp_path / "imgs", 9, classes=3)
    one, _ = run_dump(_config(tiny, [tmp_path / "imgs"], tmp_path / "one", pool="avg"))
    _, r0 = run_dump(_config(tiny, [tmp_path / "imgs"], tmp_path / "two", pool="avg", shard=(0, 2)))
    assert not r0.complete and not (tmp_path / "two/index.json").exists()
    _, r1 = run_dump(_config(tiny, [tmp_path / "imgs"], tmp_path / "two", pool="avg", shard=(1, 2)))
    assert r1.complete and (r0.inputs, r1.inputs) == (4, 5)
    a, b = store.open(one), store.open(tmp_path / "two")
    assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist() and len(b) == 9
    assert sorted(p.name for p in (tmp_path / "two/shards").iterdir())[0].startswith("00000-of-00002")
    for name in a.layers:
        np.testing.assert_allclose(a[name][:], b[name][:], rtol=1e-5, atol=1e-6)
    # dump-merge writes the same index; parts written to different folders merge too
    auto = (tmp_path / "two/index.json").read_bytes()
    assert _cli("dump-merge", tmp_path / "two").exit_code == 0
    assert (tmp_path / "two/index.json").read_bytes() == auto
    run_dump(_config(tiny, [tmp_path / "imgs"], tmp_path / "sA", pool="avg", shard=(0, 2)))
    run_dump(_config(tiny, [tmp_path / "imgs"], tmp_path / "sB", pool="avg", shard=(1, 2)))
    _one_line_error(_cli("dump-merge", tmp_path / "sA"), 8, "incomplete", "00001-of-00002")
    result = _cli("dump-merge", tmp_path / "sA", tmp_path / "sB", "--verify")
    assert result.exit_code == 0, result.output
    assert "9 rows from 4 shards of 2 parts" in result.output
    merged = store.open(tmp_path / "sA")
    assert merged.index["shards"][-1]["file"].startswith("../sB/shards/")
    np.testing.assert_allclose(merged["block"][:], a["block"][:], rtol=1e-5, atol=1e-6)
    # --verify notices a damaged shard (same size, different bytes)
    victim = tmp_path / "two/shards/00001-of-00002-000000.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    _one_line_error(_cli("dump-merge", tmp_path / "two", "--verify"), 8, "damaged", victim.name)


# --- the CLI -------------------------------------------------------------------------------


def test_cli_refuses_another_command_and_foreign_folders(tmp_path):
    _images(tmp_path / "imgs", 4)
    out = tmp_path / "d"
    args = ["dump", *R18, tmp_path / "imgs", "--out", out, "--workers", "0", "--shard-rows", "2"]
    first = _cli(*args)
    assert first.exit_code == 0, first.output
    assert "dumped 4 images, 0 failed" in first.output
    again = _cli(*args)  # the same command: nothing left to do
    assert again.exit_code == 0 and "nothing to do" in again.output
    _one_line_error(_cli(*args, "--pool", "max"), 2, "different command", "pool avg -> max", "--overwrite")
    _one_line_error(_cli(*args, "--layers", "layer1"), 2, "differs in: layers")
    replaced = _cli(*args, "--pool", "max", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert store.open(out).layer("layer1.1").pool == "max"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    _one_line_error(_cli("dump", *R18, tmp_path / "imgs", "--out", foreign), 8, "thesis.tex", "not an fgscope dump")
    _one_line_error(_cli("dump", *R18, tmp_path / "imgs", "--pool", "sum"), 2, "--pool 'sum'")
    _one_line_error(_cli("dump", *R18, tmp_path / "imgs", "--resize-to", "7x7"), 2, "--pool none")
    _one_line_error(_cli("dump", *R18, tmp_path / "imgs", "--shard", "2/2"), 2, "--shard")
    _one_line_error(_cli("dump", *R18, tmp_path / "nope"), 5, "nope")
    _one_line_error(_cli("dump", *R18, tmp_path / "imgs", "--layers", "layer9"), 6, "layer9")


# --- subprocesses: SIGKILL, torchrun, memory ------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # robust on a busy machine; the same numerics as below
    return env


@pytest.fixture
def one_thread():
    """This process computes with one thread, like the subprocesses (bit-identical results)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resume_after_sigkill_is_byte_identical(tmp_path, one_thread):
    _images(tmp_path / "imgs", 60, size=(64, 64), classes=2)
    args = ["resnet18", str(tmp_path / "imgs"), "--weights", "none", "--size", "32", "--layers",
            "blocks", "--pool", "none", "--dtype", "float16", "--workers", "0", "--batch-size", "2",
            "--shard-rows", "2"]
    ref = tmp_path / "ref"  # the uninterrupted run, in this process
    assert _cli("dump", *args, "--out", ref).exit_code == 0
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "fgscope", "dump", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "parts/00000-of-00001/progress.json"
    try:
        _wait_for_first_shard(proc, progress)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    doc = json.loads(progress.read_text())
    assert 1 <= len(doc["shards"]) < doc["n_shards"], "the kill came too late to test resuming"
    assert not (out / "index.json").exists()
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"{len(doc['shards'])} of 30 shards already complete" in " ".join(again.stdout.split())
    assert not list((out / "shards").glob(".*"))
    for name in ("index.json", "dump.json", "inputs.json", "parts/00000-of-00001/progress.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    shards = sorted(p.name for p in (ref / "shards").iterdir())
    assert len(shards) == 30 and sorted(p.name for p in (out / "shards").iterdir()) == shards
    for name in shards:
        assert (out / "shards" / name).read_bytes() == (ref / "shards" / name).read_bytes(), name


def test_second_dump_is_refused_while_one_runs_and_a_killed_ones_lock_is_taken_over(
    tmp_path, one_thread
):
    _images(tmp_path / "imgs", 24, size=(64, 64), classes=2)
    args = ["resnet18", str(tmp_path / "imgs"), "--weights", "none", "--size", "32", "--layers",
            "blocks", "--pool", "none", "--dtype", "float16", "--workers", "0", "--batch-size", "2",
            "--shard-rows", "2"]
    ref = tmp_path / "ref"  # the uninterrupted run, in this process
    assert _cli("dump", *args, "--out", ref).exit_code == 0
    out = tmp_path / "d"
    # one decoding worker: a forked child must not keep the lock once its parent is killed
    cmd = [sys.executable, "-m", "fgscope", "dump", *args, "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "parts/00000-of-00001/progress.json"
    try:
        _wait_for_first_shard(proc, progress)
        second = _cli("dump", *args, "--out", out)  # the same command, while the first runs
        running = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert running, "the first dump ended before the second one started"
    _one_line_error(second, 8, f"another fgscope dump is writing {out} (pid {proc.pid})")
    lock = out / ".fgscope-lock-00000-of-00001"
    assert lock.read_text().split()[0] == str(proc.pid)  # the killed run's lock stays behind
    doc = json.loads(progress.read_text())
    assert 1 <= len(doc["shards"]) < doc["n_shards"], "the kill came too late to test resuming"
    again = _cli("dump", *args, "--out", out)
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert f"took over the lock left in {out} by pid {proc.pid}" in text
    assert f"{len(doc['shards'])} of 12 shards already complete" in text
    assert not list(out.glob(".*")) and not list((out / "shards").glob(".*"))
    for name in ("index.json", "dump.json", "inputs.json", "parts/00000-of-00001/progress.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    shards = sorted(p.name for p in (ref / "shards").iterdir())
    assert len(shards) == 12 and sorted(p.name for p in (out / "shards").iterdir()) == shards
    for name in shards:
        assert (out / "shards" / name).read_bytes() == (ref / "shards" / name).read_bytes(), name


def test_torchrun_two_ranks_give_the_same_union_as_one_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    _images(tmp_path / "imgs", 11, classes=2)
    args = ["dump", *R18, str(tmp_path / "imgs"), "--workers", "0", "--shard-rows", "2",
            "--dtype", "float32", "--pool", "avg"]
    assert _cli(*args, "--out", tmp_path / "one").exit_code == 0  # one process: this one
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "fgscope", *args,
                          "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "part 0/2" in two.stdout and "part 1/2" in two.stdout  # 0-based, as --shard i/N
    a, b = store.open(tmp_path / "one"), store.open(tmp_path / "two")
    assert b.complete and len(b) == 11 and a.paths == b.paths
    assert a.labels.tolist() == b.labels.tolist() and a.layers == b.layers
    assert {s["part"] for s in b.index["shards"]} == {0, 1}
    assert json.loads((tmp_path / "two/dump.json").read_text())["identity"]["parts"] == 2
    for name in a.layers:
        np.testing.assert_allclose(a[name][:], b[name][:], rtol=1e-4, atol=1e-5)


_RSS = """
import resource, sys
from fgscope.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_is_bounded_by_shards_not_by_the_data_set(tmp_path):
    _images(tmp_path / "all", 20, size=(64, 64))
    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"all/img{i:04d}.png" for i in range(2)))

    def peak(inputs: Path, out: str) -> tuple[int, int]:
        # every layer's raw float32 maps at 224 px: 16.4 MB per image, in 16 MiB shards
        args = ["dump", "mobilenet_v3_small", "--weights", "none", "--size", "224", str(inputs),
                "--layers", "all", "--pool", "none", "--workers", "0",
                "--batch-size", "2", "--shard-mb", "16", "--out", str(tmp_path / out)]
        done = subprocess.run([sys.executable, "-c", _RSS, *args], env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        written = sum(p.stat().st_size for p in (tmp_path / out / "shards").iterdir())
        return int(done.stdout.split("RSS")[-1]), written

    rss_small, bytes_small = peak(small, "small")
    rss_big, bytes_big = peak(tmp_path / "all", "big")
    # 10x the data went to disk: 330 MB, a third of this process's baseline (torch alone
    # takes ~0.9 GB of RSS here), so keeping it in memory would show
    assert bytes_big >= 9 * bytes_small and bytes_big > 300e6
    assert rss_big < 1.2 * rss_small, (rss_small, rss_big)


# --- devices and the real model -------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dump_matches_cpu(tiny, tmp_path):
    paths = _images(tmp_path / "imgs", 6)
    cpu, _ = run_dump(_config(tiny, paths, tmp_path / "cpu", pool="none"))
    gpu, _ = run_dump(_config(tiny, paths, tmp_path / "gpu", pool="none", device="cuda"))
    a, b = store.open(cpu), store.open(gpu)
    for name in a.layers:
        np.testing.assert_allclose(a[name][:], b[name][:], rtol=1e-3, atol=1e-4)
    tiny.cpu()


@pytest.mark.slow
def test_real_mobilenet_stages_avg_float16(tmp_path):
    from fgscope.images import default_image

    photo = load_image(default_image())
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, angle in enumerate((0, 90, 180)):
        photo.rotate(angle).save(folder / f"p{i}.jpg")
    result = _cli("dump", "mobilenet_v2", folder, "--dtype", "float16", "--out", tmp_path / "d",
                  "--workers", "0")
    assert result.exit_code == 0, result.output
    d = store.open(tmp_path / "d")
    assert d.layers == ("features.1", "features.3", "features.6", "features.13", "features.18")
    lm = load_model("mobilenet_v2")
    x = torch.stack([lm.preprocess(load_image(p)) for p in sorted(folder.iterdir())])
    with capture(lm.module, "features.18", to="cpu") as rec:
        logits = lm.module(x)
    want = rec.stacked()["features.18"].mean((2, 3))
    np.testing.assert_allclose(d["features.18"][:], want.numpy(), rtol=2**-10, atol=1e-3)
    assert d["features.18"].dtype == np.float16 and d["features.18"].shape == (3, 1280)
    assert logits.shape == (3, 1000)
