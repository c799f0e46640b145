"""Resolve a model spec (a torchvision name, a file, or a module) into a `LoadedModel`.

`load_model` turns whatever the user typed into a CPU module in eval mode plus the
preprocessing it expects, its class names when known, and a `ModelSource` saying exactly what
was read (for manifests). torchvision weights are looked for in the torch hub cache, the offline
weights packages and `FGSCOPE_WEIGHTS_PATH`, and hash-checked the way `torch.hub` does; only
when a file is found nowhere is torchvision's download tried.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from torch import nn

from fgscope.errors import ConfigError, ModelLoadError
from fgscope.models.files import _from_file, _looks_like_path
from fgscope.models.hfzoo import _from_hf
from fgscope.models.hub import _all_builder_names, _from_torchvision
from fgscope.models.timmzoo import _from_timm, _is_timm_module, timm_preprocess
from fgscope.models.types import (
    DEFAULT_MODEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    ModelSource,
    Preprocess,
    TorchScriptModel,
    _check_labels,
    _is_int,
    _make_preprocess,
    _Resolved,
)
from fgscope.notes import announce

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


def list_architectures() -> list[str]:
    """Names of torchvision's builders, classification, segmentation and detection (valid
    values of `arch`, besides `timm:NAME`)."""
    return _all_builder_names()


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
            torch.export `.pt2`, `.safetensors`); `[torchvision:]NAME[:WEIGHTS]` (classification,
            segmentation and detection builders); `timm:NAME[.TAG]` (needs timm); or
            `hf:FOLDER`, a transformers `save_pretrained` folder (needs transformers). A bare
            builder name means the builder even when a file or folder of that name exists
            (a note says so); write `./NAME` for the file.
        weights: for torchvision names: 'default', a weights name ('IMAGENET1K_V2' or
            'ResNet50_Weights.IMAGENET1K_V2'), or 'none'/None for random init. `:WEIGHTS` in
            `spec` wins. For `timm:` 'default' (the tag's weights, read offline from the
            Hugging Face hub cache or FGSCOPE_WEIGHTS_PATH), a tag, or 'none'; for `hf:`
            'default' (the folder's weights) or 'none'. Anything but 'default' with a file or a
            module is a ConfigError.
        arch: the torchvision builder (or `timm:NAME`) that a state_dict file belongs to (a
            ConfigError with any other kind of model).
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
        ConfigError: malformed size, mean, std, labels or num_classes; weights or arch given
            for a kind of model they do not apply to.
    """
    if num_classes is not None and not _is_int(num_classes, 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(spec, nn.Module):
        _no_option(f"the module {type(spec).__qualname__}", weights, arch)
        got = _from_module(spec)
    elif not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"model spec must be a name, a file path or an nn.Module, got {spec!r}")
    elif (zoo := spec.strip().partition(":")[0].lower()) in ("timm", "hf"):
        _no_arch(spec, "a timm name" if zoo == "timm" else "an hf: folder", arch, num_classes)
        got = _from_timm(spec, weights, size) if zoo == "timm" else _from_hf(spec, weights)
    elif (builder := _bare_builder(spec)) is None and (
        os.path.exists(os.path.expanduser(spec)) or _looks_like_path(spec)
    ):
        _no_option(f"the model file {spec}", weights, None)
        got = _from_file(spec, arch, trust, num_classes)
    else:
        _no_arch(spec, "a torchvision name", arch, num_classes)
        got = _from_named(spec, weights, builder)
    fixed = got.source.path if got.source.kind == "export" else None  # static input shape
    preprocess = _make_preprocess(got.preprocess, size, mean, std, fixed)
    found = got.labels if labels is None else _check_labels(labels, got.num_classes)
    announce(got.source.notes)  # printed once per command by the CLI (fgscope.notes)
    return LoadedModel(
        got.module, preprocess, preprocess.crop_size, found, got.source, got.max_batch
    )


def _no_arch(spec: str, what: str, arch: str | None, num_classes: int | None) -> None:
    """A model name is its own architecture: --arch and --num-classes must not be ignored."""
    if arch is not None:
        raise ConfigError(
            f"--arch does not apply to {spec!r}: {what} is its own architecture",
            "drop --arch (it names the architecture of a state_dict file)",
        )
    if num_classes is not None:
        raise ConfigError(
            f"--num-classes does not apply to {spec!r}: {what} builds the classifier of "
            "its weights" + (" (1000 ImageNet classes with --weights none)" if "torch" in what else ""),
            "drop --num-classes (it sizes the classifier of a state_dict file)",
        )


def _no_option(what: str, weights: str | None, arch: str | None) -> None:
    """--weights (other than 'default') and --arch must not be silently ignored."""
    if weights is None or str(weights).strip().lower() != "default":
        raise ConfigError(
            f"--weights {weights or 'none'} does not apply to {what}: it carries its own weights",
            "drop --weights (it picks the weights of a torchvision name, e.g. resnet50:IMAGENET1K_V2)",
        )
    if arch is not None:
        raise ConfigError(f"--arch does not apply to {what}", "drop --arch")


def _bare_builder(spec: str) -> str | None:
    """The builder a spec names without any path syntax (`resnet18`, `resnet18:IMAGENET1K_V1`,
    `torchvision:...`), else None. Such a name means the builder even when a file or folder
    of that name is in the current directory: `./resnet18` reads that one."""
    text = spec.strip()
    if text.lower().startswith("torchvision:"):
        return text[len("torchvision:") :].partition(":")[0].strip().lower()
    if any(sep and sep in text for sep in ("/", os.sep, os.altsep)) or text.startswith("~"):
        return None
    name = text.partition(":")[0].strip().lower()
    return name if name in _all_builder_names() else None


def _from_named(spec: str, weights: str | None, builder: str | None) -> _Resolved:
    shadow = spec.strip() if builder and os.path.exists(spec.strip()) else None
    if shadow is None:
        return _from_torchvision(spec, weights)
    kind = "folder" if os.path.isdir(shadow) else "file"
    other = f"./{shadow} (a {kind} in the current directory)"
    read_it = f"{other} was not read: pass ./{shadow} for it"
    try:
        got = _from_torchvision(spec, weights)
    except ModelLoadError as exc:  # say why the file of that name was not the one tried
        raise type(exc)(exc.message, f"{exc.hint}; {read_it}" if exc.hint else read_it) from exc
    note = f"{spec!r} is torchvision's {builder}; {read_it}"
    source = dataclasses.replace(got.source, notes=(*got.source.notes, note))
    return got._replace(source=source)


def _from_module(module: nn.Module) -> _Resolved:
    name = f"<module {type(module).__module__}.{type(module).__qualname__}>"
    moved = all(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers()))
    notes = () if moved else ("the module was left on its device; fgscope did not move it",)
    pre = None
    if _is_timm_module(module):  # timm's own preprocessing (timm is imported already)
        pre, more = timm_preprocess(module)
        notes = (*notes, *more)
    source = ModelSource(name, "module", None, None, None, None, notes)
    return _Resolved(module.eval(), pre, None, None, source)
