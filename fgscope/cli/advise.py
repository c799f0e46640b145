"""`fgscope advise MODEL DATA`: which layers to tap, where detail is lost, which pooling, what to fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli._common import (
    ArchOpt,
    DeviceOpt,
    DtypeOpt,
    FoldsOpt,
    LayersOpt,
    MaxPerClassOpt,
    MeanOpt,
    NumClassesOpt,
    OutOpt,
    OverwriteOpt,
    SeedOpt,
    SizeOpt,
    StdOpt,
    TrustOpt,
    WeightsOpt,
    guarded,
    model_kwargs,
)
from fgscope.cli.probe import CoarseMapOpt, PoolOpt, split_pools

__all__ = ["advise"]


def advise(
    model: Annotated[
        str,
        typer.Argument(help="torchvision name or model file (as for `fgscope probe`)."),
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
    coarse_map: CoarseMapOpt = None,
    pool: PoolOpt = None,
    layers_: LayersOpt = "stages",
    from_probe: Annotated[
        Path | None,
        typer.Option(help="Reuse the probe.json of a `fgscope probe` run folder instead of probing."),
    ] = None,
    folds: FoldsOpt = 5,
    seed: SeedOpt = 0,
    max_per_class: MaxPerClassOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    trust: TrustOpt = False,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    num_classes: NumClassesOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward.")] = 32,
) -> None:
    """A short written recommendation from linear probes, quoting its numbers.

    Probes the layers (default pools: avg, bilinear, hypercolumn) and says which layers to
    tap for fine-grained features, where over-compression starts (fine accuracy falls, or
    stops rising while coarse still rises; or the stride exceeds --part-size), whether
    bilinear or hypercolumn pooling pays off, and which stages to fine-tune. Writes
    advice.md, advice.json, the probe files and manifest.json.
    """
    console = Console(highlight=False)
    with guarded():
        from fgscope.advise.run import AdviseConfig, run_advise
        from fgscope.device import tune_host_allocator

        tune_host_allocator()
        config = AdviseConfig(
            model=model,
            data=data,
            part_size=part_size,
            coarse_map=coarse_map,
            pools=split_pools(pool, ("avg", "bilinear", "hypercolumn")),
            layers=layers_,
            out=out,
            overwrite=overwrite,
            from_probe=from_probe,
            folds=folds,
            seed=seed,
            model_kwargs=model_kwargs(weights, arch, trust, size, mean, std, num_classes),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_per_class=max_per_class,
        )
        run_advise(config, console)
