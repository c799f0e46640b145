"""One small shared style for every matplotlib figure fgscope makes.

Figures are built inside `style_context()`, a `matplotlib.rc_context` with `STYLE`'s sizes, so
later paper figures look like the ones of `fgscope layers`. Widths follow common journal
columns: 3.5 in single column, 7 in double column. matplotlib is imported only when a figure
is made, never when this module is imported.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

__all__ = ["STYLE", "rc_params", "style_context", "figure_width", "ENERGY_LABEL"]

STYLE: dict[str, Any] = {
    "font_size": 8.0,  # pt: tick labels, legends, notes
    "label_size": 9.0,  # pt: axis labels, panel titles
    "title_size": 10.0,  # pt: figure titles
    "single_column_in": 3.5,  # figure width for one journal column
    "double_column_in": 7.0,  # figure width across two columns
    "panel_in": 2.0,  # side of one image panel
    "max_width_in": 16.0,  # never wider than this
    "dpi": 150,  # raster output
    "cmap": "inferno",  # perceptual colormap for activations
    "overlay_alpha": 0.6,  # weight of the colourised map over a photo
    "stage_colors": {"early": "#4c72b0", "middle": "#55a868", "late": "#dd8452"},
}

ENERGY_LABEL = "relative activation energy (per panel)"
"""The colour bar label of every energy overlay (hierarchy figures, report)."""


def rc_params() -> dict[str, Any]:
    """`STYLE` as matplotlib rcParams."""
    return {
        "font.size": STYLE["font_size"],
        "axes.titlesize": STYLE["label_size"],
        "axes.labelsize": STYLE["label_size"],
        "xtick.labelsize": STYLE["font_size"],
        "ytick.labelsize": STYLE["font_size"],
        "legend.fontsize": STYLE["font_size"],
        "figure.titlesize": STYLE["title_size"],
        "figure.dpi": STYLE["dpi"],
        "savefig.dpi": STYLE["dpi"],
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": False,
        "image.cmap": STYLE["cmap"],
        "pdf.fonttype": 42,  # embed TrueType: text stays editable and searchable
        "svg.fonttype": "none",  # text as text, not paths
        "svg.hashsalt": "fgscope",  # stable SVG ids: reruns give identical files
    }


def style_context() -> AbstractContextManager[Any]:
    """`with style_context(): fig = Figure(...)` builds `fig` in fgscope's style."""
    import matplotlib

    return matplotlib.rc_context(rc_params())


def figure_width(columns: int = 2) -> float:
    """Figure width in inches for a one- or two-column layout."""
    return STYLE["single_column_in"] if columns == 1 else STYLE["double_column_in"]
