"""`fgscope summary MODEL`: shapes, strides, receptive fields and parameters, no images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["summary"]


@opt.with_options
def summary(
    model: opt.DefaultModelArg = "mobilenet_v2",
    layers: opt.LayersOpt = "all",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    load: opt.ModelOptions = opt.ModelOptions(),
    where: opt.DeviceOptions = opt.DeviceOptions(),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the table and totals as JSON.")
    ] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write the table as CSV.")] = None,
) -> None:
    """Print every layer call's output shape, effective stride, receptive field and parameters.

    Runs one dummy input at the model's input size; no images are needed.
    """

    def job(console: Console) -> None:
        from fgscope.summary import SummaryConfig, run_summary

        run_summary(SummaryConfig(
            model=model, layers=layers, model_kwargs=load.load_kwargs(), device=where.device,
            json_path=json_path, csv_path=csv_path,
        ), console)

    run_job(job, tune=False, max_layers=max_layers)
