"""Terminal tables that fit the terminal without ever cutting a value.

rich shrinks a table that is wider than the terminal by truncating every cell (`0.…`, a
receptive field of 203 shown as `2…`, `layer1.0.con…` for three different layers). fgscope's
tables fit differently (`print_table`):

- on a terminal, low-priority columns are left out first (the caption says which, and
  where to find them); then long names wrap onto a second line (every character kept); a
  number is never shortened. When even that does not fit, the rows are printed whole and
  the terminal wraps them.
- when the output is not a terminal (a pipe or a file, where rich assumes 80 columns), every
  column is printed at its full width, one plain row per line.

Cells are plain text (a layer named `backbone[out]` is never read as rich markup) or rich
`Text` for styled cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.segment import Segment, Segments
from rich.table import Table
from rich.text import Text

__all__ = ["Col", "print_table", "fit_columns"]

_MIN_NAME = 12  # a wrapped name column keeps at least this many characters per line
_WIDE = 1 << 16


@dataclass(frozen=True)
class Col:
    """One column of a terminal table.

    Attributes:
        header: the header text.
        justify: `left` for names and words, `right` for numbers.
        drop: 0 = always shown; columns with higher values are left out first when the
            terminal is too narrow (equal values: the rightmost first).
        wrap: the column may wrap onto more lines (names): the last resort before rows are
            printed unfitted.
    """

    header: str
    justify: str = "right"
    drop: int = 0
    wrap: bool = False


def _cell(v: Any) -> Text:
    if isinstance(v, Text):
        return v
    return Text("" if v is None else str(v))


def _table(title: str | None, cols: Sequence[Col], rows: Sequence[Sequence[Any]],
           keep: Sequence[int], wrap_width: int | None, caption: str | None) -> Table:
    t = Table(
        title=Text(title) if title else None, caption=Text(caption) if caption else None,
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True,
        header_style="bold", title_justify="left", caption_justify="left",
        title_style="bold", caption_style="dim",
    )
    for i in keep:
        c = cols[i]
        if c.wrap and wrap_width is not None:
            t.add_column(Text(c.header), justify=c.justify, width=wrap_width, overflow="fold")  # type: ignore[arg-type]
        else:
            t.add_column(Text(c.header), justify=c.justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*(_cell(r[i]) for i in keep))
    return t


def _width(console: Console, table: Table) -> int:
    return Measurement.get(console, console.options.update(width=_WIDE), table).maximum


def fit_columns(
    console: Console, cols: Sequence[Col], rows: Sequence[Sequence[Any]], width: int
) -> tuple[list[int], int | None]:
    """Which columns fit in `width`, and the width of wrapped name columns (None: none wrap).

    Returns:
        `(kept column indices, wrap width)`; when nothing fits, every always-shown column
        and `wrap width` None (the caller prints the rows unfitted).
    """
    keep = list(range(len(cols)))
    order = sorted((i for i, c in enumerate(cols) if c.drop > 0), key=lambda i: (-cols[i].drop, -i))
    while True:
        if _width(console, _table(None, cols, rows, keep, None, None)) <= width:
            return keep, None
        if not order:
            break
        keep.remove(order.pop(0))
    wrapping = [i for i in keep if cols[i].wrap]
    if wrapping:
        full = _width(console, _table(None, cols, rows, keep, None, None))
        natural = max(
            max([len(_cell(r[i]).plain) for r in rows] + [len(cols[i].header)]) for i in wrapping
        )
        w = natural - (full - width) // len(wrapping) - 1
        while w >= _MIN_NAME:
            if _width(console, _table(None, cols, rows, keep, w, None)) <= width:
                return keep, w
            w -= 1
    return keep, None


def print_table(
    console: Console,
    title: str | None,
    cols: Sequence[Col],
    rows: Sequence[Sequence[Any]],
    *,
    left_out_note: str = "",
    caption: str | None = None,
) -> list[str]:
    """Print a table that fits the terminal, or whole when the output is not a terminal.

    Args:
        console: where to print.
        title: a line above the table.
        cols: the columns; `rows` hold one cell per column (str, number, None or rich Text).
        left_out_note: where the columns left out on a narrow terminal can be seen, e.g.
            `"layers.csv has every column"`; added to the caption when columns are left out.
        caption: a line under the table.

    Returns:
        The headers of the columns left out (empty when everything is shown).
    """
    if not console.is_terminal:
        keep, wrap = list(range(len(cols))), None
    else:
        keep, wrap = fit_columns(console, cols, rows, console.width)
    left_out = [cols[i].header for i in range(len(cols)) if i not in keep]
    cap = caption
    if left_out:
        note = f"not shown at this width: {', '.join(left_out)}"
        note += f" ({left_out_note})" if left_out_note else ""
        cap = f"{cap}\n{note}" if cap else note
    table = _table(title, cols, rows, keep, wrap, cap)
    fits = wrap is not None or _width(console, table) <= console.width
    if console.is_terminal and fits:
        console.print(table)
        return left_out
    # Whole rows, never cut: rendered at the table's own width, lines printed uncropped.
    options = console.options.update(width=max(_width(console, table), 1))
    lines = Segment.split_lines(console.render(table, options))
    out: list[Segment] = []
    for line in lines:
        line = list(line)
        while line and not line[-1].text.strip():  # no trailing padding in files
            line.pop()
        if line:
            last = line[-1]
            line[-1] = Segment(last.text.rstrip(), last.style, last.control)
        out += [*line, Segment.line()]
    console.print(Segments(out), crop=False, soft_wrap=True)
    return left_out
