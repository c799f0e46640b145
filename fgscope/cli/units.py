"""`fgscope units MODEL DATA`: a unit atlas (what each unit detects, and which units find parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["units"]

UnitsOpt = Annotated[
    str | None,
    typer.Option("--units", "-u", help="Units shown per layer: a count (default 8, chosen by --rank) "
                 "or unit indices, e.g. 3,17,42.", show_default=False),
]
RankOpt = Annotated[str, typer.Option(help="How a count of units is chosen: selective (highest class "
                                      "selectivity; needs class folders) | active (highest top-K peaks).")]
TopOpt = Annotated[int, typer.Option("--top", "-k", min=1, help="Examples kept per unit (top-K images).")]
MasksOpt = Annotated[
    Path | None,
    typer.Option("--masks", help="Folder of part masks, one PNG per image (same relative path or stem; "
                 "0 background, label values for parts, legend.json names them)."),
]
KeypointsOpt = Annotated[
    Path | None,
    typer.Option("--keypoints", help="Part keypoints, rows `image part x y [visible]` (CUB-200's "
                 "part_locs.txt works); each becomes a disc of radius 0.06 x the shorter side."),
]
NoFiguresOpt = Annotated[bool, typer.Option("--no-figures", help="Write the numbers only.")]


@opt.with_options
def units(
    model: opt.ModelArg,
    data: Annotated[Path, typer.Argument(help="Images: a folder (class subfolders give labels), a glob "
                                         "or a .txt list.", show_default=False)],
    layers_: opt.LayersOpt = "stages",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    units_: UnitsOpt = None,
    rank: RankOpt = "selective",
    top: TopOpt = 8,
    masks: MasksOpt = None,
    keypoints: KeypointsOpt = None,
    seed: opt.SeedOpt = 0,
    no_figures: NoFiguresOpt = False,
    output: opt.OutputOptions = opt.OutputOptions(),
    run: opt.RunOptions = opt.RunOptions(),
    batch_size: opt.BatchSizeOpt = 32,
) -> None:
    """What each unit detects, at every depth: a unit atlas over the whole data set.

    One streaming pass keeps, for every channel of each selected layer, its top-K images
    with the peak's position, mean, max, activation quantiles and (with class folders) the
    class selectivity index. Writes units.json/.csv, dataset-example figures cropped at
    each unit's receptive field (examples/LAYER.png), overview.png, filters.png and, with
    --masks or --keypoints, part IoU per unit (parts.md, parts.png: part detectors by depth).
    """

    def job(console: Console) -> None:
        from fgscope.units import UnitsConfig, run_units

        run_units(UnitsConfig(
            model=model, data=data, layers=layers_, units=units_, rank=rank, top=top, masks=masks,
            keypoints=keypoints, out=output.out, overwrite=output.overwrite,
            model_kwargs=run.load_kwargs(), device=run.device, dtype=run.dtype,
            batch_size=batch_size, seed=seed, figures=not no_figures,
        ), console)

    run_job(job, max_layers=max_layers)
