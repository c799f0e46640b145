"""The `fgscope layers` job: inspect, then write the table, grids, figures and manifest.

Output folder:
    layers.csv, layers.json, layers.md   the abstraction table (same numbers in each)
    grids/<image>/<NN>_<layer>.png       top-k channels per layer and image
    hierarchy.png                        per image: the image, then energy at each stage
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from fgscope.errors import ConfigError
from fgscope.layers.compute import InspectResult, LayerStats, inspect
from fgscope.runs import RunDir, model_entry, new_run_dir, write_json, write_text
from fgscope.stages import last_at_each_resolution

__all__ = ["LayersConfig", "run_layers", "TABLE_COLUMNS", "hierarchy_columns", "table_csv", "table_markdown"]

TABLE_COLUMNS = [
    "index", "name", "type", "shape", "spatial", "channels", "stride", "rf", "rf_frac",
    "rf_exact", "params", "stage", "sparsity", "concentration", "eff_dim", "mean", "max",
    "cka_input", "cka_output", "abstraction",
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

    def check(self) -> None:
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


def table_csv(rows: list[LayerStats], columns: list[str] = TABLE_COLUMNS) -> str:
    """The table as CSV; lists are written as `32x112x112`, missing values as empty cells."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        d = r.to_dict()
        w.writerow([_fmt_cell(d[c]) if isinstance(d[c], list) else ("" if d[c] is None else d[c]) for c in columns])
    return buf.getvalue()


def table_markdown(rows: list[LayerStats], columns: list[str] = TABLE_COLUMNS) -> str:
    """The table as GitHub Markdown (numbers rounded to 4 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        d = r.to_dict()
        lines.append("| " + " | ".join(_fmt_cell(d[c]) or "–" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def hierarchy_columns(rows: list[LayerStats]) -> list[LayerStats]:
    """The layers shown in the hierarchy figure: the last recorded map at each resolution."""
    return [rows[i] for i in last_at_each_resolution([r.spatial for r in rows])]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "_", name).replace(":", "-") or "output"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else _fmt_cell(v)


def _fixed(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _print_table(console: Console, result: InspectResult) -> None:
    has_cka = any(r.abstraction is not None for r in result.rows)
    has_transfer = any(r.transfer is not None for r in result.rows)
    wide = console.width >= 130
    t = Table(
        title="abstraction table", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
        padding=(0, 1), collapse_padding=True,
    )
    cols = ["#", "name", "type", "shape", "stride", "rf", "stage", "sparse", "conc", "effdim", "mean", "max"]
    if has_cka:
        cols += ["CKA in", "CKA out", "abstr."]
    if has_transfer:
        cols += ["transfer"]
    if not wide:
        cols.remove("type")
        cols.remove("mean")
    for c in cols:
        t.add_column(
            c,
            justify="left" if c in ("name", "type", "shape", "stage") else "right",
            no_wrap=True,
        )
    colour = {"early": "cyan", "middle": "green", "late": "magenta"}
    for r in result.rows:
        cells = [
            str(r.index), Text(r.name), Text(r.type), _fmt_cell(r.shape), _fmt_cell(r.stride),
            ("~" if r.rf is not None and not r.rf_exact else "") + _fmt_cell(r.rf),
            f"[{colour[r.stage]}]{r.stage}[/]", _fixed(r.sparsity, 3), _fixed(r.concentration, 3),
            _fixed(r.eff_dim, 1), _short(r.mean), _short(r.max),
        ]
        if has_cka:
            cells += [_fixed(r.cka_input, 3), _fixed(r.cka_output, 3), _fixed(r.abstraction, 3)]
        if has_transfer:
            cells += [_fixed(r.transfer, 3)]
        if not wide:  # a narrow terminal: type and mean go first (the files have everything)
            del cells[10]
            del cells[2]
        t.add_row(*cells)

    console.print(t)


def run_layers(config: LayersConfig, console: Console | None = None) -> tuple[Path, InspectResult]:
    """Run the whole `layers` job; returns the output folder and the measurements.

    Raises:
        FgscopeError: bad model, images, layers or options (before anything is written).
    """
    from fgscope import metrics
    from fgscope.layers.figures import geometry_figure, hierarchy_figure
    from fgscope.models import load_model
    from fgscope.render import render_grid, save_figure, save_png

    console = console or Console(quiet=True)
    config.check()
    t0 = started = time.perf_counter()
    lm = load_model(config.model, **config.model_kwargs)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = inspect(
        lm, config.images or None, config.layers, device=config.device, dtype=config.dtype,
        batch_size=config.batch_size,
    )
    t_inspect = time.perf_counter() - t0
    probe_info = None
    columns = list(TABLE_COLUMNS)
    if config.probe_data is not None:
        from fgscope.probe import transfer_accuracy

        t0 = time.perf_counter()
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
    )
    if probe_info is not None:
        run.manifest["probe"] = probe_info
    for f in result.failures:
        console.print(f"[yellow]skipped[/] {escape(f.reason)}")

    t0 = time.perf_counter()
    rows = result.rows
    write_text(run.file("layers.csv"), table_csv(rows, columns))
    write_json(run.file("layers.json"), {
        "model": run.manifest["model"]["spec"],
        "input_size": list(lm.input_size),
        "images": [str(li.path) for li in result.images],
        "columns": columns,
        "layers": result.table(),
        **({"probe": probe_info} if probe_info is not None else {}),
    })
    write_text(run.file("layers.md"), table_markdown(rows, columns))
    for name in ("layers.csv", "layers.json", "layers.md"):
        run.wrote(run.path / name)

    # Figures.
    cols = hierarchy_columns(rows)
    energy_cols = [
        (f"{r.name}\nstride {_fmt_cell(r.stride)} · rf {_fmt_cell(r.rf)} px\n{r.stage}",
         metrics.spatial_energy(result.activations[r.name]).numpy())
        for r in cols
    ]
    if energy_cols:
        for p in save_figure(hierarchy_figure(result.display, energy_cols), run.file("hierarchy.png")):
            run.wrote(p)
    geo_rows = [
        {"index": r.index, "name": r.name, "spatial": r.spatial[0] if r.spatial else None,
         "channels": r.channels, "rf": r.rf, "stage": r.stage}
        for r in rows
    ]
    for p in save_figure(geometry_figure(geo_rows, lm.input_size), run.file("geometry.png")):
        run.wrote(p)
    run.time("tables_and_figures", time.perf_counter() - t0)

    # Grids, one per map-shaped layer and image.
    if config.grids:
        t0 = time.perf_counter()
        map_rows = [r for r in rows if r.spatial is not None]
        stems = _image_stems(result)
        total = len(map_rows) * len(result.images)
        with Progress(
            TextColumn("grids"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=True,
        ) as bar:
            task = bar.add_task("grids", total=total)
            for r in map_rows:
                acts = result.activations[r.name]
                for i, stem in enumerate(stems):
                    maps = acts[i]
                    order = metrics.channel_ranking(maps, by=config.rank)[: config.top_k].tolist()
                    title = (
                        f"{r.name} · {r.type} · {_fmt_cell(r.shape)} · stride {_fmt_cell(r.stride)}"
                        f" · rf {_fmt_cell(r.rf)} px · {r.stage} · top {len(order)} by {config.rank}"
                    )
                    img = render_grid(
                        maps.numpy(), order, k=config.top_k, normalize=config.normalize,
                        cmap=config.cmap, image=result.display[i], overlay=config.overlay,
                        title=title,
                    )
                    path = run.file(f"grids/{stem}/{r.index:03d}_{_safe(r.name)}.png")
                    save_png(img, path)
                    run.wrote(path)
                    bar.advance(task)
        run.time("grids", time.perf_counter() - t0)
    manifest = run.finish()

    _print_table(console, result)
    if result.predictions:
        for li, preds in zip(result.images, result.predictions):
            top = ", ".join(f"{lab} {p:.1%}" for lab, p in preds)
            console.print(f"[bold]{escape(li.path.name)}[/]: {escape(top)}")
    if len(result.images) < 3:
        console.print(
            "[dim]CKA columns need at least 3 images (with 2, linear CKA is always 1).[/]"
        )
    console.print(
        f"wrote {len(run.manifest['files'])} files to [bold]{escape(str(run.path))}[/] "
        f"({manifest.name}, layers.csv/.json/.md, hierarchy.png, geometry.png"
        f"{', grids/' if config.grids else ''})"
    )
    return run.path, result


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
