"""The `fgscope cam` pictures: a Grad-CAM map blended over its image (`cam_overlay`) and the
figure of every layer's map in rows of at most six panels (`cam_figure`, a matplotlib
`Figure`).

matplotlib is imported inside `cam_figure` only."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from fgscope.cam.compute import CamResult

__all__ = ["cam_overlay", "cam_figure", "cam_title", "fmt_value", "panel_rows", "shown_layers",
           "MAX_PER_ROW", "MAX_LAYERS"]


def cam_overlay(display: Image.Image, cam: Tensor | np.ndarray, alpha: float | None = None) -> np.ndarray:
    """The map, divided by its max (display only), upsampled bilinearly to the image and
    blended over it with the style's colormap: (H, W, 3) uint8. An all-zero map leaves the
    image darkened by the colormap's lowest colour."""
    from fgscope.render.grid import colorize, upsample_bilinear
    from fgscope.render.style import STYLE

    base = np.asarray(display.convert("RGB"), dtype=np.float32)
    m = np.asarray(cam, dtype=np.float32)
    hi = float(m.max()) if m.size else 0.0
    norm = m / hi if hi > 0 else np.zeros_like(m)
    up = upsample_bilinear(norm, base.shape[:2])
    col = colorize(up, 0.0, 1.0, STYLE["cmap"]).astype(np.float32)
    a = STYLE["overlay_alpha"] if alpha is None else alpha
    return (col * a + base * (1.0 - a) + 0.5).astype(np.uint8)


def fmt_value(v: float | None) -> str:
    """A stride or receptive field for labels: `?` when unknown."""
    return "?" if v is None else f"{v:g}"


def cam_title(result: CamResult) -> str:
    """The figure's title, also printed by `fgscope cam`: what was differentiated, and its value."""
    if result.contrast is not None:
        a, b = result.contrast
        return f"Grad-CAM of logit {a.show()} − logit {b.show()} = {result.score:.3g}"
    return f"Grad-CAM of {result.target.show()}, logit {result.score:.3g}"


MAX_PER_ROW = 6
"""Panels per row of `cam_figure` (the image counts as one): 2 in each, 13 in with the colorbar."""
MAX_LAYERS = 23
"""Layer panels `cam_figure` draws at most (with the image, four rows of six); more are
thinned evenly over depth, and the figure says how many are left out."""


def panel_rows(n: int, per_row: int = MAX_PER_ROW) -> list[int]:
    """Panels in each row for `n` panels, at most `per_row` a row, rows balanced
    (10 panels: [5, 5], not [6, 4])."""
    if n <= 0:
        return []
    rows = math.ceil(n / per_row)
    base, extra = divmod(n, rows)
    return [base + 1] * extra + [base] * (rows - extra)


def shown_layers(n: int, limit: int = MAX_LAYERS) -> list[int]:
    """Indices of the layers drawn: all of them, or `limit` spread evenly over depth with
    the first and the last always kept."""
    if n <= limit:
        return list(range(n))
    if limit == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def cam_figure(result: CamResult, *, max_layers: int = MAX_LAYERS, per_row: int = MAX_PER_ROW) -> Figure:
    """Rows of panels: the image (with its top prediction), then per layer its Grad-CAM over
    it, each divided by its own max, the peak marked; titled with layer, stride, receptive
    field and stage; the raw max under each panel. At most `per_row` panels a row (rows
    balanced) and `max_layers` layer panels (spread over depth; a note under the figure says
    how many are left out and where they are)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from fgscope.render.style import STYLE, style_context

    keep = shown_layers(len(result.layers), max_layers)
    layers = [result.layers[i] for i in keep]
    left_out = len(result.layers) - len(layers)
    counts = panel_rows(1 + len(layers), per_row)
    n_col = max(counts)
    left, gap, cb_gap, cb_w, cb_text = 0.08, 0.08, 0.15, 0.14, 0.75
    fixed = left + (n_col - 1) * gap + cb_gap + cb_w + cb_text
    pw = min(STYLE["panel_in"], (STYLE["max_width_in"] - fixed) / n_col)
    w_img, h_img = result.display.size
    ph = pw * h_img / w_img
    size = STYLE["label_size"] if pw >= 1.6 else STYLE["font_size"]
    line = size / 72 * 1.3
    head, foot = 3 * line + 0.1, line + 0.15
    top_h = 0.35  # the suptitle
    note_h = line + 0.1 if left_out else 0.0
    row_h = head + ph + foot
    fw, fh = fixed + n_col * pw, top_h + len(counts) * row_h + note_h
    base = np.asarray(result.display.convert("RGB"))
    with style_context():
        fig = Figure(figsize=(fw, fh))
        fig.suptitle(cam_title(result), y=1 - 0.08 / fh, va="top", fontsize=STYLE["title_size"])
        k = 0
        for r, count in enumerate(counts):
            y0 = fh - top_h - r * row_h - head - ph
            for c in range(count):
                ax = fig.add_axes(((left + c * (pw + gap)) / fw, y0 / fh, pw / fw, ph / fh))
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.imshow(base, interpolation="nearest", aspect="auto")
                    pred = f"\n{result.top5[0][0]} {result.top5[0][1]:.0%}" if result.top5 else ""
                    ax.set_title(f"input{pred}", fontsize=size, pad=4)
                    k += 1
                    continue
                lay = layers[k - 1]
                k += 1
                ax.imshow(cam_overlay(result.display, lay.cam), interpolation="nearest", aspect="auto")
                if lay.peak is not None:
                    ax.plot([lay.peak[1]], [lay.peak[0]], marker="+", ms=9, mew=1.6, color="#00e5ff")
                ax.set_xlim(-0.5, w_img - 0.5)
                ax.set_ylim(h_img - 0.5, -0.5)
                geo = " · ".join(x for x in (
                    f"stride {fmt_value(lay.stride)}" if lay.stride is not None else "",
                    f"rf {fmt_value(lay.rf)} px" if lay.rf is not None else "") if x)
                ax.set_title(f"{lay.name}\n{geo}\n{lay.stage}", fontsize=size, pad=4)
                note = f"max {lay.raw_max:.3g}" if lay.peak is not None else "no positive evidence"
                ax.set_xlabel(note, fontsize=STYLE["font_size"], labelpad=3)
        first_y = fh - top_h - head - ph
        cax = fig.add_axes(((fw - cb_text - cb_w) / fw, first_y / fh, cb_w / fw, ph / fh))
        cb = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=STYLE["cmap"]), cax=cax)
        cb.set_ticks([0.0, 0.5, 1.0], labels=["0", "0.5", "max"])
        cb.set_label("Grad-CAM / panel max", fontsize=STYLE["font_size"])
        if left_out:
            fig.text(left / fw, 0.06 / fh, f"{len(layers)} of {len(result.layers)} layers shown, "
                     f"spread over depth; every layer's map is in cam_NN_<layer>.png and cam_raw.npz",
                     fontsize=STYLE["font_size"], va="bottom")
    return fig
