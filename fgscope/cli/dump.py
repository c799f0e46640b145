"""`fgscope dump MODEL INPUTS...` and `fgscope dump-merge DIR`: activations of whole data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["dump", "dump_merge"]


@opt.with_options
def dump(
    model: opt.ModelArg,
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="A folder (class subfolders become labels), globs, image files, or a .txt "
            "file listing image paths (one per line, relative to the file).",
            show_default=False,
        ),
    ],
    layers_: opt.LayersOpt = "stages",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    pool: Annotated[
        str,
        typer.Option(
            help="none (raw maps) | avg | max | bilinear (B-CNN: sum of outer products, "
            "signed sqrt, L2-normalised; C*C values per layer)."
        ),
    ] = "avg",
    resize_to: Annotated[
        str | None,
        typer.Option(
            "--resize-to",
            metavar="HxW",
            help="With --pool none: reduce maps to at most HxW (adaptive average pooling).",
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Storage dtype: float32 | float16 | bfloat16.")
    ] = "float32",
    precision: Annotated[
        str,
        typer.Option(help="Compute dtype of the forward: float32 | float16 | bfloat16 (autocast)."),
    ] = "float32",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o",
            help="Dump folder. Running the same command again continues an interrupted dump.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a dump already in --out instead of continuing it.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward.")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Decoding processes (0: none).")] = 2,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="i/N",
            help="Process only part i of N (0-based contiguous blocks of the inputs), e.g. "
            "one task of a SLURM array. Under torchrun each rank takes its own part.",
        ),
    ] = None,
    shard_mb: Annotated[
        float, typer.Option("--shard-mb", help="Target size of each shard file in MiB.")
    ] = 128.0,
    shard_rows: Annotated[
        int | None,
        typer.Option("--shard-rows", min=1, help="Images per shard file (overrides --shard-mb)."),
    ] = None,
    load: opt.ImageModelOptions = opt.ImageModelOptions(),
    where: opt.DeviceOptions = opt.DeviceOptions(),
) -> None:
    """Dump the activations of whole data sets to sharded safetensors files.

    Writes into --out: shards/*.safetensors (one tensor per layer, rows in
    input order), index.json (layers, shapes, dtypes, shards and their rows,
    paths, labels, failures), inputs.json, dump.json and manifest.json.
    Read it with fgscope.store.open(DIR)["LAYER"][rows], or with
    safetensors, torch or numpy alone (docs/dump.md). Unreadable images are
    skipped and listed. Interrupted? Run the same command again.
    """

    def job(console: Console) -> None:
        from fgscope.dump import DumpConfig, parse_hw, parse_shard, run_dump

        run_dump(DumpConfig(
            model=model, inputs=tuple(inputs), layers=layers_, pool=pool,
            resize_to=parse_hw(resize_to) if resize_to else None, dtype=dtype,
            precision=precision, out=out, overwrite=overwrite, batch_size=batch_size,
            workers=workers, shard=parse_shard(shard) if shard else None, shard_mb=shard_mb,
            shard_rows=shard_rows, device=where.device, model_kwargs=load.load_kwargs(),
        ), console)

    run_job(job, max_layers=max_layers)


def dump_merge(
    dirs: Annotated[
        list[Path],
        typer.Argument(
            help="The dump folder, then any folders holding more of its parts "
            "(when parts were written to different --out folders).",
            show_default=False,
        ),
    ],
    verify: Annotated[
        bool, typer.Option(help="Check every shard's sha256 against its record.")
    ] = False,
) -> None:
    """Write one index.json for all parts of a dump (e.g. a SLURM array).

    The part that completes last writes it by itself; run this when parts
    were written to different folders, or to check the shards (--verify).
    """

    def job(console: Console) -> None:
        from fgscope.dump import merge_dump

        merge_dump(dirs, console, verify=verify)

    run_job(job, tune=False)
