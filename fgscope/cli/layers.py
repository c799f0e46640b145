"""`fgscope layers [MODEL] [IMAGES...]`: the abstraction table, grids and hierarchy figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["layers"]


@opt.with_options
def layers(
    model: opt.DefaultModelArg = "mobilenet_v2",
    images: opt.ImagesArg = None,
    layers_: opt.LayersOpt = "blocks",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    output: opt.OutputOptions = opt.OutputOptions(),
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Channels per grid.")] = 16,
    rank: Annotated[
        str, typer.Option(help="Rank channels by mean | max | std | energy activation.")
    ] = "mean",
    normalize: Annotated[
        str, typer.Option(help="Colour scale per tile, or one per layer (with a colorbar).")
    ] = "tile",
    overlay: Annotated[bool, typer.Option(help="Blend each map, upsampled, over the image.")] = False,
    cmap: Annotated[str, typer.Option(help="Perceptual colormap for maps.")] = "inferno",
    grids: Annotated[bool, typer.Option(help="Write the per-layer grids.")] = True,
    run: opt.RunOptions = opt.RunOptions(),
    batch_size: opt.BatchSizeOpt = 16,
    probe_data: Annotated[
        Path | None,
        typer.Option(
            help="Labelled images (ImageFolder: DATA/CLASS/IMAGE): add a `transfer` column, "
            "each layer's fine-label linear-probe accuracy (avg pooling, k-fold CV)."
        ),
    ] = None,
    probe_folds: Annotated[int, typer.Option(help="Folds of the cross-validation for --probe-data.")] = 5,
    max_images: opt.MaxImagesOpt = opt.MAX_IMAGES_DEFAULT,
    views: opt.ViewsOpt = 8,
    view_seed: opt.ViewSeedOpt = 0,
) -> None:
    """Show how features change with depth: table, activation grids, hierarchy figure.

    Writes layers.csv/.json/.md (one row per recorded layer call: shape, stride, receptive
    field, stage and statistics measured on every image, accumulated batch by batch),
    grids/ (top-k channels per layer, for the first --max-images images), hierarchy.png
    (one row per such image), geometry.png and manifest.json into the output folder.
    With --probe-data the table gains a `transfer` column (see `fgscope probe`).
    """

    def job(console: Console) -> None:
        from fgscope.layers import LayersConfig, run_layers

        run_layers(LayersConfig(
            model=model, images=list(images or []), layers=layers_, out=output.out,
            overwrite=output.overwrite, top_k=top_k, rank=rank, normalize=normalize,
            overlay=overlay, cmap=cmap, grids=grids, model_kwargs=run.load_kwargs(),
            device=run.device, dtype=run.dtype, batch_size=batch_size, probe_data=probe_data,
            probe_folds=probe_folds, max_images=max_images, views=views, view_seed=view_seed,
        ), console)

    run_job(job, max_layers=max_layers)
