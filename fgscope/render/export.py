"""`save_figure`: a matplotlib `Figure` to PNG/PDF/SVG files, atomically, then released."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgscope.render.grid import PNG_PARAMS, TEXT_PX_KEY
from fgscope.render.style import style_context

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_figure", "min_text_pt", "TEXT_PX_KEY"]

_FORMATS = ("png", "pdf", "svg")



def min_text_pt(fig: Figure) -> float | None:
    """The smallest font size (points) of any visible text in `fig`: titles, labels,
    annotations, and the tick labels of axes that have ticks. No drawing is needed."""
    from matplotlib.text import Text

    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    for ax in (a for a in fig.axes if a.axison and a.get_visible()):
        for axis, ticks in ((ax.xaxis, ax.get_xticks()), (ax.yaxis, ax.get_yticks())):
            if axis.get_visible() and len(ticks):
                tick = axis.get_major_ticks(1)[0]
                if tick.label1.get_visible() or tick.label2.get_visible():
                    sizes.append(tick.label1.get_fontsize())
    return float(min(sizes)) if sizes else None


def save_figure(
    fig: Figure, path: str | os.PathLike[str], formats: Sequence[str] = ("png",), dpi: int = 150
) -> list[Path]:
    """Save `fig` once per format, then release it.

    Each file is `path` with its suffix replaced by the format (`fig.png`, `fig.pdf`), written
    to `<file>.tmp` and renamed, so readers never see half a file. PNG is rendered at `dpi`;
    PDF and SVG are vector (text stays text) with images embedded as pixels; metadata dates
    are left out so reruns give identical files. A PNG records the size of its smallest text
    in pixels (`TEXT_PX_KEY`), which `fgscope report` uses to keep it readable.

    After saving, `fig.clf()` drops every artist, so the (large) image data is freed even while
    the caller still holds `fig`; the figure is empty afterwards. Nothing global is touched:
    fgscope figures are never registered with pyplot.

    Returns:
        The written paths, in the order of `formats`.

    Raises:
        ValueError: a format other than png, pdf or svg.
    """
    fmts = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in fmts if f not in _FORMATS]
    if bad:
        raise ValueError(f"unsupported figure formats {bad}; use {', '.join(_FORMATS)}")
    path = Path(path)
    written: list[Path] = []
    meta: dict[str, dict[str, Any]] = {
        "png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None},
    }
    try:
        with style_context():
            if "png" in fmts and (pt := min_text_pt(fig)) is not None:
                meta["png"][TEXT_PX_KEY] = f"{pt * dpi / 72:.1f}"
            for fmt in fmts:
                target = path.with_suffix("." + fmt)
                tmp = target.with_name(target.name + ".tmp")
                extra: dict[str, Any] = {"pil_kwargs": dict(PNG_PARAMS)} if fmt == "png" else {}
                try:
                    fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta[fmt], **extra)
                    os.replace(tmp, target)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                written.append(target)
    finally:
        fig.clf()
    return written
