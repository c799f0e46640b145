"""The values that `load_model` builds and returns: preprocessing, source, loaded model.

Also the validators for the size/mean/std/labels options, shared by the rest of the package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from fgscope.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_MODEL",
    "Preprocess",
    "ModelSource",
    "LoadedModel",
    "TorchScriptModel",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "mobilenet_v2"  # with IMAGENET1K_V1 weights, shipped offline (_EMBEDDED_WEIGHTS)
_LIST_HINT = (
    "list them with `python -c 'import fgscope.models as m; print(m.list_architectures())'`"
)


@dataclass(frozen=True)
class Preprocess:
    """How an RGB PIL image becomes the model's input tensor (torchvision ImageClassification).

    Attributes:
        crop_size: (H, W) of the model input.
        resize_size: the shorter side is resized to this before the center crop; None resizes
            straight to `crop_size` (the aspect ratio is not kept).
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel std the result is divided by.
        interpolation: 'bilinear', 'bicubic' or 'nearest'.
        squash: resize both sides to `resize_size` (the aspect ratio is not kept) before the
            center crop, as timm's `crop_mode='squash'` does; False resizes the shorter side.
    """

    crop_size: tuple[int, int]
    resize_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    squash: bool = False

    def __post_init__(self) -> None:
        if self.resize_size is not None and not _is_int(self.resize_size, 8):
            raise ConfigError(f"resize size must be an integer >= 8, got {self.resize_size!r}")
        # Validated and normalized to tuples, so that equal settings compare and hash equal.
        object.__setattr__(self, "crop_size", _check_size(self.crop_size))
        object.__setattr__(self, "mean", _check_stats("mean", self.mean))
        object.__setattr__(self, "std", _check_stats("std", self.std))
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ConfigError(
                f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}"
            )

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """Resize, center-crop, scale to [0, 1] and normalize one image.

        Args:
            image: an RGB PIL image (other modes are converted) or a uint8 (3, H, W) tensor.

        Returns:
            A (3, H, W) float32 tensor with (H, W) = `crop_size`; for the same parameters it
            equals torchvision's `weights.transforms()(image)`, op for op.
        """
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        if self.resize_size is None:
            size = list(self.crop_size)
        else:
            size = [self.resize_size] * (2 if self.squash else 1)
        img = F.resize(
            image, size, interpolation=InterpolationMode(self.interpolation), antialias=True
        )
        img = F.center_crop(img, list(self.crop_size))
        if not isinstance(img, torch.Tensor):
            img = F.pil_to_tensor(img)
        img = F.convert_image_dtype(img, torch.float)
        return F.normalize(img, mean=list(self.mean), std=list(self.std))

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Invert the normalization (for overlays); `x` is not modified.

        Args:
            x: (C, H, W) or (N, C, H, W) normalized tensor.

        Returns:
            A new tensor of the same shape in pixel units of [0, 1] (not clamped).
        """
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return x * std + mean

    def to_image(self, x: torch.Tensor) -> Image.Image:
        """The RGB picture the model saw: `x` (3, H, W) normalized, unnormalized and clamped."""
        pixels = self.unnormalize(x.detach().cpu()).clamp(0, 1)
        arr = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr, "RGB")


@dataclass(frozen=True)
class ModelSource:
    """What was loaded, for manifests and reproducibility.

    Attributes:
        spec: what the user typed (`<module pkg.Class>` for a module instance).
        kind: 'torchvision', 'timm', 'hf', 'state_dict', 'pickled_module', 'export',
            'torchscript' or 'module'.
        arch: the torchvision builder name when known ('timm:NAME' for a timm state_dict, the
            timm name for 'timm', the transformers class for 'hf').
        weights: the weights enum, e.g. 'MobileNet_V2_Weights.IMAGENET1K_V1'; None = not torchvision
            weights (random init, or weights from the file itself).
        path: absolute path of the file that was read, if any.
        sha256: hex sha256 of that file.
        notes: caveats about how the model was resolved and what can be captured from it.
    """

    spec: str
    kind: str
    arch: str | None
    weights: str | None
    path: str | None
    sha256: str | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run model.

    Attributes:
        module: the network in eval mode, on CPU (a passed-in module stays where it was).
        preprocess: how an image becomes its input.
        input_size: (H, W) of the input, equal to `preprocess.crop_size`.
        labels: class names when known.
        source: where the model came from.
        max_batch: the most inputs one forward may hold; None = any number. Set for a torch.export
            program exported with a static batch of 1 or a bounded dynamic batch: every job
            splits its batches to at most this many images.
    """

    module: nn.Module
    preprocess: Preprocess
    input_size: tuple[int, int]
    labels: tuple[str, ...] | None
    source: ModelSource
    max_batch: int | None = None


class TorchScriptModel(nn.Module):
    """A TorchScript archive behind a plain module, so that its output can be recorded.

    torch refuses forward hooks on ScriptModules, so `fgscope.selection` treats the archive as
    one opaque leaf: selecting `all` records the model's output, named `output`.
    """

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.scripted(*args, **kwargs)


class _Resolved(NamedTuple):
    module: nn.Module
    preprocess: Preprocess | None  # None: nothing known, use flags or ImageNet defaults
    num_classes: int | None
    labels: tuple[str, ...] | None
    source: ModelSource
    max_batch: int | None = None  # see LoadedModel.max_batch


# --- small helpers -----------------------------------------------------------------------


def _make_preprocess(
    base: Preprocess | None, size: Any, mean: Any, std: Any, fixed: str | None
) -> Preprocess:
    """Apply the size/mean/std flags to `base` (None: ImageNet statistics, plain resize)."""
    crop = _check_size(size) if size is not None else None
    new_mean = _check_stats("mean", mean) if mean is not None else None
    new_std = _check_stats("std", std) if std is not None else None
    if base is None:
        base = Preprocess(crop or (224, 224), None, IMAGENET_MEAN, IMAGENET_STD)
    elif crop is not None and crop != base.crop_size:
        if fixed:
            h, w = base.crop_size
            raise ConfigError(
                f"{fixed} was exported for {h}x{w} inputs and takes no other size",
                "re-export it with dynamic shapes",
            )
        ratio = base.resize_size / max(base.crop_size) if base.resize_size else None  # keep it
        resize = round(max(crop) * ratio) if ratio else None
        base = Preprocess(crop, resize, base.mean, base.std, base.interpolation, base.squash)
    mean_, std_ = new_mean or base.mean, new_std or base.std
    return Preprocess(
        base.crop_size, base.resize_size, mean_, std_, base.interpolation, base.squash
    )


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def _check_size(size: Any) -> tuple[int, int]:
    pair = (size, size) if not isinstance(size, Sequence) else tuple(size)
    if len(pair) != 2 or not all(_is_int(v, 8) for v in pair):
        raise ConfigError(f"size must be an integer >= 8 or a pair (H, W) of them, got {size!r}")
    return int(pair[0]), int(pair[1])


def _check_stats(what: str, values: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out) or (what == "std" and min(out) <= 0):
        need = "3 positive numbers" if what == "std" else "3 numbers"
        raise ConfigError(f"{what} must be {need} (one per RGB channel), got {values!r}")
    return out  # type: ignore[return-value]


def _check_labels(labels: Any, n_classes: int | None) -> tuple[str, ...]:
    if (
        isinstance(labels, str)
        or not isinstance(labels, Sequence)
        or not _is_str_list(tuple(labels))
    ):
        raise ConfigError("labels must be a non-empty sequence of strings")
    if n_classes is not None and len(labels) != n_classes:
        raise ConfigError(f"got {len(labels)} labels but the model has {n_classes} classes")
    return tuple(labels)


def _is_str_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
