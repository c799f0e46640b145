"""Plot figures for papers: probe accuracy against depth, the CKA matrix with its curves, and
the layer geometry.

- `probe_paper`, `similarity_paper`: from the JSON files of `fgscope probe` and `similarity`;
  lines and axes are vector in PDF and SVG, the CKA matrix an `imshow` image (debiased CKA on
  a diverging scale centred on 0).
- `geometry_paper`: `fgscope.layers.figures.geometry_figure` itself, resized to the width.

Drawn inside `fgscope.render.style_context()`. Widths, formats and export:
`fgscope.report.paper`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fgscope.render import STYLE, style_context
from fgscope.report.panels import _stage_color

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["geometry_paper", "probe_paper", "similarity_paper"]


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


def similarity_paper(data: dict[str, Any], width_in: float, biased: bool = False) -> Figure:
    """Linear CKA between layers as a matrix (raster inside vector files), and a curve beside
    it: with two models, each layer's CKA with the same layer of the other; with one model,
    each layer's CKA with the first and with the last layer.

    The matrix is debiased CKA on a diverging scale centred on 0 (blue < 0 < red, -1..1), so
    that -0.08 does not pass for a weak positive value; the curves show debiased CKA with the
    biased estimator dashed beside it. A run without debiased values (or `biased=True`)
    draws the biased estimator on 0..1 and says so in the colour bar.

    Args:
        data: `similarity.json` (keys layers_x, layers_y, cka: rows = layers_x; optional
            cka_debiased, vs, stages_y, diagonal).
        width_in: figure width in inches (the curve goes beside the matrix at 7 in, under
            it at 3.5 in).
        biased: draw the biased estimator in the matrix instead.

    Raises:
        ValueError: a CKA matrix whose shape does not match the layer lists.
    """
    from matplotlib.figure import Figure

    lx, ly = [str(x) for x in data["layers_x"]], [str(y) for y in data["layers_y"]]
    raw_biased = np.asarray(data["cka"], dtype=float)  # None -> nan; rows = layers_x
    debiased = data.get("cka_debiased") is not None and not biased
    cka = np.asarray(data["cka_debiased"], dtype=float) if debiased else raw_biased
    for name, m in (("cka", raw_biased), ("cka_debiased", cka)):
        if m.shape != (len(lx), len(ly)):
            raise ValueError(f"{name} is {m.shape}, expected ({len(lx)}, {len(ly)}) from the layer lists")
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
        scale = {"vmin": -1, "vmax": 1, "cmap": "RdBu_r"} if debiased else {"vmin": 0, "vmax": 1, "cmap": "magma"}
        im = ax.imshow(cka, origin="lower", interpolation="none",
                       aspect="equal" if cka.shape[0] == cka.shape[1] else "auto", **scale)
        _layer_ticks(ax, ly, width_in / 2 if wide else width_in)
        _layer_ticks(ax, lx, width_in / 2 if wide else width_in, axis="y")
        model = str(data.get("model", "model"))
        ax.set_xlabel(f"layer of {Path(str(other)).name}" if other else "layer")
        ax.set_ylabel(f"layer of {Path(model).name}" if other else "layer")
        cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
        cb.set_label("debiased linear CKA (0 = unrelated)" if debiased else "linear CKA (biased)")
        if ax2 is None:
            return fig
        stages = data.get("stages_y") or []
        if diag:
            names = [str(d["layer"]) for d in diag]
            curves = []
            if all(d.get("cka_debiased") is not None for d in diag):
                curves.append(("debiased", [d["cka_debiased"] for d in diag], "-"))
            curves.append(("biased", [d.get("cka") for d in diag], "--"))
            ax2.set_ylabel("CKA with the same layer")
            stages = stages if len(stages) == len(names) else []
        else:
            names = ly
            kind = "debiased" if debiased else "biased"
            curves = [(f"{kind}, with {ly[0]}", list(cka[:, 0]), "-"),
                      (f"{kind}, with {ly[-1]}", list(cka[:, -1]), "-")]
            ax2.set_ylabel("linear CKA")
        if len(stages) == len(names):
            _stage_spans(ax2, [str(s) for s in stages])
        x = np.arange(len(names))
        low = 0.0
        for label, ys, ls in curves:
            y = np.asarray(ys, dtype=float)
            ax2.plot(x, y, marker="o", ms=2.5, lw=1.2, ls=ls, label=label)
            if np.isfinite(y).any():
                low = min(low, float(np.nanmin(y)))
        ax2.axhline(0.0, color="#444444", lw=0.6)
        ax2.legend(frameon=False, fontsize=STYLE["font_size"] - 1)
        ax2.set_ylim(min(-0.1, low - 0.05), 1.02)
        ax2.set_xlim(-0.5, len(names) - 0.5)
        _layer_ticks(ax2, names, width_in / 2 if wide else width_in)
    return fig
