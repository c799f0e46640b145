"""Figures for papers: one style, journal column widths, PNG/PDF/SVG.

Every figure here is built inside `fgscope.render.style_context()`, fgscope's one matplotlib
style (8 pt text, 9 pt labels; TrueType fonts embedded in PDF, text kept as text in SVG), at
one of two widths: 3.5 in for a single journal column, 7 in across two. Plots are vector in
PDF and SVG; image panels (photos, energy overlays, CAMs, the CKA matrix) are `imshow`
images, which stay raster inside vector files, so files stay small.

- `hierarchy_paper`: the energy-over-image panels of `fgscope layers`' hierarchy.png, laid out
  for the width (columns wrap onto a second row at 3.5 in).
- `geometry_paper`: `fgscope.layers.figures.geometry_figure` itself, resized to the width.
- `probe_paper`, `similarity_paper`, `cam_paper`: from the JSON files of `fgscope probe`,
  `similarity` and `cam`.
- `export`: `fgscope.render.save_figure` in every requested format at print resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fgscope.errors import ConfigError
from fgscope.render import (
    ENERGY_LABEL,
    STYLE,
    colorize,
    save_figure,
    style_context,
    upsample_bilinear,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PAPER_WIDTHS",
    "PAPER_FORMATS",
    "PAPER_DPI",
    "EnergyColumn",
    "paper_width",
    "parse_formats",
    "hierarchy_paper",
    "geometry_paper",
    "probe_paper",
    "similarity_paper",
    "cam_paper",
    "export",
]

PAPER_WIDTHS: dict[str, float] = {
    "single": STYLE["single_column_in"],
    "double": STYLE["double_column_in"],
}
PAPER_FORMATS = ("png", "pdf", "svg")
PAPER_DPI = 300  # PNG resolution, and the resolution of image panels inside PDF/SVG
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


def paper_width(name: str) -> float:
    """`single` -> 3.5, `double` -> 7.0 (inches).

    Raises:
        ConfigError: any other name.
    """
    try:
        return PAPER_WIDTHS[name]
    except KeyError:
        raise ConfigError(
            f"--width {name!r} is not one of {', '.join(PAPER_WIDTHS)}",
            hint="single = 3.5 in (one column), double = 7 in (two columns)",
        ) from None


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """`"png,pdf"` -> `("png", "pdf")`, de-duplicated, lower case.

    Raises:
        ConfigError: empty, or a format other than png, pdf, svg.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    fmts: list[str] = []
    for item in items:
        f = item.strip().lower().lstrip(".")
        if f and f not in fmts:
            fmts.append(f)
    bad = [f for f in fmts if f not in PAPER_FORMATS]
    if bad or not fmts:
        raise ConfigError(
            f"--format {','.join(bad) if bad else repr(text)} is not a figure format",
            hint=f"use a comma-separated list of {', '.join(PAPER_FORMATS)}",
        )
    return tuple(fmts)


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


def geometry_paper(rows: Sequence[dict], input_size: Sequence[int], width_in: float) -> Figure:
    """`fgscope.layers.figures.geometry_figure` at a paper width (its constrained layout reflows)."""
    from fgscope.layers.figures import geometry_figure

    fig = geometry_figure(rows, (int(input_size[0]), int(input_size[1])))
    fig.set_size_inches(width_in, 5.6 if width_in >= 5 else 4.8)
    return fig


def _stage_spans(ax: Axes, stages: Sequence[str]) -> None:
    start = 0
    for i in range(1, len(stages) + 1):
        if i == len(stages) or stages[i] != stages[start]:
            ax.axvspan(start - 0.5, i - 0.5, color=_stage_color(stages[start]), alpha=0.15, lw=0)
            start = i


def _layer_ticks(ax: Axes, names: Sequence[str], width_in: float, axis: str = "x") -> None:
    """At most ~2 names per inch; horizontal when they fit, else rotated."""
    most = max(2, int(width_in * 2))
    step = max(1, math.ceil(len(names) / most))
    idx = list(range(0, len(names), step))
    if idx[-1] != len(names) - 1 and len(names) - 1 - idx[-1] >= step / 2:
        idx.append(len(names) - 1)
    labels = [names[i] for i in idx]
    if axis == "x" and sum(len(t) + 2 for t in labels) * 0.065 < width_in:  # ~0.065 in a char
        ax.set_xticks(idx, labels)
    elif axis == "x":
        ax.set_xticks(idx, labels, rotation=40, ha="right", rotation_mode="anchor")
    else:
        ax.set_yticks(idx, labels)


def probe_paper(rows: Sequence[dict], width_in: float) -> Figure:
    """Linear-probe accuracy against depth, one line per pooling x granularity, ±1 std band.

    Args:
        rows: `probe.json` rows (keys layer, index, stage, pool, granularity, acc_mean,
            acc_std, chance); accuracies as fractions (0..1).
        width_in: figure width in inches.

    Raises:
        ValueError: no rows.
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("probe_paper needs at least one probe row")
    order: dict[str, tuple[float, str]] = {}
    for r in rows:
        order.setdefault(str(r["layer"]), (float(r.get("index") or 0), str(r.get("stage", ""))))
    layers = sorted(order, key=lambda k: order[k][0])
    pos = {name: i for i, name in enumerate(layers)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r.get("pool", "")), str(r.get("granularity", ""))), []).append(r)
    with style_context():
        fig = Figure(figsize=(width_in, 2.7 if width_in >= 5 else 2.9), layout="constrained")
        ax = fig.add_subplot()
        _stage_spans(ax, [order[k][1] for k in layers])
        chances: dict[str, float] = {}
        for (pool, gran), rs in groups.items():
            rs = sorted(rs, key=lambda r: pos[str(r["layer"])])
            x = np.array([pos[str(r["layer"])] for r in rs], float)
            m = np.array([float(r["acc_mean"]) for r in rs]) * 100
            s = np.array([float(r.get("acc_std") or 0.0) for r in rs]) * 100
            label = " · ".join(p for p in (pool, gran) if p)
            (line,) = ax.plot(x, m, marker="o", ms=2.5, lw=1.2, label=label or None)
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.18, lw=0)
            if rs[0].get("chance") is not None:
                chances[gran] = float(rs[0]["chance"]) * 100
        for gran, c in chances.items():
            ax.axhline(c, color="#444444", ls="--", lw=0.8)
            ax.annotate(f"chance{' (' + gran + ')' if gran and len(chances) > 1 else ''}",
                        (len(layers) - 0.5, c), xytext=(-2, 2), textcoords="offset points",
                        ha="right", va="bottom", fontsize=STYLE["font_size"] - 1)
        _layer_ticks(ax, layers, width_in)
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_ylim(0, 100)
        ax.set_ylabel("probe accuracy (%)")
        if any(lbl for lbl in (" · ".join(k) for k in groups)):
            ax.legend(frameon=False, loc="upper left", fontsize=STYLE["font_size"] - 1)
    return fig


def similarity_paper(data: dict[str, Any], width_in: float) -> Figure:
    """Linear CKA between layers as a matrix (raster inside vector files), and a curve beside
    it: with two models, each layer's CKA with the same layer of the other; with one model,
    each layer's CKA with the first and with the last layer.

    Args:
        data: `similarity.json` (keys layers_x, layers_y, cka; optional vs, stages_y,
            diagonal).
        width_in: figure width in inches (the curve goes beside the matrix at 7 in, under
            it at 3.5 in).

    Raises:
        ValueError: a CKA matrix whose shape does not match the layer lists.
    """
    from matplotlib.figure import Figure

    cka = np.asarray(data["cka"], dtype=float)  # None -> nan
    lx, ly = [str(x) for x in data["layers_x"]], [str(y) for y in data["layers_y"]]
    if cka.shape != (len(ly), len(lx)):
        raise ValueError(f"cka is {cka.shape}, expected ({len(ly)}, {len(lx)}) from the layer lists")
    diag = data.get("diagonal") or []
    other = data.get("vs")
    curve = bool(diag) or (not other and lx == ly and len(ly) >= 2)
    wide = width_in >= 5
    with style_context():
        if curve and wide:
            fig = Figure(figsize=(width_in, 3.2), layout="constrained")
            ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        elif curve:
            fig = Figure(figsize=(width_in, 5.8), layout="constrained")
            ax, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1.5, 1]})
        else:
            fig = Figure(figsize=(width_in, 3.2), layout="constrained")
            ax, ax2 = fig.add_subplot(), None
        im = ax.imshow(cka, origin="lower", vmin=0, vmax=1, cmap="magma", interpolation="none",
                       aspect="equal" if cka.shape[0] == cka.shape[1] else "auto")
        _layer_ticks(ax, lx, width_in / 2 if wide else width_in)
        _layer_ticks(ax, ly, width_in / 2 if wide else width_in, axis="y")
        model = str(data.get("model", "model"))
        ax.set_xlabel(f"layer of {Path(str(other)).name}" if other else "layer")
        ax.set_ylabel(f"layer of {Path(model).name}" if other else "layer")
        cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
        cb.set_label("linear CKA")
        if ax2 is None:
            return fig
        stages = data.get("stages_y") or []
        if diag:
            names = [str(d["layer"]) for d in diag]
            curves = [("CKA", [d.get("cka") for d in diag], "-")]
            if all(d.get("cka_debiased") is not None for d in diag):
                curves.append(("debiased", [d["cka_debiased"] for d in diag], "--"))
            ax2.set_ylabel("CKA with the same layer")
            stages = stages if len(stages) == len(names) else []
        else:
            names = ly
            curves = [(f"with {ly[0]}", list(cka[:, 0]), "-"),
                      (f"with {ly[-1]}", list(cka[:, -1]), "-")]
            ax2.set_ylabel("linear CKA")
        if len(stages) == len(names):
            _stage_spans(ax2, [str(s) for s in stages])
        x = np.arange(len(names))
        for label, ys, ls in curves:
            ax2.plot(x, np.asarray(ys, dtype=float), marker="o", ms=2.5, lw=1.2, ls=ls, label=label)
        ax2.legend(frameon=False, fontsize=STYLE["font_size"] - 1)
        ax2.set_ylim(0, 1.02)
        ax2.set_xlim(-0.5, len(names) - 0.5)
        _layer_ticks(ax2, names, width_in / 2 if wide else width_in)
    return fig


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


def export(fig: Figure, path: str | Path, formats: Sequence[str]) -> list[Path]:
    """Save `fig` as `path` with each format's suffix (atomic; then the figure is cleared)."""
    return save_figure(fig, path, formats=formats, dpi=PAPER_DPI)
