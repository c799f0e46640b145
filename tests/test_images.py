"""Tests for fgscope.images: discovery, decoding of every mode, and the error messages."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import deny_scandir as _deny_scandir
from PIL import Image

from fgscope.errors import ConfigError, ImageError
from fgscope.images import (
    IMAGE_EXTENSIONS,
    ImageFailure,
    LoadedImage,
    default_image,
    discover,
    iter_images,
    load_image,
    load_images,
    sha256_file,
)


def _save(img: Image.Image, path: Path, **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **params)
    return path


def _rgb(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def _assert_one_line_error(exc: pytest.ExceptionInfo[ImageError], path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert path.name in message
    return message


# --- modes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value", "ext", "expected"),
    [
        ("L", 77, ".png", (77, 77, 77)),
        ("RGB", (10, 20, 30), ".png", (10, 20, 30)),
        ("CMYK", (0, 255, 255, 0), ".jpg", (255, 0, 0)),
        ("CMYK", (0, 255, 255, 0), ".tif", (255, 0, 0)),
        ("1", 1, ".png", (255, 255, 255)),
        ("1", 0, ".tif", (0, 0, 0)),
    ],
)
def test_plain_modes_become_rgb(
    tmp_path: Path, mode: str, value: object, ext: str, expected: tuple[int, int, int]
) -> None:
    path = _save(Image.new(mode, (5, 3), value), tmp_path / f"img{ext}")
    with Image.open(path) as raw:
        assert raw.mode == mode
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 3)
    assert np.abs(np.subtract(_rgb(img), expected)).max() <= 2


def test_ycbcr_in_memory_mode_converts(tmp_path: Path) -> None:
    # YCbCr cannot be written to PNG; TIFF keeps it as a real mode.
    path = _save(Image.new("YCbCr", (4, 4), (255, 128, 128)), tmp_path / "y.tif")
    with Image.open(path) as raw:
        assert raw.mode == "YCbCr"
    assert np.abs(np.subtract(_rgb(load_image(path)), (255, 255, 255))).max() <= 2


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_grey_scaled_by_depth_not_clipped(tmp_path: Path, mode: str) -> None:
    img = Image.new(mode, (3, 1))
    for x, v in enumerate([0, 1000, 65535]):
        img.putpixel((x, 0), v)
    path = _save(img, tmp_path / "g16.tif")
    with Image.open(path) as raw:
        assert raw.mode == mode
    out = load_image(path)
    # 1000 / 257 ~ 3.9: a clip at 255 would have made it white.
    assert [_rgb(out, (x, 0))[0] for x in range(3)] == [0, 4, 255]


def test_sixteen_bit_png(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[65535, 257]], dtype=np.uint16)), tmp_path / "g.png")
    out = load_image(path)
    assert _rgb(out, (0, 0)) == (255, 255, 255) and _rgb(out, (1, 0)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 100, 255], [0, 100, 255]),  # 8-bit data in a 32-bit container is kept
        ([0, 257, 65535], [0, 1, 255]),  # 16-bit data
        ([-10, 0, 10], [0, 128, 255]),  # anything else: min-max
    ],
)
def test_32_bit_int_grey(tmp_path: Path, values: list[int], expected: list[int]) -> None:
    path = _save(Image.fromarray(np.array([values], dtype=np.int32)), tmp_path / "i.tif")
    with Image.open(path) as raw:
        assert raw.mode == "I"
    out = load_image(path)
    assert [_rgb(out, (x, 0))[0] for x in range(3)] == expected


def test_float_grey_min_max_scaled(tmp_path: Path) -> None:
    path = _save(
        Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)), tmp_path / "f.tif"
    )
    out = load_image(path)
    assert [_rgb(out, (x, 0))[0] for x in range(3)] == [0, 64, 255]


def test_constant_float_image_does_not_divide_by_zero(tmp_path: Path) -> None:
    path = _save(Image.new("F", (2, 2), 5.0), tmp_path / "c.tif")
    assert _rgb(load_image(path)) == (0, 0, 0)


def test_rgba_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (200, 0, 0, 255))
    out = load_image(_save(img, tmp_path / "a.png"))
    assert _rgb(out, (0, 0)) == (255, 255, 255)
    assert _rgb(out, (1, 0)) == (200, 0, 0)


def test_rgba_half_transparent_blends_with_white(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), tmp_path / "h.png"))
    assert np.abs(np.subtract(_rgb(out), (127, 127, 127))).max() <= 1


def test_la_transparent_becomes_white(tmp_path: Path) -> None:
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (50, 255))
    out = load_image(_save(img, tmp_path / "la.png"))
    assert _rgb(out, (0, 0)) == (255, 255, 255) and _rgb(out, (1, 0)) == (50, 50, 50)


def _palette_image() -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    for x in range(3):
        img.putpixel((x, 0), x)
    return img


@pytest.mark.parametrize("ext", [".png", ".gif", ".bmp"])
def test_palette_colours_preserved(tmp_path: Path, ext: str) -> None:
    out = load_image(_save(_palette_image(), tmp_path / f"p{ext}"))
    assert [_rgb(out, (x, 0)) for x in range(3)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_palette_transparency_becomes_white(tmp_path: Path, ext: str) -> None:
    out = load_image(_save(_palette_image(), tmp_path / f"t{ext}", transparency=1))
    assert [_rgb(out, (x, 0)) for x in range(3)] == [(255, 0, 0), (255, 255, 255), (0, 0, 255)]


def test_grey_with_trns_colour_becomes_white(tmp_path: Path) -> None:
    img = Image.new("L", (2, 1), 0)
    img.putpixel((1, 0), 90)
    out = load_image(_save(img, tmp_path / "trns.png", transparency=0))
    assert _rgb(out, (0, 0)) == (255, 255, 255) and _rgb(out, (1, 0)) == (90, 90, 90)


@pytest.mark.parametrize("ext", [".ppm", ".pgm", ".pbm", ".bmp", ".webp", ".tiff", ".jpeg"])
def test_other_formats(tmp_path: Path, ext: str) -> None:
    mode = {".pgm": "L", ".pbm": "1"}.get(ext, "RGB")
    out = load_image(
        _save(Image.new(mode, (6, 4), 255 if mode != "RGB" else (9, 9, 9)), tmp_path / f"x{ext}")
    )
    assert out.mode == "RGB" and out.size == (6, 4)


# --- orientation and frames ----------------------------------------------------------------


@pytest.mark.parametrize(("orientation", "red_at"), [(6, (1, 0)), (8, (0, 3))])
def test_exif_orientation_applied(
    tmp_path: Path, orientation: int, red_at: tuple[int, int]
) -> None:
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0))  # top-left marker
    exif = img.getexif()
    exif[0x0112] = orientation
    path = _save(img, tmp_path / "o.png", exif=exif)
    out = load_image(path)
    assert out.size == (2, 4)
    # 6 = rotate 90 clockwise for display: top-left goes to top-right; 8 = counter-clockwise.
    assert _rgb(out, red_at) == (255, 0, 0)
    (loaded,), _ = load_images([path])
    assert loaded.size == (2, 4)


def test_exif_orientation_jpeg(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    exif = img.getexif()
    exif[0x0112] = 6
    assert load_image(_save(img, tmp_path / "o.jpg", exif=exif)).size == (20, 40)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert _rgb(load_image(path)) == (255, 0, 0)


def test_multipage_tiff_first_page(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (3, 2), (0, 0, 200)), Image.new("RGB", (5, 5), (200, 0, 0))]
    path = tmp_path / "pages.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    out = load_image(path)
    assert out.size == (3, 2) and _rgb(out) == (0, 0, 200)


# --- decompression bombs -------------------------------------------------------------------


@pytest.mark.parametrize("max_pixels", [6000, 1000])  # warning range (1x-2x) and error (>2x)
def test_decompression_bomb_refused(tmp_path: Path, max_pixels: int) -> None:
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as exc:
        load_image(path, max_pixels=max_pixels)
    message = _assert_one_line_error(exc, path)
    assert f"{max_pixels:,}" in message and "max_pixels" in message
    assert Image.MAX_IMAGE_PIXELS == before


def test_pixel_limit_allows_at_limit_and_none(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "ok.png")
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    assert load_image(path, max_pixels=None).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS is not None


def test_limit_above_pillow_global_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    assert load_image(path, max_pixels=None).size == (100, 100)
    assert load_image(path, max_pixels=20_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_bad_max_pixels_is_a_config_error(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "ok.png")
    with pytest.raises(ConfigError):
        load_image(path, max_pixels=0)


def test_bomb_in_batch_is_a_failure(tmp_path: Path) -> None:
    big = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    small = _save(Image.new("RGB", (10, 10)), tmp_path / "small.png")
    loaded, failures = load_images([big, small], max_pixels=1000)
    assert [x.path for x in loaded] == [small] and [f.path for f in failures] == [big]


# --- bad files -----------------------------------------------------------------------------


def _truncated(tmp_path: Path, ext: str) -> Path:
    rng = np.random.default_rng(0)
    path = _save(
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / f"full{ext}"
    )
    data = path.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {
        "empty": empty,
        "noise": noise,
        "text": text,
        "folder": folder,
        "missing": tmp_path / "missing.jpg",
        "cut-jpeg": _truncated(tmp_path, ".jpg"),
        "cut-png": _truncated(tmp_path, ".png"),
    }


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("empty", "empty"),
        ("noise", "not a recognised image"),
        ("text", "not a recognised image"),
        ("folder", "folder"),
        ("missing", "no such file"),
        ("cut-jpeg", "truncated"),
        ("cut-png", "truncated"),
    ],
)
def test_bad_file_gives_one_line_error(tmp_path: Path, kind: str, words: str) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(ImageError) as exc:
        load_image(path)
    message = _assert_one_line_error(exc, path)
    assert words in message
    assert "(" in message  # a hint follows


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_permission_denied(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "locked.png")
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied") as exc:
            load_image(path)
        _assert_one_line_error(exc, path)
    finally:
        path.chmod(0o644)


def test_permission_error_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "locked.png")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ImageError, match="permission denied") as exc:
        load_image(path)
    _assert_one_line_error(exc, path)


def test_truncated_images_stay_errors() -> None:
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_images_keeps_good_files_in_order(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path)
    good = [_save(Image.new("RGB", (3, 3), (i, i, i)), tmp_path / f"good{i}.png") for i in range(3)]
    paths = [good[0], bad["text"], good[1], bad["missing"], bad["cut-png"], good[2]]
    loaded, failures = load_images(paths)
    assert [x.path for x in loaded] == good
    assert [f.path for f in failures] == [bad["text"], bad["missing"], bad["cut-png"]]
    for item in loaded:
        assert isinstance(item, LoadedImage) and item.image.mode == "RGB" and item.size == (3, 3)
        assert item.sha256 == hashlib.sha256(item.path.read_bytes()).hexdigest()
    for failure in failures:
        assert isinstance(failure, ImageFailure)
        assert failure.path.name in failure.reason and "\n" not in failure.reason


def test_iter_images_streams_in_order(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (2, 2)), tmp_path / "g.png")
    kinds = [type(x) for x in iter_images([good, tmp_path / "nope.png", str(good)])]
    assert kinds == [LoadedImage, ImageFailure, LoadedImage]


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # crosses chunk boundaries
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(ImageError, match="no such file"):
        sha256_file(tmp_path / "absent.bin")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_no_file_handles_left_open(tmp_path: Path) -> None:
    good = _save(Image.new("RGBA", (8, 8)), tmp_path / "g.png")
    bad = _truncated(tmp_path, ".png")
    load_image(good)  # warm up lazy plugin imports
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        load_image(good)
        with pytest.raises(ImageError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) <= before


# --- discover ------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for rel in [
        "b.png",
        "a.JPG",
        "sub/c.jpeg",
        "sub/deeper/d.TIFF",
        "z.webp",
        ".hidden.png",
        ".cache/e.png",
        "notes.txt",
        "sub/readme.md",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    return root


def _rel(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_discover_folder_recursive_sorted_hidden_skipped(tree: Path) -> None:
    assert _rel(discover([tree]), tree) == [
        "a.JPG",
        "b.png",
        "sub/c.jpeg",
        "sub/deeper/d.TIFF",
        "z.webp",
    ]


def test_discover_explicit_file_kept_whatever_extension(tree: Path) -> None:
    assert discover([tree / "notes.txt", tree / ".hidden.png"]) == [
        tree / "notes.txt",
        tree / ".hidden.png",
    ]


def test_discover_keeps_input_order_and_dedups(tree: Path) -> None:
    found = discover([tree / "z.webp", str(tree), tree / "sub" / "c.jpeg"])
    assert _rel(found, tree) == ["z.webp", "a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.TIFF"]


def test_discover_globs(tree: Path) -> None:
    assert _rel(discover([f"{tree}/*.png"]), tree) == ["b.png"]
    assert _rel(discover([f"{tree}/?.JPG"]), tree) == ["a.JPG"]
    assert _rel(discover([f"{tree}/[ab].*"]), tree) == ["a.JPG", "b.png"]
    assert _rel(discover([f"{tree}/**/*.*"]), tree) == [
        "a.JPG",
        "b.png",
        "sub/c.jpeg",
        "sub/deeper/d.TIFF",
        "z.webp",
    ]
    assert _rel(discover([f"{tree}/s*"]), tree) == ["sub/c.jpeg", "sub/deeper/d.TIFF"]


def test_discover_literal_path_with_glob_characters(tmp_path: Path) -> None:
    path = tmp_path / "shot[1].png"
    path.write_bytes(b"x")
    assert discover([path]) == [path]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda root: root / "absent", "no such file or folder"),
        (lambda root: f"{root}/*.gif", "matches no files ending in"),
        (lambda root: root / "sub" / "empty", "contains no files ending in"),
    ],
)
def test_discover_errors(tree: Path, make: Callable[[Path], object], words: str) -> None:
    (tree / "sub" / "empty" / ".hidden").mkdir(parents=True)
    (tree / "sub" / "empty" / ".hidden" / "x.png").write_bytes(b"x")
    target = make(tree)
    with pytest.raises(ImageError, match=words) as exc:
        discover([target])
    assert "\n" not in str(exc.value) and Path(target).name in str(exc.value)


def test_discover_empty_input_list() -> None:
    assert discover([]) == []


def test_extensions_are_lower_case_with_dot() -> None:
    assert {".jpg", ".jpeg", ".png", ".tif", ".webp", ".pnm"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
    registered = Image.registered_extensions()
    assert all(e in registered for e in IMAGE_EXTENSIONS)


# --- misc ----------------------------------------------------------------------------------


def test_default_image_loads() -> None:
    path = default_image()
    assert path.name == "grace_hopper.jpg" and path.is_file()
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (512, 600)


def test_module_does_not_import_torch() -> None:
    code = "import sys, fgscope.images; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_image_folder_layout(tmp_path):
    from fgscope.images import image_folder

    for cls, n in (("b_cat", 2), ("a_dog", 3)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(tmp_path / cls / "sub" / f"{i}.png")
    (tmp_path / ".hidden").mkdir()
    ds = image_folder(tmp_path)
    assert ds.classes == ["a_dog", "b_cat"]
    assert ds.labels == [0, 0, 0, 1, 1]
    assert [p.parent.parent.name for p in ds.paths] == ["a_dog"] * 3 + ["b_cat"] * 2
    (tmp_path / "c_empty").mkdir()
    with pytest.raises(ImageError, match="c_empty"):
        image_folder(tmp_path)
    with pytest.raises(ImageError):
        image_folder(tmp_path / "nope")


# --- hostile inputs: links, loops, permissions, FIFOs, long strips, limits ----------------


def _png(path: Path, size: tuple[int, int] = (4, 4)) -> Path:
    return _save(Image.new("RGB", size, (9, 9, 9)), path)


@pytest.mark.timeout(20)
def test_symlink_loops_in_a_folder_are_listed_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    good = _png(root / "a.png")
    (root / "self.jpg").symlink_to("self.jpg")  # a file-named link loop: ELOOP on stat
    (root / "here").symlink_to(".")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("..")
    found = discover([root])
    assert list(found) == [good, root / "self.jpg"]
    assert sorted(f.path.name for f in found.failures) == ["here", "up"]
    for failure in found.failures:
        assert "symbolic link loop" in failure.reason and str(failure.path) in failure.reason
    loaded, failures = load_images(found)
    assert [x.path for x in loaded] == [good]
    assert "symbolic link loop" in failures[0].reason and "self.jpg" in failures[0].reason


@pytest.mark.timeout(20)
def test_glob_double_star_does_not_explode_on_link_loops(tmp_path: Path) -> None:
    good = _png(tmp_path / "g" / "x.png")
    (tmp_path / "g" / "l1").symlink_to(".")
    (tmp_path / "g" / "l2").symlink_to(".")  # glob.glob enumerates 2**40 paths here
    found = discover([f"{tmp_path}/g/**/*.png"])
    assert list(found) == [good]
    assert {f.path.name for f in found.failures} == {"l1", "l2"}
    deep = discover([f"{tmp_path}/g/" + "*/" * 30 + "*.png"])  # each level one directory
    assert len(deep) == 1 and os.path.samefile(deep[0], good)


def test_link_to_a_folder_outside_is_searched_once(tmp_path: Path) -> None:
    outside = _png(tmp_path / "outside" / "o.png")
    root = tmp_path / "imgs"
    _png(root / "a.png")
    (root / "link1").symlink_to(outside.parent)
    (root / "link2").symlink_to(outside.parent)
    found = discover([root])
    assert _rel(list(found), root) == ["a.png", "link1/o.png"] and found.failures == []


def test_explicit_broken_link_and_link_loop(tmp_path: Path) -> None:
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    with pytest.raises(ImageError, match="broken symbolic link") as exc:
        discover([tmp_path / "broken.png"])
    _assert_one_line_error(exc, tmp_path / "broken.png")
    with pytest.raises(ImageError, match="symbolic link loop"):
        discover([tmp_path / "loop.png"])
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_image(tmp_path / "broken.png")


@pytest.mark.timeout(20)
def test_image_folder_link_loops_are_not_classes(tmp_path: Path) -> None:
    from fgscope.images import image_folder

    root = tmp_path / "data"
    cat = _png(root / "cat" / "1.png")
    dog = _png(root / "dog" / "1.png")
    (root / "loop").symlink_to(".")
    (root / "parent").symlink_to("..")
    (root / "cat" / "back").symlink_to("..")  # would put the dogs in the cat class
    outside = _png(tmp_path / "elsewhere" / "fox.png")
    (root / "fox").symlink_to(outside.parent)  # a class elsewhere is fine
    ds = image_folder(root)
    assert ds.classes == ["cat", "dog", "fox"]
    assert ds.paths == [cat, dog, root / "fox" / "fox.png"] and ds.labels == [0, 1, 2]
    assert sorted(str(f.path.relative_to(root)) for f in ds.failures) == [
        "cat/back", "loop", "parent",
    ]
    assert all("symbolic link loop" in f.reason for f in ds.failures)


def test_unreadable_folders_are_listed_monkeypatched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fgscope.images import image_folder

    root = tmp_path / "data"
    ok = _png(root / "cat" / "1.png")
    _png(root / "cat" / "locked" / "2.png")
    _png(root / "dog" / "3.png")
    _deny_scandir(monkeypatch, root / "cat" / "locked", root / "dog")
    found = discover([root])
    assert list(found) == [ok]
    assert [(f.path, "permission denied" in f.reason) for f in found.failures] == [
        (root / "cat" / "locked", True), (root / "dog", True),
    ]
    ds = image_folder(root)  # the unreadable class is left out and listed
    assert ds.classes == ["cat"] and ds.paths == [ok]
    assert {f.path.name for f in ds.failures} == {"locked", "dog"}
    _png(root / "eel" / "hidden" / "4.png")  # readable class, nothing reachable in it
    _deny_scandir(monkeypatch, root / "eel" / "hidden")  # on top of the two above
    ds = image_folder(root)
    assert ds.classes == ["cat"] and ds.labels == [0]
    assert [f.path.name for f in ds.failures] == ["locked", "dog", "hidden", "eel"]
    assert "skipped class folder" in ds.failures[-1].reason
    _deny_scandir(monkeypatch, root)
    with pytest.raises(ImageError, match="permission denied") as exc:
        discover([root])
    _assert_one_line_error(exc, root)
    with pytest.raises(ImageError, match="permission denied"):
        image_folder(root)


def test_load_inputs_lists_discovery_failures_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fgscope.images import load_inputs

    good = _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"nope")
    _png(tmp_path / "imgs" / "locked" / "b.png")
    _deny_scandir(monkeypatch, tmp_path / "imgs" / "locked")
    loaded, failures = load_inputs([tmp_path / "imgs"])
    assert [x.path for x in loaded] == [good]
    assert [f.path.name for f in failures] == ["locked", "bad.png"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unreadable_folder_chmod(tmp_path: Path) -> None:
    ok = _png(tmp_path / "imgs" / "a.png")
    locked = tmp_path / "imgs" / "locked"
    _png(locked / "b.png")
    locked.chmod(0)
    try:
        found = discover([tmp_path / "imgs"])
        assert list(found) == [ok] and [f.path for f in found.failures] == [locked]
        assert "permission denied" in found.failures[0].reason
    finally:
        locked.chmod(0o755)


@pytest.mark.timeout(20)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_listed_never_opened(tmp_path: Path) -> None:
    good = _png(tmp_path / "imgs" / "a.png")
    fifo = tmp_path / "imgs" / "x.jpg"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "pipe")
    link = tmp_path / "imgs" / "y.jpg"
    link.symlink_to(tmp_path / "pipe")  # stat follows the link: refused like a FIFO
    found = discover([tmp_path / "imgs"])
    assert list(found) == [good, fifo, link]
    loaded, failures = load_images(found)
    assert [x.path for x in loaded] == [good] and [f.path for f in failures] == [fifo, link]
    assert all("not a regular file" in f.reason and "FIFO" in f.reason for f in failures)
    assert discover([fifo]) == [fifo]  # given directly: kept, then refused unopened
    with pytest.raises(ImageError, match="not a regular file") as exc:
        load_image(fifo)
    _assert_one_line_error(exc, fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        sha256_file(link)


def test_device_is_refused(tmp_path: Path) -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("needs /dev/zero")
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")  # would read forever
    with pytest.raises(ImageError, match="character device"):
        load_image(link)


def test_very_long_strip_refused_before_resizing(tmp_path: Path) -> None:
    from fgscope.images import MAX_RESIZED_PIXELS

    strip = _png(tmp_path / "strip.png", (40000, 1))
    assert load_image(strip).size == (40000, 1)  # without a resize there is nothing to refuse
    with pytest.raises(ImageError) as exc:
        load_image(strip, resize_size=256)
    message = _assert_one_line_error(exc, strip)
    assert str(strip) in message and "40000x1" in message and "10,240,000x256" in message
    assert f"{MAX_RESIZED_PIXELS:,}" in message
    assert load_image(_png(tmp_path / "ok.png", (1000, 10)), resize_size=256).size == (1000, 10)
    loaded, failures = load_images([strip], resize_size=256)
    assert loaded == [] and failures[0].path == strip


def test_resized_size_arithmetic() -> None:
    from fgscope.image_decode import resized_size

    assert resized_size((40000, 1), 256) == (10_240_000, 256)
    assert resized_size((1, 40000), 256) == (256, 10_240_000)
    assert resized_size((640, 480), 256) == (341, 256)
    assert resized_size((300, 300), 224) == (224, 224)


def test_max_pixels_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fgscope.images import resolve_max_pixels

    path = _png(tmp_path / "big.png", (100, 100))
    monkeypatch.setenv("FGSCOPE_MAX_PIXELS", "1_000")
    assert resolve_max_pixels() == 1000
    with pytest.raises(ImageError) as exc:
        load_image(path)
    message = _assert_one_line_error(exc, path)
    assert "FGSCOPE_MAX_PIXELS" in message and "1,000 pixels" in message
    assert load_image(path, max_pixels=None).size == (100, 100)  # an argument wins
    monkeypatch.setenv("FGSCOPE_MAX_PIXELS", "20,000")
    assert load_image(path).size == (100, 100)
    monkeypatch.setenv("FGSCOPE_MAX_PIXELS", "None")
    assert resolve_max_pixels() is None
    monkeypatch.delenv("FGSCOPE_MAX_PIXELS")
    assert resolve_max_pixels() == Image.MAX_IMAGE_PIXELS
    for bad in ("0", "-5", "lots", "1e9"):
        monkeypatch.setenv("FGSCOPE_MAX_PIXELS", bad)
        with pytest.raises(ConfigError, match="FGSCOPE_MAX_PIXELS"):
            load_image(path)


def test_paths_in_messages_are_exact(tmp_path: Path) -> None:
    spaced = tmp_path / "two  spaces.png"
    spaced.write_bytes(b"not an image")
    newline = tmp_path / "new\nline.png"
    newline.write_bytes(b"")
    _, failures = load_images([spaced, newline])
    assert str(spaced) in failures[0].reason  # not folded to one space
    assert repr(str(newline)) in failures[1].reason and "\n" not in failures[1].reason
    long = tmp_path / ("d" * 200) / ("n" * 200 + ".png")
    _, failures = load_images([long])
    assert str(long) in failures[0].reason  # never shortened


def test_nul_byte_in_a_path_is_an_image_error() -> None:
    loaded, failures = load_images(["a\0b.png"])
    assert loaded == [] and "NUL byte" in failures[0].reason


@pytest.mark.timeout(60)
def test_deep_tree_does_not_hit_the_recursion_limit(tmp_path: Path) -> None:
    folders = [str(tmp_path)]
    try:
        for _ in range(sys.getrecursionlimit() + 50):  # os.makedirs itself recurses
            folders.append(os.path.join(folders[-1], "d"))
            os.mkdir(folders[-1])
        Image.new("RGB", (2, 2)).save(os.path.join(folders[-1], "x.png"))
        assert len(discover([tmp_path])) == 1
    finally:  # removed here: pytest's recursive clean-up would fail on it in a later session
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folders[-1], "x.png"))
        for folder in reversed(folders[1:]):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(folder)
