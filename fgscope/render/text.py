"""Text of activation grids: the label font, and labels drawn once and cached as pixel blocks.

Labels are drawn with Pillow's `ImageDraw` into small arrays of packed pixels (`_PIXEL`, the
format of `render_grid`'s canvas, defined here as labels are made in it) that it copies in:
whole strings for titles, cached glyphs for the tile labels that change from grid to grid
(`ch 37`, `0.00–4.12`). Also the formatting of values and ranges for labels, and the wrapping
of titles.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["label_font"]

_FG = (255, 255, 255)  # text

# The canvas holds one little-endian uint32 per pixel, bytes R, G, B, 0: filling, colour lookup
# and pasting move whole pixels (numpy is slow on a trailing axis of 3), and Pillow unpacks
# it to RGB in C ("RGBX" raw mode).
_PIXEL = np.dtype("<u4")


def _pack(rgb: np.ndarray) -> np.ndarray:
    """`(..., 3)` uint8 -> `(...)` packed pixels (`_PIXEL`)."""
    out = np.zeros(rgb.shape[:-1] + (4,), np.uint8)
    out[..., :3] = rgb
    return out.view(_PIXEL)[..., 0]


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
