"""The abstraction columns of `fgscope layers`, measured two ways, each with its interval:

- *within an image* (`run_views`, `invariance_cells`): the view-invariance index
  (`fgscope.metrics.invariance`) of each layer's average-pooled features over K seeded views
  of the image and of its tile-shuffled copy; works with one image; 2K extra forwards for
  each of at most `MAX_VIEW_IMAGES` images, spread evenly over the set.
- *across images* (`cka_cells`): debiased linear CKA (unbiased HSIC) between the layer and
  the input pixels, and between the layer and the model's output, with a 95% jackknife
  interval over images; a value is shown only when its interval is at most
  `CKA_MAX_WIDTH` wide, else the cell is empty and says why.

Plus `images_pr_cell`: the participation ratio of the pooled features across images.
Definitions and sources: docs/concepts.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fgscope import metrics
from fgscope.capture import LayerRecord, capture
from fgscope.device import autocast, to_device
from fgscope.forward import forward
from fgscope.metrics import Estimate, ViewSpec
from fgscope.models import Preprocess

__all__ = [
    "VIEWS",
    "MAX_VIEW_IMAGES",
    "MIN_IMAGES_FOR_CKA",
    "CKA_MAX_WIDTH",
    "MIN_IMAGES_FOR_PR",
    "DETAIL",
    "ViewFeatures",
    "view_images",
    "run_views",
    "invariance_cells",
    "cka_cells",
    "cka_estimate_cells",
    "images_pr_cell",
    "pr_cell",
    "pooled",
]

VIEWS = ViewSpec(views=8)
"""The default views: K = 8 per image and 8 of its shuffled copy (16 forwards per image).
On MobileNetV2 and the sample photo the 95% interval is about +-0.20 at features.1 and
+-0.07 at features.18 with K = 8 (+-0.32 and +-0.08 with K = 6; +-0.14 and +-0.05 with
K = 12; means over view seeds 0-2)."""

MAX_VIEW_IMAGES = 4
"""Views are run for at most 4 images, evenly spaced over the set (the first and the last
included), so any image set costs at most 4 x 16 = 64 extra forwards. The index is the mean
over those images; its interval comes from the views."""

MIN_IMAGES_FOR_CKA = 10
"""Debiased CKA needs 4 examples and its jackknife leaves one image out at a time, so 5 is the
least that computes; but a jackknife of so few replicates is itself unreliable (5 noise
images through a random MobileNetV2 gave an interval 0.16 wide around an impossible -0.93),
so the columns need 10 images."""

CKA_MAX_WIDTH = 0.5
"""A debiased-CKA cell is shown only when its 95% interval is at most this wide (CKA lives in
about [-0.1, 1]; a wider interval says little more than the sign)."""

DETAIL = " — "
"""Separates a reason for an empty cell from this layer's numbers (lists of reasons group by
the part before it)."""

MIN_IMAGES_FOR_PR = 10
"""The across-images participation ratio is at most N - 1; below 10 images it is mostly the
image count. It is also left empty when it exceeds half that cap (saturated)."""


@dataclass
class ViewFeatures:
    """Pooled features of the views (`run_views`).

    Attributes:
        a: per record name, (M, K, F) float32 features of K views of each of M images.
        b: the same transformations of each image's tile-shuffled copy.
        images: the indices (into the inputs) of the M viewed images.
        spec: the transformations.
        seed: image i used seed `seed + i`.
    """

    a: dict[str, Tensor] = field(default_factory=dict)
    b: dict[str, Tensor] = field(default_factory=dict)
    images: list[int] = field(default_factory=list)
    spec: ViewSpec = VIEWS
    seed: int = 0

    @property
    def n_images(self) -> int:
        return len(self.images)


def view_images(n: int, most: int = MAX_VIEW_IMAGES) -> list[int]:
    """Which of n images are viewed: all when n <= most, else `most` evenly spaced indices
    (first and last included)."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)}) if most > 1 else [0]


def pooled(t: Tensor) -> Tensor:
    """One vector per sample: average over positions for maps, flattened otherwise.
    (N, C, H, W) -> (N, C); (N, ...) -> (N, -1)."""
    t = t.float()
    return t.mean((2, 3)) if t.dim() == 4 else t.reshape(len(t), -1)


def run_views(
    module: nn.Module,
    preprocess: Preprocess,
    inputs: Tensor,
    selected: list[str],
    device: torch.device,
    dtype: torch.dtype,
    *,
    spec: ViewSpec = VIEWS,
    seed: int = 0,
    max_images: int = MAX_VIEW_IMAGES,
    batch_size: int = 16,
    images: Sequence[int] | None = None,
) -> ViewFeatures:
    """Forward K views of each of `view_images(N, max_images)` images and of its shuffled
    copy through `module`, keeping only each selected record's pooled features.

    Args:
        inputs: (N, 3, H, W) preprocessed (normalised) images; views are drawn on the
            un-normalised pixels and normalised again.
        selected: module names to record.
        batch_size: images per forward (a static-batch program's `max_batch`).
        images: the indices of `inputs` in the whole image set, when `inputs` holds only the
            images to view (`inspect` keeps no others): all of them are viewed, image
            `images[j]` with seed `seed + images[j]`. None: `view_images(N, max_images)`.
    """
    mean = torch.tensor(preprocess.mean)[:, None, None]
    std = torch.tensor(preprocess.std)[:, None, None]
    if images is not None:
        out = ViewFeatures(images=list(images), spec=spec, seed=seed)
        rows = dict(zip(images, range(len(images))))
    else:
        out = ViewFeatures(images=view_images(len(inputs), max_images), spec=spec, seed=seed)
        rows = {i: i for i in out.images}
    chunks: dict[str, list[Tensor]] = {}

    def on_record(rec: LayerRecord) -> None:
        chunks.setdefault(rec.name, []).append(pooled(rec.tensor).cpu())

    per_image: list[dict[str, Tensor]] = []
    with capture(module, selected, on_record=on_record, to=None):
        for i in out.images:
            x01 = preprocess.unnormalize(inputs[rows[i]]).clamp(0, 1)  # (3, H, W)
            va, vb = metrics.view_pairs(x01, spec, seed + i)  # (K, 3, H, W) each
            batch = (torch.cat([va, vb]) - mean) / std  # (2K, 3, H, W)
            chunks.clear()
            for start in range(0, len(batch), batch_size):
                with autocast(device, dtype):
                    forward(module, to_device(batch[start : start + batch_size], device))
            per_image.append({n: torch.cat(c) for n, c in chunks.items()})  # (2K, F) each
    k = spec.views
    for name in per_image[0] if per_image else []:
        if all(name in f and f[name].shape == per_image[0][name].shape for f in per_image):
            z = torch.stack([f[name] for f in per_image])  # (M, 2K, F)
            out.a[name], out.b[name] = z[:, :k], z[:, k:]
    return out


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def invariance_cells(views: ViewFeatures | None, name: str, n: int) -> tuple[dict, dict[str, str], list]:
    """The `abstraction` cells of one layer of n images: (values, reasons for empty cells,
    index per image, None for the images that were not viewed)."""
    keys = ("abstraction", "abstraction_lo", "abstraction_hi")
    per: list[float | None] = [None] * n
    if views is None or name not in views.a:
        why = "views were not run" if views is None or not views.a else "the layer is absent from the views' forwards"
        return dict.fromkeys(keys), {"abstraction": why}, per
    a, b = views.a[name], views.b[name]
    for i, v in zip(views.images, metrics.view_invariance(a, b).tolist()):
        per[i] = None if math.isnan(v) else float(v)
    est = metrics.view_invariance_estimate(a, b)
    if math.isnan(est.value):
        return dict.fromkeys(keys), {"abstraction": "the pooled features do not vary over the views"}, per
    return dict(zip(keys, (est.value, est.lo, est.hi))), {}, per


def cka_cells(
    x: Tensor, input_gram: Tensor, output_gram: Tensor | None
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Debiased linear CKA of one layer to the input and to the output, each with its 95%
    jackknife interval over images, blanked (with the reason) when too uncertain: the
    full-batch estimator on all n images at once (`inspect` streams the minibatch one,
    `fgscope.layers.stream.CkaStream`, and formats it with `cka_estimate_cells`).

    Args:
        x: (N, ...) the layer's outputs for the N images.
        input_gram: (N, N) linear Gram matrix of the flattened input pixels.
        output_gram: (N, N) of the model's output, None when it has no tensor output.
    """
    n = len(x)
    if n < MIN_IMAGES_FOR_CKA:
        return cka_estimate_cells(None, None, n, output=output_gram is not None)
    gram = metrics.gram_linear(x.double())  # (N, N)
    est_out = metrics.jackknife_cka(gram, output_gram, debiased=True) if output_gram is not None else None
    return cka_estimate_cells(metrics.jackknife_cka(gram, input_gram, debiased=True), est_out, n,
                              output=output_gram is not None)


def cka_estimate_cells(
    est_input: Estimate | None, est_output: Estimate | None, n: int, *, output: bool = True
) -> tuple[dict[str, float | None], dict[str, str]]:
    """The `dcka_input`/`dcka_output` cells (value, `_lo`, `_hi`) of n images from their
    estimates, and the reason for each empty cell: fewer than `MIN_IMAGES_FOR_CKA` images,
    no tensor output (`output=False`), undefined, or an interval wider than `CKA_MAX_WIDTH`."""
    vals: dict[str, float | None] = {}
    why: dict[str, str] = {}
    for side, est in (("input", est_input), ("output", est_output)):
        key = f"dcka_{side}"
        vals.update({key: None, f"{key}_lo": None, f"{key}_hi": None})
        if n < MIN_IMAGES_FOR_CKA:
            why[key] = f"needs >= {MIN_IMAGES_FOR_CKA} images (got {n})"
        elif side == "output" and not output:
            why[key] = "the model's output is not a tensor"
        elif est is None:
            why[key] = "needs forward batches of >= 5 images (--batch-size)"
        elif math.isnan(est.value) or math.isnan(est.lo):
            why[key] = "undefined: a representation is constant over the images"
        elif est.width > CKA_MAX_WIDTH:
            why[key] = (f"too uncertain with {n} images: the 95% interval is wider than {CKA_MAX_WIDTH}"
                        f"{DETAIL}{_fmt(est.value)} [{_fmt(est.lo)}, {_fmt(est.hi)}]")
        else:
            vals.update({key: est.value, f"{key}_lo": est.lo, f"{key}_hi": est.hi})
    return vals, why


def images_pr_cell(x: Tensor) -> tuple[float | None, str | None]:
    """Participation ratio of the average-pooled features across the N images, or the reason
    it is left empty. (N, ...) -> (value, reason)."""
    p = pooled(x)
    return pr_cell(float(metrics.participation_ratio(p)) if len(x) >= 2 else math.nan, len(x), p.shape[1])


def pr_cell(pr: float, n: int, dim: int = 0) -> tuple[float | None, str | None]:
    """The `pr_images` cell from the participation ratio `pr` of n images' pooled features
    of `dim` dimensions (`fgscope.layers.stream.PooledCovariance`), or why it is empty."""
    from fgscope.layers.stream import MAX_PR_FEATURES

    if n < MIN_IMAGES_FOR_PR:
        return None, f"needs >= {MIN_IMAGES_FOR_PR} images (got {n})"
    if dim > MAX_PR_FEATURES:
        return None, f"{dim} pooled features: more than {MAX_PR_FEATURES}, no covariance is accumulated"
    if math.isnan(pr):
        return None, "the pooled features do not vary over the images"
    if pr > (n - 1) / 2:
        return None, f"saturated: over half its cap N - 1 = {n - 1}; more images needed{DETAIL}{pr:.1f}"
    return pr, None
