"""`fgscope.inspect`: run images through a model and measure every recorded layer.

The abstraction table: one `LayerStats` per recorded layer call with its geometry (shape,
stride, receptive field, and the stage, from the whole model: `fgscope.places`) and
statistics measured on the images: sparsity (exact zeros; empty for signed outputs, whose
fraction negative is its own column), spatial concentration, the spatial participation ratio
within an image and (with 10+ images) across images, mean and max; the abstraction index
(view invariance within an image, `fgscope.layers.abstraction`) and, with 5+ images,
debiased linear CKA to the input and to the output, each with a 95% interval. A cell that
cannot be computed, or is too uncertain, is empty and `LayerStats.empty` says why.
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
from fgscope.images import ImageFailure, LoadedImage, default_image, load_inputs
from fgscope.layers.abstraction import (
    MIN_IMAGES_FOR_CKA,
    VIEWS,
    ViewFeatures,
    cka_cells,
    images_pr_cell,
    invariance_cells,
    run_views,
)
from fgscope.layouts import as_map
from fgscope.metrics import ViewSpec
from fgscope.models import LoadedModel, load_model
from fgscope.places import LayerPlace, trace_places
from fgscope.selection import LayerSpec, select_layers

__all__ = ["LayerStats", "InspectResult", "inspect", "MIN_IMAGES_FOR_CKA", "STAT_KEYS"]

STAT_KEYS = ("sparsity", "negative_frac", "concentration", "pr_spatial", "mean", "max", "abstraction")
"""The statistics kept per image in `LayerStats.per_image`."""


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
        stage: `early`, `middle` or `late` among the whole model's blocks (fgscope.stages).
        signed: True when some output is negative (a linear bottleneck, BatchNorm, logits):
            then "inactive" has no meaning and `sparsity` is None.
        sparsity: fraction of exact zeros (inactive units of a rectified map), mean over
            images; None for signed layers.
        negative_frac: fraction of outputs < 0, mean over images (0 for rectified maps).
        concentration: 1 - normalised spatial entropy of the activation energy (None: no map).
        pr_spatial: participation ratio of the channel covariance over the positions of one
            image (capped by min(C, H*W - 1)), mean over images (None: no map).
        pr_images: participation ratio of the average-pooled features across the images
            (capped by N - 1), None with fewer than 10 images or when saturated.
        mean: mean activation.
        max: max activation (mean over images of each image's max).
        abstraction: the view-invariance index (0 = chance, 1 = invariant), mean over the
            viewed images (at most 4, evenly spaced); `abstraction_lo`/`_hi` its 95% interval
            over views.
        dcka_input: debiased linear CKA to the input pixels, 95% interval `_lo`/`_hi` over
            images; None with fewer than 10 images or when the interval is too wide.
        dcka_output: the same to the model's output.
        transfer: fine-label linear-probe accuracy on a labelled data set (avg pooling,
            k-fold CV mean), filled by `fgscope layers --probe-data`; None otherwise.
        transfer_std: its std over folds.
        empty: for each empty statistic cell, why it is empty.
        per_image: each statistic per image, in image order (the abstraction is None for
            images that were not viewed).
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
    signed: bool
    sparsity: float | None
    negative_frac: float
    concentration: float | None
    pr_spatial: float | None
    mean: float
    max: float
    pr_images: float | None = None
    abstraction: float | None = None
    abstraction_lo: float | None = None
    abstraction_hi: float | None = None
    dcka_input: float | None = None
    dcka_input_lo: float | None = None
    dcka_input_hi: float | None = None
    dcka_output: float | None = None
    dcka_output_lo: float | None = None
    dcka_output_hi: float | None = None
    transfer: float | None = None
    transfer_std: float | None = None
    empty: dict[str, str] = field(default_factory=dict)
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
        views: the views behind the abstraction column (None when `views=0`).
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
    views: ViewFeatures | None = None

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
    views: int = VIEWS.views,
    view_seed: int = 0,
) -> InspectResult:
    """Run `images` through `model`, record the selected layers and measure each.

    Args:
        model: a `LoadedModel`, a module, or a spec for `fgscope.load_model`.
        images: paths, folders, globs or PIL images; None = the sample photo.
        layers: selection as in `fgscope.selection` (default: the model's blocks).
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: float32, float16 or bfloat16 (autocast).
        batch_size: images per forward.
        views: K views per image for the abstraction column (2K extra forwards for each of
            at most 4 images, evenly spaced over the set); 0 leaves the column empty. At least
            3 otherwise.
        view_seed: image i's views are drawn with seed `view_seed + i`.

    Returns:
        The table, the activations and the predictions.

    Raises:
        ImageError: no image could be read (failures of some images are listed instead).
        LayerNotFoundError: an unknown layer, before any forward.
        ValueError: `views` is 1 or 2.
    """
    spec = ViewSpec(views=views) if views else None
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
    selected = list(select_layers(module, layers, example))
    places, macs = trace_places(module, example, selected)  # stages from the whole model

    outputs: list[torch.Tensor] = []
    step = min(batch_size, lm.max_batch or batch_size)  # a static-batch .pt2 takes no more
    with capture(module, selected, to="cpu") as rec:
        for start in range(0, len(inputs), step):
            batch = to_device(inputs[start : start + step], dev)
            with autocast(dev, dt):
                out = forward(module, batch)
            first = first_tensor(out)
            if first is not None:
                outputs.append(first.detach().float().cpu())
    acts = {k: v.float() for k, v in rec.stacked().items()}
    # channels-last, token and window outputs measured and drawn as (N, C, H, W) maps
    acts = {k: as_map(v, places[k].geometry.layout if places.get(k) and places[k].geometry else None)
            for k, v in acts.items()}
    output = torch.cat(outputs) if outputs else None
    names = list(rec.names())
    first_rec = {r.name: r for r in rec.records if r.step == 0}
    view_feats = None
    if spec is not None:
        view_feats = run_views(module, lm.preprocess, inputs, selected, dev, dt, spec=spec,
                               seed=view_seed, batch_size=step)
    modules = dict(module.named_modules())
    params = {n: sum(p.numel() for p in modules[first_rec[n].module_name].parameters())
              if first_rec[n].op is None else 0 for n in names}  # a functional op has none
    stages, prev = [], "early"
    for n in names:  # a record the geometry pass did not see takes the stage before it
        prev = places[n].stage if n in places else prev
        stages.append(prev)
    grams = _grams(inputs, output) if len(inputs) >= MIN_IMAGES_FOR_CKA else (None, None)
    rows = [
        _row(i, n, acts[n], first_rec[n].module_type, params[n], places.get(n), stages[i],
             grams, lm.input_size, view_feats)
        for i, n in enumerate(names)
    ]
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
        views=view_feats,
    )


def _grams(inputs: torch.Tensor, output: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, N) linear Grams of the flattened inputs and outputs, float64, computed once."""
    return (metrics.gram_linear(inputs.double()),
            metrics.gram_linear(output.double()) if output is not None else None)


def _row(
    i: int,
    name: str,
    x: torch.Tensor,
    module_type: str,
    n_params: int,
    place: LayerPlace | None,
    stage: str,
    grams: tuple[torch.Tensor | None, torch.Tensor | None],
    input_size: tuple[int, int],
    views: ViewFeatures | None,
) -> LayerStats:
    """One row: x is the layer's (N, ...) output for all images; `grams` the (N, N) Grams of
    the inputs and outputs (None with too few images for CKA)."""
    n = len(x)
    is_map = x.dim() == 4
    empty: dict[str, str] = {}
    signed = bool((x < 0).any())
    per: dict[str, list[float | None]] = {
        "sparsity": [None] * n if signed else metrics.sparsity(x).tolist(),
        "negative_frac": metrics.negative_fraction(x).tolist(),
        "mean": metrics.mean_activation(x).tolist(),
        "max": metrics.max_activation(x).tolist(),
    }
    if signed:
        empty["sparsity"] = "signed output: no inactive state (see negative_frac)"
    if is_map:
        per["concentration"] = [_nan_to_none(v) for v in metrics.spatial_concentration(x).tolist()]
        per["pr_spatial"] = [_nan_to_none(v) for v in metrics.participation_ratio(x).tolist()]
    else:
        per["concentration"] = per["pr_spatial"] = [None] * n
        empty["concentration"] = empty["pr_spatial"] = "no spatial map"
    flat = {"concentration": "no activation energy (the map is zero, up to 1e-12)",
            "pr_spatial": "no variation over positions"}
    for key in ("concentration", "pr_spatial"):
        if key not in empty and _mean(per[key]) is None:
            empty[key] = "1x1 map" if x.shape[2] * x.shape[3] < 2 else flat[key]
    cka, why = cka_cells(x, *grams)
    empty.update(why)
    inv, why, per["abstraction"] = invariance_cells(views, name, n)
    empty.update(why)
    pr_images, why_pr = images_pr_cell(x)
    if why_pr is not None:
        empty["pr_images"] = why_pr
    g = place.geometry if place is not None else None
    rf = max(g.rf) if g is not None else None  # vectors: union of the last map's units
    return LayerStats(
        index=i,
        name=name,
        type=module_type,
        shape=[int(s) for s in x.shape[1:]],
        spatial=[int(x.shape[-2]), int(x.shape[-1])] if is_map else None,
        channels=int(x.shape[1]),
        stride=max(g.stride) if g is not None and g.spatial else None,
        rf=rf,
        rf_frac=round(rf / max(input_size), 4) if rf is not None else None,
        rf_exact=bool(g.exact) if g is not None else False,
        params=n_params,
        stage=stage,
        signed=signed,
        sparsity=_mean(per["sparsity"]),
        negative_frac=float(_mean(per["negative_frac"])),
        concentration=_mean(per["concentration"]),
        pr_spatial=_mean(per["pr_spatial"]),
        mean=float(_mean(per["mean"])),
        max=float(_mean(per["max"])),
        pr_images=pr_images,
        **inv,
        **cka,
        empty=empty,
        per_image=per,
    )


def _top5(output: torch.Tensor | None, labels: Sequence[str] | None) -> list[list[tuple[str, float]]] | None:
    if output is None or labels is None or output.dim() != 2 or output.shape[1] != len(labels):
        return None
    probs = output.softmax(1)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    return [
        [(labels[int(j)], round(float(p), 4)) for p, j in zip(vals, idx)]
        for vals, idx in zip(top.values, top.indices)
    ]
