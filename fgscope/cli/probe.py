"""`fgscope probe MODEL DATA`: linear probes at every depth (where does fine-grained information live?)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["probe"]

COpt = Annotated[float, typer.Option("--c", help="Inverse L2 strength of the logistic regression (C).")]


@opt.with_options
def probe(
    model: opt.ModelArg,
    data: opt.DataArg,
    layers_: opt.LayersOpt = "stages",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    pool: opt.PoolOpt = None,
    coarse_map: opt.CoarseMapOpt = None,
    folds: opt.FoldsOpt = 5,
    seed: opt.SeedOpt = 0,
    max_per_class: opt.MaxPerClassOpt = None,
    c: COpt = 1.0,
    output: opt.OutputOptions = opt.OutputOptions(),
    run: opt.RunOptions = opt.RunOptions(),
    batch_size: opt.BatchSizeOpt = 32,
) -> None:
    """Where does (fine-grained) information live? A linear probe at every selected layer.

    Pools each layer's features (avg, max, bilinear, or hypercolumn: the maps up to that
    layer fused), fits a standardised multinomial logistic regression with stratified k-fold
    cross-validation, and reports accuracy ± std per layer for the fine labels (the class
    folders) and, with --coarse-map, the coarse labels. Writes probe.json/.csv/.md, probe.png
    (accuracy against depth, stages shaded) and manifest.json.
    """

    def job(console: Console) -> None:
        from fgscope.probe import ProbeConfig, run_probe

        run_probe(ProbeConfig(
            model=model, data=data, layers=layers_, pools=opt.split_pools(pool), coarse_map=coarse_map,
            folds=folds, seed=seed, out=output.out, overwrite=output.overwrite,
            model_kwargs=run.load_kwargs(), device=run.device, dtype=run.dtype,
            batch_size=batch_size, max_per_class=max_per_class, c=c,
        ), console)

    run_job(job, max_layers=max_layers)
