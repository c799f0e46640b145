"""`fgscope similarity`: linear CKA between all selected layers of one model, or of two.

Kornblith, Norouzi, Lee & Hinton 2019 ("Similarity of neural network representations
revisited") compare two layers by linear centred kernel alignment of their representations of
the same n images. A layer's representation of an image is its whole recorded output,
flattened (C*H*W numbers, not pooled, as in the paper): CKA then compares where *and* what a
layer responds to. CKA depends on the features only through the linear Gram matrix
K = X X^T of the images, so it is computed from Grams:

- `minibatch` (the default with at least two batches of images): Nguyen, Raghu & Kornblith
  2021 ("Do wide and deep networks learn the same things?"). For each batch of b images the
  b x b Grams of every layer are formed and the HSIC of every pair of layers is added up;
  CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L)). Memory never holds more than
  one batch of features and a few b x b matrices, whatever the number of images.
  `cka_debiased` uses the unbiased HSIC of Song et al. 2012, whose minibatch average is
  independent of b and converges to the full debiased CKA; `cka` uses the biased HSIC,
  which equals Kornblith et al.'s CKA for a single batch of all n but is biased upwards for
  small b (compare runs with `cka_debiased`).
- `full`: one "batch" of all n images, i.e. exactly `fgscope.metrics.linear_cka(x, y)` and
  `linear_cka(x, y, debiased=True)`; the features of every image are kept, and n x n Grams.
  Used when asked for, or when there are fewer than two batches of images.

Output folder:
    similarity.json            matrices, layer names and stages, method (see `write_outputs`)
    similarity.csv             the CKA matrix, rows = layers of MODEL, columns = layers of the
                               --vs model (or of MODEL again)
    similarity_debiased.csv    the debiased CKA matrix, same layout
    similarity.png             heatmaps with stage colour bars (+ with --vs: CKA of same-named
                               layers against depth)
    manifest.json              versions, models, images, command, timings
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from ..capture import LayerRecord, LayerSpec, capture, select_layers
from ..device import autocast, resolve_device, resolve_dtype, to_device
from ..errors import ConfigError, FgscopeError, ImageError, LayerNotFoundError
from ..geometry import LayerGeometry, trace_geometry
from ..images import ImageFailure, LoadedImage, discover, load_images
from ..metrics import center_gram
from ..models import LoadedModel, Preprocess, load_model
from ..runs import RunDir, new_run_dir, write_json, write_text
from .stages import assign_stages

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MIN_IMAGES",
    "LayerPlace",
    "locate_layers",
    "centered_gram",
    "CkaAccumulator",
    "SimilarityResult",
    "compute_similarity",
    "similarity_figure",
    "SimilarityConfig",
    "run_similarity",
]

MIN_IMAGES = 4
"""The debiased estimator needs n >= 4 (and with n = 2 linear CKA is identically 1)."""

_GRAM_CHUNK_BYTES = 64 << 20  # float64 working set per Gram chunk


# --- where the layers are ------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlace:
    """Geometry and stage of one recorded layer.

    Attributes:
        name: record name (`features.3`, `layer1.0.relu:2`).
        geometry: stride and receptive field, None when unknown.
        stage: `early`, `middle` or `late` among *all* layers of the model (the rule of
            `fgscope.analysis.stages` applied to every leaf call plus the selection).
    """

    name: str
    geometry: LayerGeometry | None
    stage: str

    @property
    def stride(self) -> float | None:
        g = self.geometry
        return float(max(g.stride)) if g is not None and g.spatial else None

    @property
    def rf(self) -> float | None:
        return float(max(self.geometry.rf)) if self.geometry is not None else None


def locate_layers(
    module: nn.Module, example_input: Tensor, selected: Sequence[str]
) -> dict[str, LayerPlace]:
    """Geometry and stage of every record of the `selected` modules, in execution order.

    Stages are assigned over all leaf calls of the model, so a layer gets the same stage
    whichever subset is selected.
    """
    geo, _ = trace_geometry(module, example_input, ["all", *selected])
    names = list(geo)
    stages = assign_stages(
        [max(g.stride) if g is not None and g.spatial else None for g in geo.values()],
        [g is None or g.spatial for g in geo.values()],
    )
    return {n: LayerPlace(n, geo[n], s) for n, s in zip(names, stages)}


# --- CKA from Grams -----------------------------------------------------------------------


def centered_gram(x: Tensor) -> Tensor:
    """Linear Gram matrix of features centred over the batch: (b, ...) -> (b, b) float64.

    H X X^T H with H = I - 11^T / b (`metrics.center_gram` of the linear Gram), accumulated
    over float64 chunks of columns, so a wide layer never needs a float64 copy of all its
    features at once; centring the b x b result is exact in float64 up to rounding (relative
    1e-16 of the uncentred entries). Runs on x's device (the CPU for MPS, which has no
    float64). x is not modified.
    """
    f = x.reshape(len(x), -1)  # (b, p)
    if f.device.type == "mps":
        f = f.cpu()
    b, p = f.shape
    step = max(1, _GRAM_CHUNK_BYTES // (8 * max(b, 1)))
    k = torch.zeros(b, b, dtype=torch.float64, device=f.device)
    for i in range(0, p, step):
        c = f[:, i : i + step].to(torch.float64)
        k += c @ c.T
    kc = center_gram((k + k.T) / 2)  # (b, b), exactly symmetric
    # A constant layer centres to rounding noise, not to zero: call that zero (NaN CKA).
    if float(kc.abs().max()) <= 8 * b * torch.finfo(torch.float64).eps * float(k.abs().max()):
        kc.zero_()
    return kc


class CkaAccumulator:
    """Linear CKA, biased and debiased, accumulated over minibatches of centred Grams.

    For each batch of b examples, with K, L the Grams of two layers:
    biased HSIC = <HKH, HLH> / (b-1)^2 (Gretton et al. 2005), unbiased HSIC =
    <K~, L~> / (b (b-3)) with K~ the U-centred Gram (Song et al. 2012; equal to
    `metrics.hsic_unbiased`). Per pair of layers the per-batch estimates are summed and
    CKA = S_KL / sqrt(S_KK S_LL) (Nguyen, Raghu & Kornblith 2021). One batch of all n
    examples gives exactly `metrics.linear_cka(x, y)` and `linear_cka(x, y, debiased=True)`;
    the debiased matrix over several batches equals `metrics.MinibatchCKA`.

    Args:
        n_x: layers on the row side.
        n_y: layers on the column side; None compares the n_x layers with themselves.
    """

    def __init__(self, n_x: int, n_y: int | None = None) -> None:
        if n_x < 1 or (n_y is not None and n_y < 1):
            raise ValueError(f"need at least one layer on each side, got n_x={n_x}, n_y={n_y}")
        self.n_x, self.n_y = n_x, n_y
        self.batches = 0
        self.examples = 0
        self._sums: dict[str, Tensor] = {}

    @staticmethod
    def _centre(grams: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(L, b*b) biased- and U-centred Grams, flattened."""
        kc = torch.stack([center_gram(k.to(torch.float64)) for k in grams])
        ku = torch.stack([center_gram(k, unbiased=True) for k in kc])
        return kc.flatten(1), ku.flatten(1)

    def update(self, kx: Sequence[Tensor], ky: Sequence[Tensor] | None = None) -> None:
        """Add one batch: one (b, b) Gram per layer (from `centered_gram`; any symmetric Gram
        is centred again here), for the rows and, unless symmetric, the columns.

        Raises:
            ValueError: wrong number of Grams, mismatched or non-square shapes, or b < 4.
        """
        if len(kx) != self.n_x:
            raise ValueError(f"expected {self.n_x} Grams in kx, got {len(kx)}")
        if (ky is None) != (self.n_y is None):
            raise ValueError("pass ky exactly when n_y was given")
        if ky is not None and len(ky) != self.n_y:
            raise ValueError(f"expected {self.n_y} Grams in ky, got {len(ky)}")
        shapes = {tuple(k.shape) for k in [*kx, *(ky or [])]}
        b = next(iter(shapes))[0] if len(shapes) == 1 else -1
        if len(shapes) != 1 or shapes != {(b, b)} or b < 4:
            raise ValueError(f"all Grams need the same shape (b, b) with b >= 4, got {sorted(shapes)}")
        xc, xu = self._centre(kx)  # (n_x, b*b)
        yc, yu = (xc, xu) if ky is None else self._centre([k.to(xc.device) for k in ky])
        sums = {
            "xy": xc @ yc.T / (b - 1) ** 2,  # (n_x, n_y) biased HSIC
            "xy_u": xu @ yu.T / (b * (b - 3)),  # (n_x, n_y) unbiased HSIC
            "xx": xc.square().sum(1) / (b - 1) ** 2,  # (n_x,)
            "xx_u": xu.square().sum(1) / (b * (b - 3)),
            "yy": yc.square().sum(1) / (b - 1) ** 2,  # (n_y,)
            "yy_u": yu.square().sum(1) / (b * (b - 3)),
        }
        for k, v in sums.items():
            self._sums[k] = v if k not in self._sums else self._sums[k] + v
        self.batches += 1
        self.examples += b

    def compute(self) -> tuple[Tensor, Tensor]:
        """(cka, cka_debiased), each (n_x, n_y) float64 on the CPU; NaN for a constant layer.

        Raises:
            RuntimeError: no batch was added.
        """
        if not self._sums:
            raise RuntimeError("CkaAccumulator.compute() called before any update()")
        s = {k: v.cpu() for k, v in self._sums.items()}
        out = []
        for suffix in ("", "_u"):
            xy, xx, yy = s["xy" + suffix], s["xx" + suffix], s["yy" + suffix]
            denom = (xx[:, None] * yy[None, :]).sqrt()
            cka = torch.where(denom > 0, xy / denom.clamp_min(1e-300), torch.nan)
            if self.n_y is None:
                cka = (cka + cka.T) / 2  # exactly symmetric despite rounding
            out.append(cka)
        return out[0], out[1]


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
        model, vs_model: the models (vs_model None without --vs).
        vs_preprocess: `own` when the --vs model used its own preprocessing, `shared` when it
            was fed MODEL's inputs (it brought none of its own); None without --vs.
        device, dtype: where and in what precision the forwards ran.
        notes: remarks for the user (fallbacks, skipped layers).
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
    images: list[LoadedImage]
    failures: list[ImageFailure]
    model: LoadedModel
    vs_model: LoadedModel | None
    vs_preprocess: str | None
    device: str
    dtype: str
    notes: tuple[str, ...] = ()

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


def _load_inputs(images: Sequence[Any]) -> tuple[list[LoadedImage], list[ImageFailure]]:
    pil = [im for im in images if isinstance(im, Image.Image)]
    if pil:
        if len(pil) != len(images):
            raise ImageError("pass either PIL images or paths, not both")
        return [
            LoadedImage(Path(f"<image {i}>"), im.convert("RGB"), im.size, "")
            for i, im in enumerate(pil)
        ], []
    return load_images(discover([os.fspath(p) for p in images]))


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
            module(x)
        if not self.names:
            self.names = seen
        elif seen != self.names:
            raise FgscopeError(
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
        layers: selection as in `fgscope.capture`, applied to both models.
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
    loaded, failures = _load_inputs(images)
    if len(loaded) < MIN_IMAGES:
        bad = f" ({len(failures)} could not be read)" if failures else ""
        raise ImageError(
            f"similarity needs at least {MIN_IMAGES} images, got {len(loaded)}{bad}",
            "pass a folder of images: CKA compares how layers represent a set of inputs",
        )
    pics = [li.image for li in loaded]
    x_side = _prepare(lm, lm.preprocess, layers, pics[0], dev, "MODEL")
    sides = [x_side]
    vs_pre = None
    if vlm is not None:
        own = _has_own_preprocess(vlm)
        vs_pre = "own" if own else "shared"
        sides.append(
            _prepare(vlm, vlm.preprocess if own else lm.preprocess, layers, pics[0], dev, "--vs model")
        )
    n = len(loaded)
    method, batches = _batches(n, batch_size, minibatch)
    notes = []
    if method == "full" and minibatch:
        notes.append(
            f"{n} images are fewer than two batches of {batch_size}: CKA computed on all "
            f"{n} at once (n x n Grams) instead of in minibatches"
        )
    acc: CkaAccumulator | None = None
    for done, idx in enumerate(batches, 1):
        batch = [pics[i] for i in idx]
        for side in sides:
            side.run(batch, dev, dt, keep=(int(idx[0]), n) if method == "full" else None)
        if method == "minibatch":
            kx = [x_side.grams[nm] for nm in x_side.names]
            ky = [sides[1].grams[nm] for nm in sides[1].names] if len(sides) > 1 else None
            if acc is None:
                acc = CkaAccumulator(len(kx), None if ky is None else len(ky))
            acc.update(kx, ky)
        if progress is not None:
            progress(done, len(batches))
    if method == "full":
        grams = [[centered_gram(s.feats[nm]) for nm in s.names] for s in sides]
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
        batch_size=batch_size, n_batches=acc.batches, images=loaded, failures=failures,
        model=lm, vs_model=vlm, vs_preprocess=vs_pre, device=str(dev),
        dtype=str(dt).removeprefix("torch."), notes=tuple(notes),
    )


# --- figure --------------------------------------------------------------------------------


def _tick_labels(places: Sequence[LayerPlace], limit: int = 40) -> tuple[list[int], list[str]]:
    step = max(1, math.ceil(len(places) / limit))
    idx = list(range(0, len(places), step))
    return idx, [
        p.name + (f"  s{p.stride:g}" if p.stride is not None else "") for p in (places[i] for i in idx)
    ]


def _stage_strip(ax: Any, places: Sequence[LayerPlace], axis: str, colors: dict) -> None:
    """Coloured boxes just outside the heatmap, one per layer, by stage."""
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    for i, p in enumerate(places):
        color = colors.get(p.stage, "#999999")
        if axis == "y":
            tr = blended_transform_factory(ax.transAxes, ax.transData)
            r = Rectangle((-0.045, i - 0.5), 0.03, 1, transform=tr, color=color, clip_on=False, lw=0)
        else:
            tr = blended_transform_factory(ax.transData, ax.transAxes)
            r = Rectangle((i - 0.5, -0.045), 1, 0.03, transform=tr, color=color, clip_on=False, lw=0)
        ax.add_patch(r)


def similarity_figure(result: SimilarityResult, x_label: str, y_label: str | None = None) -> Figure:
    """Heatmaps of CKA and debiased CKA (rows: MODEL's layers bottom to top; columns: the
    --vs model's, left to right), stage colour bars along both axes; with --vs, a third
    panel: CKA of same-named layers against depth.

    Args:
        result: what `compute_similarity` returned.
        x_label: name of MODEL (rows).
        y_label: name of the --vs model (columns), None without --vs.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ..render.style import STYLE, style_context

    px, py = result.places_x, result.places_y
    diag = result.diagonal()
    nx, ny = len(px), len(py)
    annotate = nx * ny <= 100
    colors = STYLE["stage_colors"]
    side = min(3.4, max(2.4, 0.28 * max(nx, ny)))
    width = min(STYLE["max_width_in"], 2 * side + 3.2)
    height = side + 1.9 + (2.3 if diag else 0.0)
    with style_context():
        fig = Figure(figsize=(width, height), layout="constrained")
        if diag:
            top, bottom = fig.subfigures(2, 1, height_ratios=[side + 1.9, 2.3])
        else:
            top, bottom = fig, None
        axes = top.subplots(1, 2)
        norm = Normalize(0.0, 1.0)
        biased = "linear CKA" if result.method == "full" else "linear CKA (biased: grows as\nbatches shrink)"
        for ax, mat, title in zip(
            axes, (result.cka, result.cka_debiased), (biased, "debiased linear CKA")
        ):
            m = mat.numpy()
            ax.imshow(m, origin="lower", cmap=STYLE["cmap"], norm=norm, aspect="auto",
                      interpolation="nearest")
            ax.set_title(title)
            xi, xl = _tick_labels(py)
            yi, yl = _tick_labels(px)
            ax.set_xticks(xi, labels=xl, rotation=55, ha="right", rotation_mode="anchor")
            ax.set_yticks(yi, labels=yl if ax is axes[0] else [])
            ax.tick_params(axis="both", length=0, pad=9)
            for spine in ax.spines.values():
                spine.set_visible(False)
            _stage_strip(ax, px, "y", colors)
            _stage_strip(ax, py, "x", colors)
            if annotate:
                for i in range(nx):
                    for j in range(ny):
                        v = m[i, j]
                        txt = "–" if math.isnan(v) else f"{v:.2f}"
                        ink = "black" if not math.isnan(v) and v > 0.6 else "white"
                        ax.text(j, i, txt, ha="center", va="center", color=ink,
                                fontsize=STYLE["font_size"] - (1 if max(nx, ny) > 7 else 0))
        axes[0].set_ylabel(f"{x_label} layers")
        for ax in axes:
            ax.set_xlabel(f"{y_label or x_label} layers")
        cb = top.colorbar(ScalarMappable(norm=norm, cmap=STYLE["cmap"]), ax=list(axes), shrink=0.8)
        cb.set_label("CKA (1 = same up to rotation and scale)")
        present = [s for s in ("early", "middle", "late") if any(p.stage == s for p in [*px, *py])]
        top.legend(
            handles=[Patch(color=colors[s], label=s) for s in present], loc="outside upper center",
            ncols=len(present) + 1, frameon=False,
            title=f"{result.n_images} images · {result.method}"
            + (f" (batches of {result.batch_size})" if result.method == "minibatch" else ""),
        )
        if bottom is not None:
            _diagonal_panel(bottom, result, diag, colors, y_label or "")
    return fig


def _diagonal_panel(fig: Any, result: SimilarityResult, diag: list[dict], colors: dict, vs: str) -> None:
    from ..render.style import STYLE

    ax = fig.subplots(1, 1)
    rows = sorted(diag, key=lambda r: r["index"])
    xs = [r["index"] for r in rows]
    for i, p in enumerate(result.places_x):
        ax.axvspan(i - 0.5, i + 0.5, color=colors.get(p.stage, "#999999"), alpha=0.12, lw=0)
    for key, label, style in (("cka", "linear CKA", "-"), ("cka_debiased", "debiased", "--")):
        ys = [np.nan if r[key] is None else r[key] for r in rows]
        ax.plot(xs, ys, style, marker="o", ms=3, color="#222222" if style == "-" else "#c44e52",
                label=label, lw=1.2)
    ax.set_xlim(-0.5, len(result.places_x) - 0.5)
    ax.set_ylim(min(0.0, *[r["cka_debiased"] or 0.0 for r in rows]), 1.05)
    idx, labels = _tick_labels(result.places_x, limit=25)
    ax.set_xticks(idx, labels=labels, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel(f"CKA to the same layer\nof {vs}")
    ax.legend(frameon=False, loc="lower left")
    if rows:
        worst = diag[0]
        if worst["cka_debiased"] is not None:
            right = worst["index"] > len(result.places_x) / 2
            ax.annotate(
                f"largest drop: {worst['layer']}", (worst["index"], worst["cka_debiased"]),
                xytext=(-6 if right else 6, -14), textcoords="offset points",
                ha="right" if right else "left", fontsize=STYLE["font_size"] - 1,
            )


# --- the command's job ---------------------------------------------------------------------


@dataclass(frozen=True)
class SimilarityConfig:
    """Options of one `fgscope similarity` run (see the command's help for each)."""

    model: str = "mobilenet_v2"
    images: list[str] = field(default_factory=list)
    vs: str | None = None
    layers: str = "stages"
    out: Path | None = None
    overwrite: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    vs_model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32
    minibatch: bool = True


def _matrix_csv(rows: list[str], cols: list[str], mat: Tensor) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", *cols])
    for name, vals in zip(rows, mat.tolist()):
        w.writerow([name, *("" if math.isnan(v) else repr(v) for v in vals)])
    return buf.getvalue()


def _matrix_json(mat: Tensor) -> list[list[float | None]]:
    return [[_num(v) for v in row] for row in mat.tolist()]


def _model_entry(lm: LoadedModel) -> dict[str, Any]:
    s, p = lm.source, lm.preprocess
    return {
        "spec": s.spec, "kind": s.kind, "arch": s.arch, "weights": s.weights, "path": s.path,
        "sha256": s.sha256, "notes": list(s.notes), "input_size": list(lm.input_size),
        "preprocess": {"crop_size": list(p.crop_size), "resize_size": p.resize_size,
                       "mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation},
    }


def run_similarity(
    config: SimilarityConfig, console: Console | None = None
) -> tuple[Path, SimilarityResult]:
    """Run the whole `similarity` job; returns the output folder and the measurements.

    Raises:
        FgscopeError: bad models, images, layers or options (before anything is written).
    """
    console = console or Console(quiet=True)
    if not config.images:
        raise ImageError(
            f"similarity needs at least {MIN_IMAGES} images and none were given",
            "pass image files or a folder after MODEL",
        )
    if config.batch_size < 4:
        raise ConfigError(f"--batch-size must be at least 4 for CKA, got {config.batch_size}")
    t0 = time.perf_counter()
    lm = load_model(config.model, **config.model_kwargs)
    vlm = load_model(config.vs, **config.vs_model_kwargs) if config.vs is not None else None
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Progress(
        TextColumn("CKA"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as bar:
        task = bar.add_task("batches", total=None)
        result = compute_similarity(
            lm, config.images, config.layers, vs=vlm, batch_size=config.batch_size,
            minibatch=config.minibatch, device=config.device, dtype=config.dtype,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    t_cka = time.perf_counter() - t0

    run = RunDir(new_run_dir(config.out, "similarity", config.overwrite), "similarity")
    run.time("load_model", t_load)
    run.time("cka", t_cka)
    run.manifest.update(
        model=_model_entry(lm),
        vs_model=_model_entry(vlm) if vlm is not None else None,
        vs_preprocess=result.vs_preprocess,
        images=[{"path": str(li.path), "sha256": li.sha256, "size": list(li.size)} for li in result.images],
        failures=[{"path": str(f.path), "reason": f.reason} for f in result.failures],
        device=result.device, dtype=result.dtype, layers=config.layers,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        notes=list(result.notes),
    )
    for f in result.failures:
        console.print(f"[yellow]skipped[/] {f.reason}")
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}")

    t0 = time.perf_counter()
    data = {
        "model": lm.source.spec,
        "vs": vlm.source.spec if vlm is not None else None,
        "layers_x": result.layers_x,
        "layers_y": result.layers_y,
        "stages_x": [p.stage for p in result.places_x],
        "stages_y": [p.stage for p in result.places_y],
        "strides_x": [p.stride for p in result.places_x],
        "strides_y": [p.stride for p in result.places_y],
        "n_images": result.n_images,
        "cka": _matrix_json(result.cka),
        "cka_debiased": _matrix_json(result.cka_debiased),
        "method": result.method,
        "batch_size": result.batch_size,
        "n_batches": result.n_batches,
        "features": "each layer's whole output per image, flattened (not pooled)",
        "vs_preprocess": result.vs_preprocess,
        "notes": list(result.notes),
    }
    if vlm is not None:
        data["diagonal"] = result.diagonal()
    write_json(run.file("similarity.json"), data)
    write_text(run.file("similarity.csv"), _matrix_csv(result.layers_x, result.layers_y, result.cka))
    write_text(
        run.file("similarity_debiased.csv"),
        _matrix_csv(result.layers_x, result.layers_y, result.cka_debiased),
    )
    for name in ("similarity.json", "similarity.csv", "similarity_debiased.csv"):
        run.wrote(run.path / name)
    from ..render import save_figure

    fig = similarity_figure(result, _short_name(lm), _short_name(vlm) if vlm is not None else None)
    for p in save_figure(fig, run.file("similarity.png")):
        run.wrote(p)
    run.time("files", time.perf_counter() - t0)
    manifest = run.finish()

    _print_summary(console, result, data)
    console.print(
        f"wrote {len(run.manifest['files'])} files to [bold]{run.path}[/] ({manifest.name}, "
        "similarity.json/.csv, similarity_debiased.csv, similarity.png)"
    )
    return run.path, result


def _short_name(lm: LoadedModel) -> str:
    s = lm.source
    if s.kind == "torchvision":
        return s.arch or s.spec
    return Path(s.path).name if s.path else s.spec


def _print_summary(console: Console, result: SimilarityResult, data: dict[str, Any]) -> None:
    """The matrix when it fits (8 columns at most); otherwise one row per layer: its stage,
    CKA to the next layer, and with --vs the same-named and the best-matching layer."""
    from rich import box
    from rich.table import Table

    d = result.cka_debiased
    t = Table(title="debiased linear CKA", box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    t.add_column("layer", no_wrap=True)
    t.add_column("stage", no_wrap=True)

    def cell(v: float) -> str:
        return "–" if math.isnan(v) else f"{v:.2f}"

    if len(result.layers_y) <= 8:
        need = max(map(len, result.layers_x)) + 14 + sum(max(len(c), 4) + 3 for c in result.layers_y)
        short = need > console.width  # columns by number, named in the caption
        for j, name in enumerate(result.layers_y):
            t.add_column(f"[{j}]" if short else name, justify="right", no_wrap=True)
        if short:
            t.caption = "columns: " + ", ".join(f"[{j}] {c}" for j, c in enumerate(result.layers_y))
        for i, name in enumerate(result.layers_x):
            t.add_row(name, result.places_x[i].stage, *(cell(v) for v in d[i].tolist()))
    elif result.vs_model is None:
        t.add_column("to next", justify="right")
        t.add_column("to first", justify="right")
        t.add_column("to last", justify="right")
        for i, name in enumerate(result.layers_x):
            nxt = cell(float(d[i, i + 1])) if i + 1 < len(result.layers_x) else ""
            t.add_row(name, result.places_x[i].stage, nxt, cell(float(d[i, 0])), cell(float(d[i, -1])))
    else:
        same = {r["layer"]: r for r in data.get("diagonal", [])}
        t.add_column("same layer", justify="right")
        t.add_column("best match in --vs", no_wrap=True)
        t.add_column("CKA", justify="right")
        for i, name in enumerate(result.layers_x):
            row = torch.nan_to_num(d[i], nan=-math.inf)
            j = int(row.argmax())
            s_ = same.get(name, {}).get("cka_debiased")
            t.add_row(
                name, result.places_x[i].stage, "" if s_ is None else f"{s_:.2f}",
                result.layers_y[j], cell(float(d[i, j])),
            )
    console.print(t)
    if data.get("diagonal"):
        worst = data["diagonal"][:3]
        text = ", ".join(
            f"{r['layer']} {r['cka_debiased']:.3f}" for r in worst if r["cka_debiased"] is not None
        )
        console.print(f"largest change against --vs (debiased CKA): {text}")
