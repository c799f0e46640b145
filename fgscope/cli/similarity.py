"""`fgscope similarity MODEL IMAGES... [--vs MODEL2]`: linear CKA between layers across depth."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli._common import (
    ArchOpt,
    DeviceOpt,
    DtypeOpt,
    LayersOpt,
    MeanOpt,
    OutOpt,
    OverwriteOpt,
    SizeOpt,
    StdOpt,
    TrustOpt,
    WeightsOpt,
    guarded,
    model_kwargs,
)

__all__ = ["similarity"]


def similarity(
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
            help="At least 4 image files, folders (recursive) or globs.", show_default=False
        ),
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
    vs_weights: Annotated[
        str, typer.Option(help="torchvision weights of a --vs name: default, a name, or none.")
    ] = "default",
    layers_: LayersOpt = "stages",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    batch_size: Annotated[
        int, typer.Option(min=4, help="Images per forward and per CKA minibatch.")
    ] = 32,
    minibatch: Annotated[
        bool,
        typer.Option(
            "--minibatch/--full",
            help="Accumulate unbiased HSIC over minibatches (memory O(batch^2)), or use "
            "n x n Grams of all images (exact, memory O(n * features)).",
        ),
    ] = True,
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    trust: TrustOpt = False,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Linear CKA (Kornblith et al. 2019) between layers, biased and debiased.

    Each layer's whole output per image (flattened, not pooled) is compared
    across the images. With two or more batches of images CKA is accumulated
    over minibatches (Nguyen, Raghu & Kornblith 2021): memory does not grow
    with the number of images. With --vs, rows are MODEL's layers, columns
    the second model's. Writes similarity.json, similarity.csv,
    similarity_debiased.csv, similarity.png and manifest.json.
    """
    console = Console(highlight=False)
    with guarded():
        from fgscope.device import tune_host_allocator
        from fgscope.similarity.run import SimilarityConfig, run_similarity

        tune_host_allocator()
        config = SimilarityConfig(
            model=model,
            images=list(images or []),
            vs=vs,
            layers=layers_,
            out=out,
            overwrite=overwrite,
            model_kwargs=model_kwargs(weights, arch, trust, size, mean, std),
            vs_model_kwargs=model_kwargs(vs_weights, vs_arch, trust, size, mean, std),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            minibatch=minibatch,
        )
        run_similarity(config, console)
