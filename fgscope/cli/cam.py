"""`fgscope cam [MODEL] [IMAGES...] [--class C | --contrast A B]`: Grad-CAM at every stage."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fgscope.cli import options as opt
from fgscope.cli._common import run_job

__all__ = ["cam"]


@opt.with_options
def cam(
    model: opt.DefaultModelArg = "mobilenet_v2",
    images: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders or globs, run one at a time; default: a sample photo.",
            show_default=False,
        ),
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
    layers_: opt.LayersOpt = "stages",
    max_layers: opt.MaxLayersOpt = opt.MAX_LAYERS_DEFAULT,
    max_images: opt.MaxImagesOpt = opt.MAX_IMAGES_DEFAULT,
    output: opt.OutputOptions = opt.OutputOptions(),
    load: opt.ImageModelOptions = opt.ImageModelOptions(),
    where: opt.DeviceOptions = opt.DeviceOptions(),
) -> None:
    """Grad-CAM (Selvaraju et al. 2017) at every stage, beside the image.

    Channel weights: the spatial mean of the gradient of the class logit
    (before softmax) with respect to each layer's maps; the map: ReLU of the
    weighted sum. The figure shows at which depth class-discriminative parts
    appear. Writes cam.json, cam.png, one cam_NN_LAYER.png per layer,
    cam_raw.npz (raw maps and weights) and manifest.json. With several images,
    cam.json has every image and per-layer means over them; figures and maps are
    written for the first --max-images images, one folder each.
    """

    def job(console: Console) -> None:
        from fgscope.cam import CamConfig, run_cam

        run_cam(CamConfig(
            model=model, images=list(images or []), max_images=max_images, target=class_,
            contrast=tuple(contrast) if contrast else None, layers=layers_, out=output.out,
            overwrite=output.overwrite, model_kwargs=load.load_kwargs(), device=where.device,
        ), console)

    run_job(job, max_layers=max_layers)
