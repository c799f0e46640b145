"""The result types of `fgscope.inspect`: `LayerStats` (one row of the abstraction table),
`ImageInfo` (one measured image) and `InspectResult`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fgscope.images import ImageFailure
from fgscope.layers.abstraction import ViewFeatures
from fgscope.models import LoadedModel

__all__ = ["LayerStats", "ImageInfo", "InspectResult", "STAT_KEYS", "MAX_IMAGES"]

MAX_IMAGES = 8
"""Images whose activations `inspect` keeps (for grids and figures) unless told otherwise."""

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
        rf_note: why the geometry is approximate (None when exact or unknown).
        layout: where the map is in the output (`NCHW`, `NHWC`, `tokens`, ...; None unknown);
            other layouts are measured and drawn as (C, H, W) maps.
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
    rf_note: str | None = None
    layout: str | None = None
    empty: dict[str, str] = field(default_factory=dict)
    per_image: dict[str, list[float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageInfo:
    """One measured image: its path (`<image i>` for a PIL image), (width, height) as decoded
    and the sha256 of its file ("" for a PIL image). The pixels are not kept."""

    path: Path
    size: tuple[int, int]
    sha256: str


@dataclass
class InspectResult:
    """Everything `inspect` measured.

    The statistics in `rows` cover all N images; the tensors cover only the first
    M = min(N, max_images) of them (what grids and figures show), so that a result's size
    does not grow with the data set.

    Attributes:
        rows: the abstraction table (all N images).
        activations: per record name, (M, ...) float32 CPU tensor of the first M images
            (channels-last and token outputs as (M, C, H, W) maps).
        inputs: (M, 3, H, W) preprocessed inputs of the first M images (CPU).
        display: the first M images as the model saw them (resized and cropped), RGB.
        images: all N measured images (path, size, hash), in order.
        failures: images that could not be read, with the reason.
        output: (M, K) model output of the first M images (CPU, float32).
        predictions: per image (all N), top-5 (label, probability), when class names are known.
        model: the `LoadedModel` that was run.
        device: the device that ran the forward.
        dtype: the compute dtype.
        macs: multiply-accumulates of one forward per image.
        views: the views behind the abstraction column (None when `views=0`).
        notes: remarks for the user (functional operations the selection misses, images
            left out of a statistic), one line each.
        batches: forward batches the statistics were accumulated over.
    """

    rows: list[LayerStats]
    activations: dict[str, torch.Tensor]
    inputs: torch.Tensor
    display: list[Image.Image]
    images: list[ImageInfo]
    failures: list[ImageFailure]
    output: torch.Tensor | None
    predictions: list[list[tuple[str, float]]] | None
    model: LoadedModel
    device: str
    dtype: str
    macs: int
    views: ViewFeatures | None = None
    notes: tuple[str, ...] = ()
    batches: int = 1

    @property
    def n_images(self) -> int:
        return len(self.images)

    def table(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rows]
