"""Grad-CAM for `fgscope cam`: the map of one layer (`grad_cam`), class resolution, and the
maps of one image at every selected layer (`compute_cams`). The method is described in
`fgscope.cam.run`'s docstring; no files are written here."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from fgscope.capture import LayerRecord, capture, first_tensor
from fgscope.device import resolve_device
from fgscope.errors import ConfigError
from fgscope.forward import forward
from fgscope.images import default_image, load_image
from fgscope.models import LoadedModel, load_model
from fgscope.places import locate_layers
from fgscope.selection import select_layers

__all__ = [
    "ClassRef",
    "CamLayer",
    "CamResult",
    "grad_cam",
    "resolve_class",
    "compute_cams",
]


def grad_cam(activations: Tensor, gradients: Tensor) -> tuple[Tensor, Tensor]:
    """Grad-CAM from a layer's maps and the gradient of the score with respect to them.

    Args:
        activations: (N, C, H, W) the layer's output A.
        gradients: (N, C, H, W) dy/dA.

    Returns:
        (maps, weights): maps (N, H, W) = ReLU(sum_k alpha_k A_k), weights (N, C) = alpha,
        the spatial mean of the gradient; float32 (float64 stays float64). Inputs are not
        modified.

    Raises:
        ValueError: shapes differ or are not 4-D.
    """
    if activations.ndim != 4 or activations.shape != gradients.shape:
        raise ValueError(
            "expected activations and gradients of the same shape (N, C, H, W), got "
            f"{tuple(activations.shape)} and {tuple(gradients.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (activations.dtype, gradients.dtype) else torch.float32
    a, g = activations.to(dtype), gradients.to(dtype)
    weights = g.mean((2, 3))  # (N, C)
    maps = torch.relu((weights[:, :, None, None] * a).sum(1))  # (N, H, W)
    return maps, weights


@dataclass(frozen=True)
class ClassRef:
    """A class of the model's output: its index and, when known, its name."""

    index: int
    label: str | None

    def show(self) -> str:
        return f"{self.label!r} (#{self.index})" if self.label else f"class #{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label}


def resolve_class(spec: str | int, labels: Sequence[str] | None, n_classes: int) -> ClassRef:
    """A class by index (`"281"`) or by name (case-insensitive, exact).

    Raises:
        ConfigError: index out of range; a name for a model without class names; an unknown
            name (close matches suggested); a name shared by several classes (their indices).
    """
    text = str(spec).strip()
    named = labels is not None and len(labels) == n_classes
    if re.fullmatch(r"[+-]?\d+", text):
        idx = int(text)
        if not 0 <= idx < n_classes:
            raise ConfigError(
                f"class index {idx} is out of range: the model has {n_classes} classes "
                f"(0..{n_classes - 1})"
            )
        return ClassRef(idx, labels[idx] if named else None)
    if not named:
        raise ConfigError(
            f"class {text!r}: this model has no class names",
            f"pass a class index 0..{n_classes - 1}",
        )
    assert labels is not None
    low = text.lower()
    hits = [i for i, lab in enumerate(labels) if lab.lower() == low]
    if len(hits) == 1:
        return ClassRef(hits[0], labels[hits[0]])
    if hits:
        raise ConfigError(
            f"class name {text!r} is shared by classes {', '.join(map(str, hits))}",
            "pass the index instead",
        )
    lowered = [lab.lower() for lab in labels]
    close = difflib.get_close_matches(low, lowered, n=5, cutoff=0.6)
    close += [lab for lab in lowered if low in lab.split() and lab not in close][: 5 - len(close)]
    picks = [lowered.index(c) for c in close]
    found = "; did you mean " + ", ".join(f"{labels[i]!r} ({i})" for i in picks) + "?" if picks else ""
    raise ConfigError(
        f"unknown class {text!r}{found}",
        f"classes are matched by name (case-insensitive) or index 0..{n_classes - 1}",
    )


@dataclass(frozen=True)
class CamLayer:
    """Grad-CAM of one recorded layer.

    Attributes:
        name: record name.
        stride, rf: effective stride and receptive field in input pixels (larger axis).
        stage: early / middle / late.
        shape: [C, H, W] of the layer's output.
        cam: (H, W) raw Grad-CAM (float32, CPU), in the layer's activation units.
        weights: (C,) channel weights alpha_k.
        peak: [y, x] in input pixels of the hottest point of the map upsampled to the input
            (as drawn); None when the map is all zero.
        peak_unit: [i, j] of the largest value on the layer's own grid; None when all zero.
    """

    name: str
    stride: float | None
    rf: float | None
    stage: str
    shape: list[int]
    cam: Tensor
    weights: Tensor
    peak: list[int] | None
    peak_unit: list[int] | None

    @property
    def raw_max(self) -> float:
        return float(self.cam.max())

    @property
    def raw_mean(self) -> float:
        return float(self.cam.mean())


@dataclass(frozen=True)
class CamResult:
    """What `compute_cams` found for one image.

    Attributes:
        image: the image's path (or a placeholder for a PIL image).
        display: the image as the model saw it (resized, cropped), RGB.
        target: the explained class (class A with a contrast).
        contrast: (A, B) when explaining A against B, else None.
        score: the differentiated quantity: the target's logit, or logit_A - logit_B.
        layers: one `CamLayer` per recorded feature map, in execution order.
        top5: (label, probability) of the five most likely classes, when names are known.
        model: the model that ran.
        device: where it ran.
        notes: what was skipped and why.
    """

    image: str
    display: Image.Image
    target: ClassRef
    contrast: tuple[ClassRef, ClassRef] | None
    score: float
    layers: list[CamLayer]
    top5: list[tuple[str, float]] | None
    model: LoadedModel
    device: str
    notes: tuple[str, ...] = ()



def _logits(output: Any) -> Tensor:
    out = first_tensor(output)
    if out is None:
        raise ConfigError("the model returned no tensor to explain")
    if out.ndim != 2:
        raise ConfigError(
            f"Grad-CAM needs a classifier with (N, classes) logits; the model returned shape "
            f"{tuple(out.shape)}"
        )
    return out


def _peaks(cam: Tensor, size: tuple[int, int]) -> tuple[list[int] | None, list[int] | None]:
    from fgscope.render import upsample_bilinear

    if not float(cam.max()) > 0:
        return None, None
    h, w = cam.shape
    unit = divmod(int(cam.argmax()), w)
    up = upsample_bilinear(cam.numpy(), size)
    pix = divmod(int(np.argmax(up)), size[1])
    return [int(pix[0]), int(pix[1])], [int(unit[0]), int(unit[1])]


def compute_cams(
    model: LoadedModel | str,
    image: str | Path | Image.Image | None = None,
    layers: str | Sequence[str] = "stages",
    *,
    target: str | int | None = None,
    contrast: tuple[str | int, str | int] | None = None,
    device: str = "cpu",
) -> CamResult:
    """Grad-CAM of one image at every selected layer.

    Args:
        model: a `LoadedModel` or a spec for `fgscope.load_model`.
        image: a path or PIL image; None = the sample photo.
        layers: selection as in `fgscope.selection` (layers without spatial maps are skipped).
        target: class index or name; default: the top-1 prediction. Not with `contrast`.
        contrast: (A, B): explain logit_A - logit_B.
        device: auto, cpu, cuda, cuda:N or mps.

    Raises:
        ConfigError: both target and contrast; unknown class; a model output that is not
            (N, classes); no selected layer with a spatial map.
        LayerNotFoundError: an unknown layer, before any forward.
        ImageError: the image cannot be read.
    """
    if target is not None and contrast is not None:
        raise ConfigError("pass either --class or --contrast, not both")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    dev = resolve_device(device)
    if isinstance(image, Image.Image):
        name, pil = "<image>", image.convert("RGB")
    else:
        path = Path(image) if image is not None else default_image()
        name, pil = str(path), load_image(path, resize_size=lm.preprocess.resize_size)
    # Class names are checked before anything runs; indices once the output size is known.
    n_known = len(lm.labels) if lm.labels else None
    wanted = [] if target is None else [target]
    wanted += list(contrast) if contrast is not None else []
    if n_known is not None:
        for spec in wanted:
            resolve_class(spec, lm.labels, n_known)

    module = lm.module.to(dev)
    x = lm.preprocess(pil)[None].to(dev)  # (1, 3, H, W)
    selected = list(select_layers(module, layers, x))
    places = locate_layers(module, x, selected)
    values: dict[str, Tensor] = {}
    edges: dict[str, Any] = {}
    notes: list[str] = []

    def on_record(rec: LayerRecord) -> None:
        t = rec.tensor
        if t.ndim != 4 or not t.is_floating_point() or t.shape[-2] * t.shape[-1] < 2:
            notes.append(
                f"{rec.name}: output shape {tuple(t.shape[1:])} is not a spatial feature map; skipped"
            )
            return
        values[rec.name] = t.detach().float().cpu().clone()  # the value as produced
        if t.requires_grad:
            edges[rec.name] = get_gradient_edge(t)  # its place in the graph, as produced

    xin = x.clone().requires_grad_(True)  # a graph even when every parameter is frozen
    with torch.enable_grad(), capture(module, selected, on_record=on_record, to=None, grad=True):
        logits = _logits(forward(module, xin))
    if not values:
        raise ConfigError(
            f"none of the selected layers ({', '.join(selected[:5])}) outputs a spatial feature map",
            "choose convolutional layers; `fgscope summary MODEL --layers all` lists them",
        )
    n_classes = logits.shape[1]
    labels = lm.labels if lm.labels and len(lm.labels) == n_classes else None
    if contrast is not None:
        a, b = (resolve_class(c, labels, n_classes) for c in contrast)
        score = logits[0, a.index] - logits[0, b.index]
        tgt, pair = a, (a, b)
    else:
        tgt = (
            resolve_class(target, labels, n_classes) if target is not None
            else ClassRef(int(logits[0].argmax()), None)
        )
        if tgt.label is None and labels is not None:
            tgt = ClassRef(tgt.index, labels[tgt.index])
        score, pair = logits[0, tgt.index], None
    names = [n for n in values if n in edges]
    grads = torch.autograd.grad(score, [edges[n] for n in names], allow_unused=True) if names else ()
    grad_of = dict(zip(names, grads))
    out: list[CamLayer] = []
    for nm, act in values.items():
        g = grad_of.get(nm)
        if g is None:
            notes.append(f"{nm}: the score does not depend on this layer; its map is zero")
            g = torch.zeros_like(act)
        cam, w = grad_cam(act, g.detach().float().cpu())
        peak, unit = _peaks(cam[0], lm.input_size)
        place = places.get(nm)
        out.append(CamLayer(
            name=nm, stride=place.stride if place else None, rf=place.rf if place else None,
            stage=place.stage if place else "late", shape=[int(s) for s in act.shape[1:]],
            cam=cam[0], weights=w[0], peak=peak, peak_unit=unit,
        ))
    probs = logits.detach()[0].float().softmax(0).cpu()
    top = probs.topk(min(5, n_classes)) if labels is not None else None
    return CamResult(
        image=name, display=lm.preprocess.to_image(x[0]), target=tgt, contrast=pair,
        score=float(score.detach()), layers=out,
        top5=[(labels[int(i)], round(float(p), 4)) for p, i in zip(top.values, top.indices)]
        if top is not None and labels is not None else None,
        model=lm, device=str(dev), notes=tuple(notes),
    )
