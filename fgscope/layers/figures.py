"""matplotlib figures of how features change with depth, as `Figure` objects (never pyplot).

- `hierarchy_figure`: where each selected layer responds in each image, the "edges -> parts ->
  objects" picture of Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks"
  (ECCV 2014), shown here as activation energy overlaid on the photo.
- `geometry_figure`: spatial size, channels and receptive field against depth.

The figures own no global state: nothing is registered with pyplot, so a figure is freed like
any object once the caller drops it. matplotlib is imported inside the functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fgscope.render.grid import colorize, upsample_bilinear
from fgscope.render.style import ENERGY_LABEL, STYLE, style_context

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["hierarchy_figure", "geometry_figure", "spread", "MAX_COLUMNS", "MAX_COLUMNS_PER_ROW"]

_STAGES = ("early", "middle", "late")


def _normalized_energy(energy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(h, w)` energy -> `(H, W)` in 0..1 at `size = (H, W)`, bilinear; constant -> 0."""
    up = upsample_bilinear(energy, size)
    lo, hi = float(np.nanmin(up)), float(np.nanmax(up))
    if not hi > lo:
        return np.zeros(size, np.float32)
    return (up - lo) / (hi - lo)


MAX_COLUMNS_PER_ROW = 8
"""Layer panels per row block of the hierarchy figure; more columns wrap into further blocks
(each starting again with the input image)."""
MAX_COLUMNS = 24
"""Layer columns drawn at most; beyond, evenly spaced ones (first and last included) are
shown and a note under the figure says how many were left out."""


def spread(n: int, most: int) -> list[int]:
    """`most` evenly spaced indices of range(n), first and last included (all when n <= most)."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)}) if most > 1 else [0]


def hierarchy_figure(
    images: Sequence[Image.Image],
    columns: Sequence[tuple[str, np.ndarray]],
    *,
    col_notes: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    per_row: int = MAX_COLUMNS_PER_ROW,
    max_columns: int = MAX_COLUMNS,
) -> Figure:
    """One row per image: the image, then per selected layer its activation energy on it.

    Args:
        images: the input images at the size the model saw (RGB or convertible).
        columns: one `(label, energy)` per layer, left to right (e.g. the last layer of each
            stage); `label` is the column title (may hold newlines, e.g.
            `"features.3\\nstride 4 · rf 19 px\\nearly"`), `energy` is `(n_images, h, w)`: the
            mean over channels of the squared activations. Each panel shows its energy map
            upsampled bilinearly to the image, scaled to 0..1 within the panel and blended over
            the image with `STYLE["cmap"]` at `STYLE["overlay_alpha"]`. Arrays are not modified.
        col_notes: optional one note per layer column, written under the bottom row.
        row_labels: optional one name per image (e.g. its file name), written left of its row.
        per_row: layer columns per row block; more wrap into further blocks, each with the
            images again, so panels keep their size however many layers there are.
        max_columns: at most this many layer columns, evenly spaced over the given ones, with
            a note saying how many were left out.

    Returns:
        A `matplotlib.figure.Figure`, 2 in per panel (less when that would make it wider than
        16 in), panels laid out at fixed inch positions.

    Raises:
        ValueError: no images, or an energy array whose shape does not match.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    n_img = len(images)
    if n_img == 0:
        raise ValueError("hierarchy_figure needs at least one image")
    for label, energy in columns:
        e = np.asarray(energy)
        if e.ndim != 3 or e.shape[0] != n_img:
            raise ValueError(
                f"energy of column {label.splitlines()[0]!r} must be (n_images={n_img}, h, w), "
                f"got shape {e.shape}"
            )
    if col_notes is not None and len(col_notes) != len(columns):
        raise ValueError(f"col_notes has {len(col_notes)} entries for {len(columns)} columns")
    if row_labels is not None and len(row_labels) != n_img:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {n_img} images")
    keep = spread(len(columns), max(1, max_columns))
    left_out = len(columns) - len(keep)
    columns = [columns[i] for i in keep]
    notes = [col_notes[i] for i in keep] if col_notes else None
    per_row = max(1, per_row)
    blocks = [list(range(i, min(i + per_row, len(columns)))) for i in range(0, len(columns), per_row)] or [[]]

    rgb = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
    n_col = 1 + len(blocks[0])
    alpha = STYLE["overlay_alpha"]

    # Fixed layout in inches (a layout engine leaves uneven gaps around equal-aspect images).
    gap, cb_gap, cb_w, cb_text = 0.06, 0.15, 0.14, 0.9
    left = 0.08 + (0.22 if row_labels else 0.0)
    fixed = left + (n_col - 1) * gap + cb_gap + cb_w + cb_text
    pw = min(STYLE["panel_in"], (STYLE["max_width_in"] - fixed) / n_col)
    title_pt = STYLE["label_size"] if pw >= 1.6 else STYLE["font_size"]
    line_in = title_pt / 72 * 1.3
    n_lines = max([1] + [len(label.splitlines()) for label, _ in columns])
    head = n_lines * line_in + 0.12
    foot = line_in + 0.14 if notes else 0.08
    tail = line_in + 0.1 if left_out else 0.0
    heights = [pw * a.shape[0] / a.shape[1] for a in rgb]
    block = sum(heights) + gap * (n_img - 1)
    fw = fixed + n_col * pw
    fh = len(blocks) * (head + block + foot) + tail

    with style_context():
        fig = Figure(figsize=(fw, fh))
        top = fh
        for cols in blocks:
            top -= head
            axes = np.empty((n_img, 1 + len(cols)), dtype=object)
            for r, (base, ph) in enumerate(zip(rgb, heights, strict=True)):
                top -= ph
                for c in range(1 + len(cols)):
                    rect = ((left + c * (pw + gap)) / fw, top / fh, pw / fw, ph / fh)
                    axes[r, c] = ax = fig.add_axes(rect)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if c == 0:
                        ax.imshow(base.astype(np.uint8), interpolation="nearest", aspect="auto")
                        if row_labels:
                            ax.set_ylabel(_short(row_labels[r]), fontsize=STYLE["font_size"], labelpad=3)
                        continue
                    e = _normalized_energy(
                        np.asarray(columns[cols[c - 1]][1][r], dtype=np.float32), base.shape[:2]
                    )
                    col = colorize(e, 0.0, 1.0, STYLE["cmap"]).astype(np.float32)
                    blend = (col * alpha + base * (1.0 - alpha) + 0.5).astype(np.uint8)
                    ax.imshow(blend, interpolation="nearest", aspect="auto")
                top -= gap
            top += gap
            for c, label in enumerate(["input"] + [columns[j][0] for j in cols]):
                axes[0, c].set_title(label, fontsize=title_pt, pad=4)
                if notes and c:
                    axes[-1, c].set_xlabel(notes[cols[c - 1]], fontsize=title_pt, labelpad=4)
            top -= foot
        if left_out:
            fig.text(left / fw, 0.05 / fh, f"{len(columns)} of {len(columns) + left_out} layers shown, "
                     "evenly spaced over depth", fontsize=STYLE["font_size"], va="bottom")

        body = fh - tail
        cb_h = min(block, 5.0)
        cb_y = tail + body / 2 - cb_h / 2
        cax = fig.add_axes(((fw - cb_text - cb_w) / fw, cb_y / fh, cb_w / fw, cb_h / fh))
        sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=STYLE["cmap"])
        cb = fig.colorbar(sm, cax=cax)
        cb.set_ticks([0.0, 0.5, 1.0], labels=["0 (min)", "0.5", "1 (max)"])
        # On a short bar (one row) the label goes on two lines so it stays inside the figure.
        label = ENERGY_LABEL if cb_h >= 2.8 else ENERGY_LABEL.replace(" (", "\n(")
        cb.set_label(label, fontsize=STYLE["font_size"])
    return fig


def _short(name: str, most: int = 24) -> str:
    """A row label that fits beside a panel: long names keep their start and end."""
    return name if len(name) <= most else name[: most // 2 - 1] + "…" + name[-(most // 2 - 1):]


def _runs(stages: list[str], xs: list[float]) -> list[tuple[str, float, float, int]]:
    """Contiguous runs of equal stage: (stage, first x, last x, first row)."""
    out: list[tuple[str, float, float, int]] = []
    for i, (s, x) in enumerate(zip(stages, xs, strict=True)):
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1], x, out[-1][3])
        else:
            out.append((s, x, x, i))
    return out


def _fraction(v: float, _pos: Any = None) -> str:
    """1/8, 1/2, 1, 2: a power of two as a fraction of the input side."""
    if v <= 0:
        return ""
    return f"1/{1 / v:g}" if v < 1 else f"{v:g}"


def geometry_figure(rows: Sequence[dict], input_size: tuple[int, int]) -> Figure:
    """Spatial size, channels and receptive field of every layer against depth.

    Args:
        rows: one dict per layer in execution order with keys `index` (x position), `name`,
            `spatial` (H side of the map, None for vectors), `channels`, `rf` (receptive
            field in input px, None if unknown) and `stage` (`early`, `middle` or `late`).
        input_size: `(H, W)` of the model input; the receptive field panel marks H with a
            dashed line and has a secondary axis in fractions of it.

    Returns:
        A `matplotlib.figure.Figure`, 7 in wide (double column), three panels sharing x.

    Raises:
        ValueError: no rows, or a row without one of the keys.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not rows:
        raise ValueError("geometry_figure needs at least one layer row")
    keys = ("index", "name", "spatial", "channels", "rf", "stage")
    for row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"layer row {row.get('name', row)!r} lacks keys {missing}")

    def num(v: Any) -> float:
        return float("nan") if v is None else float(v)

    xs = [float(r["index"]) for r in rows]
    spatial = [num(r["spatial"]) for r in rows]
    channels = [num(r["channels"]) for r in rows]
    rf = [num(r["rf"]) for r in rows]
    side = float(input_size[0])
    colors = STYLE["stage_colors"]
    runs = _runs([str(r["stage"]) for r in rows], xs)
    pow2 = FuncFormatter(lambda v, _: f"{v:g}")

    with style_context():
        fig = Figure(figsize=(STYLE["double_column_in"], 5.6), layout="constrained")
        axes = fig.subplots(3, 1, sharex=True)
        panels = (
            (spatial, "spatial size (px)"),
            (channels, "channels"),
            (rf, "receptive field (px)"),
        )
        for ax, (ys, label) in zip(axes, panels, strict=True):
            for stage, a, b, _ in runs:
                ax.axvspan(a - 0.5, b + 0.5, color=colors.get(stage, "#999999"), alpha=0.15, lw=0)
            ax.plot(xs, ys, color="#222222", lw=1.2, marker="o", ms=2.2)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(LogLocator(base=2, numticks=10))
            ax.yaxis.set_major_formatter(pow2)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel(label)
        ax_rf = axes[2]
        ax_rf.axhline(side, color="#222222", ls="--", lw=0.9)
        ax_rf.annotate(
            f"input {side:g} px",
            (xs[0], side),
            xytext=(2, 3),
            textcoords="offset points",
            fontsize=STYLE["font_size"],
            va="bottom",
        )
        sec = ax_rf.secondary_yaxis("right", functions=(lambda v: v / side, lambda f: f * side))
        sec.set_ylabel("fraction of input")
        sec.yaxis.set_major_locator(LogLocator(base=2, numticks=10))
        sec.yaxis.set_major_formatter(FuncFormatter(_fraction))
        sec.yaxis.set_minor_formatter(NullFormatter())

        # A few names: the first layer of each stage run, and the last layer.
        ticks: dict[float, str] = {}
        for _, a, _, i in runs:
            ticks[a] = str(rows[i]["name"])
        ticks[xs[-1]] = str(rows[-1]["name"])
        ax_rf.set_xticks(list(ticks), labels=list(ticks.values()), rotation=30, ha="right")
        ax_rf.set_xlabel("layer (execution order)")
        ax_rf.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
        present = [s for s in _STAGES if any(r[0] == s for r in runs)]
        present += sorted({r[0] for r in runs} - set(_STAGES))
        handles = [Patch(color=colors.get(s, "#999999"), alpha=0.3, label=s) for s in present]
        fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), frameon=False)
    return fig
