"""The `fgscope probe` figure: probe accuracy against depth, as a matplotlib `Figure`.

matplotlib is imported inside `probe_figure` only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fgscope.probe.results import ProbeResult

__all__ = ["probe_figure", "fmt_num"]

_POOL_COLORS = {"avg": "#222222", "max": "#8c8c8c", "bilinear": "#c44e52", "hypercolumn": "#8172b3"}
_GRAN_STYLE = {"fine": ("-", "o"), "coarse": ("--", "s")}


def fmt_num(v: Any) -> str:
    """A number for tables and labels: integers plainly, other floats to 4 decimals."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}" if v == int(v) else f"{v:.4f}"
    return str(v)


def probe_figure(result: ProbeResult) -> Figure:
    """Accuracy against depth: one line per pooling x granularity, ± std bands, stages
    shaded, chance levels dotted. Returns a `matplotlib.figure.Figure` (7 in wide)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from fgscope.render.style import STYLE, style_context

    layers = list(result.layers)
    xs = {layer.name: i for i, layer in enumerate(layers)}
    series = list(dict.fromkeys((r.pool, r.granularity) for r in result.rows))
    colors = STYLE["stage_colors"]
    with style_context():
        fig = Figure(figsize=(STYLE["double_column_in"], 3.6), layout="constrained")
        ax = fig.add_subplot()
        start = 0
        for i in range(1, len(layers) + 1):
            if i == len(layers) or layers[i].stage != layers[start].stage:
                ax.axvspan(start - 0.5, i - 0.5, color=colors.get(layers[start].stage, "#999999"),
                           alpha=0.12, lw=0)
                start = i
        handles: list[Any] = []
        for pool, gran in series:
            rows = sorted((r for r in result.rows if r.pool == pool and r.granularity == gran),
                          key=lambda r: r.index)
            x = [xs[r.layer] for r in rows]
            m = np.array([r.acc_mean for r in rows])
            s = np.array([r.acc_std for r in rows])
            ls, marker = _GRAN_STYLE[gran]
            col = _POOL_COLORS[pool]
            ax.fill_between(x, m - s, m + s, color=col, alpha=0.10, lw=0)
            ax.plot(x, m, ls=ls, marker=marker, ms=3.5, lw=1.4, color=col)
        # Legend: colour = pooling, line style = label granularity, shading = stage.
        for pool in dict.fromkeys(p for p, _ in series):
            label = "hypercolumn (cumulative)" if pool == "hypercolumn" else pool
            handles.append(Line2D([], [], color=_POOL_COLORS[pool], lw=1.8, label=label))
        for gran in dict.fromkeys(g for _, g in series):
            ls, marker = _GRAN_STYLE[gran]
            handles.append(Line2D([], [], color="#444444", ls=ls, marker=marker, ms=3.5, label=f"{gran} labels"))
        for gran in dict.fromkeys(g for _, g in series):
            ch = next(r.chance for r in result.rows if r.granularity == gran)
            ax.axhline(ch, color="#555555", ls=":", lw=1.0)
            ax.annotate(f"chance ({gran}) {ch:.2f}", (len(layers) - 0.5, ch), xytext=(-2, 2),
                        textcoords="offset points", ha="right", va="bottom", fontsize=STYLE["font_size"],
                        color="#555555", zorder=1)  # under the curves: data stays visible
        ax.set_ylim(0, 1.02)
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_ylabel(f"probe accuracy ({result.folds}-fold CV)")
        rotate = len(layers) > 8
        sep = " " if rotate else "\n"
        labels = [f"{layer.name}{sep}/{fmt_num(layer.stride)}" if layer.stride else layer.name for layer in layers]
        ax.set_xticks(range(len(layers)), labels=labels, rotation=45 if rotate else 0,
                      ha="right" if rotate else "center")
        ax.set_xlabel("layer in execution order  (/n: effective stride n px)")
        present = list(dict.fromkeys(layer.stage for layer in layers))
        handles += [Patch(color=colors.get(s, "#999999"), alpha=0.3, label=s) for s in present]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        n_coarse = f", {len(result.coarse_classes)} coarse" if result.coarse_classes else ""
        ax.set_title(f"Linear probe by depth · {Path(result.model).name} · {result.n_images} images, "
                     f"{len(result.classes)} fine classes{n_coarse}", loc="left")
    return fig
