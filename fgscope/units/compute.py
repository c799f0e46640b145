"""The streaming pass of `fgscope units`: every image runs once, and each selected layer's
maps go straight into the per-unit accumulators of `fgscope.units.topk` (top-K, quantile
sketch, mean/max, class means), so memory is bounded by C x (K + BINS) per layer, never by
the data set. With part annotations a second pass scores every unit against every part at
the thresholds the first pass found (`fgscope.units.parts`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fgscope.errors import ImageError
from fgscope.forward import forward
from fgscope.geometry import LayerGeometry
from fgscope.progress import ProgressFn, report
from fgscope.units.parts import IOU_SIDE, Annotations, PartScores
from fgscope.units.topk import (
    QUANTILES,
    ChannelStats,
    ClassMeans,
    QuantileSketch,
    RunningTopK,
    selectivity_index,
)

if TYPE_CHECKING:
    from fgscope.models import LoadedModel

__all__ = ["UnitLayer", "UnitsResult", "compute_units", "first_filters", "mask_to_input"]


@dataclass
class UnitLayer:
    """Everything measured for one layer's units (C = channels, K = top-K, Q quantiles, P parts).

    Attributes:
        name, index, stage: record name, position among the selected layers, stage.
        geometry: stride / rf / padding of the map (None when unknown: no crops then).
        shape: (C, H, W) of the map.
        mean, max: (C,) over all images and positions.
        quantiles: (C, Q) at `UnitsResult.quantile_levels`; q_error (C,) their error bound.
        selectivity: (C,) Morcos et al.'s index (NaN where undefined); best_class (C,).
        top_values: (C, K) peak activations, descending (-inf: fewer images than K).
        top_images: (C, K) indices into `UnitsResult.paths` (-1: none).
        top_rows, top_cols: (C, K) map position of each peak.
        iou, pointing: (C, P) part scores, None without annotations.
    """

    name: str
    index: int
    stage: str
    geometry: LayerGeometry | None
    shape: tuple[int, int, int]
    mean: np.ndarray
    max: np.ndarray
    quantiles: np.ndarray
    q_error: np.ndarray
    selectivity: np.ndarray
    best_class: np.ndarray
    top_values: np.ndarray
    top_images: np.ndarray
    top_rows: np.ndarray
    top_cols: np.ndarray
    iou: np.ndarray | None = None
    pointing: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def stride(self) -> float | None:
        return float(max(self.geometry.stride)) if self.geometry is not None else None

    @property
    def rf(self) -> float | None:
        return float(max(self.geometry.rf)) if self.geometry is not None else None


@dataclass
class UnitsResult:
    """The unit atlas of one model on one data set.

    Attributes:
        layers: per selected map layer, in execution order.
        paths: every input path (top-K image indices point here).
        labels: class index per path, or None; classes: class names, or None.
        kept: how many images ran; failures: (path, reason) of the others.
        quantile_levels: the Q levels of `UnitLayer.quantiles`; the last is the IoU threshold.
        parts: part names (empty without annotations); annotated: images with annotations.
        input_size: (H, W) of the model input.
        filters: the first convolution's weights (C, 3, k, k), None when it has none.
        notes: caveats (layers skipped, undefined selectivity, ...).
    """

    layers: list[UnitLayer]
    paths: list[str]
    labels: list[int] | None
    classes: list[str] | None
    kept: int
    failures: list[tuple[str, str]]
    quantile_levels: tuple[float, ...]
    input_size: tuple[int, int]
    parts: list[str] = field(default_factory=list)
    annotated: int = 0
    filters: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> UnitLayer:
        return next(layer for layer in self.layers if layer.name == name)


def first_filters(module: torch.nn.Module) -> np.ndarray | None:
    """(C, 3, k, k) weights of the first Conv2d that takes 3 channels, None without one."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3 and m.groups == 1:
            return m.weight.detach().float().cpu().numpy().copy()
    return None


def mask_to_input(labels: np.ndarray, lm: LoadedModel, side: tuple[int, int]) -> np.ndarray:
    """A label image in original pixels -> the model input's pixels (its resize and centre
    crop, nearest neighbour) -> `side` (H, W), nearest. (H0, W0) uint8 -> (H, W) uint8."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    pre = lm.preprocess
    t = torch.from_numpy(np.ascontiguousarray(labels))[None]
    size = list(pre.crop_size) if pre.resize_size is None else [pre.resize_size]
    t = TF.resize(t, size, interpolation=InterpolationMode.NEAREST, antialias=False)
    t = TF.center_crop(t, list(pre.crop_size))
    t = TF.resize(t, list(side), interpolation=InterpolationMode.NEAREST, antialias=False)
    return t[0].numpy()


def _batches(paths: Sequence[str], ids: Sequence[int], lm: LoadedModel, batch_size: int,
             failures: list[tuple[str, str]] | None):
    """Yield (image index tensor, input batch, sizes) over the images that load."""
    from fgscope.images import LoadedImage, iter_images

    for start in range(0, len(ids), batch_size):
        part = ids[start: start + batch_size]
        tensors, got, sizes = [], [], []
        for i, item in zip(part, iter_images([paths[i] for i in part], resize_size=lm.preprocess.resize_size)):
            if isinstance(item, LoadedImage):
                tensors.append(lm.preprocess(item.image))
                got.append(i)
                sizes.append(item.size)
            elif failures is not None:
                failures.append((str(item.path), item.reason))
        if tensors:
            yield torch.tensor(got), torch.stack(tensors), sizes, start + len(part)


@dataclass
class _Acc:
    topk: RunningTopK
    sketch: QuantileSketch
    stats: ChannelStats
    classes: ClassMeans | None


def compute_units(
    lm: LoadedModel,
    paths: Sequence[str],
    labels: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    layers: Any = "stages",
    *,
    top_k: int = 8,
    annotations: Annotations | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> UnitsResult:
    """One streaming pass over `paths` (and a second with `annotations`).

    Raises:
        ImageError: no image could be read.
        LayerNotFoundError: an unknown layer (before any forward).
        ConfigError: the selection has no layer with a spatial map.
    """
    from fgscope.capture import capture
    from fgscope.device import autocast, resolve_device, resolve_dtype, to_device
    from fgscope.errors import ConfigError
    from fgscope.layouts import to_nchw
    from fgscope.places import trace_places
    from fgscope.selection import select_layers

    batch_size = min(batch_size, lm.max_batch or batch_size)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    module = lm.module
    module.to(dev)
    example = torch.zeros(1, 3, *lm.input_size, device=dev)
    selected = list(select_layers(module, layers, example))
    shapes: dict[str, tuple[int, int, int]] = {}
    notes: list[str] = []

    lost: set[str] = set()
    layouts: dict[str, Any] = {}  # record name -> its layout (`NCHW` where geometry is unknown)

    def on_shape(rec: Any, g: LayerGeometry | None) -> None:
        if g is not None and g.spatial and g.layout is not None and g.layout.is_map:
            layout: Any = g.layout
        elif rec.tensor.dim() == 4 and (g is None or g.layout is None or g.layout.kind == "other"):
            layout = "NCHW"  # a map whose geometry was lost (e.g. an export): stats, no crops
            lost.add(rec.name)
        else:
            return
        try:
            m = to_nchw(rec.tensor, layout)
        except ValueError:
            return
        layouts[rec.name] = layout
        shapes.setdefault(rec.name, tuple(int(s) for s in m.shape[1:]))  # type: ignore[arg-type]

    places, _ = trace_places(module, example, selected, on_record=on_shape)
    skipped = [n for n in places if n not in shapes]
    if skipped:
        notes.append(f"{len(skipped)} selected output(s) without a spatial map left out: " + ", ".join(skipped[:5]))
    if not shapes:
        raise ConfigError("none of the selected layers has a spatial map (units are channels of maps)",
                          hint="select convolutional layers, e.g. --layers stages")
    n_cls = len(classes) if classes and labels is not None else 0
    lab = torch.tensor(list(labels)) if n_cls else None
    acc = {n: _Acc(RunningTopK(s[0], top_k), QuantileSketch(s[0]), ChannelStats(s[0]),
                   ClassMeans(n_cls, s[0]) if n_cls else None) for n, s in shapes.items()}
    state: dict[str, Any] = {}

    def on_record(rec: Any) -> None:
        a = acc.get(rec.name)
        if a is None:
            return
        x = to_nchw(rec.tensor, layouts[rec.name]).float()
        ids = state["ids"]
        a.topk.update(x, ids)
        a.sketch.update(x)
        a.stats.update(x)
        if a.classes is not None and lab is not None:
            a.classes.update(x, lab[ids])

    failures: list[tuple[str, str]] = []
    kept = 0
    ids_all = list(range(len(paths)))
    report(progress, "units", 0, len(paths))
    with capture(module, selected, on_record=on_record, to=None), torch.inference_mode():
        for ids, x, _sizes, done in _batches(paths, ids_all, lm, batch_size, failures):
            state["ids"] = ids
            with autocast(dev, dt):
                forward(module, to_device(x, dev))
            kept += len(ids)
            report(progress, "units", done, len(paths))
    if not kept:
        reasons = "; ".join(r for _, r in failures[:3])
        raise ImageError(f"none of the {len(failures)} image(s) could be read: {reasons}")
    out: list[UnitLayer] = []
    for i, (name, s) in enumerate(shapes.items()):
        a = acc[name]
        si, best = (selectivity_index(a.classes.means()) if a.classes is not None
                    else (np.full(s[0], np.nan), np.full(s[0], -1)))
        pos = a.topk.positions.numpy()
        out.append(UnitLayer(
            name, i, places[name].stage, None if name in lost else places[name].geometry, s, a.stats.mean, a.stats.max.numpy(),
            a.sketch.quantiles(QUANTILES), a.sketch.error_bound(), si, best,
            a.topk.values.numpy(), a.topk.images.numpy(), pos // s[2], pos % s[2],
        ))
    if lost:
        notes.append(f"geometry unknown for {len(lost)} layer(s) (no receptive-field crops): " + ", ".join(sorted(lost)[:5]))
    blank = sum(int(np.isnan(u.selectivity).sum()) for u in out)
    if n_cls and blank:
        notes.append(f"class selectivity is blank for {blank} of {sum(u.channels for u in out)} units: a "
                     "class mean below 0 (the index assumes non-negative activity, e.g. after a ReLU)")
    elif not n_cls:
        notes.append("no class labels (DATA is not in ImageFolder layout): no class selectivity")
    result = UnitsResult(out, list(paths), list(labels) if labels is not None else None,
                         list(classes) if classes else None, kept, failures, QUANTILES,
                         tuple(lm.input_size), filters=first_filters(module), notes=notes)
    if annotations is not None:
        _score_parts(result, lm, selected, annotations, dev, dt, batch_size, progress)
    return result


def _peak_pixels(x: torch.Tensor, g: LayerGeometry | None, size: tuple[int, int], side: tuple[int, int]) -> torch.Tensor:
    """Where each unit points: the centre of the receptive field of its map's largest value,
    as a flat index on the `side` grid. x (N, C, H, W) -> (N, C) int64."""
    pos = x.flatten(2).argmax(2)  # (N, C)
    rows, cols = pos // x.shape[3], pos % x.shape[3]
    if g is None:  # unknown geometry: the map is taken to cover the input evenly
        cy = (rows + 0.5) * size[0] / x.shape[2]
        cx = (cols + 0.5) * size[1] / x.shape[3]
    else:
        cy = rows * g.stride[0] - g.padding[0] + g.rf[0] / 2  # input pixels
        cx = cols * g.stride[1] - g.padding[1] + g.rf[1] / 2
    gy = (cy * side[0] / size[0]).floor().clamp(0, side[0] - 1).long()
    gx = (cx * side[1] / size[1]).floor().clamp(0, side[1] - 1).long()
    return gy * side[1] + gx


def _score_parts(result: UnitsResult, lm: LoadedModel, selected: list[str], ann: Annotations,
                 dev: torch.device, dt: torch.dtype, batch_size: int, progress: ProgressFn | None) -> None:
    """Second pass over the annotated images: IoU and pointing game per unit and part."""
    from fgscope.capture import capture
    from fgscope.device import autocast, to_device
    from fgscope.layouts import to_nchw

    module = lm.module
    h, w = result.input_size
    side = (min(IOU_SIDE, h), min(IOU_SIDE, w))
    n_parts = len(ann.parts)
    ids = sorted(set(ann.masks) | set(ann.points))
    by_name = {u.name: u for u in result.layers}
    thr = {u.name: torch.from_numpy(u.quantiles[:, -1].astype(np.float32)) for u in result.layers}
    scores = {u.name: PartScores.empty(u.channels, n_parts) for u in result.layers}
    state: dict[str, Any] = {}

    def on_record(rec: Any) -> None:
        u = by_name.get(rec.name)
        if u is None:
            return
        x = to_nchw(rec.tensor, u.geometry.layout if u.geometry and u.geometry.layout else "NCHW").float().cpu()
        parts = state["parts"]  # (N, P, S) bool
        keep = state["keep"]
        peak = _peak_pixels(x, u.geometry, (h, w), side)  # (N, C) flat index on the IoU grid
        for j in keep:
            for c0 in range(0, u.channels, 256):
                up = F.interpolate(x[j: j + 1, c0: c0 + 256], size=side, mode="bilinear", align_corners=False)
                up = up.flatten(2)  # (1, c, S)
                t = thr[u.name][c0: c0 + 256]
                active = up >= t[None, :, None]
                sub = PartScores.empty(up.shape[1], n_parts)
                sub.add(active, peak[j: j + 1, c0: c0 + 256], parts[j: j + 1])
                sc = scores[u.name]
                sc.inter[c0: c0 + 256] += sub.inter
                sc.union[c0: c0 + 256] += sub.union
                sc.hits[c0: c0 + 256] += sub.hits
                if c0 == 0:
                    sc.trials += sub.trials

    annotated = 0
    report(progress, "parts", 0, len(ids))
    with capture(module, selected, on_record=on_record, to=None), torch.inference_mode():
        for got, x, sizes, done in _batches(result.paths, ids, lm, batch_size, None):
            masks, keep = [], []
            for j, (i, size) in enumerate(zip(got.tolist(), sizes)):
                lab = ann.mask(i, size)
                if lab is None:
                    masks.append(np.zeros(side, np.uint8))
                    continue
                masks.append(mask_to_input(lab, lm, side))
                keep.append(j)
            m = torch.from_numpy(np.stack(masks)).flatten(1)  # (N, S)
            state["parts"] = torch.stack([m == k + 1 for k in range(n_parts)], 1)  # (N, P, S)
            state["keep"] = keep
            annotated += len(keep)
            with autocast(dev, dt):
                forward(module, to_device(x, dev))
            report(progress, "parts", done, len(ids))
    result.parts = list(ann.parts)
    result.annotated = annotated
    for u in result.layers:
        u.iou = scores[u.name].iou()
        u.pointing = scores[u.name].pointing()

