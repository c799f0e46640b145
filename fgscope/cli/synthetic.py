"""`fgscope synthetic OUT`: write the synthetic fine-grained data set (also `python -m fgscope.synthetic`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from fgscope.cli._common import run_job

__all__ = ["synthetic"]


def synthetic(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (ImageFolder layout).")],
    per_class: Annotated[int, typer.Option("--per-class", help="Images per fine class (12 classes).")] = 40,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 224,
    seed: Annotated[int, typer.Option("--seed", help="The same seed gives the same images.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty folder.")] = False,
) -> None:
    """Write the synthetic fine-grained set: coarse label = shape, fine = shape + small spot.

    12 fine classes (circle/square/triangle x stripes/dots spot x top-left/bottom-right) in
    ImageFolder layout, plus coarse_map.json for `fgscope probe --coarse-map`.
    """

    def job(console: Console) -> None:
        from fgscope.synthetic import SHAPES, generate, masks_dir

        with Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("images", total=12 * max(per_class, 0))
            ds = generate(out_dir, per_class=per_class, size=size, seed=seed, overwrite=overwrite,
                          on_image=lambda: bar.advance(task))
        console.print(
            f"wrote {ds.n_images} images ({len(ds.classes)} fine classes, {len(SHAPES)} coarse) "
            f"to [bold]{escape(str(ds.root))}[/] and {ds.coarse_map_path.name}; part masks to "
            f"[bold]{escape(str(masks_dir(ds.root)))}[/]"
        )

    run_job(job, tune=False)
