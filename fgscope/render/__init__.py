"""Pictures of activations: grids with numpy + Pillow, plots as matplotlib `Figure` objects.

Importing this package loads numpy and Pillow only; matplotlib is imported when a colormap or
a figure is first needed, and torch never (tensors are accepted by duck typing), so the CLI
starts fast.
"""

from __future__ import annotations

from fgscope.render.export import min_text_pt, save_figure
from fgscope.render.grid import (
    PNG_PARAMS,
    TEXT_PX_KEY,
    colorize,
    colormap_lut,
    label_font,
    render_grid,
    save_png,
    upsample_bilinear,
)
from fgscope.render.style import ENERGY_LABEL, STYLE, figure_width, rc_params, style_context

__all__ = [
    "PNG_PARAMS",
    "TEXT_PX_KEY",
    "min_text_pt",
    "colormap_lut",
    "colorize",
    "render_grid",
    "save_png",
    "label_font",
    "upsample_bilinear",
    "save_figure",
    "ENERGY_LABEL",
    "STYLE",
    "rc_params",
    "style_context",
    "figure_width",
]
