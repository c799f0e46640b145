"""`fgscope layers [MODEL] [IMAGES...]`: the abstraction table, grids and hierarchy figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli._common import (
    ArchOpt,
    DeviceOpt,
    DtypeOpt,
    LayersOpt,
    MeanOpt,
    NumClassesOpt,
    OutOpt,
    OverwriteOpt,
    SizeOpt,
    StdOpt,
    TrustOpt,
    WeightsOpt,
    guarded,
    model_kwargs,
)

__all__ = ["layers"]


def layers(
    model: Annotated[
        str,
        typer.Argument(
            help="torchvision name or model file (see `fgscope summary --help`); "
            "default: the embedded ImageNet MobileNetV2."
        ),
    ] = "mobilenet_v2",
    images: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders (recursive) or globs; default: a sample photo.",
            show_default=False,
        ),
    ] = None,
    layers_: LayersOpt = "blocks",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Channels per grid.")] = 16,
    rank: Annotated[
        str, typer.Option(help="Rank channels by mean | max | std | energy activation.")
    ] = "mean",
    normalize: Annotated[
        str, typer.Option(help="Colour scale per tile, or one per layer (with a colorbar).")
    ] = "tile",
    overlay: Annotated[
        bool, typer.Option(help="Blend each map, upsampled, over the image.")
    ] = False,
    cmap: Annotated[str, typer.Option(help="Perceptual colormap for maps.")] = "inferno",
    grids: Annotated[bool, typer.Option(help="Write the per-layer grids.")] = True,
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    trust: TrustOpt = False,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    num_classes: NumClassesOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward.")] = 16,
    probe_data: Annotated[
        Path | None,
        typer.Option(
            help="Labelled images (ImageFolder: DATA/CLASS/IMAGE): add a `transfer` column, "
            "each layer's fine-label linear-probe accuracy (avg pooling, k-fold CV)."
        ),
    ] = None,
    probe_folds: Annotated[
        int, typer.Option(help="Folds of the cross-validation for --probe-data.")
    ] = 5,
) -> None:
    """Show how features change with depth: table, activation grids, hierarchy figure.

    Writes layers.csv/.json/.md (one row per recorded layer call: shape, stride, receptive
    field, stage and statistics measured on the images), grids/ (top-k channels per layer
    and image), hierarchy.png, geometry.png and manifest.json into the output folder.
    With --probe-data the table gains a `transfer` column (see `fgscope probe`).
    """
    console = Console(highlight=False)
    with guarded():
        from fgscope.device import tune_host_allocator
        from fgscope.layers.run import LayersConfig, run_layers

        tune_host_allocator()
        config = LayersConfig(
            model=model,
            images=list(images or []),
            layers=layers_,
            out=out,
            overwrite=overwrite,
            top_k=top_k,
            rank=rank,
            normalize=normalize,
            overlay=overlay,
            cmap=cmap,
            grids=grids,
            model_kwargs=model_kwargs(weights, arch, trust, size, mean, std, num_classes),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            probe_data=probe_data,
            probe_folds=probe_folds,
        )
        run_layers(config, console)
