"""`fgscope advise MODEL DATA`: which layers to tap, where detail is lost, which pooling, what to fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["advise"]


@opt.with_options
def advise(
    model: Annotated[
        str, typer.Argument(help="torchvision name or model file (as for `fgscope probe`).")
    ] = "mobilenet_v2",
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled images in ImageFolder layout (not needed with --from-probe).",
            show_default=False,
        ),
    ] = None,
    part_size: Annotated[
        int | None,
        typer.Option(help="Size in input pixels of the parts that tell fine classes apart."),
    ] = None,
    coarse_map: opt.CoarseMapOpt = None,
    pool: opt.PoolOpt = None,
    layers_: opt.LayersOpt = "stages",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    from_probe: Annotated[
        Path | None,
        typer.Option(help="Reuse the probe.json of a `fgscope probe` run folder instead of probing."),
    ] = None,
    folds: opt.FoldsOpt = 5,
    seed: opt.SeedOpt = 0,
    max_per_class: opt.MaxPerClassOpt = None,
    output: opt.OutputOptions = opt.OutputOptions(),
    run: opt.RunOptions = opt.RunOptions(),
    batch_size: opt.BatchSizeOpt = 32,
    from_dump: Annotated[
        Path | None,
        typer.Option(
            "--from-dump",
            help="Probe the pooled features of this `fgscope dump` folder (also a torchrun / "
            "--shard dump) instead of running MODEL over DATA; default pools: those of avg, "
            "bilinear, hypercolumn that the dump can give.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """A short written recommendation from linear probes, quoting its numbers.

    Probes the layers (default pools: avg, bilinear, hypercolumn) and says which layers to
    tap for fine-grained features, where over-compression starts (fine accuracy falls, or
    stops rising while coarse still rises; or the stride exceeds --part-size), whether
    bilinear or hypercolumn pooling pays off, and which stages to fine-tune. Writes
    advice.md, advice.json, the probe files and manifest.json.
    """

    def job(console: Console) -> None:
        from fgscope.advise import AdviseConfig, run_advise

        run_advise(AdviseConfig(
            model=model, data=data, part_size=part_size, coarse_map=coarse_map,
            pools=opt.split_pools(pool, ("avg", "bilinear", "hypercolumn")), layers=layers_,
            out=output.out, overwrite=output.overwrite, from_probe=from_probe, from_dump=from_dump,
            pools_given=bool(pool), folds=folds,
            seed=seed, model_kwargs=run.load_kwargs(), device=run.device, dtype=run.dtype,
            batch_size=batch_size, max_per_class=max_per_class,
        ), console)

    run_job(job, max_layers=max_layers)
