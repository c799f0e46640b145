"""Activation grids composed with numpy and Pillow: fast, and every pixel exactly the data.

`render_grid(maps, channels)` turns the `(C, H, W)` activations of one image at one layer into
one RGB picture: a near-square grid of tiles, one per channel, each labelled with its channel
index and value range, optionally under a title line and over a shared-scale colorbar.

How it stays fast (see `bench/render.py`): the shown maps are colourised in one numpy call on
their small native size (a lookup table indexed by uint8), upscaled by whole pixels (nearest
neighbour: no blurring, exact pixels), and written into one preallocated canvas of packed
pixels through a strided view. Text is drawn with `ImageDraw` into small cached arrays that are
copied in: whole strings for titles, cached glyphs for the tile labels that change from grid to
grid (`ch 37`, `0.00–4.12`).

Conventions:
- value -> colour follows matplotlib: `x = (v - lo) / (hi - lo)`, colour `lut[min(int(x * 256),
  255)]`; a constant map (`hi == lo`) and NaN get the lowest colour, +inf the highest.
- PNG files are written with `PNG_PARAMS`: zlib level 1. On ResNet-50 grids it gives files
  about 13% larger than level 9 (78 vs 69 kB per grid) at 1/19 of the encoding time (4.7 vs
  89 ms) and half that of level 6; level 0 (no compression) is 10x larger.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "PNG_PARAMS",
    "colormap_lut",
    "colorize",
    "render_grid",
    "save_png",
    "label_font",
    "upsample_bilinear",
]

PNG_PARAMS: dict[str, Any] = {"compress_level": 1}
"""Keyword arguments of `PIL.Image.save` for every PNG fgscope writes."""

_MIN_TILE = 96  # default: small maps are upscaled (by an integer factor) to at least this
_GAP = 3  # px between tiles
_MARGIN = 8  # px around the grid
_PAD = 2  # px between a label band's edge and its text
_BG = (30, 30, 30)  # canvas and gaps
_BAND = (62, 62, 62)  # label bands: apart from the colormaps' black, white text readable
_FG = (255, 255, 255)  # text
_ALPHA = 0.55  # overlay: weight of the colourised map over the image
# The canvas holds one little-endian uint32 per pixel, bytes R, G, B, 0: filling, colour lookup
# and pasting move whole pixels (numpy is slow on a trailing axis of 3), and Pillow unpacks
# it to RGB in C ("RGBX" raw mode).
_PIXEL = np.dtype("<u4")


# --- colours -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps  # lazy: matplotlib costs ~150 ms to import

    try:
        cmap = colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colormap {name!r}; use a matplotlib name such as inferno, viridis, gray"
        ) from None
    lut = cmap(np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
    lut = np.ascontiguousarray(lut, dtype=np.uint8)
    lut.setflags(write=False)
    return lut


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """The 256 colours of a matplotlib colormap.

    Returns:
        `(256, 3)` uint8, read-only and cached (one array per name).

    Raises:
        ValueError: `name` is not a registered matplotlib colormap.
    """
    return _lut(name)


def _per_map(v: Any, nd: int) -> np.ndarray:
    """A scalar or per-map array of bounds, shaped to broadcast over `(..., H, W)`."""
    a = np.asarray(v, dtype=np.float32)
    if 0 < a.ndim <= nd - 2:
        a = a.reshape(a.shape + (1, 1))
    return a


def _indices(maps: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    """`(..., H, W)` float -> `(..., H, W)` uint8 colormap indices (see module conventions)."""
    m = np.asarray(maps, dtype=np.float32)
    lo_a = _per_map(lo, m.ndim)
    span = _per_map(hi, m.ndim) - lo_a
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = np.where(span > 0, np.float32(256.0) / span, np.float32(0.0)).astype(np.float32)
        t = (m - lo_a) * scale  # a new array: the input is never written
        # fmax/fmin drop NaN (-> 0) and clamp infinities; also covers 0 * inf.
        np.fmax(t, 0.0, out=t)
        np.fmin(t, 255.0, out=t)
    return t.astype(np.uint8)


def colorize(maps: np.ndarray, lo: Any, hi: Any, cmap: str = "inferno") -> np.ndarray:
    """Map values to colours with a fixed range.

    Args:
        maps: `(..., H, W)` float values (not modified).
        lo, hi: the values shown as the lowest and highest colour: scalars, or one per map
            (shape `maps.shape[:-2]`, or anything broadcastable to `maps`). Where `hi <= lo`
            (a constant map) everything gets the lowest colour.
        cmap: a matplotlib colormap name.

    Returns:
        `(..., H, W, 3)` uint8 RGB.
    """
    return colormap_lut(cmap)[_indices(maps, lo, hi)]


# --- text ------------------------------------------------------------------------------------


def _dejavu_path() -> str | None:
    # Found without importing matplotlib (which ships the font in its data folder).
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=16)
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The TrueType font of grid labels at `size` px, cached.

    DejaVu Sans from matplotlib's data folder comes first: Pillow's built-in scalable font
    (`ImageFont.load_default(size=...)`, Aileron) lacks glyphs fgscope prints, such as the
    en dash of value ranges and the multiplication sign. The built-in font is the fallback
    (then those characters are written as ASCII, see `_text`).
    """
    path = _dejavu_path()
    if path is not None:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


_ASCII = str.maketrans({"\u2013": "-", "\u2212": "-", "\u00d7": "x"})


def _text(font: Any, text: str) -> str:
    """`text` in characters `font` can draw."""
    path = getattr(font, "path", None)
    if isinstance(path, str) and path.endswith("DejaVuSans.ttf"):
        return text
    return text.translate(_ASCII)


def _line_height(font: Any) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return font.getbbox("Ag")[3] + 2  # a bitmap font (Pillow without FreeType)


@functools.lru_cache(maxsize=16384)
def _width(text: str, size: int) -> int:
    """Advance width of `text` in px at `size`."""
    font = label_font(size)
    return math.ceil(font.getlength(_text(font, text)))


def _rgb32(color: tuple[int, int, int]) -> int:
    """An RGB colour as one pixel of the packed canvas (bytes R, G, B, 0 in memory)."""
    return int(color[0]) | int(color[1]) << 8 | int(color[2]) << 16


def _pack(rgb: np.ndarray) -> np.ndarray:
    """`(..., 3)` uint8 -> `(...)` packed pixels (`_PIXEL`)."""
    out = np.zeros(rgb.shape[:-1] + (4,), np.uint8)
    out[..., :3] = rgb
    return out.view(_PIXEL)[..., 0]


@functools.lru_cache(maxsize=32)
def _lut32(name: str) -> np.ndarray:
    lut = _pack(colormap_lut(name))
    lut.setflags(write=False)
    return lut


# Tile labels (`ch 37`, `0.00–4.12`) are new in almost every grid; drawing each with FreeType
# would be most of a grid's cost, so strings of these characters are set from cached glyphs
# (DejaVu has no kerning between them, so this matches drawing the whole string).
_GLYPH_CHARS = frozenset("0123456789.+-e chonst\u2212\u2013")


@functools.lru_cache(maxsize=1024)
def _glyph(ch: str, size: int) -> tuple[np.ndarray, float]:
    """One character drawn with ImageDraw: (alpha `(line height, w)` with one px of room on
    the left, advance in px)."""
    font = label_font(size)
    t = _text(font, ch)
    adv = font.getlength(t)
    img = Image.new("L", (math.ceil(adv) + 3, _line_height(font)), 0)
    ImageDraw.Draw(img).text((1, 0), t, font=font, fill=255)
    return np.asarray(img), adv


def _alpha(text: str, size: int) -> np.ndarray:
    """`text` as a coverage mask `(line height, width)` uint8."""
    font = label_font(size)
    width = max(1, _width(text, size))
    if set(text) <= _GLYPH_CHARS:
        out = np.zeros((_line_height(font), width + 3), np.uint8)
        pen = 0.0
        for ch in text:
            g, adv = _glyph(ch, size)
            x = round(pen)
            dst = out[:, x : x + g.shape[1]]
            np.maximum(dst, g[:, : dst.shape[1]], out=dst)
            pen += adv
        return out[:, 1 : width + 1]
    img = Image.new("L", (width, _line_height(font)), 0)
    ImageDraw.Draw(img).text((0, 0), _text(font, text), font=font, fill=255)
    return np.asarray(img)


@functools.lru_cache(maxsize=16)
def _ink(bg: tuple[int, int, int]) -> np.ndarray:
    """Packed colours of `_FG` over `bg` at coverage 0..255 (how ImageDraw blends)."""
    a = np.arange(256, dtype=np.float32)[:, None] / 255.0
    rgb = np.asarray(bg, np.float32) * (1.0 - a) + np.asarray(_FG, np.float32) * a
    return _pack((rgb + 0.5).astype(np.uint8))


@functools.lru_cache(maxsize=8192)
def _label(text: str, size: int, bg: tuple[int, int, int]) -> np.ndarray:
    """`text` in white on `bg`: read-only `(line height, width)` packed pixels, cached."""
    arr = _ink(bg)[_alpha(text, size)]
    arr.setflags(write=False)
    return arr


def _paste_text(
    canvas: np.ndarray, text: str, size: int, x: int, y: int, bg: tuple, max_w: int | None = None
) -> None:
    """Copy a cached label into `canvas` with its top-left at (x, y), cropped to fit."""
    lab = _label(text, size, bg)
    h = min(lab.shape[0], canvas.shape[0] - y)
    w = min(lab.shape[1], canvas.shape[1] - x, max_w if max_w is not None else lab.shape[1])
    if h > 0 and w > 0:
        canvas[y : y + h, x : x + w] = lab[:h, :w]


def _fmt(v: float) -> str:
    """A value in at most ~6 characters, with a true minus sign."""
    a = abs(v)
    if v == 0 or 0.01 <= a < 1000:
        s = f"{v:.2f}"
    elif 1000 <= a < 100000:
        s = f"{v:.0f}"
    else:
        s = f"{v:.2g}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
    return s.replace("-", "\u2212")


def _range_text(lo: float, hi: float) -> str:
    """`0.00–4.12`; spaced (`−1.20 – 3.00`) when a sign could be misread as the dash; one
    value for a constant map."""
    a, b = _fmt(lo), _fmt(hi)
    if a == b:
        return f"const {a}"
    return f"{a} \u2013 {b}" if lo < 0 or hi < 0 else f"{a}\u2013{b}"


def _wrap(text: str, size: int, width: int) -> list[str]:
    """Greedy wrap at ` · ` separators (then spaces) so each line fits `width` if it can."""
    lines: list[str] = []
    for para in text.split("\n"):
        sep = " \u00b7 " if " \u00b7 " in para else " "
        cur = ""
        for part in para.split(sep):
            cand = f"{cur}{sep}{part}" if cur else part
            if cur and _width(cand, size) > width:
                lines.append(cur)
                cur = part
            else:
                cur = cand
        lines.append(cur)
    return lines


# --- geometry helpers ----------------------------------------------------------------------


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # Pixel-centre nearest neighbour; equals np.repeat for integer factors.
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`(n_out, n_in)` weights of bilinear resampling (half-pixel centres, edges clamped)."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = x - i0
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, i0), 1.0 - f)
    np.add.at(mat, (rows, i1), f)
    return mat


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(..., h, w)` -> `(..., H, W)` float32 for `size = (H, W)`, bilinear (like PIL/torch
    with `align_corners=False`), a convex combination so per-map min/max never grow."""
    m = np.asarray(maps, dtype=np.float32)
    ry = _bilinear_matrix(m.shape[-2], size[0])
    rx = _bilinear_matrix(m.shape[-1], size[1])
    return ry @ m @ rx.T


def _default_columns(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


def _tile_shape(h: int, w: int, tile_size: int | None) -> tuple[int, int]:
    if tile_size is None:
        f = math.ceil(_MIN_TILE / max(h, w)) if max(h, w) < _MIN_TILE else 1
        return h * f, w * f
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}")
    s = tile_size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _as_numpy(maps: Any, chosen: list[int]) -> np.ndarray:
    """The chosen channels as a new float32 `(n, H, W)` array (torch tensors without torch)."""
    if hasattr(maps, "detach") and hasattr(maps, "cpu"):
        sel = maps.detach()[list(chosen)].cpu().float().numpy()
    else:
        sel = np.asarray(maps)[chosen]
    return np.asarray(sel, dtype=np.float32)


def _finite_min_max(a: np.ndarray, axis: Any) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = a.min(axis=axis), a.max(axis=axis)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        f = np.where(np.isfinite(a), a, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN maps
            lo, hi = np.nanmin(f, axis=axis), np.nanmax(f, axis=axis)
        lo, hi = np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=0.0)
    return lo, hi


# --- the grid ------------------------------------------------------------------------------


def render_grid(
    maps: Any,
    channels: Sequence[int] | None = None,
    k: int = 16,
    normalize: str = "tile",
    cmap: str = "inferno",
    tile_size: int | None = None,
    image: Image.Image | None = None,
    overlay: bool = False,
    title: str | None = None,
    columns: int | None = None,
) -> Image.Image:
    """One image's activations at one layer as a labelled grid of channel tiles.

    Args:
        maps: `(C, H, W)` activations of one image (numpy array or torch tensor; not modified).
        channels: the channels to show, in this order (ranked by the caller); at most `k` of
            them are shown. None: the first `k` channels.
        k: the most tiles to show.
        normalize: `"tile"`: each tile spans its own min..max, labelled under the tile;
            `"layer"`: one min..max over all shown tiles, drawn as a colorbar at the bottom.
        cmap: a matplotlib colormap name.
        tile_size: side of the longer tile edge in px. Default: the map's own size, upscaled
            by the smallest integer factor that makes it at least 96 px (nearest neighbour,
            never blurred); with `overlay`, the image's size.
        image: the input image at the model's (preprocessed) size; needed for `overlay`.
        overlay: blend each map, upsampled bilinearly to the image, over the image
            (alpha 0.55) instead of plain tiles.
        title: one header line, e.g. `"features.6 · InvertedResidual · 32x28x28 · stride 8"`;
            wrapped at ` · ` when wider than the grid.
        columns: tiles per row; default `ceil(sqrt(n))` (4 for 16 tiles).

    Returns:
        An RGB `PIL.Image.Image`.

    Raises:
        ValueError: `maps` is not 3-D, a channel is out of range, nothing to show, an
            unknown `normalize` or colormap, or `overlay` without `image`.
    """
    shape = tuple(maps.shape)
    if len(shape) != 3:
        raise ValueError(f"maps must be (C, H, W) for one image, got shape {shape}")
    n_ch, h, w = shape
    if normalize not in ("tile", "layer"):
        raise ValueError(f"normalize must be 'tile' or 'layer', got {normalize!r}")
    if overlay and image is None:
        raise ValueError("overlay=True needs the input image (image=...)")
    chosen = list(range(n_ch))[:k] if channels is None else [int(c) for c in channels][:k]
    if not chosen or h == 0 or w == 0:
        raise ValueError(f"nothing to show: {len(chosen)} channels of a {h}x{w} map")
    bad = [c for c in chosen if not 0 <= c < n_ch]
    if bad:
        raise ValueError(f"channels {bad} out of range for a map with {n_ch} channels")
    lut32 = _lut32(cmap)

    data = _as_numpy(maps, chosen)  # (n, h, w) float32, a copy
    n = len(chosen)
    lo, hi = _finite_min_max(data, axis=(1, 2))  # (n,), (n,)
    if normalize == "layer":
        lo_n = np.full(n, lo.min(), np.float32)
        hi_n = np.full(n, hi.max(), np.float32)
    else:
        lo_n, hi_n = lo, hi

    # Tile pixels, (n, th, tw) packed.
    if overlay:
        assert image is not None
        base = image.convert("RGB")
        if tile_size is not None:
            s = tile_size / max(base.size)
            base = base.resize((max(1, round(base.width * s)), max(1, round(base.height * s))))
        th, tw = base.height, base.width
        up = upsample_bilinear(data, (th, tw))
        col = colormap_lut(cmap)[_indices(up, lo_n, hi_n)].astype(np.float32)
        img = np.asarray(base, dtype=np.float32)
        tiles = _pack((col * _ALPHA + img * (1.0 - _ALPHA) + 0.5).astype(np.uint8))
    else:
        th, tw = _tile_shape(h, w, tile_size)
        tiles = np.take(lut32, _indices(data, lo_n, hi_n))  # colour the small maps, then
        fy, fx = divmod(th, h), divmod(tw, w)  # upscale whole pixels
        if fy[1] == 0 and fx[1] == 0:
            if fy[0] > 1:
                tiles = tiles.repeat(fy[0], axis=1)
            if fx[0] > 1:
                tiles = tiles.repeat(fx[0], axis=2)
        else:
            tiles = tiles[:, _nearest_index(h, th)[:, None], _nearest_index(w, tw)[None, :]]

    # Layout.
    ncol = max(1, min(columns or _default_columns(n), n))
    nrow = math.ceil(n / ncol)
    fs = int(np.clip(round(tw / 9.5), 11, 16))
    lh = _line_height(label_font(fs))
    ch_texts = [f"ch {c}" for c in chosen]
    rng_texts = [_range_text(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]
    two_lines = False
    if normalize == "tile":
        widest = max(
            _width(a, fs) + _width(b, fs) for a, b in zip(ch_texts, rng_texts, strict=True)
        )
        two_lines = widest + 2 * _PAD + 8 > tw
    band = (2 if two_lines else 1) * lh + 2 * _PAD
    pitch_y, pitch_x = th + band + _GAP, tw + _GAP
    grid_w, grid_h = ncol * pitch_x - _GAP, nrow * pitch_y - _GAP

    tfs = fs + 2
    title_lines = _wrap(title, tfs, grid_w) if title else []
    tlh = _line_height(label_font(tfs))
    title_w = max((_width(t, tfs) for t in title_lines), default=0)
    title_h = len(title_lines) * tlh + _MARGIN // 2 if title_lines else 0
    cb_h = lh + _MARGIN if normalize == "layer" else 0

    width = max(grid_w, title_w) + 2 * _MARGIN
    height = _MARGIN + title_h + grid_h + cb_h + _MARGIN
    x0 = (width - grid_w) // 2
    y0 = _MARGIN + title_h
    canvas = np.empty((height, width), _PIXEL)
    canvas[:] = _rgb32(_BG)

    # Tiles and bands through one strided view (nrow, pitch_y, ncol, pitch_x); the last row's
    # and column's trailing gap lies inside the margin (_MARGIN >= _GAP).
    cells = canvas[y0 : y0 + nrow * pitch_y, x0 : x0 + ncol * pitch_x].reshape(
        nrow, pitch_y, ncol, pitch_x
    )
    full, rest = divmod(n, ncol)
    if full:
        grid_tiles = tiles[: full * ncol].reshape(full, ncol, th, tw).transpose(0, 2, 1, 3)
        cells[:full, :th, :, :tw] = grid_tiles
        cells[:full, th : th + band, :, :tw] = _rgb32(_BAND)
    if rest:
        cells[full, :th, :rest, :tw] = tiles[full * ncol :].transpose(1, 0, 2)
        cells[full, th : th + band, :rest, :tw] = _rgb32(_BAND)

    # Text: labels drawn once with ImageDraw (cached), copied in as pixel blocks.
    inner = tw - 2 * _PAD - 2
    for i in range(n):
        r, c = divmod(i, ncol)
        x = x0 + c * pitch_x + _PAD + 1
        y = y0 + r * pitch_y + th + _PAD
        _paste_text(canvas, ch_texts[i], fs, x, y, _BAND, max_w=inner)
        if normalize == "tile" and two_lines:
            _paste_text(canvas, rng_texts[i], fs, x, y + lh, _BAND, max_w=inner)
        elif normalize == "tile":
            _paste_text(canvas, rng_texts[i], fs, x + inner - _width(rng_texts[i], fs), y, _BAND)
    for j, line in enumerate(title_lines):
        _paste_text(canvas, line, tfs, _MARGIN, _MARGIN + j * tlh, _BG)
    if normalize == "layer":
        texts = (_fmt(float(lo_n[0])), _fmt(float(hi_n[0])))
        _colorbar(canvas, lut32, texts, fs, x0, y0 + grid_h + _MARGIN, grid_w, lh)

    return Image.frombytes("RGB", (width, height), canvas.tobytes(), "raw", "RGBX")


def _colorbar(
    canvas: np.ndarray,
    lut32: np.ndarray,
    texts: tuple[str, str],
    fs: int,
    x: int,
    y: int,
    width: int,
    lh: int,
) -> None:
    """`min [colour ramp] max` in one row of height `lh` starting at (x, y)."""
    lo_w, hi_w = _width(texts[0], fs), _width(texts[1], fs)
    bar_x0, bar_x1 = x + lo_w + 6, x + width - hi_w - 6
    labels = bar_x1 - bar_x0 >= 16
    if not labels:  # too narrow for labels beside it: the ramp alone
        bar_x0, bar_x1 = x, x + width
    bar_h = max(6, lh - 6)
    by = y + (lh - bar_h) // 2
    canvas[by : by + bar_h, bar_x0:bar_x1] = lut32[
        np.linspace(0, 255, bar_x1 - bar_x0).astype(np.intp)
    ]
    if labels:
        _paste_text(canvas, texts[0], fs, x, y, _BG)
        _paste_text(canvas, texts[1], fs, x + width - hi_w, y, _BG)


def save_png(img: Image.Image, path: str | os.PathLike[str]) -> None:
    """Write `img` as PNG with `PNG_PARAMS`, atomically: to `<path>.tmp` in the same folder,
    then renamed over `path`, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        img.save(tmp, format="PNG", **PNG_PARAMS)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
