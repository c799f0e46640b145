"""Where a wrapped model keeps its spatial hierarchy, and timm's `feature_info` layers.

Many models researchers bring wrap the CNN that holds the hierarchy: a Hugging Face
`ConvNextForImageClassification` holds `convnext.encoder.stages`, a torchvision FCN holds a
`backbone` (an `IntermediateLayerGetter`), a Faster R-CNN holds `backbone.body` and
`backbone.fpn`, timm's `features_only` models are `FeatureListNet` / `FeatureDictNet`
dictionaries of the original modules. `descends_into` says which modules the `blocks`
selection (`fgscope.selection.block_modules`) walks through instead of taking them whole; the
rule (no table of architectures) is in its docstring. `feature_layers` resolves the
`features` keyword: the layers timm's `feature_info` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fgscope.errors import ConfigError, UnsupportedModelError
from fgscope.outputs import elements

__all__ = ["WRAPPER_NAMES", "check_supported", "descends_into", "video_model_error", "hierarchy_part", "is_detector", "feature_info", "feature_layers"]

WRAPPER_NAMES = frozenset({"backbone", "body", "encoder", "base_model", "model"})
"""Attribute names under which wrappers keep the network that holds the hierarchy."""

_DOWNSAMPLE_NAMES = frozenset({"downsample", "downsampling_layer"})
_WRAPPER_SUFFIXES = ("Model", "Encoder", "Backbone", "Stage", "Features")


def descends_into(name: str, module: nn.Module) -> bool:
    """Whether `blocks` walks into `module` (the child attribute `name`) instead of taking it
    as one block: its children run one after another and are the blocks.

    True for
    - the pure containers `nn.Sequential`, `nn.ModuleList`, `nn.ModuleDict` (not their
      subclasses, which are usually blocks: torchvision's `Conv2dNormActivation` is a
      `Sequential`), and any subclass of `nn.ModuleDict` (torchvision's
      `IntermediateLayerGetter`, timm's `FeatureDictNet`/`FeatureListNet` run their children
      in order);
    - a child kept under a wrapper's attribute name (`WRAPPER_NAMES`: `backbone`, `body`,
      `encoder`, `base_model`, `model`), and a Hugging Face model's base model (the child
      named by the parent's `base_model_prefix` is handled as `model` is);
    - a module whose class name ends in `Model`, `Encoder`, `Backbone`, `Stage` or `Features`
      (Hugging Face `ConvNextModel`, `ResNetEncoder`, `ConvNextStage`, timm `ConvNeXtStage`,
      `CspStage`, `RegStage`) — provided it has children: a leaf is always a block;
    - in an unflattened torch.export program, a module the export recorded as one of these
      (`fgscope.models.pt2graph` names its class after the original).

    False for a stage's `downsample` / `downsampling_layer` (timm's and Hugging Face's
    ConvNeXt stages open with a norm and a strided conv): it changes the resolution, and is
    one block, so that the norm before it is not taken for the end of the previous stage.
    """
    if name.rpartition(".")[2] in _DOWNSAMPLE_NAMES and any(True for _ in module.children()):
        return False
    if type(module) in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return True
    if type(module).__name__ == "InterpreterModule":  # a .pt2 module of no recorded type
        return True  # (containers: the export records the types of modules that ran)
    if getattr(type(module), "_fgscope_unflattened", False):  # a .pt2's container, renamed
        return type(module).__name__ in ("Sequential", "ModuleList", "ModuleDict") or (
            type(module).__name__.endswith(_WRAPPER_SUFFIXES))
    if isinstance(module, torch.jit.ScriptModule) or not any(True for _ in module.children()):
        return False
    if isinstance(module, nn.ModuleDict):
        return True
    if name.rpartition(".")[2] in WRAPPER_NAMES:
        return True
    return type(module).__name__.endswith(_WRAPPER_SUFFIXES)


_VIDEO = (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)


def check_supported(model: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> None:
    """Refuse, in one line, a quantized model (`torch.ao.nn.quantized` modules, whose int8
    outputs and fused modules hooks and geometry cannot read); a video model is refused when
    it fails on images (`video_model_error`, called by `fgscope.forward`).

    `modules`: `dict(model.named_modules())`, when known.

    Raises:
        UnsupportedModelError: a quantized model.
    """
    for name, m in (model.named_modules() if modules is None else modules.items()):
        kind = type(m).__module__
        if kind.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                            "torch.ao.nn.intrinsic.quantized")):
            raise UnsupportedModelError(
                f"{type(model).__name__} is a quantized model ({name or 'the model'} is "
                f"{kind}.{type(m).__name__}); fgscope inspects float models",
                hint="inspect the float model before quantization (torchvision: quantize=False)",
            )


def video_model_error(model: nn.Module) -> UnsupportedModelError | None:
    """The one-line error for a video model (3-D convolutions and no 2-D ones) that failed on
    an image batch; None for other models (a model may stack frames itself and run 3-D
    convolutions on images)."""
    kinds = [type(m) for m in model.modules()]
    if any(issubclass(k, _VIDEO) for k in kinds) and not any(issubclass(k, nn.Conv2d) for k in kinds):
        return UnsupportedModelError(
            f"{type(model).__name__} is a video model (3-D convolutions over (N, C, T, H, W) "
            "clips); fgscope inspects image models taking (N, 3, H, W)",
            hint="inspect an image CNN, e.g. the 2-D backbone the video model was inflated from",
        )
    return None


def hierarchy_part(model: nn.Module) -> str | None:
    """The top-level child holding a wrapper's spatial hierarchy: the first named
    `backbone`, `body` or `encoder` (torchvision's segmentation and detection models, Hugging
    Face base models, most hand-written wrappers), None when there is none."""
    names = dict(model.named_children())
    return next((n for n in ("backbone", "body", "encoder") if n in names), None)


def is_detector(model: nn.Module) -> bool:
    """A torchvision-style detector: a `backbone` and a `transform` that resizes the images
    into its own batch (Faster/Mask R-CNN, RetinaNet, FCOS, SSD); its heads work on proposals
    and boxes, so only the backbone has per-image layers."""
    names = dict(model.named_children())
    return "backbone" in names and "transform" in names


def feature_info(model: nn.Module) -> list[dict[str, Any]] | None:
    """timm's `feature_info` as a list of `{module, num_chs, reduction}` dicts (a classifier's
    plain list or a `features_only` model's `FeatureInfo`), None when the model has none."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    if hasattr(info, "get_dicts"):  # timm FeatureInfo (features_only models)
        dicts = list(info.get_dicts())
    elif isinstance(info, (list, tuple)):
        dicts = list(info)
    else:
        return None
    if not dicts or not all(isinstance(d, dict) and "module" in d for d in dicts):
        return None
    return dicts


def _flat(name: str) -> str:
    return name.replace(".", "_")


def feature_layers(
    model: nn.Module, named: dict[str, nn.Module], example: torch.Tensor | None
) -> list[str]:
    """The module names of timm's `feature_info` layers, in its order.

    With `example`, one forward checks each tap: the module `feature_info` names (a
    `features_only` model flattens `stages.1` to `stages_1`; both spellings are tried) when
    its output has `num_chs` channels at 1/`reduction` of the input's resolution, else the
    last module to finish with such an output (the outermost when several finish together):
    timm's HRNet names taps that are not modules, or not the modules that give them
    (`stem`, `stage1`, ...). Without `example`, the names are taken as they are.

    Raises:
        ConfigError: the model has no `feature_info` (not a timm model), or a tap cannot be
            found.
    """
    dicts = feature_info(model)
    if dicts is None:
        raise ConfigError(
            f"`features` selects timm's feature_info layers and {type(model).__name__} has no "
            "feature_info",
            hint="use blocks or stages, or name the layers (`kw:features` is this keyword, "
            "`name:features` a module named features)",
        )
    if example is None or example.dim() != 4:  # names only, unchecked
        out = [next((n for n in (str(d["module"]), _flat(str(d["module"]))) if n in named and n),
                    None) for d in dicts]
        if None in out:
            raise ConfigError(
                "timm's feature_info names layers that are not modules of the model; finding "
                "them needs an example input"
            )
        return list(dict.fromkeys(n for n in out if n is not None))
    return list(dict.fromkeys(_by_shape(model, named, dicts, example)))


def _by_shape(
    model: nn.Module,
    named: dict[str, nn.Module],
    taps: list[dict[str, Any]],
    example: torch.Tensor | None,
) -> list[str]:
    """For each tap {module, num_chs, reduction}: the named module if its output has that
    shape, else the last module to finish with it."""
    from fgscope.forward import forward

    h_in = int(example.shape[-2])
    finished: list[tuple[str, int, float]] = []
    handles = []

    def make(n: str):
        def hook(_m: nn.Module, _a: Any, o: Any) -> None:
            for key, t in elements(o):
                if key is None and t.dim() == 4 and t.shape[-2] > 0:
                    finished.append((n, int(t.shape[1]), h_in / int(t.shape[-2])))

        return hook

    try:
        for n, m in named.items():
            if n:
                handles.append(m.register_forward_hook(make(n)))
        with torch.inference_mode():
            forward(model, example[:1])
    finally:
        for h in handles:
            h.remove()
    out: list[str] = []
    for t in taps:
        want_c, want_r = int(t["num_chs"]), float(t["reduction"])
        hits = [n for n, c, r in finished if c == want_c and abs(r - want_r) < 0.5]
        named_as = [n for n in (str(t["module"]), _flat(str(t["module"]))) if n in hits]
        if named_as:
            out.append(named_as[0])
            continue
        if not hits:
            raise ConfigError(
                f"timm's feature_info tap {str(t['module'])!r} ({want_c} channels at 1/{want_r:g} "
                "resolution) matches no module's output",
                hint="name the layers instead (run `fgscope summary MODEL --layers all`)",
            )
        out.append(hits[-1])
    return out
