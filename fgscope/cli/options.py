"""Options shared by several commands, each declared once.

An option group is a frozen dataclass whose fields carry their Typer declaration
(`Annotated[type, typer.Option(...)]`). A command names a group once in its signature
(`model: ModelOptions`) and is decorated with `@with_options`: the group's fields become the
command's options (in that place of its `--help`), and the command receives one instance.
Adding a model option touches this file only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

__all__ = [
    "OptionGroup",
    "ModelOptions",
    "ImageModelOptions",
    "RunOptions",
    "DeviceOptions",
    "OutputOptions",
    "with_options",
    "ModelArg",
    "DefaultModelArg",
    "ImagesArg",
    "DataArg",
    "LayersOpt",
    "MaxLayersOpt",
    "MAX_LAYERS_DEFAULT",
    "BatchSizeOpt",
    "MaxImagesOpt",
    "MAX_IMAGES_DEFAULT",
    "ViewsOpt",
    "ViewSeedOpt",
    "FoldsOpt",
    "SeedOpt",
    "MaxPerClassOpt",
    "PoolOpt",
    "CoarseMapOpt",
    "split_pools",
    "WEIGHTS_HELP",
]

F = TypeVar("F", bound=Callable[..., Any])

WEIGHTS_HELP = (
    "torchvision weights: default, a name (IMAGENET1K_V2) or none (random init); "
    "for timm:NAME a tag or none."
)
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps."


class OptionGroup:
    """Base of the option groups (a marker for `with_options`)."""


@dataclasses.dataclass(frozen=True)
class ModelOptions(OptionGroup):
    """How MODEL is loaded: weights, architecture of a state_dict, trust, input size."""

    weights: Annotated[str, typer.Option(help=WEIGHTS_HELP)] = "default"
    arch: Annotated[
        str | None,
        typer.Option(help="architecture of a state_dict file: resnet50, or timm:NAME for timm."),
    ] = None
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Allow unpickling a whole model file (this runs code from the file)."),
    ] = False
    size: Annotated[
        int | None,
        typer.Option(
            help="Input side in pixels (default: the weights' own; with --weights none the "
            "architecture's, e.g. 299 for inception_v3; else 224)."
        ),
    ] = None
    num_classes: Annotated[
        int | None,
        typer.Option(
            "--num-classes", min=1, help="Classes of a state_dict's classifier when they cannot be inferred."
        ),
    ] = None

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `fgscope.models.load_model`."""
        return {
            "weights": None if self.weights.lower() == "none" else self.weights,
            "arch": self.arch,
            "trust": self.trust,
            "size": self.size,
            "num_classes": self.num_classes,
        }


@dataclasses.dataclass(frozen=True)
class ImageModelOptions(ModelOptions):
    """How MODEL is loaded, and how images are normalised for it (commands that read images)."""

    mean: Annotated[
        tuple[float, float, float] | None,
        typer.Option(
            metavar="R,G,B",
            help="Normalisation mean per channel, e.g. 0.5,0.5,0.5 (or three values: 0.5 0.5 "
            "0.5); default: the weights' own, else ImageNet's.",
        ),
    ] = None
    std: Annotated[
        tuple[float, float, float] | None,
        typer.Option(
            metavar="R,G,B",
            help="Normalisation std per channel, like --mean; default: the weights' own, else "
            "ImageNet's.",
        ),
    ] = None

    def load_kwargs(self) -> dict[str, Any]:
        return {**super().load_kwargs(), "mean": self.mean, "std": self.std}


@dataclasses.dataclass(frozen=True)
class DeviceOptions(OptionGroup):
    """Where the model runs."""

    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto"


@dataclasses.dataclass(frozen=True)
class RunOptions(ImageModelOptions):
    """How MODEL is loaded and run on images: loading, normalisation, device and dtype."""

    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto"
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16 (autocast where supported).")] = "float32"


@dataclasses.dataclass(frozen=True)
class OutputOptions(OptionGroup):
    """The output folder of a run."""

    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: a new one under fgscope-out/)."),
    ] = None
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Reuse --out if it holds an earlier fgscope run: only that run's files are "
            "removed; a folder holding anything else is refused. Without it, a --out that holds "
            "files is left alone and the run goes to DIR-2 (a warning names it)."
        ),
    ] = False


def with_options(func: F) -> F:
    """Expand each `OptionGroup`-typed parameter of a Typer command into the group's options,
    and call the command with one group instance per such parameter."""
    hints = typing.get_type_hints(func, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for p in inspect.signature(func).parameters.values():
        ann = hints.get(p.name, p.annotation)
        if isinstance(ann, type) and issubclass(ann, OptionGroup):
            fields = dataclasses.fields(ann)  # type: ignore[arg-type]
            field_hints = typing.get_type_hints(ann, include_extras=True)
            groups[p.name] = (ann, [f.name for f in fields])
            for f in fields:
                params.append(inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                    annotation=field_hints[f.name],
                ))
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=ann))
    names = [p.name for p in params]
    clash = {n for n in names if names.count(n) > 1}
    assert not clash, f"{func.__name__}: options declared twice: {clash}"

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        for name, (cls, fields) in groups.items():
            kwargs[name] = cls(**{f: kwargs.pop(f) for f in fields})
        return func(**kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command  # type: ignore[return-value]


# --- single options and arguments shared by several commands --------------------------------

ModelArg = Annotated[
    str,
    typer.Argument(
        help="torchvision name (resnet50, torchvision:resnet50:IMAGENET1K_V2) or a model file "
        "(.pt/.pth state_dict or checkpoint with --arch, .pt2 export, TorchScript, pickled module with --trust).",
        show_default=False,
    ),
]
DefaultModelArg = Annotated[
    str,
    typer.Argument(
        help="torchvision name, timm:NAME, hf:FOLDER or model file (see `fgscope summary --help`); "
        "default: the embedded ImageNet MobileNetV2."
    ),
]
ImagesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Image files, folders (recursive) or globs; default: a sample photo.", show_default=False
    ),
]
DataArg = Annotated[
    Path,
    typer.Argument(help="Labelled images in ImageFolder layout: DATA/CLASS/IMAGE.", show_default=False),
]
LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        "-l",
        help="all | blocks | stages | features (timm's feature_info) | names, globs or regexes "
        "('re:^layer[12]$'), comma-separated. In globs `*` stays inside one name component "
        "('layer*': layer1..layer4; 'layer3.*': the blocks of layer3) and `**` crosses them "
        "('layer3.**': everything inside layer3). A keyword that is also a module's name: "
        "`features` is the module (torchvision), the others the keyword; `kw:WORD` is always "
        "the keyword, `name:NAME` always the module.",
    ),
]
MAX_LAYERS_DEFAULT = 64  # = fgscope.selection.DEFAULT_MAX_LAYERS (not imported here: torch)
MaxLayersOpt = Annotated[
    int,
    typer.Option(
        "--max-layers",
        min=1,
        help="The most layers globs and regexes of --layers may select (`all` is never limited).",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Images per forward.")]
MAX_IMAGES_DEFAULT = 8  # = fgscope.layers.compute.MAX_IMAGES (not imported here: torch)
MaxImagesOpt = Annotated[
    int,
    typer.Option(
        "--max-images",
        min=1,
        help="Images that get grids and figures (their activations are kept); statistics "
        "always cover every image, so memory does not grow with the data set.",
    ),
]
ViewsOpt = Annotated[
    int,
    typer.Option(
        "--views",
        min=0,
        help="Views per image for the abstraction column (2K extra forwards for each of at "
        "most 4 images); 0 leaves it empty, else at least 3.",
    ),
]
ViewSeedOpt = Annotated[int, typer.Option("--view-seed", help="Image i's views are drawn with seed SEED + i.")]
FoldsOpt = Annotated[int, typer.Option(help="Folds of the stratified cross-validation.")]
SeedOpt = Annotated[
    int, typer.Option(help="Seed of folds, subsampling, projections and random init (--weights none).")
]
MaxPerClassOpt = Annotated[
    int | None, typer.Option(help="Use at most this many images per class (seeded subset).")
]
PoolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--pool", "-p",
        help="avg | max | bilinear | hypercolumn; repeat or comma-separate for several (default: avg).",
        show_default=False,
    ),
]
CoarseMapOpt = Annotated[
    Path | None,
    typer.Option("--coarse-map", help='JSON {"fine class": "coarse class", ...}: also probe the coarse labels.'),
]


def split_pools(pools: list[str] | None, default: tuple[str, ...] = ("avg",)) -> tuple[str, ...]:
    """`--pool a --pool b,c` -> ("a", "b", "c"); nothing -> `default`."""
    items = [p.strip() for item in (pools or []) for p in item.split(",") if p.strip()]
    return tuple(items) or default
