"""`fgscope.inspect`: run images through a model and measure every recorded layer.

The abstraction table: one `LayerStats` per recorded layer call with its geometry (shape,
stride, receptive field, stage) and statistics measured on the images (sparsity, spatial
concentration, effective dimensionality, mean and max activation; with three or more
images, linear CKA to the input pixels and to the model's output and the abstraction index).
Definitions and sources: docs/concepts.md. The CLI's `fgscope layers` writes exactly these
numbers; a notebook gets the same from this function.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from fgscope import metrics
from fgscope.capture import capture, first_tensor
from fgscope.device import autocast, resolve_device, resolve_dtype, to_device
from fgscope.errors import ImageError
from fgscope.forward import forward
from fgscope.geometry import trace_geometry
from fgscope.images import ImageFailure, LoadedImage, default_image, load_inputs
from fgscope.models import LoadedModel, load_model
from fgscope.selection import LayerSpec, select_layers
from fgscope.stages import assign_stages

__all__ = ["LayerStats", "InspectResult", "inspect", "MIN_IMAGES_FOR_CKA", "STAT_KEYS"]

MIN_IMAGES_FOR_CKA = 3
"""Linear CKA on n = 2 examples is identically 1 (both centred Gram matrices are rank one
with the same sign pattern), so CKA columns need at least three images."""

STAT_KEYS = ("sparsity", "concentration", "eff_dim", "mean", "max")


@dataclass(frozen=True)
class LayerStats:
    """One row of the abstraction table (see docs/concepts.md for each definition).

    Attributes:
        index: position in execution order.
        name: record name (`features.3`, `layer1.0.relu:2`).
        type: module class name.
        shape: output shape without the batch: [C, H, W] or [F].
        spatial: [H, W] of the map, None for vectors.
        channels: C (or F for vectors).
        stride: effective stride in input pixels (larger axis), None for vectors / unknown.
        rf: theoretical receptive field in input pixels (larger axis); for vectors the union
            of the last map's units; None when unknown.
        rf_frac: rf divided by the input side (can exceed 1).
        rf_exact: False when the geometry involved an approximation.
        params: parameters of the module.
        stage: `early`, `middle` or `late` (fgscope.stages).
        sparsity: fraction of activations <= 0, mean over images.
        concentration: 1 - normalised spatial entropy of the activation energy (None: no map).
        eff_dim: participation ratio of the channel covariance over positions (None: no map).
        mean: mean activation.
        max: max activation (mean over images of each image's max).
        cka_input: linear CKA to the input pixels (None with fewer than 3 images).
        cka_output: linear CKA to the model's output.
        abstraction: cka_output / (cka_input + cka_output): 0 = like pixels, 1 = like output.
        transfer: fine-label linear-probe accuracy on a labelled data set (avg pooling,
            k-fold CV mean), filled by `fgscope layers --probe-data`; None otherwise.
        transfer_std: its std over folds.
        per_image: each statistic per image, in image order.
    """

    index: int
    name: str
    type: str
    shape: list[int]
    spatial: list[int] | None
    channels: int
    stride: float | None
    rf: float | None
    rf_frac: float | None
    rf_exact: bool
    params: int
    stage: str
    sparsity: float
    concentration: float | None
    eff_dim: float | None
    mean: float
    max: float
    cka_input: float | None = None
    cka_output: float | None = None
    abstraction: float | None = None
    transfer: float | None = None
    transfer_std: float | None = None
    per_image: dict[str, list[float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InspectResult:
    """Everything `inspect` measured.

    Attributes:
        rows: the abstraction table.
        activations: per record name, (N, ...) float32 CPU tensor of all images.
        inputs: (N, 3, H, W) preprocessed input batch (CPU).
        display: the images as the model saw them (resized and cropped), RGB.
        images: the loaded images (paths, hashes, original sizes).
        failures: images that could not be read, with the reason.
        output: (N, K) model output (CPU, float32).
        predictions: per image, top-5 (label, probability), when class names are known.
        model: the `LoadedModel` that was run.
        device: the device that ran the forward.
        dtype: the compute dtype.
        macs: multiply-accumulates of one forward per image.
    """

    rows: list[LayerStats]
    activations: dict[str, torch.Tensor]
    inputs: torch.Tensor
    display: list[Image.Image]
    images: list[LoadedImage]
    failures: list[ImageFailure]
    output: torch.Tensor | None
    predictions: list[list[tuple[str, float]]] | None
    model: LoadedModel
    device: str
    dtype: str
    macs: int

    def table(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rows]


def _nan_to_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def inspect(
    model: LoadedModel | nn.Module | str = "mobilenet_v2",
    images: Sequence[str | os.PathLike | Image.Image] | None = None,
    layers: LayerSpec = "blocks",
    *,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
) -> InspectResult:
    """Run `images` through `model`, record the selected layers and measure each.

    Args:
        model: a `LoadedModel`, a module, or a spec for `fgscope.load_model`.
        images: paths, folders, globs or PIL images; None = the sample photo.
        layers: selection as in `fgscope.selection` (default: the model's blocks).
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: float32, float16 or bfloat16 (autocast).
        batch_size: images per forward.

    Returns:
        The table, the activations and the predictions.

    Raises:
        ImageError: no image could be read (failures of some images are listed instead).
        LayerNotFoundError: an unknown layer, before any forward.
    """
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    loaded, failures = load_inputs(images or [default_image()], resize_size=lm.preprocess.resize_size)
    if not loaded:
        reasons = "; ".join(f.reason for f in failures[:3])
        raise ImageError(f"none of the {len(failures)} image(s) could be read: {reasons}")
    module = lm.module
    module.to(dev)
    inputs = torch.stack([lm.preprocess(li.image) for li in loaded])  # (N, 3, H, W)
    example = inputs[:1].to(dev)
    selected = select_layers(module, layers, example)
    geo, macs = trace_geometry(module, example, list(selected))

    outputs: list[torch.Tensor] = []
    with capture(module, list(selected), to="cpu") as rec:
        step = min(batch_size, lm.max_batch or batch_size)  # a static-batch .pt2 takes no more
        for start in range(0, len(inputs), step):
            batch = to_device(inputs[start : start + step], dev)
            with autocast(dev, dt):
                out = forward(module, batch)
            first = first_tensor(out)
            if first is not None:
                outputs.append(first.detach().float().cpu())
    acts = {k: v.float() for k, v in rec.stacked().items()}
    output = torch.cat(outputs) if outputs else None
    names = [n for n in rec.names()]
    modules = dict(module.named_modules())
    rows = _table(names, acts, rec, geo, modules, inputs, output, lm.input_size)
    display = [lm.preprocess.to_image(x) for x in inputs]
    return InspectResult(
        rows=rows,
        activations=acts,
        inputs=inputs,
        display=display,
        images=loaded,
        failures=failures,
        output=output,
        predictions=_top5(output, lm.labels),
        model=lm,
        device=str(dev),
        dtype=str(dt).removeprefix("torch."),
        macs=macs,
    )


def _table(names, acts, rec, geo, modules, inputs, output, input_size) -> list[LayerStats]:
    first = {r.name: r for r in rec.records if r.step == 0}
    side = max(input_size)
    n = inputs.shape[0]
    geos = [geo.get(name) for name in names]
    stages = assign_stages(
        [max(g.stride) if g is not None and g.spatial else None for g in geos],
        [g is None or g.spatial for g in geos],
    )
    rows = []
    for i, name in enumerate(names):
        x = acts[name]
        rec0 = first[name]
        g = geos[i]
        is_map = x.dim() == 4
        per: dict[str, list[float | None]] = {
            "sparsity": metrics.sparsity(x).tolist(),
            "mean": metrics.mean_activation(x).tolist(),
            "max": metrics.max_activation(x).tolist(),
        }
        if is_map:
            per["concentration"] = [_nan_to_none(v) for v in metrics.spatial_concentration(x).tolist()]
            per["eff_dim"] = [_nan_to_none(v) for v in metrics.participation_ratio(x).tolist()]
        else:
            per["concentration"] = [None] * n
            per["eff_dim"] = [None] * n
        cka_in = cka_out = abstraction = None
        if n >= MIN_IMAGES_FOR_CKA:
            cka_in = _nan_to_none(metrics.linear_cka(x, inputs))
            if output is not None:
                cka_out = _nan_to_none(metrics.linear_cka(x, output))
            if cka_in is not None and cka_out is not None and cka_in + cka_out > 0:
                abstraction = cka_out / (cka_in + cka_out)
        stride = max(g.stride) if g is not None and g.spatial else None
        rf = max(g.rf) if g is not None else None  # vectors: union of the last map's units
        rows.append(
            LayerStats(
                index=i,
                name=name,
                type=rec0.module_type,
                shape=[int(s) for s in x.shape[1:]],
                spatial=[int(x.shape[-2]), int(x.shape[-1])] if is_map else None,
                channels=int(x.shape[1]),
                stride=stride,
                rf=rf,
                rf_frac=round(rf / side, 4) if rf is not None else None,
                rf_exact=bool(g.exact) if g is not None else False,
                params=sum(p.numel() for p in modules[rec0.module_name].parameters()),
                stage=stages[i],
                sparsity=float(_mean(per["sparsity"])),
                concentration=_mean(per["concentration"]),
                eff_dim=_mean(per["eff_dim"]),
                mean=float(_mean(per["mean"])),
                max=float(_mean(per["max"])),
                cka_input=cka_in,
                cka_output=cka_out,
                abstraction=abstraction,
                per_image=per,
            )
        )
    return rows



def _top5(output: torch.Tensor | None, labels: Sequence[str] | None) -> list[list[tuple[str, float]]] | None:
    if output is None or labels is None or output.dim() != 2 or output.shape[1] != len(labels):
        return None
    probs = output.softmax(1)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    return [
        [(labels[int(j)], round(float(p), 4)) for p, j in zip(vals, idx)]
        for vals, idx in zip(top.values, top.indices)
    ]
