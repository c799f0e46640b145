"""The `fgscope similarity` figure: CKA heatmaps with stage colour bars (and, with --vs, CKA of
same-named layers against depth), as a matplotlib `Figure`.

The first panel is debiased linear CKA on a diverging scale centred on 0 (blue below 0, white
at 0, red up to 1), so that a slightly negative value, which means "no more similar than
unrelated features", does not look like a weak positive one; the second is the biased
estimator on its own 0..1 scale, for comparison (it is inflated with few images).

matplotlib is imported inside the functions only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fgscope.places import LayerPlace
    from fgscope.similarity.compute import SimilarityResult

__all__ = ["similarity_figure"]


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
    """Heatmaps of debiased CKA (diverging scale centred on 0) and biased CKA (0..1), rows:
    MODEL's layers bottom to top, columns: the --vs model's, left to right; stage colour bars
    along both axes; with --vs, a third panel: CKA of same-named layers against depth.

    Args:
        result: what `compute_similarity` returned.
        x_label: name of MODEL (rows).
        y_label: name of the --vs model (columns), None without --vs.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from fgscope.render.style import STYLE, style_context

    px, py = result.places_x, result.places_y
    diag = result.diagonal()
    nx, ny = len(px), len(py)
    annotate = nx * ny <= 100
    colors = STYLE["stage_colors"]
    side = min(3.4, max(2.4, 0.28 * max(nx, ny)))
    width = min(STYLE["max_width_in"], 2 * side + 3.8)
    height = side + 1.9 + (2.3 if diag else 0.0)
    with style_context():
        fig = Figure(figsize=(width, height), layout="constrained")
        if diag:
            top, bottom = fig.subfigures(2, 1, height_ratios=[side + 1.9, 2.3])
        else:
            top, bottom = fig, None
        axes = top.subplots(1, 2)
        diverging = Normalize(-1.0, 1.0)  # centred on 0: sign and size read at once
        sequential = Normalize(0.0, 1.0)
        biased = "biased linear CKA" + (" (inflated: grows\nas batches shrink)" if result.method == "minibatch"
                                        else " (inflated with few images)")
        panels = ((axes[0], result.cka_debiased, "debiased linear CKA", "RdBu_r", diverging),
                  (axes[1], result.cka, biased, STYLE["cmap"], sequential))
        for ax, mat, title, cmap, norm in panels:
            m = mat.numpy()
            ax.imshow(m, origin="lower", cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
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
                        if norm is diverging:
                            ink = "white" if not math.isnan(v) and abs(v) > 0.6 else "black"
                        else:
                            ink = "black" if not math.isnan(v) and v > 0.6 else "white"
                        ax.text(j, i, txt, ha="center", va="center", color=ink,
                                fontsize=STYLE["font_size"] - (1 if max(nx, ny) > 7 else 0))
            cb = top.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8)
            cb.set_label("debiased CKA (0 = unrelated)" if norm is diverging
                         else "biased CKA (1 = same up to rotation and scale)")
        axes[0].set_ylabel(f"{x_label} layers")
        for ax in axes:
            ax.set_xlabel(f"{y_label or x_label} layers")
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
    from fgscope.render.style import STYLE

    ax = fig.subplots(1, 1)
    rows = sorted(diag, key=lambda r: r["index"])
    xs = [r["index"] for r in rows]
    for i, p in enumerate(result.places_x):
        ax.axvspan(i - 0.5, i + 0.5, color=colors.get(p.stage, "#999999"), alpha=0.12, lw=0)
    for key, label, style in (("cka_debiased", "debiased", "-"), ("cka", "biased", "--")):
        ys = [np.nan if r[key] is None else r[key] for r in rows]
        ax.plot(xs, ys, style, marker="o", ms=3, color="#c44e52" if style == "-" else "#888888",
                label=label, lw=1.2)
    ax.axhline(0.0, color="#444444", lw=0.6)
    ax.set_xlim(-0.5, len(result.places_x) - 0.5)
    ax.set_ylim(min(-0.05, *[r["cka_debiased"] or 0.0 for r in rows]) - 0.05, 1.05)
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
