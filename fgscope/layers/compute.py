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

Every number is accumulated while the batches flow (`fgscope.layers.stream`): the images are
decoded batch by batch and each layer's output is reduced as it is produced, so memory is set
by the batch, the model and `max_images` (the images whose activations are kept, for grids
and figures), never by the number of images.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from fgscope.capture import LayerRecord, capture, first_tensor
from fgscope.device import autocast, resolve_device, resolve_dtype, to_device
from fgscope.errors import ImageError, ModelRunError
from fgscope.forward import forward
from fgscope.geometry import trace
from fgscope.images import (
    ImageFailure,
    LoadedImage,
    default_image,
    discover,
    iter_images,
    load_inputs,
)
from fgscope.layers.abstraction import (
    MIN_IMAGES_FOR_CKA,
    VIEWS,
    ViewFeatures,
    cka_estimate_cells,
    invariance_cells,
    pr_cell,
    run_views,
    view_images,
)
from fgscope.layers.results import MAX_IMAGES, STAT_KEYS, ImageInfo, InspectResult, LayerStats
from fgscope.layers.stream import (
    JACKKNIFE_GROUPS,
    MIN_CKA_BATCH,
    CkaStream,
    LayerStream,
    layer_gram,
)
from fgscope.layouts import as_map
from fgscope.metrics import Estimate, ViewSpec
from fgscope.models import LoadedModel, load_model
from fgscope.places import LayerPlace, trace_places
from fgscope.progress import ProgressFn, report
from fgscope.selection import LayerSpec, select_layers

__all__ = ["LayerStats", "InspectResult", "ImageInfo", "inspect", "MIN_IMAGES_FOR_CKA", "STAT_KEYS", "MAX_IMAGES"]

def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _source(images: Sequence[str | os.PathLike | Image.Image], resize_size: int | None
            ) -> tuple[int, Iterator[LoadedImage | ImageFailure], list[ImageFailure]]:
    """(number of inputs, an iterator decoding them one at a time, discovery failures)."""
    if any(isinstance(im, Image.Image) for im in images):
        loaded, failures = load_inputs(images)  # already in memory: the caller holds them
        return len(loaded), iter(loaded), failures
    found = discover([os.fspath(p) for p in images])  # type: ignore[arg-type]
    return len(found), iter_images(found, resize_size=resize_size), list(found.failures)


def _batches(first: LoadedImage, source: Iterator[LoadedImage | ImageFailure],
             failures: list[ImageFailure], step: int, fixed: bool) -> Iterator[list[LoadedImage]]:
    """Batches of `step` decoded images, decoding a few ahead so that a last batch too small
    for CKA joins the one before it (not when the program takes at most `step`: `fixed`);
    images that fail to decode are appended to `failures`."""
    buf: collections.deque[LoadedImage] = collections.deque([first])
    more = True
    while True:
        while more and len(buf) < step + MIN_CKA_BATCH:
            item = next(source, None)
            if item is None:
                more = False
            elif isinstance(item, LoadedImage):
                buf.append(item)
            else:
                failures.append(item)
        if not buf:
            return
        take = len(buf) if not more and not fixed and len(buf) < step + MIN_CKA_BATCH else min(step, len(buf))
        yield [buf.popleft() for _ in range(take)]


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
    max_images: int = MAX_IMAGES,
    progress: ProgressFn | None = None,
) -> InspectResult:
    """Run `images` through `model`, record the selected layers and measure each.

    Images are decoded and run batch by batch; every statistic is accumulated as the records
    are produced (`fgscope.layers.stream`), and only the first `max_images` images keep
    their activations, inputs and outputs. Per-image statistics equal those of all images in
    memory; debiased CKA is the minibatch estimator over the forward batches (docs/concepts.md),
    the full-batch one when all images fit in one batch.

    Args:
        model: a `LoadedModel`, a module, or a spec for `fgscope.load_model`.
        images: paths, folders, globs or PIL images; None = the sample photo.
        layers: selection as in `fgscope.selection` (default: the model's blocks).
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: float32, float16 or bfloat16 (autocast).
        batch_size: images per forward (a last batch of fewer than 5 joins the one before).
        views: K views per image for the abstraction column (2K extra forwards for each of
            at most 4 images, evenly spaced over the set); 0 leaves the column empty. At least
            3 otherwise.
        view_seed: image i's views are drawn with seed `view_seed + i`.
        max_images: images whose activations are kept (>= 1).
        progress: `progress(phase, done, total)` after each batch (`fgscope.progress`).

    Returns:
        The table, the first images' activations and the predictions.

    Raises:
        ImageError: no image could be read (failures of some images are listed instead).
        LayerNotFoundError: an unknown layer, before any forward.
        ModelRunError: the model recorded different layers for different batches.
        ValueError: `views` is 1 or 2, or `max_images` < 1.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    spec = ViewSpec(views=views) if views else None
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    n_in, source, failures = _source(images or [default_image()], lm.preprocess.resize_size)
    first = next((it for it in source if isinstance(it, LoadedImage) or failures.append(it)), None)
    if first is None:
        reasons = "; ".join(f.reason for f in failures[:3])
        raise ImageError(f"none of the {len(failures)} image(s) could be read: {reasons}")
    module = lm.module
    module.to(dev)
    example = lm.preprocess(first.image)[None].to(dev)
    selected = list(select_layers(module, layers, example))
    places, macs = trace_places(module, example, selected)  # stages from the whole model
    missed = trace(module, example, selected, report_ops=True).missed_note()
    step = min(batch_size, lm.max_batch or batch_size)  # a static-batch .pt2 takes no more
    kept = _Kept()
    streams: dict[str, LayerStream] = {}
    order: list[str] = []
    first_rec: dict[str, LayerRecord] = {}
    want_views = set(view_images(n_in)) if spec is not None else set()
    cka: CkaStream | None = None
    report(progress, "forward", 0, n_in)
    for batch in _batches(first, source, failures, step, fixed=lm.max_batch is not None):
        start = len(kept.images)
        for j, li in enumerate(batch):
            kept.images.append(ImageInfo(li.path, li.size, li.sha256))
            if start + j in want_views:
                kept.view_inputs.append((start + j, lm.preprocess(li.image)))
        x = torch.stack([lm.preprocess(li.image) for li in batch])  # (b, 3, H, W)
        keep = max(0, min(len(batch), max_images - start))
        if keep:
            kept.inputs.append(x[:keep])
            kept.display += [lm.preprocess.to_image(t) for t in x[:keep]]
        del batch
        grams: dict[str, torch.Tensor] = {}
        seen: list[str] = []

        def on_record(rec: LayerRecord, keep: int = keep, seen: list[str] = seen,
                      grams: dict[str, torch.Tensor] = grams) -> None:
            geo = places[rec.name].geometry if rec.name in places else None
            t = as_map(rec.tensor, geo.layout if geo is not None else None)
            seen.append(rec.name)
            first_rec.setdefault(rec.name, rec)
            streams.setdefault(rec.name, LayerStream(rec.name)).add(t)
            if len(t) >= MIN_CKA_BATCH:
                grams[rec.name] = layer_gram(t)
            if keep:
                kept.acts.setdefault(rec.name, []).append(t[:keep].float().cpu().clone())

        with capture(module, selected, on_record=on_record, to=None):
            xb = to_device(x, dev)
            with autocast(dev, dt):
                out = forward(module, xb)
        if not order:
            order = seen
        elif seen != order:
            raise ModelRunError(
                "the model recorded different layers for different batches "
                f"({', '.join(seen[:4])} vs {', '.join(order[:4])})",
                "select layers that run on every forward",
            )
        out_t = first_tensor(out)
        out_t = out_t.detach().float() if out_t is not None else None
        if out_t is not None:
            if keep:
                kept.output.append(out_t[:keep].cpu())
            kept.predictions += _top5(out_t.cpu(), lm.labels) or []
        if len(x) >= MIN_CKA_BATCH and all(n in grams for n in order):
            if cka is None:
                cka = CkaStream(len(order), max(JACKKNIFE_GROUPS, step + MIN_CKA_BATCH))
            cka.add([grams[n] for n in order], layer_gram(xb), layer_gram(out_t) if out_t is not None else None)
        else:
            kept.no_cka += len(x)
        kept.batches += 1
        report(progress, "forward", len(kept.images) + len(failures), n_in)
    n = len(kept.images)
    view_feats = None
    if spec is not None and kept.view_inputs:
        report(progress, "views", 0, None)
        idx, vin = zip(*kept.view_inputs)
        view_feats = run_views(module, lm.preprocess, torch.stack(vin), selected, dev, dt, spec=spec,
                               seed=view_seed, batch_size=step, images=list(idx))
    report(progress, "statistics", 0, None)
    modules = dict(module.named_modules())
    params = {nm: sum(p.numel() for p in modules[first_rec[nm].module_name].parameters())
              if first_rec[nm].op is None else 0 for nm in order}  # a functional op has none
    stages, prev = [], "early"
    for nm in order:  # a record the geometry pass did not see takes the stage before it
        prev = places[nm].stage if nm in places else prev
        stages.append(prev)
    ests = cka.estimates() if cka is not None and n >= MIN_IMAGES_FOR_CKA else [None] * len(order)
    notes = [missed] if missed else []
    if kept.no_cka and n >= MIN_IMAGES_FOR_CKA:
        notes.append(f"dCKA: {kept.no_cka} of {n} images were in forward batches of fewer than "
                     f"{MIN_CKA_BATCH} images and are left out of it (raise --batch-size)")
    rows = [_row(i, nm, streams[nm], first_rec[nm].module_type, params[nm], places.get(nm), stages[i],
                 ests[i], n, lm.input_size, view_feats, out_seen=bool(kept.output) or kept.predictions != [])
            for i, nm in enumerate(order)]
    acts = {nm: torch.cat(v) for nm, v in kept.acts.items()}
    return InspectResult(
        rows=rows, activations=acts, inputs=torch.cat(kept.inputs), display=kept.display,
        images=kept.images, failures=failures,
        output=torch.cat(kept.output) if kept.output else None,
        predictions=kept.predictions or None, model=lm, device=str(dev),
        dtype=str(dt).removeprefix("torch."), macs=macs, views=view_feats, notes=tuple(notes),
        batches=kept.batches,
    )


@dataclass
class _Kept:
    """What `inspect` keeps while the batches flow: the first images' tensors, every image's
    name and prediction."""

    images: list[ImageInfo] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    display: list[Image.Image] = field(default_factory=list)
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    output: list[torch.Tensor] = field(default_factory=list)
    predictions: list[list[tuple[str, float]]] = field(default_factory=list)
    view_inputs: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    no_cka: int = 0
    batches: int = 0


_FLAT = {"concentration": "no activation energy (the map is zero, up to 1e-12)",
         "pr_spatial": "no variation over positions"}


def _row(
    i: int,
    name: str,
    s: LayerStream,
    module_type: str,
    n_params: int,
    place: LayerPlace | None,
    stage: str,
    cka: tuple[Estimate | None, Estimate | None] | None,
    n: int,
    input_size: tuple[int, int],
    views: ViewFeatures | None,
    *,
    out_seen: bool,
) -> LayerStats:
    """One row from a layer's accumulated numbers; `cka` its (input, output) estimates
    (None with too few images for CKA)."""
    shape = s.shape or []
    is_map = len(shape) == 3
    empty: dict[str, str] = {}
    per = {k: list(v) for k, v in s.per.items()}
    if s.signed:
        per["sparsity"] = [None] * n
        empty["sparsity"] = "signed output: no inactive state (see negative_frac)"
    if not is_map:
        empty["concentration"] = empty["pr_spatial"] = "no spatial map"
    for key in ("concentration", "pr_spatial"):
        if key not in empty and _mean(per[key]) is None:
            empty[key] = "1x1 map" if shape[1] * shape[2] < 2 else _FLAT[key]
    if cka is None:
        vals, why = cka_estimate_cells(None, None, n, output=out_seen)
    else:
        vals, why = cka_estimate_cells(cka[0], cka[1], n, output=out_seen and cka[1] is not None)
    empty.update(why)
    inv, why, per["abstraction"] = invariance_cells(views, name, n)
    empty.update(why)
    pr_images, why_pr = pr_cell(s.pooled.value(), n, s.pooled.dim)
    if why_pr is not None:
        empty["pr_images"] = why_pr
    g = place.geometry if place is not None else None
    rf = max(g.rf) if g is not None else None  # vectors: union of the last map's units
    return LayerStats(
        index=i,
        name=name,
        type=module_type,
        shape=shape,
        spatial=shape[1:] if is_map else None,
        channels=int(shape[0]) if shape else 0,
        stride=max(g.stride) if g is not None and g.spatial else None,
        rf=rf,
        rf_frac=round(rf / max(input_size), 4) if rf is not None else None,
        rf_exact=bool(g.exact) if g is not None else False,
        params=n_params,
        stage=stage,
        signed=s.signed,
        sparsity=_mean(per["sparsity"]),
        negative_frac=float(_mean(per["negative_frac"])),
        concentration=_mean(per["concentration"]),
        pr_spatial=_mean(per["pr_spatial"]),
        mean=float(_mean(per["mean"])),
        max=float(_mean(per["max"])),
        pr_images=pr_images,
        **inv,
        **vals,
        rf_note=g.note if g is not None else None,
        layout=g.layout.label if g is not None and g.layout is not None else None,
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
