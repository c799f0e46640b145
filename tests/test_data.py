"""Tests for fgscope.data: inputs of batch jobs on hostile file systems, and the dataset's
refusals (FIFOs, long strips, the pixel limit)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import deny_scandir as _deny_scandir
from PIL import Image
from torchvision.transforms import functional as F

from fgscope.data import ImageDataset, read_path_list, resolve_inputs
from fgscope.errors import ConfigError, ImageError
from fgscope.image_decode import MAX_RESIZED_PIXELS, resized_size
from fgscope.models.types import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def _png(path: Path, size: tuple[int, int] = (4, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 60, 90)).save(path)
    return path


def _preprocess(resize: int | None = 16) -> Preprocess:
    return Preprocess((16, 16), resize, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.timeout(20)
def test_image_folder_inputs_list_link_loops(tmp_path: Path) -> None:
    root = tmp_path / "data"
    a = _png(root / "a" / "1.png")
    b = _png(root / "b" / "1.png")
    (root / "again").symlink_to(".")  # would be a class holding the whole data set
    got = resolve_inputs([root])
    assert got.paths == (str(a), str(b)) and got.labels == (0, 1) and got.classes == ("a", "b")
    assert [f.path for f in got.failures] == [root / "again"]
    assert "symbolic link loop" in got.failures[0].reason


def test_unreadable_folders_become_input_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "locked" / "b.png")
    _deny_scandir(monkeypatch, tmp_path / "imgs" / "locked")
    got = resolve_inputs([tmp_path / "imgs", f"{tmp_path}/imgs/**"])
    assert got.paths == (str(ok), str(ok))  # one row per input, as before
    assert got.labels is None
    assert [f.path for f in got.failures] == [tmp_path / "imgs" / "locked"]  # listed once
    assert "permission denied" in got.failures[0].reason
    _deny_scandir(monkeypatch, tmp_path / "imgs")  # the only input cannot be read at all
    with pytest.raises(ImageError, match="permission denied"):
        resolve_inputs([tmp_path / "imgs"])


def test_plain_inputs_have_no_failures(tmp_path: Path) -> None:
    got = resolve_inputs([_png(tmp_path / "a.png")])
    assert got.failures == () and len(got) == 1


@pytest.mark.timeout(20)
def test_fifo_path_list_and_fifo_image_never_opened(tmp_path: Path) -> None:
    fifo_list = tmp_path / "list.txt"
    os.mkfifo(fifo_list)
    with pytest.raises(ImageError, match="not a regular file"):
        read_path_list(fifo_list)
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    got = resolve_inputs([fifo_list])  # not a regular .txt: taken as one input, refused later
    assert got.paths == (str(fifo_list),)
    good = _png(tmp_path / "a.png")
    ds = ImageDataset([fifo, good], _preprocess())
    assert ds[0].image is None and "not a regular file" in (ds[0].failure or "")
    assert ds[1].image is not None and ds[1].image.shape == (3, 16, 16)


def test_long_strip_is_a_failure_naming_it_not_an_out_of_memory(tmp_path: Path) -> None:
    strip = _png(tmp_path / "strip.png", (40000, 1))
    tall = _png(tmp_path / "tall.png", (1, 40000))
    good = _png(tmp_path / "good.png", (64, 48))
    ds = ImageDataset([strip, tall, good], _preprocess(256))
    for i, path in enumerate([strip, tall]):
        sample = ds[i]
        assert sample.image is None and sample.failure is not None
        assert str(path) in sample.failure and f"{MAX_RESIZED_PIXELS:,}" in sample.failure
    assert ds[2].image is not None and ds[2].image.shape == (3, 16, 16)
    plain = ImageDataset([strip], _preprocess(None))  # resized straight to the crop: no blow-up
    assert plain[0].image is not None and plain[0].image.shape == (3, 16, 16)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 101), (7, 3000), (256, 256)])
def test_resized_size_equals_torchvision(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size)
    assert resized_size(size, 224) == F.resize(image, [224], antialias=True).size


def test_dataset_reads_the_pixel_limit_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _png(tmp_path / "big.png", (100, 100))
    monkeypatch.setenv("FGSCOPE_MAX_PIXELS", "1000")
    sample = ImageDataset([path], _preprocess())[0]
    assert sample.image is None and "FGSCOPE_MAX_PIXELS" in (sample.failure or "")
    assert ImageDataset([path], _preprocess(), max_pixels=None)[0].image is not None
    monkeypatch.setenv("FGSCOPE_MAX_PIXELS", "many")
    with pytest.raises(ConfigError, match="FGSCOPE_MAX_PIXELS"):
        ImageDataset([path], _preprocess())  # at construction, not in a worker


def test_dataset_failure_keeps_the_path_exact(tmp_path: Path) -> None:
    path = tmp_path / "a  b.png"
    path.write_bytes(b"junk")
    sample = ImageDataset([path], _preprocess())[0]
    assert sample.failure is not None and str(path) in sample.failure
