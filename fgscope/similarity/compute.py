"""Running one model, or two, over images for `fgscope similarity`: where the selected layers
are (`fgscope.places.locate_layers`) and the CKA between them (`compute_similarity`, with the Grams of
`similarity_cka`). No files are written here (see `fgscope.similarity.run`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fgscope.capture import LayerRecord, capture
from fgscope.device import autocast, resolve_device, resolve_dtype, to_device
from fgscope.errors import ConfigError, ImageError, LayerNotFoundError, ModelRunError
from fgscope.forward import forward
from fgscope.images import ImageFailure, LoadedImage, discover, iter_images, load_inputs
from fgscope.models import LoadedModel, Preprocess, load_model
from fgscope.places import LayerPlace, locate_layers
from fgscope.selection import LayerSpec, select_layers
from fgscope.similarity.cka import CkaAccumulator, centered_gram

__all__ = [
    "MIN_IMAGES",
    "SimilarityResult",
    "ImageInfo",
    "compute_similarity",
]

MIN_IMAGES = 4
"""The debiased estimator needs n >= 4 (and with n = 2 linear CKA is identically 1)."""


# --- running models over images -----------------------------------------------------------


@dataclass(frozen=True)
class SimilarityResult:
    """What `compute_similarity` measured.

    Attributes:
        layers_x, layers_y: record names of MODEL (rows) and of the --vs model (columns; the
            same as `layers_x` without --vs), in execution order.
        places_x, places_y: geometry and stage of each of those layers.
        cka: (len(layers_x), len(layers_y)) linear CKA (float64, CPU; NaN: constant layer).
        cka_debiased: the same with unbiased HSIC.
        method: `minibatch` or `full`.
        batch_size: images per batch (batches are split evenly: each holds at least this many).
        n_batches: batches accumulated (1 for `full`).
        images, failures: the images used, and those that could not be read.
        model, vs_model: the models (vs_model None without --vs; model None for a dump).
        vs_preprocess: `own` when the --vs model used its own preprocessing, `shared` when it
            was fed MODEL's inputs (it brought none of its own); None without --vs.
        device, dtype: where and in what precision the forwards ran.
        notes: remarks for the user (fallbacks, skipped layers).
        features: what each layer's representation of an image is (in words).
    """

    layers_x: list[str]
    layers_y: list[str]
    places_x: list[LayerPlace]
    places_y: list[LayerPlace]
    cka: Tensor
    cka_debiased: Tensor
    method: str
    batch_size: int
    n_batches: int
    images: list[ImageInfo]
    failures: list[ImageFailure]
    model: LoadedModel | None
    vs_model: LoadedModel | None
    vs_preprocess: str | None
    device: str
    dtype: str
    notes: tuple[str, ...] = ()
    features: str = "each layer's whole output per image, flattened (not pooled)"

    @property
    def n_images(self) -> int:
        return len(self.images)

    def diagonal(self) -> list[dict[str, Any]]:
        """With --vs: CKA between same-named layers of both models, largest drop first
        (ascending debiased CKA; undefined values last). Empty without --vs."""
        if self.vs_model is None:
            return []
        col = {n: j for j, n in enumerate(self.layers_y)}
        rows = []
        for i, name in enumerate(self.layers_x):
            if name not in col:
                continue
            j = col[name]
            c, d = _num(self.cka[i, j]), _num(self.cka_debiased[i, j])
            rows.append({
                "layer": name, "cka": c, "cka_debiased": d,
                "drop": None if d is None else 1.0 - d,
                "stage": self.places_x[i].stage, "index": i,
            })
        return sorted(rows, key=lambda r: (r["cka_debiased"] is None, r["cka_debiased"] or 0.0))


def _num(v: Any) -> float | None:
    f = float(v)
    return None if math.isnan(f) else f


def _has_own_preprocess(lm: LoadedModel) -> bool:
    """True when the preprocessing came with the weights (torchvision weights' transforms)."""
    return lm.source.kind == "torchvision" and lm.source.weights is not None


@dataclass
class _Side:
    """One model's part of the run: what to record and what was recorded for this batch."""

    lm: LoadedModel
    preprocess: Preprocess
    selected: list[str]
    places: dict[str, LayerPlace]
    names: list[str] = field(default_factory=list)  # record names, fixed by the first batch
    grams: dict[str, Tensor] = field(default_factory=dict)  # this batch
    feats: dict[str, Tensor] = field(default_factory=dict)  # `full`: (n, p) of every image

    def run(
        self, images: Sequence[Image.Image], dev: torch.device, dt: torch.dtype,
        keep: tuple[int, int] | None = None,
    ) -> None:
        """Forward one batch; store each layer's centred Gram, or with `keep=(offset, n)`
        its features in rows offset.. of an (n, p) float32 CPU buffer per layer."""
        x = to_device(torch.stack([self.preprocess(im) for im in images]), dev)
        self.grams = {}
        seen: list[str] = []

        def on_record(rec: LayerRecord) -> None:
            seen.append(rec.name)
            if keep is not None:  # `full`: every image's features, for the n x n Gram
                flat = rec.tensor.detach().reshape(len(rec.tensor), -1)
                buf = self.feats.get(rec.name)
                if buf is None:
                    buf = self.feats[rec.name] = torch.empty(keep[1], flat.shape[1])
                buf[keep[0] : keep[0] + len(flat)] = flat  # a copy, before any in-place op
            else:
                self.grams[rec.name] = centered_gram(rec.tensor.detach())

        module = self.lm.module
        with capture(module, self.selected, on_record=on_record, to=None), autocast(dev, dt):
            forward(module, x)
        if not self.names:
            self.names = seen
        elif seen != self.names:
            raise ModelRunError(
                "the model recorded different layers for different batches "
                f"({', '.join(seen[:4])} vs {', '.join(self.names[:4])})",
                "select layers that run on every forward",
            )


def _prepare(
    lm: LoadedModel, preprocess: Preprocess, layers: LayerSpec, first: Image.Image,
    dev: torch.device, what: str,
) -> _Side:
    lm.module.to(dev)
    example = preprocess(first)[None].to(dev)
    try:
        selected = list(select_layers(lm.module, layers, example))
    except LayerNotFoundError as exc:
        raise LayerNotFoundError(f"{what}: {exc.message}", hint=exc.hint) from None
    return _Side(lm, preprocess, selected, locate_layers(lm.module, example, selected))


def _batches(n: int, batch_size: int, minibatch: bool) -> tuple[str, list[np.ndarray]]:
    """`minibatch` with n // batch_size even batches (each >= batch_size) when there are
    at least two, else `full` in forward batches of batch_size."""
    if minibatch and n >= 2 * batch_size:
        return "minibatch", np.array_split(np.arange(n), n // batch_size)
    return "full", [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def compute_similarity(
    model: LoadedModel | nn.Module | str,
    images: Sequence[str | os.PathLike | Image.Image],
    layers: LayerSpec = "stages",
    *,
    vs: LoadedModel | nn.Module | str | None = None,
    batch_size: int = 32,
    minibatch: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> SimilarityResult:
    """Linear CKA (biased and debiased) between the selected layers of `model`, or between
    those of `model` (rows) and of `vs` (columns), on the same images.

    Args:
        model, vs: `LoadedModel`s, modules, or specs for `fgscope.load_model`.
        images: at least 4 paths, folders, globs or PIL images.
        layers: selection as in `fgscope.selection`, applied to both models.
        batch_size: images per forward and per CKA minibatch (>= 4).
        minibatch: accumulate over batches (Nguyen et al. 2021); False, or fewer than two
            batches of images, computes CKA on all images at once (`full`).
        device, dtype: where and how the forwards run.
        progress: called as `progress(done, total)` after each batch.

    Raises:
        ImageError: fewer than 4 images could be read.
        LayerNotFoundError: an unknown layer, before any forward.
        ConfigError: batch_size < 4.
    """
    if batch_size < 4:
        raise ConfigError(f"--batch-size must be at least 4 for CKA, got {batch_size}")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    vlm = None if vs is None else vs if isinstance(vs, LoadedModel) else load_model(vs)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    sizes = [m.preprocess.resize_size for m in (lm, vlm) if m is not None and m.preprocess.resize_size]
    source = _Source(images, max(sizes, default=None))
    n_in = len(source)
    if n_in < MIN_IMAGES:
        bad = f" ({len(source.failures)} could not be read)" if source.failures else ""
        raise ImageError(
            f"similarity needs at least {MIN_IMAGES} images, got {n_in}{bad}",
            "pass a folder of images: CKA compares how layers represent a set of inputs",
        )
    # A static-batch .pt2 takes at most `cap` images per forward: `full` CKA, whose rows are
    # filled forward by forward, in forwards of at most `cap` images.
    cap = min((m.max_batch for m in (lm, vlm) if m is not None and m.max_batch), default=None)
    method, batches = _batches(n_in, batch_size, minibatch and cap is None)
    if cap is not None:
        batches = [part for idx in batches for part in np.array_split(idx, -(-len(idx) // cap))]
    notes = [f"at most {cap} image(s) per forward: CKA computed on all {n_in} at once"] if cap else []
    if method == "full" and minibatch and cap is None:
        notes.append(
            f"{n_in} images are fewer than two batches of {batch_size}: CKA computed on all "
            f"{n_in} at once (n x n Grams) instead of in minibatches"
        )
    # Images are decoded batch by batch (never all at once); only path, size and hash stay.
    first = source.decode(batches[0])
    while not first and len(batches) > 1:  # a first batch that failed entirely
        batches = batches[1:]
        first = source.decode(batches[0])
    if not first:
        raise ImageError(f"none of the {n_in} image(s) could be read: "
                         + "; ".join(f.reason for f in source.failures[:3]))
    x_side = _prepare(lm, lm.preprocess, layers, first[0].image, dev, "MODEL")
    sides = [x_side]
    vs_pre = None
    if vlm is not None:
        own = _has_own_preprocess(vlm)
        vs_pre = "own" if own else "shared"
        sides.append(
            _prepare(vlm, vlm.preprocess if own else lm.preprocess, layers, first[0].image, dev, "--vs model")
        )
    acc: CkaAccumulator | None = None
    kept: list[ImageInfo] = []
    pending: list[LoadedImage] = []
    for done, idx in enumerate(batches, 1):
        pending += first if done == 1 else source.decode(idx)
        # A minibatch needs 4 images: one that lost images to failures waits for the next.
        if pending and (method == "full" or len(pending) >= MIN_IMAGES):
            pics = [li.image for li in pending]
            for side in sides:
                side.run(pics, dev, dt, keep=(len(kept), n_in) if method == "full" else None)
            kept += [ImageInfo(li.path, li.size, li.sha256) for li in pending]
            pending = []
            if method == "minibatch":
                kx = [x_side.grams[nm] for nm in x_side.names]
                ky = [sides[1].grams[nm] for nm in sides[1].names] if len(sides) > 1 else None
                if acc is None:
                    acc = CkaAccumulator(len(kx), None if ky is None else len(ky))
                acc.update(kx, ky)
        if progress is not None:
            progress(done, len(batches))
    n = len(kept)
    if n < MIN_IMAGES:
        raise ImageError(
            f"similarity needs at least {MIN_IMAGES} images, got {n} ({len(source.failures)} could not be read)",
            "pass a folder of images: CKA compares how layers represent a set of inputs",
        )
    if pending:
        notes.append(f"the last {len(pending)} image(s) were left out: failures left their "
                     f"minibatch with fewer than {MIN_IMAGES}")
    if method == "full":
        grams = [[centered_gram(s.feats[nm][:n]) for nm in s.names] for s in sides]
        for s in sides:
            s.feats.clear()
        acc = CkaAccumulator(len(grams[0]), None if len(sides) == 1 else len(grams[1]))
        acc.update(grams[0], grams[1] if len(sides) > 1 else None)
    assert acc is not None
    cka, cka_u = acc.compute()
    y_side = sides[-1]
    return SimilarityResult(
        layers_x=x_side.names, layers_y=y_side.names,
        places_x=[x_side.places[nm] for nm in x_side.names],
        places_y=[y_side.places[nm] for nm in y_side.names],
        cka=cka, cka_debiased=cka_u, method=method,
        batch_size=batch_size, n_batches=acc.batches, images=kept, failures=source.failures,
        model=lm, vs_model=vlm, vs_preprocess=vs_pre, device=str(dev),
        dtype=str(dt).removeprefix("torch."), notes=tuple(notes),
    )


@dataclass(frozen=True)
class ImageInfo:
    """An image that went into the CKA: its path (`<image i>` for a PIL image), (width,
    height) after the EXIF transpose (None when read from a dump, which does not store it),
    and the sha256 of its file ("" for a PIL image or a dump)."""

    path: Path
    size: tuple[int, int] | None
    sha256: str


class _Source:
    """The inputs, decoded one batch at a time: PIL images as given, or the files found in
    paths, folders and globs (`discover`); `failures` fills as batches are decoded."""

    def __init__(self, images: Sequence[str | os.PathLike | Image.Image], resize_size: int | None) -> None:
        self.resize_size = resize_size
        if any(isinstance(im, Image.Image) for im in images):
            self.loaded, self.failures = load_inputs(images)  # in memory already (the caller's)
            self.paths: list[Path] = []
        else:
            found = discover([os.fspath(p) for p in images])  # type: ignore[arg-type]
            self.loaded, self.paths, self.failures = [], list(found), list(found.failures)

    def __len__(self) -> int:
        return len(self.loaded) if self.loaded else len(self.paths)

    def decode(self, idx: np.ndarray) -> list[LoadedImage]:
        if self.loaded:
            return [self.loaded[int(i)] for i in idx]
        out: list[LoadedImage] = []
        for item in iter_images([self.paths[int(i)] for i in idx], resize_size=self.resize_size):
            if isinstance(item, LoadedImage):
                out.append(item)
            else:
                self.failures.append(item)
        return out
