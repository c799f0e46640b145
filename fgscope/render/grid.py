"""Activation grids composed with numpy and Pillow: fast, and every pixel exactly the data.

`render_grid(maps, channels)` turns the `(C, H, W)` activations of one image at one layer into
one RGB picture: a near-square grid of tiles, one per channel, each labelled with its channel
index and value range, optionally under a title line and over a shared-scale colorbar.

How it stays fast (see `bench/render.py`): the shown maps are colourised in one numpy call on
their small native size (a lookup table indexed by uint8), upscaled by whole pixels (nearest
neighbour: no blurring, exact pixels), and written into one preallocated canvas of packed
pixels through a strided view. Text is drawn with `ImageDraw` into small cached arrays that are
copied in: whole strings for titles, cached glyphs for the tile labels that change from grid to
grid (`ch 37`, `0.00–4.12`); see `text.py`.

Conventions:
- value -> colour follows matplotlib: `x = (v - lo) / (hi - lo)`, colour `lut[min(int(x * 256),
  255)]`; a constant map (`hi == lo`) and NaN get the lowest colour, +inf the highest.
- PNG files are written with `PNG_PARAMS`: zlib level 1. On ResNet-50 grids it gives files
  about 13% larger than level 9 (78 vs 69 kB per grid) at 1/19 of the encoding time (4.7 vs
  89 ms) and half that of level 6; level 0 (no compression) is 10x larger.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fgscope.render.resample import _nearest_index, upsample_bilinear
from fgscope.render.text import (
    _PIXEL,
    _fmt,
    _line_height,
    _pack,
    _paste_text,
    _range_text,
    _width,
    _wrap,
    label_font,
)

__all__ = [
    "PNG_PARAMS",
    "TEXT_PX_KEY",
    "colormap_lut",
    "colorize",
    "render_grid",
    "save_png",
    "label_font",
    "upsample_bilinear",
]

PNG_PARAMS: dict[str, Any] = {"compress_level": 1}
"""Keyword arguments of `PIL.Image.save` for every PNG fgscope writes."""

TEXT_PX_KEY = "fgscope:min-text-px"
"""PNG text chunk: the size of the picture's smallest text in pixels (see `save_png`)."""

_MIN_TILE = 96  # default: small maps are upscaled (by an integer factor) to at least this
_GAP = 3  # px between tiles
_MARGIN = 8  # px around the grid
_PAD = 2  # px between a label band's edge and its text
_BG = (30, 30, 30)  # canvas and gaps
_BAND = (62, 62, 62)  # label bands: apart from the colormaps' black, white text readable
_ALPHA = 0.55  # overlay: weight of the colourised map over the image


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


def _rgb32(color: tuple[int, int, int]) -> int:
    """An RGB colour as one pixel of the packed canvas (bytes R, G, B, 0 in memory)."""
    return int(color[0]) | int(color[1]) << 8 | int(color[2]) << 16


@functools.lru_cache(maxsize=32)
def _lut32(name: str) -> np.ndarray:
    lut = _pack(colormap_lut(name))
    lut.setflags(write=False)
    return lut


# --- geometry helpers ----------------------------------------------------------------------


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

    out = Image.frombytes("RGB", (width, height), canvas.tobytes(), "raw", "RGBX")
    out.info[TEXT_PX_KEY] = str(fs)  # the tile labels: the smallest text (see save_png)
    return out


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
    then renamed over `path`, so a reader never sees a half-written file. The size of its
    smallest text (`img.info[TEXT_PX_KEY]`, set by `render_grid`) is kept in the file."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    extra: dict[str, Any] = {}
    if TEXT_PX_KEY in img.info:
        extra["pnginfo"] = PngInfo()
        extra["pnginfo"].add_text(TEXT_PX_KEY, str(img.info[TEXT_PX_KEY]))
    try:
        img.save(tmp, format="PNG", **PNG_PARAMS, **extra)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
