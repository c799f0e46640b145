"""`fgscope report`'s building blocks: page assembly, per-run sections, figures for papers.

- `fgscope.report.html`: escaping, embedded images, inline CSS and the sortable-table script,
  `render_page`.
- `fgscope.report.runs`: `load_runs`, what each earlier run folder is.
- `fgscope.report.sections`, `fgscope.report.results`: one function per section, reading a run
  folder's files (`cells` formats their values).
- `fgscope.report.paper`: one figure style at 3.5 / 7 in, exported as PNG, PDF and SVG; the
  figures themselves in `fgscope.report.panels` (image panels) and `fgscope.report.plots`.

The job that puts them together is `fgscope.report.run.run_report`.
"""

from __future__ import annotations

from fgscope.report.html import Section, render_page
from fgscope.report.panels import EnergyColumn
from fgscope.report.paper import PAPER_WIDTHS
from fgscope.report.runs import RunFolder, Runs, load_runs

__all__ = ["Section", "render_page", "PAPER_WIDTHS", "EnergyColumn", "RunFolder", "Runs", "load_runs"]
