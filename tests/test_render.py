"""Renderers on synthetic arrays only: exact pixels of grids, figures that build and save."""

from __future__ import annotations

import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from fgscope.layers.figures import geometry_figure, hierarchy_figure
from fgscope.render import (
    colorize,
    colormap_lut,
    render_grid,
    save_figure,
    save_png,
)
from fgscope.render import grid as G
from fgscope.render import text as T

M, GAP = G._MARGIN, G._GAP
BG = np.array(G._BG, np.uint8)


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def pitch_y(img: Image.Image, nrow: int, extra: int = 0) -> int:
    """Row pitch (tile + label band + gap) from the image height of an untitled grid."""
    h = img.height - 2 * M - extra + GAP
    assert h % nrow == 0
    return h // nrow


# --- colours ------------------------------------------------------------------------------


def test_colormap_lut_matches_matplotlib_and_is_cached() -> None:
    from matplotlib import colormaps

    lut = colormap_lut("viridis")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    ref = colormaps["viridis"](np.linspace(0, 1, 256), bytes=True)[:, :3]
    np.testing.assert_array_equal(lut, ref)
    assert colormap_lut("viridis") is lut
    with pytest.raises(ValueError, match="colormap"):
        colormap_lut("no-such-map")


def test_colorize_exact_indices_per_map_bounds() -> None:
    lut = colormap_lut()
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]], [[10.0, 20.0], [15.0, 30.0]]], np.float32)
    before = maps.copy()
    out = colorize(maps, lo=np.array([0.0, 10.0]), hi=np.array([3.0, 30.0]))
    assert out.shape == (2, 2, 2, 3) and out.dtype == np.uint8
    # x = (v - lo) / (hi - lo); index = min(int(x * 256), 255), as matplotlib does.
    np.testing.assert_array_equal(out[0], lut[[[0, 85], [170, 255]]])
    np.testing.assert_array_equal(out[1], lut[[[0, 128], [64, 255]]])
    np.testing.assert_array_equal(maps, before)


def test_colorize_constant_nan_inf_without_warnings() -> None:
    lut = colormap_lut()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        const = colorize(np.full((3, 3), 7.0), 7.0, 7.0)
        odd = colorize(np.array([[np.nan, np.inf], [-np.inf, 0.5]]), 0.0, 1.0)
    assert (const == lut[0]).all()
    np.testing.assert_array_equal(odd, lut[[[0, 255], [0, 128]]])


# --- grids --------------------------------------------------------------------------------


def test_tile_pixels_are_exact_lut_colours_nearest_upscaled() -> None:
    lut = colormap_lut()
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]]], np.float32)
    img = render_grid(maps)
    assert img.mode == "RGB"
    a = px(img)
    # A 2x2 map is upscaled by 48 to a 96 px tile at the margin; each quadrant one colour.
    tile = a[M : M + 96, M : M + 96]
    for (r, c), idx in {(0, 0): 0, (0, 1): 85, (1, 0): 170, (1, 1): 255}.items():
        q = tile[r * 48 : (r + 1) * 48, c * 48 : (c + 1) * 48]
        assert (q == lut[idx]).all(), (r, c)
    assert img.width == 2 * M + 96


def test_grid_size_arithmetic_16_tiles_is_4x4() -> None:
    lut = colormap_lut()
    rng = np.random.default_rng(0)
    maps = rng.random((20, 8, 8)).astype(np.float32)
    maps[1::2, 0, 0] = 2.0  # odd channels: top-left pixel is the maximum
    maps[0::2, 0, 0] = -1.0  # even channels: the minimum
    img = render_grid(maps, k=16)
    a = px(img)
    tw = 96  # 8 px maps, upscaled by 12
    assert img.width == 2 * M + 4 * tw + 3 * GAP
    py = pitch_y(img, 4)
    for i in range(16):
        r, c = divmod(i, 4)
        y, x = M + r * py, M + c * (tw + GAP)
        assert (a[y, x] == lut[255 if i % 2 else 0]).all(), i
        assert (a[y : y + 12, x : x + 12] == a[y, x]).all()  # one map pixel = a 12x12 block
        if c < 3:
            assert (a[y, x + tw : x + tw + GAP] == BG).all()  # the gap between tiles


def test_grid_k5_with_three_columns_and_channel_order() -> None:
    lut = colormap_lut()
    maps = np.zeros((8, 4, 4), np.float32)
    maps[:, 0, 0] = 1.0  # every tile: top-left pixel maximum, rest minimum
    maps[6] = 5.0  # a constant channel
    img = render_grid(maps, channels=[6, 0, 1, 2, 3, 4, 5], k=5, columns=3)
    a = px(img)
    tw = 96
    assert img.width == 2 * M + 3 * tw + 2 * GAP
    py = pitch_y(img, 2)
    assert (a[M : M + tw, M : M + tw] == lut[0]).all()  # channel 6 first, constant
    assert (a[M, M + tw + GAP] == lut[255]).all()  # then channel 0
    assert (a[M + py : M + py + tw, M + 2 * (tw + GAP)] == BG).all()  # sixth slot is empty


def test_layer_normalisation_uses_shared_range_and_draws_colorbar() -> None:
    lut = colormap_lut()
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 1, 1] = 1.0
    maps[1, 1, 1] = 4.0
    tile = render_grid(maps, normalize="tile")
    layer = render_grid(maps, normalize="layer")
    t, lay = px(tile), px(layer)
    corner = (M + 95, M + 95)  # bottom-right quadrant of tile 0 shows the value 1
    assert (t[corner] == lut[255]).all()
    assert (lay[corner] == lut[64]).all()  # 1 on the shared 0..4 scale
    assert (lay[corner[0], corner[1] + GAP + 96] == lut[255]).all()
    # The colorbar: one pixel row below the grid holds the whole ramp, ends included.
    rows = lay[layer.height - M - 20 : layer.height - M]
    hit = [r for r in rows if (r == lut[0]).all(-1).any() and (r == lut[255]).all(-1).any()]
    assert hit
    assert not (t[tile.height - M - 20 : tile.height - M] == lut[128]).all(-1).any()  # no ramp


def test_labels_are_drawn_on_dark_bands() -> None:
    maps = np.random.default_rng(1).random((4, 12, 12)).astype(np.float32)
    img = render_grid(maps, channels=[3, 1, 0, 2])
    a = px(img)
    py = pitch_y(img, 2)
    band = a[M + 96 : M + py - GAP, M : M + 96]
    assert len(np.unique(band.reshape(-1, 3), axis=0)) > 2  # text, not a flat band
    assert band.max() >= 230  # white text
    assert np.median(band) < 100  # on a dark band


def test_title_adds_a_header_and_wraps() -> None:
    maps = np.ones((1, 3, 3), np.float32)
    plain = render_grid(maps)
    title = " \u00b7 ".join(["layer4.2.conv3", "Conv2d", "2048x7x7", "stride 32", "rf 427 px"])
    titled = render_grid(maps, title=title)
    assert titled.height > plain.height
    font_w = T._width(title, 13)
    assert titled.width < font_w  # wrapped at the separators instead of one wide line


def test_constant_and_nan_maps_do_not_crash() -> None:
    lut = colormap_lut()
    maps = np.zeros((3, 5, 5), np.float32)
    maps[2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for norm in ("tile", "layer"):
            a = px(render_grid(maps, normalize=norm))
            assert (a[M : M + 95, M : M + 95] == lut[0]).all()


def test_overlay_tiles_have_the_image_size_and_blend() -> None:
    lut = colormap_lut()
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    maps = np.zeros((3, 4, 4), np.float32)  # constant: every overlay pixel blends lut[0]
    img = render_grid(maps, image=image, overlay=True)
    a = px(img).astype(int)
    assert img.width == 2 * M + 2 * 64 + GAP  # 3 tiles -> 2 columns of image-sized tiles
    tile = a[M : M + 48, M : M + 64]
    want = np.asarray(image) * (1 - G._ALPHA) + lut[0] * G._ALPHA
    assert np.abs(tile - want).max() <= 1
    assert (a[M : M + 48, M + 64] == BG).all()
    with pytest.raises(ValueError, match="image"):
        render_grid(maps, overlay=True)


def test_torch_tensor_input_matches_numpy_and_is_not_mutated() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(6, 7, 7)
    before = t.clone()
    a = px(render_grid(t, channels=[5, 2], title="t"))
    b = px(render_grid(t.numpy().copy(), channels=[5, 2], title="t"))
    np.testing.assert_array_equal(a, b)
    assert torch.equal(t, before)


def test_numpy_input_not_mutated_and_bad_arguments() -> None:
    maps = np.random.default_rng(3).normal(size=(5, 6, 6)).astype(np.float32)
    before = maps.copy()
    render_grid(maps, normalize="layer", tile_size=50)
    np.testing.assert_array_equal(maps, before)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        render_grid(maps[0])
    with pytest.raises(ValueError, match="normalize"):
        render_grid(maps, normalize="global")
    with pytest.raises(ValueError, match="out of range"):
        render_grid(maps, channels=[0, 9])
    with pytest.raises(ValueError, match="nothing to show"):
        render_grid(maps, channels=[])


def _clear_text_caches() -> None:
    for fn in (T.label_font, T._width, T._glyph, T._label):
        fn.cache_clear()


def test_pillow_builtin_font_fallback(monkeypatch) -> None:
    monkeypatch.setattr(T, "_dejavu_path", lambda: None)
    _clear_text_caches()
    try:
        maps = np.random.default_rng(7).normal(size=(2, 6, 6)).astype(np.float32)
        a = px(render_grid(maps, title="fallback \u00b7 2x6x6"))
        assert a.max() >= 230  # labels drawn
        assert T._text(T.label_font(12), "\u22120.20 \u2013 1.00") == "-0.20 - 1.00"
    finally:
        monkeypatch.undo()
        _clear_text_caches()
    assert T._text(T.label_font(12), "0.00\u20131.00") == "0.00\u20131.00"


def test_upsample_bilinear_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    m = np.random.default_rng(8).random((3, 5, 7)).astype(np.float32)
    ours = G.upsample_bilinear(m, (23, 40))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(m)[None], size=(23, 40), mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_explicit_tile_size_and_non_square_maps() -> None:
    maps = np.random.default_rng(4).random((2, 10, 20)).astype(np.float32)
    img = render_grid(maps, tile_size=50)  # longer side 20 -> 50: tiles 25 x 50
    assert img.width >= 2 * M + 2 * 50 + GAP
    a = px(render_grid(maps, k=1))  # 20 wide -> factor 5: a 50 x 100 tile
    assert (a[M : M + 5, M : M + 5] == a[M, M]).all()
    assert render_grid(maps, k=1).width == 2 * M + 100


def test_save_png_is_atomic_and_valid(tmp_path) -> None:
    img = render_grid(np.random.default_rng(5).random((4, 9, 9)).astype(np.float32))
    path = tmp_path / "grid.png"
    save_png(img, path)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with Image.open(path) as back:
        assert back.format == "PNG"
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), px(img))
    with pytest.raises(OSError):
        save_png(img, tmp_path / "missing" / "grid.png")
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


# --- figures ------------------------------------------------------------------------------


def _check_saved(paths, fmts) -> None:
    assert [p.suffix for p in paths] == [f".{f}" for f in fmts]
    for p in paths:
        data = p.read_bytes()
        if p.suffix == ".pdf":
            assert data.startswith(b"%PDF")
        elif p.suffix == ".svg":
            assert ET.fromstring(data).tag.endswith("svg")
        else:
            with Image.open(p) as im:
                assert im.format == "PNG" and im.width > 100
        assert not p.with_name(p.name + ".tmp").exists()


@pytest.mark.parametrize("n_img", [1, 3])
def test_hierarchy_figure_builds_and_saves(tmp_path, n_img: int) -> None:
    rng = np.random.default_rng(6)
    images = [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(n_img)
    ]
    columns = [
        (
            "features.3\nstride 4 \u00b7 rf 19 px\nearly",
            rng.random((n_img, 10, 12)).astype(np.float32),
        ),
        ("features.13\nstride 16 \u00b7 rf 155 px\nlate", np.zeros((n_img, 3, 3), np.float32)),
    ]
    before = [c[1].copy() for c in columns]
    fig = hierarchy_figure(images, columns, col_notes=["edges", "objects"])
    assert len(fig.axes) == n_img * 3 + 1  # panels + colorbar
    assert fig.get_figwidth() <= 16
    for (_, e), b in zip(columns, before, strict=True):
        np.testing.assert_array_equal(e, b)
    fmts = ("png", "pdf", "svg")
    paths = save_figure(fig, tmp_path / "hierarchy.png", formats=fmts)
    _check_saved(paths, fmts)
    assert len(fig.axes) == 0  # released after saving


def test_hierarchy_figure_rejects_mismatched_energy() -> None:
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="n_images"):
        hierarchy_figure([img], [("a", np.zeros((2, 3, 3)))])
    with pytest.raises(ValueError, match="col_notes"):
        hierarchy_figure([img], [("a", np.zeros((1, 3, 3)))], col_notes=["x", "y"])


def test_geometry_figure_builds_and_saves(tmp_path) -> None:
    rows = []
    for i in range(40):
        stage = "early" if i < 12 else "middle" if i < 30 else "late"
        spatial = None if i == 39 else 112 // 2 ** (i // 8)
        rows.append(
            {
                "index": i,
                "name": f"block{i}",
                "spatial": spatial,
                "channels": 16 * 2 ** (i // 10),
                "rf": None if i == 39 else 3 + 8.0 * i,
                "stage": stage,
            }
        )
    fig = geometry_figure(rows, (224, 224))
    assert len(fig.axes) >= 3
    labels = [t.get_text() for t in fig.axes[2].get_xticklabels()]
    assert labels == ["block0", "block12", "block30", "block39"]
    fmts = ("svg", "pdf", "png")
    _check_saved(save_figure(fig, tmp_path / "geometry", formats=fmts), fmts)
    with pytest.raises(ValueError, match="formats"):
        save_figure(geometry_figure(rows[:3], (64, 64)), tmp_path / "g", formats=("jpg",))
    with pytest.raises(ValueError, match="keys"):
        geometry_figure([{"index": 0, "name": "x"}], (8, 8))


def test_import_is_light_and_figures_never_use_pyplot() -> None:
    code = (
        "import sys, numpy as np\n"
        "import fgscope.render as r\n"
        "import fgscope.layers.figures as f\n"
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "r.render_grid(np.ones((2, 3, 3)))\n"
        "from PIL import Image\n"
        "f.hierarchy_figure([Image.new('RGB', (8, 8))], [('a', np.ones((1, 2, 2)))])\n"
        "assert 'matplotlib.pyplot' not in sys.modules and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the size of the smallest text, recorded in every PNG (the report keeps it readable) -------


def test_pngs_record_their_smallest_text_in_pixels(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image as _Image

    from fgscope.render import TEXT_PX_KEY, min_text_pt, render_grid, save_figure, save_png

    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.set_title("title", fontsize=11)
    ax.tick_params(labelsize=6.5)
    assert min_text_pt(fig) == 6.5  # tick labels count, without drawing
    save_figure(fig, tmp_path / "f.png", ("png", "svg"), dpi=144)
    with _Image.open(tmp_path / "f.png") as im:
        assert im.text[TEXT_PX_KEY] == "13.0"  # 6.5 pt at 144 dpi
    blank = Figure(figsize=(1, 1))
    blank.add_axes((0, 0, 1, 1)).set_axis_off()
    assert min_text_pt(blank) is None
    grid = render_grid(np.random.default_rng(0).random((4, 5, 5), dtype=np.float32))
    save_png(grid, tmp_path / "g.png")
    with _Image.open(tmp_path / "g.png") as im:
        assert float(im.text[TEXT_PX_KEY]) >= 11  # the tile labels


def test_report_images_keep_text_readable(tmp_path):
    import re

    from PIL import Image as _Image
    from PIL.PngImagePlugin import PngInfo

    from fgscope.render import TEXT_PX_KEY
    from fgscope.report.html import READABLE_PX, img_html

    info = PngInfo()
    info.add_text(TEXT_PX_KEY, "16")
    _Image.new("RGB", (2000, 500)).save(tmp_path / "wide.png", pnginfo=info)
    html = img_html(tmp_path / "wide.png", "a wide figure")
    min_w = int(re.search(r'min-width:(\d+)px', html).group(1))
    assert min_w * 16 / 2000 >= READABLE_PX and min_w < 1100  # shown at >= 8 px text, no wider
    assert 'data-text-px="16"' in html and '<div class="pan">' in html and 'class="swipe"' in html
    _Image.new("RGB", (100, 50)).save(tmp_path / "plain.png")  # no record: 11 px assumed
    assert 'data-text-px="11"' in img_html(tmp_path / "plain.png", "x")
