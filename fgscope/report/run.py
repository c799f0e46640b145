"""The `fgscope report` job: run what is needed, then one HTML page and figures for papers.

Live (`MODEL IMAGES`): `run_layers` into `layers/`, Grad-CAM of the first image into `cam/`,
layer-by-layer CKA into `similarity/` (with 4 or more images), linear probes and advice into
`probe/` and `advise/` (with `probe_data`): each through its own library job, so the numbers
are exactly those of the single commands. A job that fails on this model or these images is
left out with a note (in the terminal and in the page); only the
layers job is required. From earlier runs (`from_dirs`): nothing is recomputed.

Output folder:
    report.html      one self-contained page (images embedded; no network, no external files)
    figures/         paper figures, 3.5 or 7 in wide, in each requested format (png/pdf/svg)
    hierarchy.png    the layers run's hierarchy figure for the first --max-images images
    hierarchy.npz    the energy maps behind it and figures/hierarchy.* (so `--from` redraws them)
    layers/ cam/ similarity/ probe/ advise/   the runs made for the report (live only)
    log.txt          what those runs printed
    manifest.json    versions, options, sources, sections, notes, files, timings
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from fgscope.errors import ConfigError
from fgscope.report import paper, results, sections
from fgscope.report.atlas import atlas_section
from fgscope.report.html import Section, esc, references_section, render_page
from fgscope.report.live import (
    MIN_IMAGES_FOR_SIMILARITY,
    Hierarchy,
    load_hierarchy,
    run_live,
    save_hierarchy,
)
from fgscope.report.panels import cam_paper, hierarchy_paper
from fgscope.report.plots import geometry_paper, probe_paper, similarity_paper
from fgscope.report.results import class_label
from fgscope.report.runs import RunFolder, Runs, load_runs, model_name, read_json
from fgscope.runs import RunDir, new_run_dir, write_text

__all__ = [
    "ReportConfig", "ReportResult", "run_report", "load_hierarchy", "MIN_IMAGES_FOR_SIMILARITY",
]



@dataclass(frozen=True)
class ReportConfig:
    """Options of one `fgscope report` run (see the command's help for each).

    Attributes:
        model, images: what to run (live mode); images default to the sample photo.
        from_dirs: earlier run folders to build the page from instead (nothing recomputed).
        out, overwrite: the report folder (never overwritten silently).
        probe_data: an ImageFolder of labelled images for linear probes and advice.
        coarse_map: a JSON map from fine to coarse class names for the probes.
        formats: paper figure formats (png, pdf, svg).
        width: `single` (3.5 in) or `double` (7 in) paper figures.
        layers: layer selection of the layers and similarity runs.
        max_images: images shown in the grids section and the paper hierarchy figure (the
            layers run keeps the activations of these only; its table measures every image).
        views, view_seed: the abstraction column's views (`fgscope layers --views`).
        model_kwargs, device, dtype: passed to every job.
    """

    model: str = "mobilenet_v2"
    images: list[str] = field(default_factory=list)
    from_dirs: list[Path] = field(default_factory=list)
    out: Path | None = None
    overwrite: bool = False
    probe_data: Path | None = None
    coarse_map: Path | None = None
    formats: tuple[str, ...] = ("png", "pdf", "svg")
    width: str = "double"
    layers: str = "blocks"
    max_images: int = 3
    views: int = 8
    view_seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"

    def check(self) -> None:
        """Raises ConfigError for bad formats, width, or live-only options with `from_dirs`."""
        paper.parse_formats(self.formats)
        paper.paper_width(self.width)
        if self.max_images < 1:
            raise ConfigError(f"--max-images must be at least 1, got {self.max_images}")
        if self.views in (1, 2) or self.views < 0:
            raise ConfigError(f"--views must be 0 (no abstraction column) or at least 3, got {self.views}")
        if self.from_dirs and (self.probe_data or self.coarse_map or self.images):
            raise ConfigError(
                "--from builds the page from earlier runs; --probe-data, --coarse-map and "
                "images need a live run",
                hint="run `fgscope probe` first and pass its folder to --from",
            )
        if self.coarse_map and not self.probe_data:
            raise ConfigError("--coarse-map needs --probe-data")
        if self.probe_data is not None and not Path(self.probe_data).is_dir():
            raise ConfigError(
                f"--probe-data {self.probe_data}: no such folder",
                hint="pass an ImageFolder: one subfolder of images per class",
            )


@dataclass(frozen=True)
class ReportResult:
    """What `run_report` wrote.

    Attributes:
        html: path of report.html.
        sections: the ids of the page's sections, in order.
        notes: what was left out and why (plain text).
        figures: the paper figure files.
        runs: the run folders the page was built from.
    """

    html: Path
    sections: list[str]
    notes: list[str]
    figures: list[Path]
    runs: Runs


def _page_hierarchy(data: Hierarchy, run: RunDir) -> None:
    """`hierarchy.png` for the page: the layers run's picture for the first images only."""
    from PIL import Image

    from fgscope.layers.figures import hierarchy_figure
    from fgscope.render import save_figure

    images, cols, labels = data
    columns = [(f"{c.name}\nstride {_g(c.stride)} · rf {_g(c.rf)} px\n{c.stage}", c.energy)
               for c in cols]
    fig = hierarchy_figure([Image.fromarray(im) for im in images], columns,
                           row_labels=list(labels) if len(labels) == len(images) else None)
    for p in save_figure(fig, run.file("hierarchy.png")):
        run.wrote(p)


def _g(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


def _paper_figures(
    runs: Runs,
    hierarchy: Hierarchy | None,
    config: ReportConfig,
    run: RunDir,
    notes: list[str],
) -> list[Path]:
    width = paper.paper_width(config.width)
    fmts = paper.parse_formats(config.formats)
    todo: list[tuple[str, Callable[[], Any]]] = []
    if hierarchy is not None:
        images, cols, labels = hierarchy
        todo.append(("hierarchy", lambda: hierarchy_paper(
            images, cols, width, image_labels=labels, max_images=config.max_images)))
    elif runs.layers is not None:
        notes.append(
            "Paper figure of the hierarchy: the layers run keeps only hierarchy.png; run "
            "`fgscope report MODEL IMAGES` (or pass a report folder to `--from`) to redraw it."
        )
    if runs.layers is not None:
        data = read_json(runs.layers.path / "layers.json", "layers")
        geo_rows = [
            {"index": r["index"], "name": r["name"],
             "spatial": r["spatial"][0] if r.get("spatial") else None,
             "channels": r.get("channels"), "rf": r.get("rf"), "stage": r.get("stage")}
            for r in data["layers"]
        ]
        if geo_rows:
            todo.append(("geometry", lambda: geometry_paper(geo_rows, data["input_size"], width)))
    if runs.probe is not None:
        rows = read_json(runs.probe.path / "probe.json", "probe").get("rows") or []
        if rows:
            todo.append(("probe", lambda: probe_paper(rows, width)))
    if runs.similarity is not None:
        sim = read_json(runs.similarity.path / "similarity.json", "similarity")
        todo.append(("similarity", lambda: similarity_paper(sim, width)))
    for k, cam_run in enumerate(runs.cams):
        todo.append(("cam" if k == 0 else f"cam_{k + 1}", _cam_figure(cam_run, width)))

    written: list[Path] = []
    for name, make in todo:
        try:
            fig = make()
        except (ValueError, KeyError, TypeError, OSError) as exc:
            notes.append(f"Paper figure `{name}`: not drawn, its data do not fit ({exc}).")
            continue
        if fig is None:
            continue
        for p in paper.export(fig, run.file(f"figures/{name}.png"), fmts):
            run.wrote(p)
            written.append(p)
    return written


def _cam_figure(cam_run: RunFolder, width: float) -> Callable[[], Any]:
    def make() -> Any:
        from PIL import Image

        data = read_json(cam_run.path / "cam.json", "cam")
        panels = []
        for lay in data.get("layers") or []:
            f = lay.get("file")
            if f and (cam_run.path / f).is_file():
                note = f"max {lay['raw_max']:.3g}" if isinstance(lay.get("raw_max"), float) else ""
                with Image.open(cam_run.path / f) as im:
                    panels.append((str(lay.get("name")), str(lay.get("stage", "")), note,
                                   np.asarray(im.convert("RGB"))))
        if not panels:
            return None
        target = data.get("target") or {}
        contrast = data.get("contrast")
        heading = (
            f"Grad-CAM: {class_label(contrast.get('a'))} vs {class_label(contrast.get('b'))}"
            if contrast else f"Grad-CAM: {class_label(target)}"
        )
        return cam_paper(panels, width, heading=heading)
    return make


def _page(runs: Runs, figures: list[Path], config: ReportConfig, run: RunDir,
          notes: list[str]) -> tuple[str, list[str]]:
    from fgscope import __version__

    width = paper.paper_width(config.width)
    parts: list[Section | None] = [sections.summary_section(runs)]
    if runs.layers is not None:
        own = run.path / "hierarchy.png"
        parts += [
            sections.table_section(runs.layers),
            sections.hierarchy_section(runs.layers, own if own.is_file() else None, config.max_images),
            sections.geometry_section(runs.layers),
        ]
        grids = sections.grids_section(runs.layers, config.max_images)
        if grids is None:
            options = runs.layers.manifest.get("options") or {}
            notes.append("Activation grids: the layers run was made with `--no-grids`."
                         if options.get("grids") is False else
                         "Activation grids: the layers run recorded no layer with a spatial map.")
        parts.append(grids)
    parts.append(results.cam_section(runs.cams))
    if runs.probe is not None:
        parts.append(results.probe_section(runs.probe))
    if runs.advise is not None:
        parts.append(results.advice_section(runs.advise))
    if runs.similarity is not None:
        parts.append(results.similarity_section(runs.similarity))
    if runs.dump is not None:
        parts.append(results.dump_section(runs.dump))
    if runs.units is not None:
        parts.append(atlas_section(runs.units))
    parts.append(sections.figures_section(figures, width, run.path))
    present = [s for s in parts if s is not None]
    refs = references_section(present)
    present += [refs] if refs else []

    ref = runs.layers or next((r for r in runs.all if model_name(r.manifest)), None)
    man = ref.manifest if ref else (runs.all[0].manifest if runs.all else {})
    spec = model_name(man) or "runs without a model"
    n_img = len(man.get("images") or [])
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    bits = [f"{n_img} image{'s' if n_img != 1 else ''}" if n_img else "",
            str(man.get("device") or ""), when, f"fgscope {__version__}"]
    subtitle = esc(" · ".join(b for b in bits if b))
    footer = (
        f"Made by fgscope {__version__} on {when}. This page is one self-contained file: it "
        "loads nothing from the network and can be archived or shared as is."
    )
    page = render_page(f"fgscope report: {spec}", subtitle, present, notes=notes, footer=footer)
    return page, [s.id for s in present]


def run_report(config: ReportConfig, console: Console | None = None) -> tuple[Path, ReportResult]:
    """Run the whole `report` job; returns the output folder and what was written.

    Raises:
        FgscopeError: bad options, model, images or run folders (before anything is written,
            except that a live run's empty report folder may remain when the model fails).
    """
    console = console or Console(quiet=True)
    config.check()
    runs_from = load_runs(config.from_dirs) if config.from_dirs else None
    out = new_run_dir(config.out, "report", config.overwrite, [
        *config.images, *config.from_dirs, config.probe_data, config.coarse_map,
    ])
    run = RunDir(out, "report")
    notes: list[str] = []
    hierarchy = None
    if runs_from is not None:
        runs = runs_from
        if runs.hierarchy_npz is not None:
            hierarchy = load_hierarchy(runs.hierarchy_npz)
    else:
        try:
            live = run_live(config, out, console, run)
        except BaseException:
            _remove_if_empty(out)
            raise
        runs = load_runs(live.folders)
        notes += live.notes
        hierarchy = live.hierarchy
        if hierarchy is not None:
            save_hierarchy(run.file("hierarchy.npz"), hierarchy)
            run.wrote(out / "hierarchy.npz")
        write_text(run.file("log.txt"), live.log.getvalue())
        run.wrote(out / "log.txt")
    t0 = time.perf_counter()
    with console.status("report: figures for papers"):
        if hierarchy is not None:
            _page_hierarchy(hierarchy, run)
        figures = _paper_figures(runs, hierarchy, config, run, notes)
    run.time("figures", time.perf_counter() - t0)
    t0 = time.perf_counter()
    with console.status("report: report.html"):
        page, ids = _page(runs, figures, config, run, notes)
        html_path = out / "report.html"
        write_text(html_path, page)
    run.wrote(html_path)
    run.time("html", time.perf_counter() - t0)
    ref = runs.layers or next((r for r in runs.all if r.manifest.get("model")), None)
    run.manifest.update(
        mode="from" if runs_from is not None else "live",
        model=ref.manifest.get("model") if ref else None,
        sources=[{"kind": r.kind, "path": str(r.path)} for r in runs.all],
        sections=ids,
        notes=notes,
        formats=list(paper.parse_formats(config.formats)),
        width=config.width,
        width_in=paper.paper_width(config.width),
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()
                 if k != "from_dirs"} | {"from_dirs": [str(p) for p in config.from_dirs]},
    )
    run.finish()

    size = html_path.stat().st_size / 1e6
    console.print(f"[bold]report[/]: {escape(str(html_path))} ({size:.1f} MB; {', '.join(ids)})")
    if figures:
        stems: dict[str, list[str]] = {}
        for p in figures:
            stems.setdefault(p.stem, []).append(p.suffix.lstrip("."))
        console.print("figures: " + ", ".join(
            f"figures/{s}.{{{','.join(x)}}}" if len(x) > 1 else f"figures/{s}.{x[0]}"
            for s, x in stems.items()), highlight=False, markup=False)
    for n in notes:
        console.print(f"[yellow]not in the report:[/] {escape(n)}", highlight=False)
    console.print(f"open it: {html_path.resolve().as_uri()}", highlight=False, markup=False)
    return out, ReportResult(html_path, ids, notes, figures, runs)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only succeeds on an empty folder: nothing written is ever removed
    except OSError:
        pass
