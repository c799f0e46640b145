"""`fgscope report [MODEL] [IMAGES...]`: one self-contained HTML page and figures for papers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["report"]


@opt.with_options
def report(
    model: Annotated[
        str | None,
        typer.Argument(
            help="torchvision name or model file (see `fgscope summary --help`); default: the "
            "embedded ImageNet MobileNetV2. With --from: more run folders.",
            show_default=False,
        ),
    ] = None,
    images: opt.ImagesArg = None,
    output: opt.OutputOptions = opt.OutputOptions(),
    from_: Annotated[
        list[Path] | None,
        typer.Option(
            "--from",
            help="Build the page from earlier run folders (layers, cam, probe, advise, "
            "similarity, dump, units or report) without recomputing; repeat it or list folders after it.",
            show_default=False,
        ),
    ] = None,
    probe_data: Annotated[
        Path | None,
        typer.Option(help="Labelled images (one subfolder per class) for linear probes, advice and the unit atlas."),
    ] = None,
    coarse_map: Annotated[
        Path | None,
        typer.Option(help="JSON map from fine to coarse class names, for coarse-label probes."),
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="Paper figure formats, comma-separated: png, pdf, svg.")
    ] = "png,pdf,svg",
    width: Annotated[
        str, typer.Option(help="Paper figure width: single (3.5 in column) or double (7 in).")
    ] = "double",
    layers_: opt.LayersOpt = "blocks",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    max_images: opt.MaxImagesOpt = 3,
    views: opt.ViewsOpt = 8,
    view_seed: opt.ViewSeedOpt = 0,
    run: opt.RunOptions = opt.RunOptions(),
) -> None:
    """One self-contained HTML page and figures for papers, for one model and its images.

    Runs `layers` (and Grad-CAM on the first image, layer-by-layer CKA with 4+ images,
    linear probes, advice and the unit atlas with --probe-data) into sub-folders, then writes report.html
    (run summary, abstraction table, hierarchy, geometry, stage grids, and the other
    results; images embedded, nothing loaded from the network) and figures/ (3.5 or 7 in
    wide, in each --format). With --from RUN_DIR... it builds the same page from earlier
    runs without recomputing.
    """
    from_dirs = list(from_ or [])
    if from_dirs:  # `--from a b c`: the positional arguments are run folders too
        from_dirs += [Path(p) for p in ([model] if model else []) + list(images or [])]
        model, images = None, []

    def job(console: Console) -> None:
        from fgscope.report.run import ReportConfig, run_report

        run_report(ReportConfig(
            model=model or "mobilenet_v2", images=list(images or []), from_dirs=from_dirs,
            out=output.out, overwrite=output.overwrite, probe_data=probe_data,
            coarse_map=coarse_map, formats=tuple(format_.split(",")), width=width,
            layers=layers_, max_images=max_images, views=views, view_seed=view_seed,
            model_kwargs=run.load_kwargs(),
            device=run.device, dtype=run.dtype,
        ), console)

    run_job(job, tune=not from_dirs, max_layers=None if from_dirs else max_layers)
