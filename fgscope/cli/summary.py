"""`fgscope summary MODEL`: shapes, strides, receptive fields and parameters, no images."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fgscope.cli._common import (
    ArchOpt,
    DeviceOpt,
    LayersOpt,
    ModelArg,
    NumClassesOpt,
    SizeOpt,
    TrustOpt,
    WeightsOpt,
    guarded,
    model_kwargs,
)

__all__ = ["summary"]

CSV_COLUMNS = [
    "index", "name", "type", "shape", "stride", "rf", "stride_hw", "rf_hw", "padding_hw",
    "rf_exact", "global_context", "params",
]


def summary(
    model: ModelArg = "mobilenet_v2",
    layers: LayersOpt = "all",
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    trust: TrustOpt = False,
    size: SizeOpt = None,
    num_classes: NumClassesOpt = None,
    device: DeviceOpt = "cpu",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the table and totals as JSON.")
    ] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write the table as CSV.")] = None,
) -> None:
    """Print every layer call's output shape, effective stride, receptive field and parameters.

    Runs one dummy input at the model's input size; no images are needed.
    """
    console = Console(highlight=False)
    with guarded():
        from fgscope.device import resolve_device
        from fgscope.models import load_model
        from fgscope.summary.compute import summarize

        dev = resolve_device(device)
        kwargs = model_kwargs(weights, arch, trust, size, num_classes=num_classes)
        loaded = load_model(model, **kwargs)
        loaded.module.to(dev)
        result = summarize(loaded.module, loaded.input_size, layers, device=dev)
        _print_table(console, result, loaded)
        if json_path is not None:
            _write(json_path, json.dumps(result.to_dict(), indent=1))
            console.print(f"wrote {json_path}", markup=False)
        if csv_path is not None:
            _write_csv(csv_path, result)
            console.print(f"wrote {csv_path}", markup=False)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _print_table(console: Console, result, loaded) -> None:
    from rich.table import Table

    src = loaded.source
    title = f"{src.arch or src.spec} ({src.weights or 'random init' if src.kind == 'torchvision' else src.kind})"
    table = Table(title=title, show_lines=False, header_style="bold")
    for col, justify in [
        ("#", "right"), ("name", "left"), ("type", "left"), ("shape", "left"),
        ("stride", "right"), ("rf", "right"), ("params", "right"),
    ]:
        table.add_column(col, justify=justify)
    for r in result.rows:
        rf = _fmt(r.rf) if r.rf_hw is None or r.rf_hw[0] == r.rf_hw[1] else "x".join(map(_fmt, r.rf_hw))
        if r.rf is not None and not r.rf_exact:
            rf = "~" + rf
        table.add_row(
            str(r.index), Text(r.name), Text(r.type), "x".join(map(str, r.shape)), _fmt(r.stride), rf,
            f"{r.params:,}",
        )
    console.print(table)
    h, w = result.input_size
    console.print(
        f"input {h}x{w} | params {result.total_params:,} "
        f"(trainable {result.trainable_params:,}) | mult-adds {result.macs / 1e6:,.1f} M"
    )
    for note in src.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def _write(path: Path, text: str) -> None:
    from fgscope.errors import OutputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_csv(path: Path, result) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in result.rows:
        d = r.to_dict()
        writer.writerow({k: json.dumps(d[k]) if isinstance(d[k], list) else d[k] for k in CSV_COLUMNS})
    _write(path, buf.getvalue().rstrip("\n"))
