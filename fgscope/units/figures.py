"""Figures of a unit atlas: dataset examples per layer, an overview across depth, the first
layer's filters, and part detectors by depth. Crops are cut at each unit's receptive field
(`fgscope.units.crops`); the model runs once more on the few top images to get the maps
behind the overlays. Figures are `matplotlib.figure.Figure`s, never pyplot state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fgscope.units.compute import UnitLayer, UnitsResult
from fgscope.units.crops import PAD, crop, rf_box

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fgscope.models import LoadedModel

__all__ = ["Patch", "example_patches", "examples_figure", "overview_figure", "filters_figure",
           "parts_figure", "RANKS", "choose_units"]

RANKS = ("selective", "active")


def choose_units(layer: UnitLayer, n: int, rank: str) -> list[int]:
    """The documented rule: `selective`, the n units with the highest class selectivity index
    (undefined ones last); `active`, the n with the highest mean of their top-K peaks."""
    if rank == "selective" and np.isfinite(layer.selectivity).any():
        key = np.where(np.isfinite(layer.selectivity), layer.selectivity, -np.inf)
    else:
        v = np.where(np.isfinite(layer.top_values), layer.top_values, np.nan)
        key = np.nan_to_num(np.nanmean(v, 1), nan=-np.inf) if np.isfinite(v).any() else layer.mean
    return [int(i) for i in np.argsort(-key, kind="stable")[:n]]


@dataclass(frozen=True)
class Patch:
    """One dataset example: the RF crop (h, w, 3) uint8, the unit's map over it (h, w) float
    (NaN outside the image), the peak value and the image index."""

    rgb: np.ndarray
    heat: np.ndarray
    value: float
    image: int


def example_patches(lm: LoadedModel, result: UnitsResult, layer: UnitLayer, units: Sequence[int],
                    k: int, device: str = "auto") -> dict[int, list[Patch]]:
    """The top-k crops of each unit in `units` (the model runs on their images once)."""
    import torch
    import torch.nn.functional as F

    from fgscope.capture import capture
    from fgscope.device import resolve_device
    from fgscope.images import load_image
    from fgscope.layouts import to_nchw

    if layer.geometry is None:
        return {}
    dev = resolve_device(device)
    wanted = sorted({int(i) for u in units for i in layer.top_images[u, :k] if i >= 0})
    pictures: dict[int, np.ndarray] = {}
    maps: dict[int, torch.Tensor] = {}
    module = lm.module.to(dev)
    for start in range(0, len(wanted), 16):
        ids = wanted[start: start + 16]
        xs = [lm.preprocess(load_image(result.paths[i], resize_size=lm.preprocess.resize_size)) for i in ids]
        x = torch.stack(xs)
        with capture(module, [layer.name], to="cpu") as rec, torch.inference_mode():
            module(x.to(dev))
        t = to_nchw(rec.stacked()[layer.name], layer.geometry.layout).float()  # type: ignore[arg-type]
        up = F.interpolate(t, size=tuple(result.input_size), mode="bilinear", align_corners=False)
        for j, i in enumerate(ids):
            pictures[i] = np.asarray(lm.preprocess.to_image(x[j]))
            maps[i] = up[j]
    out: dict[int, list[Patch]] = {}
    for u in units:
        patches = []
        for rank in range(k):
            i = int(layer.top_images[u, rank])
            if i < 0:
                continue
            box = rf_box(layer.geometry, int(layer.top_rows[u, rank]), int(layer.top_cols[u, rank]))
            heat = crop(maps[i][u].numpy().astype(np.float32), box, np.nan)
            patches.append(Patch(crop(pictures[i], box, PAD), heat, float(layer.top_values[u, rank]), i))
        out[u] = patches
    return out


def _blend(p: Patch, top: float) -> np.ndarray:
    from fgscope.render.grid import colormap_lut

    lut = colormap_lut("inferno")
    norm = np.clip(np.nan_to_num(p.heat, nan=0.0) / (top if top > 0 else 1.0), 0, 1)
    rgb = lut[(norm * 255).astype(np.int64)][..., :3].astype(np.float64)
    out = 0.45 * p.rgb + 0.55 * rgb
    out[np.isnan(p.heat)] = PAD
    return out.astype(np.uint8)


def _unit_title(result: UnitsResult, layer: UnitLayer, u: int) -> str:
    rf = f"rf {layer.rf:g} px" if layer.rf is not None else "rf ?"
    t = f"{layer.name} · unit {u} · {layer.stage} · {rf}"
    si = layer.selectivity[u]
    if np.isfinite(si) and result.classes:
        t += f" · selectivity {si:.2f}, highest class mean: {result.classes[int(layer.best_class[u])]}"
    if layer.iou is not None and result.parts:
        j = int(np.nanargmax(np.nan_to_num(layer.iou[u], nan=-1)))
        t += f" · IoU {result.parts[j]} {layer.iou[u, j]:.2f}"
    return t


def examples_figure(result: UnitsResult, layer: UnitLayer, patches: dict[int, list[Patch]]) -> Figure:
    """Per unit two rows: its top-K receptive-field crops, then the unit's map over each."""
    from matplotlib.figure import Figure

    from fgscope.render.style import style_context

    units = list(patches)
    k = max((len(p) for p in patches.values()), default=1)
    cell = 0.85
    with style_context():
        fig = Figure(figsize=(max(6.0, cell * k), (2 * cell + 0.3) * len(units) + 0.85))
        axes = fig.subplots(2 * len(units), k, squeeze=False)
        for r, u in enumerate(units):
            ps = patches[u]
            for c in range(k):
                a, b = axes[2 * r, c], axes[2 * r + 1, c]
                for ax in (a, b):
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for s in ax.spines.values():
                        s.set_visible(False)
                if c >= len(ps):
                    continue
                a.imshow(ps[c].rgb, interpolation="nearest")
                b.imshow(_blend(ps[c], ps[0].value), interpolation="nearest")
                a.set_xlabel(f"{ps[c].value:.2g}", fontsize=6, labelpad=1)
            axes[2 * r, 0].set_title(_unit_title(result, layer, u), fontsize=7, loc="left", pad=3)
        fig.suptitle(f"{layer.name}: each unit's top-{k} images, cropped at its receptive field\n"
                     "(grey: outside the image; number: peak activation); below: the unit's map",
                     fontsize=7)
        fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.85 / fig.get_figheight(), bottom=0.01,
                            hspace=0.35, wspace=0.05)
    return fig


def overview_figure(result: UnitsResult, rows: list[tuple[UnitLayer, int, list[Patch]]]) -> Figure:
    """A few units of every stage, depth increasing downwards: each row one unit's top patches."""
    from matplotlib.figure import Figure

    from fgscope.render.style import style_context

    k = max((len(p) for _, _, p in rows), default=1)
    with style_context():
        fig = Figure(figsize=(max(5.0, 0.9 * k + 2.2), 0.95 * len(rows) + 0.4))
        axes = fig.subplots(len(rows), k, squeeze=False)
        for r, (layer, u, ps) in enumerate(rows):
            for c in range(k):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(ps):
                    ax.imshow(ps[c].rgb, interpolation="nearest")
            rf = f"{layer.rf:g}" if layer.rf is not None else "?"
            axes[r, 0].set_ylabel(f"{layer.stage}\n{layer.name}\nunit {u}, rf {rf}", fontsize=6,
                                  rotation=0, ha="right", va="center")
        fig.suptitle("Top image patches of a few units per layer, shallow (top) to deep (bottom)", fontsize=8)
        fig.subplots_adjust(left=1.2 / fig.get_figwidth(), right=0.99, top=1 - 0.4 / fig.get_figheight(),
                            bottom=0.01, hspace=0.08, wspace=0.05)
    return fig


def filters_figure(filters: np.ndarray) -> Figure:
    """The first convolution's filters as RGB tiles, each scaled by its own largest |weight|
    (mid grey = 0)."""
    from matplotlib.figure import Figure

    from fgscope.render.style import style_context

    n = filters.shape[0]
    cols = min(n, 16)
    rows_n = -(-n // cols)
    with style_context():
        fig = Figure(figsize=(0.5 * cols + 0.2, 0.5 * rows_n + 0.5))
        axes = fig.subplots(rows_n, cols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
            if i < n:
                w = filters[i].transpose(1, 2, 0)
                m = np.abs(w).max() or 1.0
                ax.imshow(0.5 + 0.5 * w / m, interpolation="nearest")
        k = filters.shape[-1]
        fig.suptitle(f"First-layer filters ({n} of {k}x{k}x3), each scaled to its own range", fontsize=7)
        fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.35 / fig.get_figheight(), bottom=0.01,
                            hspace=0.1, wspace=0.1)
    return fig


def parts_figure(result: UnitsResult, table: list[dict]) -> Figure:
    """Part detectors by depth: fraction of units detecting some part, and per part the best
    unit's IoU, against the layer's position."""
    from matplotlib.figure import Figure

    from fgscope.render.style import style_context

    x = np.arange(len(table))
    with style_context():
        fig = Figure(figsize=(6.4, 4.2))
        a, b = fig.subplots(2, 1, sharex=True)
        a.bar(x, [row["detector_fraction"] for row in table], color="#4c72b0")
        a.set_ylabel("fraction of units\nthat detect a part")
        for p in result.parts:
            b.plot(x, [row["best"][p]["iou"] for row in table], marker="o", label=p)
        b.set_ylabel("best unit's IoU")
        b.legend(fontsize=7, frameon=False)
        b.set_xticks(x, [f"{row['layer']}\n({row['stage']})" for row in table], rotation=30, ha="right", fontsize=6)
        a.set_title("Part detectors by depth (Network Dissection IoU)", fontsize=9)
        fig.subplots_adjust(bottom=0.25, left=0.14, right=0.98, top=0.92, hspace=0.12)
    return fig
