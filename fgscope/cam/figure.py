"""The `fgscope cam` pictures: a Grad-CAM map blended over its image (`cam_overlay`) and the
one-row figure of every layer's map (`cam_figure`, a matplotlib `Figure`).

matplotlib is imported inside `cam_figure` only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from fgscope.cam.compute import CamResult

__all__ = ["cam_overlay", "cam_figure", "cam_title", "fmt_value"]


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


def cam_figure(result: CamResult) -> Figure:
    """One row: the image (with its top prediction), then per layer its Grad-CAM over it,
    each divided by its own max, the peak marked; titled with layer, stride, receptive field
    and stage; the raw max under each panel."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from fgscope.render.style import STYLE, style_context

    layers = result.layers
    n_col = 1 + len(layers)
    left, gap, cb_gap, cb_w, cb_text = 0.08, 0.08, 0.15, 0.14, 0.75
    fixed = left + (n_col - 1) * gap + cb_gap + cb_w + cb_text
    pw = min(STYLE["panel_in"], (STYLE["max_width_in"] - fixed) / n_col)
    w_img, h_img = result.display.size
    ph = pw * h_img / w_img
    size = STYLE["label_size"] if pw >= 1.6 else STYLE["font_size"]
    line = size / 72 * 1.3
    head, foot = 3 * line + 0.1 + 0.35, line + 0.15
    fw, fh = fixed + n_col * pw, head + ph + foot
    base = np.asarray(result.display.convert("RGB"))
    with style_context():
        fig = Figure(figsize=(fw, fh))
        fig.suptitle(cam_title(result), y=1 - 0.08 / fh, va="top", fontsize=STYLE["title_size"])
        y0 = foot / fh
        for c in range(n_col):
            ax = fig.add_axes(((left + c * (pw + gap)) / fw, y0, pw / fw, ph / fh))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(base, interpolation="nearest", aspect="auto")
                pred = f"\n{result.top5[0][0]} {result.top5[0][1]:.0%}" if result.top5 else ""
                ax.set_title(f"input{pred}", fontsize=size, pad=4)
                continue
            lay = layers[c - 1]
            ax.imshow(cam_overlay(result.display, lay.cam), interpolation="nearest", aspect="auto")
            if lay.peak is not None:
                ax.plot([lay.peak[1]], [lay.peak[0]], marker="+", ms=9, mew=1.6, color="#00e5ff")
            ax.set_xlim(-0.5, w_img - 0.5)
            ax.set_ylim(h_img - 0.5, -0.5)
            ax.set_title(
                f"{lay.name}\nstride {fmt_value(lay.stride)} · rf {fmt_value(lay.rf)} px\n{lay.stage}",
                fontsize=size, pad=4,
            )
            note = f"max {lay.raw_max:.3g}" if lay.peak is not None else "no positive evidence"
            ax.set_xlabel(note, fontsize=STYLE["font_size"], labelpad=3)
        cax = fig.add_axes(((fw - cb_text - cb_w) / fw, y0, cb_w / fw, ph / fh))
        cb = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=STYLE["cmap"]), cax=cax)
        cb.set_ticks([0.0, 0.5, 1.0], labels=["0", "0.5", "max"])
        cb.set_label("Grad-CAM / panel max", fontsize=STYLE["font_size"])
    return fig
