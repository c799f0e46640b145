"""Figures for papers: one style, journal column widths, PNG/PDF/SVG.

Every figure is built inside `fgscope.render.style_context()`, fgscope's one matplotlib
style (8 pt text, 9 pt labels; TrueType fonts embedded in PDF, text kept as text in SVG), at
one of two widths: 3.5 in for a single journal column, 7 in across two. Plots are vector in
PDF and SVG; image panels (photos, energy overlays, CAMs, the CKA matrix) are `imshow`
images, which stay raster inside vector files, so files stay small.

This module holds the widths (`paper_width`), the formats (`parse_formats`) and `export`
(`fgscope.render.save_figure` in every requested format at print resolution). The figures
live by kind and are re-exported here:

- `fgscope.report.panels`: `hierarchy_paper` (energy-over-image panels, one `EnergyColumn`
  per layer) and `cam_paper`.
- `fgscope.report.plots`: `probe_paper`, `similarity_paper` and `geometry_paper`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fgscope.errors import ConfigError
from fgscope.render import STYLE, save_figure
from fgscope.report.panels import EnergyColumn, cam_paper, hierarchy_paper
from fgscope.report.plots import geometry_paper, probe_paper, similarity_paper

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PAPER_WIDTHS",
    "PAPER_FORMATS",
    "PAPER_DPI",
    "paper_width",
    "parse_formats",
    "export",
    # re-exported from fgscope.report.panels and fgscope.report.plots
    "EnergyColumn",
    "hierarchy_paper",
    "geometry_paper",
    "probe_paper",
    "similarity_paper",
    "cam_paper",
]

PAPER_WIDTHS: dict[str, float] = {
    "single": STYLE["single_column_in"],
    "double": STYLE["double_column_in"],
}
PAPER_FORMATS = ("png", "pdf", "svg")
PAPER_DPI = 300  # PNG resolution, and the resolution of image panels inside PDF/SVG


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


def export(fig: Figure, path: str | Path, formats: Sequence[str]) -> list[Path]:
    """Save `fig` as `path` with each format's suffix (atomic; then the figure is cleared)."""
    return save_figure(fig, path, formats=formats, dpi=PAPER_DPI)
