"""Resolve a model spec (a torchvision name, a file, or a module) into a `LoadedModel`.

`load_model` turns whatever the user typed into a CPU module in eval mode plus the
preprocessing it expects, its class names when known, and a `ModelSource` saying exactly what
was read (for manifests). torchvision weights are looked for in the torch hub cache, the offline
weights packages and `FGSCOPE_WEIGHTS_PATH`, and hash-checked the way `torch.hub` does; only
when a file is found nowhere is torchvision's download tried.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn

from fgscope.errors import ConfigError
from fgscope.models.files import _from_file, _looks_like_path
from fgscope.models.hub import _builder_names, _from_torchvision
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
    """Names of torchvision's classification builders (the valid values of `arch`)."""
    return _builder_names()


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
