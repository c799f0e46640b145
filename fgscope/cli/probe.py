"""`fgscope probe MODEL DATA`: linear probes at every depth (where does fine-grained information live?)."""

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
    ModelArg,
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

__all__ = ["probe", "PoolOpt", "CoarseMapOpt", "split_pools"]

DataArg = Annotated[
    Path,
    typer.Argument(help="Labelled images in ImageFolder layout: DATA/CLASS/IMAGE.", show_default=False),
]
PoolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--pool", "-p",
        help="avg | max | bilinear | hypercolumn; repeat or comma-separate for several "
        "(default: avg).",
        show_default=False,
    ),
]
CoarseMapOpt = Annotated[
    Path | None,
    typer.Option(
        "--coarse-map",
        help='JSON {"fine class": "coarse class", ...}: also probe the coarse labels.',
    ),
]


def split_pools(pools: list[str] | None, default: tuple[str, ...] = ("avg",)) -> tuple[str, ...]:
    """`--pool a --pool b,c` -> ("a", "b", "c"); nothing -> `default`."""
    items = [p.strip() for item in (pools or []) for p in item.split(",") if p.strip()]
    return tuple(items) or default


def probe(
    model: ModelArg,
    data: DataArg,
    layers_: LayersOpt = "stages",
    pool: PoolOpt = None,
    coarse_map: CoarseMapOpt = None,
    folds: FoldsOpt = 5,
    seed: SeedOpt = 0,
    max_per_class: MaxPerClassOpt = None,
    c: Annotated[
        float, typer.Option("--c", help="Inverse L2 strength of the logistic regression (C).")
    ] = 1.0,
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
    """Where does (fine-grained) information live? A linear probe at every selected layer.

    Pools each layer's features (avg, max, bilinear, or hypercolumn: the maps up to that
    layer fused), fits a standardised multinomial logistic regression with stratified k-fold
    cross-validation, and reports accuracy ± std per layer for the fine labels (the class
    folders) and, with --coarse-map, the coarse labels. Writes probe.json/.csv/.md, probe.png
    (accuracy against depth, stages shaded) and manifest.json.
    """
    console = Console(highlight=False)
    with guarded():
        from fgscope.device import tune_host_allocator
        from fgscope.probe import ProbeConfig, run_probe

        tune_host_allocator()
        config = ProbeConfig(
            model=model,
            data=data,
            layers=layers_,
            pools=split_pools(pool),
            coarse_map=coarse_map,
            folds=folds,
            seed=seed,
            out=out,
            overwrite=overwrite,
            model_kwargs=model_kwargs(weights, arch, trust, size, mean, std, num_classes),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_per_class=max_per_class,
            c=c,
        )
        run_probe(config, console)
