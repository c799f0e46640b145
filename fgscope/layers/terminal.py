"""What `fgscope layers` prints: the abstraction table at the terminal's width
(`fgscope.render.table`) and the lines around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fgscope.layers.compute import InspectResult, LayerStats
from fgscope.layers.run import _fmt_cell, empty_notes, has_map

__all__ = ["print_table", "print_summary"]


# The terminal table: (header, LayerStats field, format, drop). On a narrow terminal columns
# with a higher `drop` are left out first (fgscope.render.table); a column without a value in
# any row (or whose field LayerStats lacks) is not shown; the files have every column.
_STAGE_COLOUR = {"early": "cyan", "middle": "green", "late": "magenta"}
_TERMINAL_COLUMNS: list[tuple[str, str, str, int]] = [
    ("#", "index", "d", 0), ("name", "name", "", 0), ("type", "type", "", 9),
    ("shape", "shape", "", 0), ("stride", "stride", "", 0), ("rf", "rf", "", 0),
    ("stage", "stage", "", 0), ("sparse", "sparsity", ".3f", 4), ("neg", "negative_frac", ".3f", 5),
    ("conc", "concentration", ".3f", 3), ("effdim", "eff_dim", ".1f", 3),
    ("PR", "pr_spatial", ".1f", 3), ("PR img", "pr_images", ".1f", 5), ("mean", "mean", ".3g", 8),
    ("max", "max", ".3g", 7), ("CKA in", "cka_input", ".3f", 6), ("CKA out", "cka_output", ".3f", 6),
    ("dCKA in", "dcka_input", ".3f", 6), ("dCKA out", "dcka_output", ".3f", 6),
    ("abstr.", "abstraction", ".3f", 2), ("transfer", "transfer", ".3f", 1),
]
_TEXT_FIELDS = ("name", "type", "shape", "stage")


def _terminal_cell(r: LayerStats, field_: str, spec: str) -> Any:
    v = getattr(r, field_, None)
    if field_ == "stage":
        return Text(str(v), style=_STAGE_COLOUR.get(str(v), ""))
    if field_ == "rf":
        return ("~" if v is not None and not r.rf_exact else "") + (_fmt_cell(v) or "–")
    if v is None or not spec:
        return _fmt_cell(v) or ("–" if field_ == "stride" else "")
    return format(v, spec)


def print_table(console: Console, result: InspectResult) -> None:
    from fgscope.render.table import Col, print_table

    shown = [c for c in _TERMINAL_COLUMNS
             if c[1] in _TEXT_FIELDS or any(getattr(r, c[1], None) is not None for r in result.rows)]
    cols = [Col(h, "left" if f in _TEXT_FIELDS else "right", drop, wrap=f == "name")
            for h, f, _, drop in shown]
    rows = [[_terminal_cell(r, f, spec) for _, f, spec, _ in shown] for r in result.rows]
    print_table(console, "abstraction table", cols, rows,
                left_out_note="layers.csv, .json and .md have every column")



def print_summary(console: Console, grids: bool, result: InspectResult, n_files: int, path: Path,
                  manifest: str, hierarchy: bool) -> None:
    """What `fgscope layers` prints once its files are written: the table, what the figures
    show, the first images' predictions, notes, why cells are empty, the files written."""
    print_table(console, result)
    flat = [r.name for r in result.rows if r.spatial is not None and not has_map(r)]
    if grids and flat:
        console.print(f"no grid for {len(flat)} 1x1 map{'s' if len(flat) > 1 else ''} "
                      f"({', '.join(flat)}): one value per channel, nothing spatial to show",
                      markup=False, soft_wrap=True)
    n, n_fig = result.n_images, len(result.display)
    if n > n_fig and (hierarchy or grids):
        shown = " and ".join(x for x in ("hierarchy.png" if hierarchy else "", "grids/" if grids else "") if x)
        verb = "show" if " and " in shown else "shows"
        console.print(f"{shown} {verb} the first {n_fig} of {n} images (--max-images); the table "
                      f"measures all {n}", markup=False, soft_wrap=True)
    if result.predictions:
        for li, preds in list(zip(result.images, result.predictions))[:n_fig]:
            top = ", ".join(f"{lab} {p:.1%}" for lab, p in preds)
            console.print(f"[bold]{escape(li.path.name)}[/]: {escape(top)}", soft_wrap=True)
        if n > n_fig:
            console.print(f"top-5 of every image: {manifest}", markup=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    for note in empty_notes(result.rows):
        console.print(f"[dim]empty: {escape(note)}[/]", soft_wrap=True)
    console.print(
        f"wrote {n_files} files to [bold]{escape(str(path))}[/] "
        f"({manifest}, layers.csv/.json/.md, hierarchy.png, geometry.png"
        f"{', grids/' if grids else ''})", soft_wrap=True,
    )
