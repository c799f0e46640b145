"""`fgscope similarity MODEL IMAGES... [--vs MODEL2]`: linear CKA between layers across depth."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["similarity"]


@opt.with_options
def similarity(
    model: opt.DefaultModelArg = "mobilenet_v2",
    images: Annotated[
        list[str] | None,
        typer.Argument(help="At least 4 image files, folders (recursive) or globs.", show_default=False),
    ] = None,
    vs: Annotated[
        str | None,
        typer.Option(
            help="A second model (e.g. the fine-tuned checkpoint): CKA between MODEL's layers "
            "(rows) and its layers (columns); same-named layers are ranked by how much they changed.",
        ),
    ] = None,
    vs_arch: Annotated[
        str | None, typer.Option(help="torchvision architecture of a --vs state_dict file.")
    ] = None,
    vs_weights: Annotated[str, typer.Option(help=f"For a --vs name: {opt.WEIGHTS_HELP}")] = "default",
    layers_: opt.LayersOpt = "stages",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    output: opt.OutputOptions = opt.OutputOptions(),
    batch_size: Annotated[int, typer.Option(min=4, help="Images per forward and per CKA minibatch.")] = 32,
    minibatch: Annotated[
        bool,
        typer.Option(
            "--minibatch/--full",
            help="Accumulate unbiased HSIC over minibatches (memory O(batch^2)), or use "
            "n x n Grams of all images (exact, memory O(n * features)).",
        ),
    ] = True,
    run: opt.RunOptions = opt.RunOptions(),
    from_dump: Annotated[
        Path | None,
        typer.Option(
            "--from-dump",
            help="Compare the layers stored in this `fgscope dump` folder (also a torchrun / "
            "--shard dump) instead of running a model; no MODEL or IMAGES then. Raw maps "
            "(--pool none) give the live numbers; pooled dumps give CKA of pooled features.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Linear CKA (Kornblith et al. 2019) between layers, biased and debiased.

    Each layer's whole output per image (flattened, not pooled) is compared
    across the images. With two or more batches of images CKA is accumulated
    over minibatches (Nguyen, Raghu & Kornblith 2021): memory does not grow
    with the number of images. With --vs, rows are MODEL's layers, columns
    the second model's. Writes similarity.json, similarity.csv,
    similarity_debiased.csv, similarity.png and manifest.json. With --from-dump DIR the
    stored layers of a `fgscope dump` are compared without running the model (docs/dump.md).
    """
    # --vs is loaded like MODEL (trust, size, normalisation), with its own weights and arch.
    vs_run = dataclasses.replace(run, weights=vs_weights, arch=vs_arch, num_classes=None)

    def job(console: Console) -> None:
        from fgscope.errors import ConfigError
        from fgscope.similarity import SimilarityConfig, run_similarity

        if from_dump is not None and (images or model != "mobilenet_v2"):
            raise ConfigError("similarity --from-dump compares the dump's stored layers: MODEL and "
                              "IMAGES are not used", hint=f"run `fgscope similarity --from-dump {from_dump}`")
        run_similarity(SimilarityConfig(from_dump=from_dump,
            model=model, images=list(images or []), vs=vs, layers=layers_, out=output.out,
            overwrite=output.overwrite, model_kwargs=run.load_kwargs(),
            vs_model_kwargs=vs_run.load_kwargs(), device=run.device, dtype=run.dtype,
            batch_size=batch_size, minibatch=minibatch,
        ), console)

    run_job(job, max_layers=max_layers)
