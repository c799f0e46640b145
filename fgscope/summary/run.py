"""The `fgscope summary` job: load the model, tabulate every layer call, print and write it."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fgscope.runs import write_text
from fgscope.summary.compute import ModelSummary, summarize

__all__ = ["SummaryConfig", "run_summary", "CSV_COLUMNS"]

CSV_COLUMNS = [
    "index", "name", "type", "shape", "stride", "rf", "stride_hw", "rf_hw", "padding_hw",
    "rf_exact", "rf_note", "layout", "global_context", "params",
]


@dataclass(frozen=True)
class SummaryConfig:
    """Options of one `fgscope summary` run.

    Attributes:
        model: the model spec (`fgscope.models.load_model`).
        layers: the layer selection.
        model_kwargs: keyword arguments of `load_model`.
        device: where the dummy forward runs.
        json_path, csv_path: files to write the table to (None: not written).
    """

    model: str = "mobilenet_v2"
    layers: str = "all"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    json_path: Path | None = None
    csv_path: Path | None = None


def run_summary(config: SummaryConfig, console: Console | None = None) -> ModelSummary:
    """Run the whole `summary` job; returns the table.

    Raises:
        FgscopeError: bad model, layers or device; an output file that cannot be written.
    """
    from fgscope.device import resolve_device
    from fgscope.models import load_model

    console = console or Console(quiet=True)
    dev = resolve_device(config.device)
    loaded = load_model(config.model, **config.model_kwargs)
    loaded.module.to(dev)
    result = summarize(loaded.module, loaded.input_size, config.layers, device=dev)
    _print_table(console, result, loaded)
    if config.json_path is not None:
        write_text(Path(config.json_path), json.dumps(result.to_dict(), indent=1) + "\n")
        console.print(f"wrote {config.json_path}", markup=False)
    if config.csv_path is not None:
        write_text(Path(config.csv_path), _csv(result))
        console.print(f"wrote {config.csv_path}", markup=False)
    return result


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _print_table(console: Console, result: ModelSummary, loaded: Any) -> None:
    from fgscope.render.table import Col, print_table

    src = loaded.source
    title = f"{src.arch or src.spec} ({src.weights or 'random init' if src.kind == 'torchvision' else src.kind})"
    cols = [Col("#"), Col("name", "left", wrap=True), Col("type", "left", drop=2),
            Col("shape", "left"), Col("stride"), Col("rf"), Col("params", drop=1)]
    rows = []
    for r in result.rows:
        rf = _fmt(r.rf) if r.rf_hw is None or r.rf_hw[0] == r.rf_hw[1] else "x".join(map(_fmt, r.rf_hw))
        if r.rf is not None and not r.rf_exact:
            rf = "~" + rf
        rows.append([str(r.index), r.name, r.type, "x".join(map(str, r.shape)), _fmt(r.stride), rf,
                     f"{r.params:,}"])
    print_table(console, title, cols, rows,
                left_out_note="--csv FILE or --json FILE writes every column")
    h, w = result.input_size
    console.print(
        f"input {h}x{w} | params {result.total_params:,} "
        f"(trainable {result.trainable_params:,}) | mult-adds {result.macs / 1e6:,.1f} M"
    )
    for note in result.notes:  # the model's own notes are printed when it loads (fgscope.notes)
        console.print(f"[yellow]note:[/] {escape(note)}")


def _csv(result: ModelSummary) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in result.rows:
        d = r.to_dict()
        writer.writerow({k: json.dumps(d[k]) if isinstance(d[k], list) else d[k] for k in CSV_COLUMNS})
    return buf.getvalue()
