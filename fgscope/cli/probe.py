"""`fgscope probe MODEL DATA`: linear probes at every depth (where does fine-grained information live?)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["probe", "check_inputs", "FromDumpOpt"]

COpt = Annotated[float, typer.Option("--c", help="Inverse L2 strength of the logistic regression (C).")]
FromDumpOpt = Annotated[
    Path | None,
    typer.Option(
        "--from-dump",
        help="Read the pooled features from this `fgscope dump` folder (also a torchrun / --shard "
        "dump) instead of running a model: no MODEL or DATA then.",
        show_default=False,
    ),
]


def check_inputs(model: str | None, data: Path | None, from_dump: Path | None, command: str) -> None:
    """MODEL and DATA, or --from-dump alone. Raises ConfigError."""
    from fgscope.errors import ConfigError

    if from_dump is not None and (model is not None or data is not None):
        raise ConfigError(f"{command} --from-dump reads the dump's features: MODEL and DATA are not used",
                          hint=f"run `fgscope {command} --from-dump {from_dump}` without them")
    if from_dump is None and (model is None or data is None):
        raise ConfigError(f"{command} needs MODEL and DATA (an ImageFolder), or --from-dump DIR",
                          hint=f"e.g. `fgscope {command} resnet50 birds/`")


@opt.with_options
def probe(
    model: Annotated[str | None, typer.Argument(
        help="torchvision name or model file (see `fgscope summary --help`); not with --from-dump.",
        show_default=False, metavar="MODEL")] = None,
    data: Annotated[Path | None, typer.Argument(
        help="Labelled images in ImageFolder layout: DATA/CLASS/IMAGE.", show_default=False,
        metavar="DATA")] = None,
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
    from_dump: FromDumpOpt = None,
) -> None:
    """Where does (fine-grained) information live? A linear probe at every selected layer.

    Pools each layer's features (avg, max, bilinear, or hypercolumn: the maps up to that
    layer fused), fits a standardised multinomial logistic regression with stratified k-fold
    cross-validation, and reports accuracy ± std per layer for the fine labels (the class
    folders) and, with --coarse-map, the coarse labels. Writes probe.json/.csv/.md, probe.png
    (accuracy against depth, stages shaded) and manifest.json. With --from-dump DIR the
    features come from a `fgscope dump` folder and no model runs (docs/dump.md).
    """

    def job(console: Console) -> None:
        from fgscope.probe import ProbeConfig, run_probe

        check_inputs(model, data, from_dump, "probe")
        run_probe(ProbeConfig(
            model=model or "", data=data or Path("."), from_dump=from_dump, layers=layers_, pools=opt.split_pools(pool), coarse_map=coarse_map,
            folds=folds, seed=seed, out=output.out, overwrite=output.overwrite,
            model_kwargs=run.load_kwargs(), device=run.device, dtype=run.dtype,
            batch_size=batch_size, max_per_class=max_per_class, c=c,
        ), console)

    run_job(job, max_layers=max_layers)
