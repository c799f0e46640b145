"""`fgscope cam [MODEL] [IMAGE] [--class C | --contrast A B]`: Grad-CAM at every stage."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli._common import (
    ArchOpt,
    DeviceOpt,
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

__all__ = ["cam"]


def cam(
    model: Annotated[
        str,
        typer.Argument(
            help="torchvision name or model file (see `fgscope summary --help`); "
            "default: the embedded ImageNet MobileNetV2."
        ),
    ] = "mobilenet_v2",
    image: Annotated[
        str | None,
        typer.Argument(help="One image file; default: a sample photo.", show_default=False),
    ] = None,
    class_: Annotated[
        str | None,
        typer.Option(
            "--class",
            "-c",
            help="Class to explain, by index or name (case-insensitive); default: the top-1 prediction.",
            show_default=False,
        ),
    ] = None,
    contrast: Annotated[
        tuple[str, str] | None,
        typer.Option(
            help="Explain class A against class B (gradient of logit A - logit B), e.g. "
            "--contrast 'Siamese cat' 'Persian cat'.",
            metavar="A B",
            show_default=False,
        ),
    ] = None,
    layers_: LayersOpt = "stages",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    trust: TrustOpt = False,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Grad-CAM (Selvaraju et al. 2017) at every stage, beside the image.

    Channel weights: the spatial mean of the gradient of the class logit
    (before softmax) with respect to each layer's maps; the map: ReLU of the
    weighted sum. The figure shows at which depth class-discriminative parts
    appear. Writes cam.json, cam.png, one cam_NN_LAYER.png per layer,
    cam_raw.npz (raw maps and weights) and manifest.json.
    """
    console = Console(highlight=False)
    with guarded():
        from fgscope.cam.run import CamConfig, run_cam
        from fgscope.device import tune_host_allocator

        tune_host_allocator()
        config = CamConfig(
            model=model,
            image=image,
            target=class_,
            contrast=tuple(contrast) if contrast else None,
            layers=layers_,
            out=out,
            overwrite=overwrite,
            model_kwargs=model_kwargs(weights, arch, trust, size, mean, std),
            device=device,
        )
        run_cam(config, console)
