"""The `fgscope layers` job: inspect, then write the table, grids, figures and manifest.

Output folder:
    layers.csv, layers.json, layers.md   the abstraction table (same numbers in each, all images)
    grids/<image>/<NN>_<layer>.png       top-k channels per layer, for the first --max-images
    hierarchy.png                        per image (the first --max-images): the image, then
                                         energy at each stage
    geometry.png                         spatial size, channels, receptive field vs depth
    manifest.json                        versions, model, images, command, predictions, timings

With `probe_data` (an ImageFolder of labelled images) the table gains a `transfer` column:
the fine-label linear-probe accuracy of each layer (avg pooling, k-fold CV; see
`fgscope.probe`).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fgscope.errors import ConfigError
from fgscope.layers.abstraction import VIEWS
from fgscope.layers.compute import MAX_IMAGES, InspectResult, LayerStats, inspect
from fgscope.progress import Phases, ProgressFn
from fgscope.runs import RunDir, model_entry, new_run_dir, write_json, write_text
from fgscope.stages import last_at_each_resolution

__all__ = [
    "LayersConfig", "run_layers", "TABLE_COLUMNS", "hierarchy_columns", "table_csv", "table_markdown",
    "empty_notes",
]

TABLE_COLUMNS = [
    "index", "name", "type", "shape", "spatial", "channels", "layout", "stride", "rf", "rf_frac",
    "rf_exact", "rf_note", "params", "stage", "signed", "sparsity", "negative_frac", "concentration",
    "pr_spatial", "pr_images", "mean", "max", "abstraction", "abstraction_lo", "abstraction_hi",
    "dcka_input", "dcka_input_lo", "dcka_input_hi", "dcka_output", "dcka_output_lo",
    "dcka_output_hi",
]
_RANKS = ("mean", "max", "std", "energy")
_NORMS = ("tile", "layer")


@dataclass(frozen=True)
class LayersConfig:
    """Options of one `fgscope layers` run (see the command's help for each)."""

    model: str = "mobilenet_v2"
    images: list[str] = field(default_factory=list)
    layers: str = "blocks"
    out: Path | None = None
    overwrite: bool = False
    top_k: int = 16
    rank: str = "mean"
    normalize: str = "tile"
    overlay: bool = False
    cmap: str = "inferno"
    grids: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 16
    probe_data: Path | None = None
    probe_folds: int = 5
    max_images: int = MAX_IMAGES
    views: int = VIEWS.views
    view_seed: int = 0

    def check(self) -> None:
        if self.max_images < 1:
            raise ConfigError(f"--max-images must be at least 1, got {self.max_images}")
        if self.views in (1, 2) or self.views < 0:
            raise ConfigError(f"--views must be 0 (no abstraction column) or at least 3, got {self.views}")
        if self.rank not in _RANKS:
            raise ConfigError(f"--rank {self.rank!r} is not one of {', '.join(_RANKS)}")
        if self.probe_data is not None and self.probe_folds < 2:
            raise ConfigError(f"--probe-folds must be at least 2, got {self.probe_folds}")
        if self.normalize not in _NORMS:
            raise ConfigError(f"--normalize {self.normalize!r} is not one of {', '.join(_NORMS)}")
        try:
            from fgscope.render import colormap_lut

            colormap_lut(self.cmap)
        except (ValueError, KeyError):
            raise ConfigError(
                f"unknown colormap {self.cmap!r}", hint="try inferno, viridis, magma or cividis"
            ) from None


def _fmt_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(str(int(x)) if float(x).is_integer() else str(x) for x in v)
    return str(v)


def table_csv(
    rows: list[LayerStats], columns: list[str] = TABLE_COLUMNS, extra: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """The table as CSV; lists are written as `32x112x112`, missing values as empty cells.
    `extra` adds cells of columns that `LayerStats` lacks, by layer name (e.g. `grid`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        d = {**r.to_dict(), **(extra or {}).get(r.name, {})}
        w.writerow([_fmt_cell(d[c]) if isinstance(d[c], list) else ("" if d[c] is None else d[c]) for c in columns])
    return buf.getvalue()


def table_markdown(
    rows: list[LayerStats], columns: list[str] = TABLE_COLUMNS, extra: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """The table as GitHub Markdown (numbers rounded to 4 significant digits); a column's
    `_lo`/`_hi` interval is folded into it (`0.62 [0.55, 0.70]`), and the reasons for empty
    cells follow the table. `extra` as in `table_csv`."""
    shown = [c for c in columns if not (c.endswith(("_lo", "_hi")) and c[:-3] in columns)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        d = {**r.to_dict(), **(extra or {}).get(r.name, {})}
        cells = []
        for c in shown:
            cell = _fmt_cell(d[c]) or "–"
            lo, hi = d.get(f"{c}_lo"), d.get(f"{c}_hi")
            if f"{c}_lo" in columns and d[c] is not None and lo is not None and hi is not None:
                cell += f" [{lo:.2f}, {hi:.2f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    notes = empty_notes(rows)
    if notes:
        lines += ["", "Empty cells (–):", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def empty_notes(rows: list[LayerStats]) -> list[str]:
    """Why cells are empty, one line per (column, reason): `sparsity (17 of 21 layers): ...`."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for col, why in r.empty.items():  # a layer's own numbers (after " — ") stay in the files
            groups.setdefault((col, why.split(" — ")[0]), []).append(r.name)
    out = []
    for (col, why), names in groups.items():
        which = ", ".join(names) if len(names) <= 3 else f"{len(names)} of {len(rows)} layers"
        out.append(f"{col} ({which}): {why}")
    return out


def hierarchy_columns(rows: list[LayerStats]) -> list[LayerStats]:
    """The layers shown in the hierarchy figure: the last recorded map at each resolution
    (a 1x1 map, after global pooling, has nothing spatial to show and is left out)."""
    return [rows[i] for i in last_at_each_resolution([r.spatial for r in rows]) if has_map(rows[i])]


def has_map(r: LayerStats) -> bool:
    """A spatial map with more than one position (what a grid or an energy panel can show)."""
    return r.spatial is not None and r.spatial[0] * r.spatial[1] > 1


def geometry_text(stride: float | None, rf: float | None, sep: str = " · ") -> str:
    """`stride 8 · rf 59 px`, leaving out what is unknown (a global pool has no stride)."""
    parts = [f"stride {_fmt_cell(stride)}" if stride is not None else "",
             f"rf {_fmt_cell(rf)} px" if rf is not None else ""]
    return sep.join(p for p in parts if p)


def _grid_cell(r: LayerStats, grids: bool) -> str:
    """The `grid` column: the grid's file name in each grids/<image>/ folder, or why none."""
    if r.spatial is None:
        return "none: not a map"
    if not has_map(r):
        return "none: 1x1 map (one value per channel, nothing spatial to show)"
    return f"{r.index:03d}_{_safe(r.name)}.png" if grids else "none: --no-grids"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "_", name).replace(":", "-") or "output"


def run_layers(
    config: LayersConfig, console: Console | None = None, progress: ProgressFn | None = None
) -> tuple[Path, InspectResult]:
    """Run the whole `layers` job; returns the output folder and the measurements.

    Every phase longer than a moment shows progress on a terminal console (`fgscope.progress`):
    model load, the forward over the images (images/s, time left), statistics, figures, grids.

    `progress`, when given, also receives every phase's updates (`fgscope.progress`).

    Raises:
        FgscopeError: bad model, images, layers or options (before anything is written).
    """
    from fgscope.layers.terminal import print_summary

    console = console or Console(quiet=True)
    config.check()
    with Phases(console, relay=progress) as phases:
        run, result, manifest, hierarchy = _run(config, console, phases)
    print_summary(console, config.grids, result, len(run.manifest["files"]), run.path, manifest, hierarchy)
    return run.path, result


def _run(config: LayersConfig, console: Console, phases: Phases) -> tuple[RunDir, InspectResult, str, bool]:
    from fgscope import metrics
    from fgscope.layers.figures import geometry_figure, hierarchy_figure
    from fgscope.models import load_model
    from fgscope.render import render_grid, save_figure, save_png

    t0 = started = time.perf_counter()
    phases.update("load model", 0)
    lm = load_model(config.model, **config.model_kwargs)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = inspect(
        lm, config.images or None, config.layers, device=config.device, dtype=config.dtype,
        batch_size=config.batch_size, max_images=config.max_images, views=config.views,
        view_seed=config.view_seed, progress=phases.update,
    )
    t_inspect = time.perf_counter() - t0
    probe_info = None
    columns = list(TABLE_COLUMNS)
    if config.probe_data is not None:
        from fgscope.probe import transfer_accuracy

        t0 = time.perf_counter()
        phases.update("probe", 0)
        acc, probed = transfer_accuracy(
            lm, config.probe_data, config.layers, folds=config.probe_folds, device=config.device,
            dtype=config.dtype, batch_size=config.batch_size, console=console,
        )
        result.rows = [
            replace(r, transfer=acc[r.name][0], transfer_std=acc[r.name][1]) if r.name in acc else r
            for r in result.rows
        ]
        columns.append("transfer")
        probe_info = {
            "data": str(config.probe_data), "n_images": probed.n_images, "classes": list(probed.classes),
            "folds": probed.folds, "seed": probed.seed, "pool": "avg", "granularity": "fine",
            "seconds": round(time.perf_counter() - t0, 4), "notes": list(probed.notes),
        }
    run = RunDir(new_run_dir(
        config.out, "layers", config.overwrite, [*config.images, config.probe_data]
    ), "layers", started=started)
    run.time("load_model", t_load)
    run.time("inspect", t_inspect)
    if probe_info is not None:
        run.time("probe", probe_info.pop("seconds"))
    run.manifest.update(
        model={**model_entry(lm), "macs_per_image": result.macs},
        images=[{"path": str(li.path), "sha256": li.sha256, "size": list(li.size)} for li in result.images],
        failures=[{"path": str(f.path), "reason": f.reason} for f in result.failures],
        device=result.device,
        dtype=result.dtype,
        layers=config.layers,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        predictions=[
            {"image": str(li.path), "top5": [{"label": lab, "prob": p} for lab, p in preds]}
            for li, preds in zip(result.images, result.predictions or [])
        ] or None,
        notes=list(result.notes),
        batches=result.batches,
    )
    if probe_info is not None:
        run.manifest["probe"] = probe_info
    for f in result.failures:
        console.print(f"[yellow]skipped[/] {escape(f.reason)}")

    t0 = time.perf_counter()
    rows = result.rows
    columns.insert(columns.index("transfer") if "transfer" in columns else len(columns), "grid")
    grid = {r.name: {"grid": _grid_cell(r, config.grids)} for r in rows}
    with phases.step("files", total=3) as advance:
        write_text(run.file("layers.csv"), table_csv(rows, columns, grid))
        advance()
        write_json(run.file("layers.json"), {
            "model": run.manifest["model"]["spec"],
            "input_size": list(lm.input_size),
            "images": [str(li.path) for li in result.images],
            "columns": columns,
            "layers": [{**t, **grid[t["name"]]} for t in result.table()],
            **({"probe": probe_info} if probe_info is not None else {}),
        })
        advance()
        write_text(run.file("layers.md"), table_markdown(rows, columns, grid))
        advance()
    for name in ("layers.csv", "layers.json", "layers.md"):
        run.wrote(run.path / name)

    # Figures: the first --max-images images (the only ones whose activations were kept).
    stems = _image_stems(result)
    n_fig = len(result.display)
    cols = hierarchy_columns(rows)
    with phases.step("figures", total=2) as advance:
        energy_cols = [
            (f"{r.name}\n{geometry_text(r.stride, r.rf)}\n{r.stage}",
             metrics.spatial_energy(result.activations[r.name][:n_fig]).numpy())
            for r in cols
        ]
        if energy_cols:
            fig = hierarchy_figure(result.display, energy_cols,
                                   row_labels=[Path(str(li.path)).name for li in result.images[:n_fig]])
            for p in save_figure(fig, run.file("hierarchy.png")):
                run.wrote(p)
        advance()
        geo_rows = [
            {"index": r.index, "name": r.name, "spatial": r.spatial[0] if r.spatial else None,
             "channels": r.channels, "rf": r.rf, "stage": r.stage}
            for r in rows
        ]
        for p in save_figure(geometry_figure(geo_rows, lm.input_size), run.file("geometry.png")):
            run.wrote(p)
        advance()
    run.time("tables_and_figures", time.perf_counter() - t0)

    # Grids, one per map-shaped layer and kept image.
    if config.grids:
        t0 = time.perf_counter()
        map_rows = [r for r in rows if has_map(r)]
        with phases.step("grids", total=len(map_rows) * n_fig) as advance:
            for r in map_rows:
                acts = result.activations[r.name]
                for i, stem in enumerate(stems[:n_fig]):
                    maps = acts[i]
                    order = metrics.channel_ranking(maps, by=config.rank)[: config.top_k].tolist()
                    title = " · ".join(x for x in (
                        r.name, r.type, _fmt_cell(r.shape), geometry_text(r.stride, r.rf), r.stage,
                        f"top {len(order)} by {config.rank}") if x)
                    img = render_grid(
                        maps.numpy(), order, k=config.top_k, normalize=config.normalize,
                        cmap=config.cmap, image=result.display[i], overlay=config.overlay,
                        title=title,
                    )
                    path = run.file(f"grids/{stem}/{r.index:03d}_{_safe(r.name)}.png")
                    save_png(img, path)
                    run.wrote(path)
                    advance()
        run.time("grids", time.perf_counter() - t0)
    manifest = run.finish()
    return run, result, manifest.name, bool(energy_cols)


def _image_stems(result: InspectResult) -> list[str]:
    stems: list[str] = []
    seen: dict[str, int] = {}
    for li in result.images:
        stem = _safe(Path(str(li.path)).stem)
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def load_table(path: Path) -> list[dict[str, Any]]:
    """Read `layers.json` back (for `report --from`)."""
    return json.loads(Path(path).read_text())["layers"]
