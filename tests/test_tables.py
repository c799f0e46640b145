"""Terminal tables (fgscope.render.table): on a terminal they fit by leaving columns out and
wrapping names, never by cutting a value; piped or redirected they are printed whole."""

from __future__ import annotations

import io
import re

import pytest
from conftest import run
from rich.console import Console
from rich.text import Text

from fgscope.render.table import Col, fit_columns, print_table

COLS = [Col("#"), Col("name", "left", wrap=True), Col("type", "left", drop=3), Col("shape", "left"),
        Col("stride"), Col("rf"), Col("mean", drop=2), Col("max", drop=1)]
ROWS = [[i, f"layer{i}.0.conv{i}", "Conv2d", "64x56x56", 4, rf, 0.123456, -12.3456]
        for i, rf in enumerate((107, 203, 1311))]
VALUES = {"107", "203", "1311", "0.123456", "-12.3456", "64x56x56"}


def _print(width: int, terminal: bool, **kw) -> tuple[str, list[str]]:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=terminal, color_system=None)
    left_out = print_table(console, "abstraction table", COLS, ROWS, **kw)
    return buf.getvalue(), left_out


def _cells(text: str) -> set[str]:
    return {w for line in text.splitlines() for w in line.split()}


@pytest.mark.parametrize("width", [200, 80, 60, 48])
def test_terminal_table_fits_without_cutting_a_value(width):
    text, left_out = _print(width, True, left_out_note="layers.csv has every column")
    assert "…" not in text
    lines = text.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= width
    shown = [c.header for c in COLS if c.header not in left_out]
    for header in ("#", "name", "shape", "stride", "rf"):  # never left out
        assert header in shown
    # every value that is shown is shown whole; names too (wrapped at most, every character kept)
    cells = _cells(text)
    for v in ("107", "203", "1311", "64x56x56"):
        assert v in cells
    assert {"0.123456", "-12.3456"} & cells == ({"0.123456"} if "mean" in shown else set()) | (
        {"-12.3456"} if "max" in shown else set())
    joined = re.sub(r"\s+", "", text)
    for i in range(3):
        assert f"layer{i}.0.conv{i}" in joined
    if left_out:  # the highest `drop` goes first (type, then mean, then max); the caption says so
        assert set(left_out) == set(["type", "mean", "max"][: len(left_out)])
        assert "not shown at this width" in text and "layers.csv" in text
    else:
        assert "not shown" not in text


LONG = [[i, f"features.{i}.conv.0.0.backbone[out]", 4, rf] for i, rf in enumerate((107, 203, 1311))]
LONG_COLS = [Col("#"), Col("name", "left", wrap=True), Col("stride"), Col("rf")]


def test_name_wraps_before_a_number_is_cut():
    buf = io.StringIO()
    console = Console(file=buf, width=40, force_terminal=True, color_system=None)
    assert fit_columns(console, LONG_COLS, LONG, 40)[1] is not None  # the name column wraps
    print_table(console, None, LONG_COLS, LONG)
    text = buf.getvalue()
    assert "…" not in text and max(len(ln.rstrip()) for ln in text.splitlines()) <= 40
    assert {"107", "203", "1311"} <= _cells(text)
    lines = [ln for ln in text.splitlines()[2:]]  # after the header and its rule
    names = "".join(ln.split()[1] if ln.split()[0].isdigit() else ln.split()[0] for ln in lines)
    assert names == "".join(f"features.{i}.conv.0.0.backbone[out]" for i in range(3))


def test_too_narrow_for_anything_prints_whole_rows():
    text, _ = _print(20, True)
    assert "…" not in text
    assert {"107", "203", "1311", "64x56x56", "layer0.0.conv0"} <= _cells(text)


def test_not_a_terminal_prints_every_column_at_full_width():
    text, left_out = _print(80, False)  # rich assumes 80 columns for a pipe or a file
    assert left_out == [] and "…" not in text
    assert VALUES | {"Conv2d", "layer2.0.conv2"} <= _cells(text)
    header = next(ln for ln in text.splitlines() if ln.startswith("#"))
    assert header.split() == [c.header for c in COLS]
    assert all(ln == ln.rstrip() for ln in text.splitlines())  # no padding at line ends


def test_cells_are_text_not_markup():
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=True, color_system=None)
    print_table(console, None, [Col("name", "left"), Col("v")],
                [["backbone[out]", Text("0.5", style="bold")], ["[bold]x[/]", "1"]])
    out = buf.getvalue()
    assert "backbone[out]" in out and "[bold]x[/]" in out


def test_fit_columns_drops_by_priority_then_wraps():
    console = Console(file=io.StringIO(), width=200)
    keep, wrap = fit_columns(console, COLS, ROWS, 200)
    assert keep == list(range(len(COLS))) and wrap is None
    keep, wrap = fit_columns(console, COLS, ROWS, 44)
    assert [COLS[i].header for i in keep] == ["#", "name", "shape", "stride", "rf"] and wrap is None
    order = ["type", "mean", "max"]  # highest `drop` first
    for width in range(40, 100):
        keep, _ = fit_columns(console, COLS, ROWS, width)
        dropped = [c.header for i, c in enumerate(COLS) if i not in keep]
        assert set(dropped) == set(order[: len(dropped)]), (width, dropped)


# --- the commands, piped (CliRunner's output is not a terminal) ------------------------------


def test_summary_piped_keeps_every_name_and_number_whole():
    result = run("summary", "resnet50", "--weights", "none")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "…" not in out
    for name in ("layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3", "layer4.2.relu:3"):
        assert re.search(rf"^\s*\d+\s+{re.escape(name)}\s", out, re.M), name
    row = next(ln for ln in out.splitlines() if re.search(r"\slayer4\.2\.conv3\s", ln))
    assert row.split()[-3:] == ["32", "427", "1,048,576"]  # stride, rf, params: whole


def test_layers_piped_table_has_no_cut_numbers(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (40, 48), (120, 30, 200)).save(img)
    result = run("layers", "resnet18", img, "--weights", "none", "--size", "64", "--no-grids",
                 "--device", "cpu", "--out", tmp_path / "o", "--layers", "layer*,avgpool")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["#", "name"])
    rows = [ln.split() for ln in lines[head + 2:head + 7]]
    assert [r[1] for r in rows] == ["layer1", "layer2", "layer3", "layer4", "avgpool"]
    assert all("…" not in c for r in rows for c in r)
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4"]
    assert "type" in lines[head].split() and "mean" in lines[head].split()  # every column
