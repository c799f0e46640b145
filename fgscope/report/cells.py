"""Formatting of run-file values for the page: numbers, shapes, hashes, table cells.

Values come from JSON written by other commands, so every function accepts None (shown
blank) and lists (shapes, shown `64×56×56`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fgscope.report.html import Cell, esc

__all__ = ["fmt", "fmt_int", "sort_value", "stage_cell", "name_cell", "short_hash", "kv_table"]


def fmt(v: Any, spec: str = ".3f") -> str:
    """A number with `spec`, a list as `a×b×c`, None/NaN as blank, anything else as text."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    if isinstance(v, (list, tuple)):
        return "×".join(fmt(x, "g") for x in v)
    return str(v)


def fmt_int(v: Any) -> str:
    """A whole number without a decimal point (`4.0` -> `4`), None as blank."""
    return "" if v is None else f"{float(v):g}"


def sort_value(v: Any) -> float | str | None:
    """What a table cell sorts by: numbers, text, a shape by its size, None last."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return math.prod(float(x) for x in v) if all(isinstance(x, (int, float)) for x in v) else str(v)
    return str(v)


def stage_cell(stage: Any) -> Cell:
    """A stage name coloured like the figures (early, middle, late)."""
    s = str(stage or "")
    return Cell(esc(s), s, f"l st-{s}" if s in ("early", "middle", "late") else "l")


def name_cell(name: Any) -> Cell:
    """A layer name in monospace, pinned when its table scrolls sideways."""
    return Cell(f'<span class="mono">{esc(name)}</span>', str(name), "l nm")


def short_hash(h: Any) -> str:
    """The first 12 hex digits of a sha256, the whole one as a tooltip."""
    return f'<span class="mono" title="{esc(h)}">{esc(str(h)[:12])}</span>' if h else "–"


def kv_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of (label, HTML value); empty values are left out."""
    body = "".join(f'<tr><th scope="row">{esc(k)}</th><td>{v}</td></tr>' for k, v in rows if v)
    return f'<div class="scroll"><table class="kv"><tbody>{body}</tbody></table></div>'
