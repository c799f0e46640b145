"""Image-panel figures for papers: photos, energy overlays and Grad-CAM maps in titled rows.

- `hierarchy_paper`: the energy-over-image panels of `fgscope layers`' hierarchy.png, laid out
  for the width (columns wrap onto a second row at 3.5 in); one `EnergyColumn` per layer.
- `cam_paper`: Grad-CAM maps side by side, from the files of `fgscope cam`.

Panels are `imshow` images (raster inside PDF and SVG), drawn inside
`fgscope.render.style_context()`. Widths, formats and export: `fgscope.report.paper`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fgscope.render import ENERGY_LABEL, STYLE, colorize, style_context, upsample_bilinear

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["EnergyColumn", "hierarchy_paper", "cam_paper"]

_MIN_PANEL_IN = 0.95  # narrower image panels leave no room for their titles
_GAP_IN = 0.06
_NEUTRAL = "#999999"


@dataclass(frozen=True)
class EnergyColumn:
    """One layer column of the hierarchy figure.

    Attributes:
        name: layer name.
        stride: effective stride in input pixels (None if unknown).
        rf: receptive field in input pixels (None if unknown).
        stage: early, middle or late.
        energy: `(n_images, h, w)` mean over channels of the squared activations.
    """

    name: str
    stride: float | None
    rf: float | None
    stage: str
    energy: np.ndarray


def _num(v: float | None) -> str:
    return "?" if v is None else f"{float(v):g}"


def _stage_color(stage: str) -> str:
    return STYLE["stage_colors"].get(stage, _NEUTRAL)


def _bare(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _panel_grid(n_panels: int, width_in: float) -> tuple[int, float]:
    """Panels per row and panel side (inches) so that panels stay at least _MIN_PANEL_IN."""
    per_row = n_panels
    while per_row > 1 and (width_in - (per_row - 1) * _GAP_IN) / per_row < _MIN_PANEL_IN:
        per_row -= 1
    per_row = math.ceil(n_panels / math.ceil(n_panels / per_row))  # balance the rows
    side = min(STYLE["panel_in"], (width_in - (per_row - 1) * _GAP_IN) / per_row)
    return per_row, side


def _titled_panels(
    width_in: float,
    panels: Sequence[tuple[list[str], str, np.ndarray]],
    blocks: int,
    *,
    block_labels: Sequence[str] = (),
    colorbar: tuple[str, Sequence[str]] | None = None,
) -> Figure:
    """Rows of image panels with short titles, one block of rows per image.

    Args:
        panels: per block, the same sequence of `(title lines, stage, rgb)`, flattened
            block by block (`len(panels) == blocks * per_block`).
        blocks: how many blocks (images).
        block_labels: optional label written at the top left of each block.
        colorbar: `(label, three tick labels)` of a horizontal 0..1 colorbar under everything.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    per_block = len(panels) // blocks
    per_row, side = _panel_grid(per_block, width_in)
    rows_per_block = math.ceil(per_block / per_row)
    fs = STYLE["font_size"] - 1  # 7 pt titles under 1-in panels
    n_lines = max(len(t) for t, _, _ in panels)
    title_h = n_lines * fs / 72 * 1.25 + 0.04
    label_h = fs / 72 * 1.6 + (0.08 if blocks > 1 else 0.0) if block_labels else 0.0
    aspect = max(p[2].shape[0] / p[2].shape[1] for p in panels)
    row_h = title_h + side * aspect + _GAP_IN
    cb_h = 0.45 if colorbar else 0.0
    height = blocks * (label_h + rows_per_block * row_h) + cb_h + 0.04
    total_w = per_row * side + (per_row - 1) * _GAP_IN
    x0 = (width_in - total_w) / 2

    with style_context():
        fig = Figure(figsize=(width_in, height))
        top = height
        for b in range(blocks):
            if block_labels:
                fig.text(x0 / width_in, (top - label_h + 0.03) / height, block_labels[b],
                         fontsize=STYLE["font_size"], fontweight="bold", va="bottom")
                top -= label_h
            for i in range(per_block):
                title, stage, rgb = panels[b * per_block + i]
                r, c = divmod(i, per_row)
                in_row = min(per_row, per_block - r * per_row)
                xr = (width_in - in_row * side - (in_row - 1) * _GAP_IN) / 2  # centre short rows
                ph = side * rgb.shape[0] / rgb.shape[1]
                y = top - r * row_h - title_h - ph
                ax = fig.add_axes(((xr + c * (side + _GAP_IN)) / width_in, y / height,
                                   side / width_in, ph / height))
                ax.imshow(rgb, interpolation="none", aspect="auto")
                _bare(ax)
                for k, line in enumerate(reversed(title)):  # bottom line first
                    ax.text(0.5, 1.0 + (0.03 + k * fs * 1.25 / 72) / ph, line,
                            transform=ax.transAxes, ha="center", va="bottom", fontsize=fs,
                            color=_stage_color(stage) if stage and line == stage else "black")
            top -= rows_per_block * row_h
        if colorbar:
            cw = min(total_w, 3.0)
            cax = fig.add_axes(((width_in - cw) / 2 / width_in, 0.22 / height, cw / width_in,
                                0.08 / height))
            sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=STYLE["cmap"])
            cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
            cb.set_ticks([0.0, 0.5, 1.0], labels=list(colorbar[1]))
            cb.ax.tick_params(labelsize=fs, length=2, pad=1)
            cb.outline.set_linewidth(0.5)
            cax.set_title(colorbar[0], fontsize=fs, pad=2)
    return fig


def _overlay(base: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """`(H, W, 3)` uint8 photo and `(h, w)` energy -> the energy, 0..1 per panel, over it.

    The same picture as `fgscope.layers.figures.hierarchy_figure`: bilinear upsampling, min..max
    scaling within the panel, `STYLE["cmap"]` blended at `STYLE["overlay_alpha"]`.
    """
    up = upsample_bilinear(np.asarray(energy, np.float32), base.shape[:2])  # (H, W)
    lo, hi = float(up.min()), float(up.max())
    e = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    col = colorize(e, 0.0, 1.0, STYLE["cmap"]).astype(np.float32)
    a = STYLE["overlay_alpha"]
    return (col * a + base.astype(np.float32) * (1 - a) + 0.5).astype(np.uint8)


def hierarchy_paper(
    images: Sequence[np.ndarray],
    columns: Sequence[EnergyColumn],
    width_in: float,
    *,
    image_labels: Sequence[str] = (),
    max_images: int = 3,
) -> Figure:
    """Edges -> parts -> objects for a paper: per image, the photo then each layer's energy.

    Args:
        images: `(H, W, 3)` uint8 images as the model saw them.
        columns: the layers (usually the last one at each resolution), left to right.
        width_in: figure width in inches (3.5 or 7).
        image_labels: optional name per image, written above its block.
        max_images: at most this many images (the first ones) are drawn.

    Raises:
        ValueError: no images or no columns, or an energy array of the wrong shape.
    """
    if not images or not columns:
        raise ValueError("hierarchy_paper needs at least one image and one layer column")
    n = min(len(images), max_images)
    for col in columns:
        if np.ndim(col.energy) != 3 or len(col.energy) < n:
            raise ValueError(f"energy of {col.name!r} must be (n_images, h, w), got {np.shape(col.energy)}")
    panels: list[tuple[list[str], str, np.ndarray]] = []
    for i in range(n):
        base = np.asarray(images[i], dtype=np.uint8)
        panels.append((["input", ""], "", base))
        for col in columns:
            title = [col.name, f"stride {_num(col.stride)}, rf {_num(col.rf)} px", col.stage]
            panels.append((title, col.stage, _overlay(base, col.energy[i])))
    # "input" gets as many title lines as the others so panels line up.
    lines = max(len(t) for t, _, _ in panels)
    panels = [(t + [""] * (lines - len(t)) if t[0] == "input" else t, s, p) for t, s, p in panels]
    labels = list(image_labels[:n]) if len(image_labels) >= n and n > 1 else []
    return _titled_panels(width_in, panels, n, block_labels=labels,
                          colorbar=(ENERGY_LABEL, ("0 (min)", "0.5", "1 (max)")))


def cam_paper(
    panels: Sequence[tuple[str, str, str, np.ndarray]], width_in: float, *, heading: str = ""
) -> Figure:
    """Grad-CAM maps side by side, each scaled to its own maximum (as `fgscope cam` draws
    them).

    Args:
        panels: one `(layer name, stage, note, rgb (H, W, 3) uint8)` per layer, left to right;
            the note (e.g. `max 0.93`) is a third title line, left out when empty.
        width_in: figure width in inches.
        heading: optional line above the panels (e.g. the target class).

    Raises:
        ValueError: no panels.
    """
    if not panels:
        raise ValueError("cam_paper needs at least one panel")
    items = [([name, stage] + ([note] if note else []), stage, np.asarray(rgb, np.uint8))
             for name, stage, note, rgb in panels]
    return _titled_panels(width_in, items, 1, block_labels=[heading] if heading else [],
                          colorbar=("Grad-CAM / panel max", ("0", "0.5", "max")))
