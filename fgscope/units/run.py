"""The `fgscope units` job: options (`UnitsConfig`), `run_units`, the `units` API, and the
files of a unit atlas (units.json, units.csv, parts.csv/.md, figures, manifest.json)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fgscope.errors import ConfigError
from fgscope.runs import RunDir, model_entry, new_run_dir, write_json, write_text

if TYPE_CHECKING:
    from rich.console import Console

    from fgscope.models import LoadedModel
    from fgscope.progress import ProgressFn
    from fgscope.units.compute import UnitsResult

__all__ = ["UnitsConfig", "parse_units", "units", "run_units", "parts_table", "units_json",
           "units_csv", "parts_markdown", "load_units", "safe_name"]


def parse_units(spec: str | None) -> tuple[int, tuple[int, ...] | None]:
    """`--units`: a count (`8`) or a list of unit indices (`3,17,42`) -> (count, indices or None).

    Raises:
        ConfigError: anything else, or a count below 1.
    """
    if spec is None or not str(spec).strip():
        return 8, None
    s = str(spec).strip()
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*,?", s):
        raise ConfigError(f"--units {spec!r} is neither a count nor a list of unit indices",
                          hint="e.g. --units 8 or --units 3,17,42")
    if "," in s:
        ids = tuple(dict.fromkeys(int(p) for p in s.split(",") if p.strip()))
        return len(ids), ids
    n = int(s)
    if n < 1:
        raise ConfigError(f"--units must be at least 1, got {n}")
    return n, None


@dataclass(frozen=True)
class UnitsConfig:
    """Options of one `fgscope units` run (see the command's help for each).

    Attributes:
        model, data, layers: model spec, images (an ImageFolder gives class labels), selection.
        units: figure units per layer, a count or indices (`parse_units`).
        rank: how a count of units is chosen: `selective` or `active` (`figures.choose_units`).
        top: K, the examples kept per unit.
        masks, keypoints: part annotations (`fgscope.units.parts`).
        out, overwrite: output folder.
        model_kwargs, device, dtype, batch_size, seed: how the model runs.
        figures: write the figures (the numbers are written either way).
    """

    model: str = "mobilenet_v2"
    data: Path = Path(".")
    layers: str = "stages"
    units: str | None = None
    rank: str = "selective"
    top: int = 8
    masks: Path | None = None
    keypoints: Path | None = None
    out: Path | None = None
    overwrite: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32
    seed: int = 0
    figures: bool = True

    def check(self) -> None:
        """Raises ConfigError for malformed options (before anything runs)."""
        from fgscope.units.figures import RANKS

        parse_units(self.units)
        if self.rank not in RANKS:
            raise ConfigError(f"--rank {self.rank!r} is not one of {', '.join(RANKS)}")
        if self.top < 1:
            raise ConfigError(f"--top must be at least 1, got {self.top}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.masks is not None and not Path(self.masks).is_dir():
            raise ConfigError(f"--masks {self.masks} is not a folder", hint="pass the folder holding one mask PNG per image")
        if self.keypoints is not None and not Path(self.keypoints).is_file():
            raise ConfigError(f"--keypoints {self.keypoints} is not a file", hint="pass a file of rows: image part x y [visible]")


def _num(v: Any) -> Any:
    v = float(v)
    return None if not math.isfinite(v) else round(v, 6)


def parts_table(result: UnitsResult) -> list[dict[str, Any]]:
    """Per layer: fraction of units whose best IoU > DETECTOR_IOU, and per part the best
    unit, its IoU and its pointing-game score. Empty without annotations."""
    from fgscope.units.parts import DETECTOR_IOU

    rows = []
    for u in result.layers:
        if u.iou is None:
            continue
        iou = np.nan_to_num(u.iou, nan=0.0)
        best = {}
        for j, p in enumerate(result.parts):
            k = int(iou[:, j].argmax())
            best[p] = {"unit": k, "iou": _num(iou[k, j]), "pointing": _num(u.pointing[k, j])}  # type: ignore[index]
        rows.append({
            "layer": u.name, "stage": u.stage, "stride": u.stride, "rf": u.rf, "channels": u.channels,
            "detectors": int((iou.max(1) > DETECTOR_IOU).sum()),
            "detector_fraction": _num((iou.max(1) > DETECTOR_IOU).mean()), "best": best,
        })
    return rows


def units_json(result: UnitsResult) -> dict[str, Any]:
    """Everything measured, JSON-ready (NaN/inf as null)."""
    def arr(a: np.ndarray | None) -> Any:
        if a is None:
            return None
        return [[_num(v) for v in r] for r in a] if a.ndim == 2 else [_num(v) for v in a]

    layers = []
    for u in result.layers:
        g = u.geometry
        layers.append({
            "name": u.name, "index": u.index, "stage": u.stage, "shape": list(u.shape),
            "stride": list(g.stride) if g else None, "rf": list(g.rf) if g else None,
            "padding": list(g.padding) if g else None, "exact": g.exact if g else None,
            "mean": arr(u.mean), "max": arr(u.max), "quantiles": arr(u.quantiles),
            "quantile_error": arr(u.q_error), "selectivity": arr(u.selectivity),
            "best_class": [int(c) for c in u.best_class],
            "top": {"values": arr(u.top_values), "images": u.top_images.tolist(),
                    "rows": u.top_rows.tolist(), "cols": u.top_cols.tolist()},
            "iou": arr(u.iou), "pointing": arr(u.pointing),
        })
    return {
        "n_images": result.kept, "paths": result.paths, "classes": result.classes,
        "labels": result.labels, "quantile_levels": list(result.quantile_levels),
        "input_size": list(result.input_size), "parts": result.parts, "annotated": result.annotated,
        "layers": layers, "parts_table": parts_table(result), "notes": result.notes,
        "failures": [{"path": p, "reason": r} for p, r in result.failures],
    }


def units_csv(result: UnitsResult) -> str:
    """One line per unit: layer, unit, stage, mean, max, quantiles, selectivity, best part IoU."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    qs = [f"q{q:g}" for q in result.quantile_levels]
    w.writerow(["layer", "unit", "stage", "rf", "mean", "max", *qs, "selectivity", "best_class",
                "top1", "best_part", "best_iou"])
    for u in result.layers:
        for c in range(u.channels):
            part, best = "", ""
            if u.iou is not None and result.parts:
                j = int(np.nan_to_num(u.iou[c], nan=-1).argmax())
                part, best = result.parts[j], _num(u.iou[c, j])
            cls = result.classes[int(u.best_class[c])] if result.classes and u.best_class[c] >= 0 else ""
            vals = [_num(v) for v in (u.mean[c], u.max[c], *u.quantiles[c], u.selectivity[c], u.top_values[c, 0])]
            w.writerow([u.name, c, u.stage, u.rf, *vals[:-2], vals[-2], cls, vals[-1], part, best])
    return buf.getvalue().replace(",None", ",")


def parts_markdown(result: UnitsResult) -> str:
    """The part-detector table: per layer, detectors and per part best unit / IoU / pointing."""
    from fgscope.units.parts import DETECTOR_IOU

    rows = parts_table(result)
    head = ["layer", "stage", "rf", "detectors"] + [f"{p}: unit, IoU, pointing" for p in result.parts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["layer"], r["stage"], f"{r['rf']:g}" if r["rf"] else "–",
                 f"{r['detectors']}/{r['channels']} ({r['detector_fraction']:.0%})"]
        for p in result.parts:
            b = r["best"][p]
            pt = "–" if b["pointing"] is None else f"{b['pointing']:.2f}"
            cells.append(f"{b['unit']}, {b['iou']:.3f}, {pt}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{result.annotated} annotated images; a unit detects a part when IoU > {DETECTOR_IOU} "
              f"(map upsampled, thresholded at its {result.quantile_levels[-1]} quantile); pointing: "
              "fraction of images with the part where the unit's peak falls inside it."]
    return "\n".join(lines) + "\n"


def safe_name(name: str) -> str:
    """A layer name as a file name part (`features.3` -> `features.3`, `relu:2` -> `relu_2`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "layer"


def _write_figures(run: RunDir, lm: LoadedModel, result: UnitsResult, config: UnitsConfig,
                   progress: ProgressFn | None) -> None:
    from fgscope.progress import report
    from fgscope.render import save_figure
    from fgscope.units.figures import (
        choose_units,
        example_patches,
        examples_figure,
        filters_figure,
        overview_figure,
        parts_figure,
    )

    n, ids = parse_units(config.units)
    overview = []
    for i, layer in enumerate(result.layers):
        report(progress, "figures", i, len(result.layers))
        chosen = [u for u in ids if u < layer.channels] if ids else choose_units(layer, n, config.rank)
        if not chosen or layer.geometry is None:
            continue
        patches = example_patches(lm, result, layer, chosen, config.top, config.device)
        for p in save_figure(examples_figure(result, layer, patches), run.file(f"examples/{safe_name(layer.name)}.png"), dpi=110):
            run.wrote(p)
        overview += [(layer, u, patches[u][:6]) for u in chosen[:2]]
    if overview:
        for p in save_figure(overview_figure(result, overview), run.file("overview.png"), dpi=110):
            run.wrote(p)
    if result.filters is not None:
        for p in save_figure(filters_figure(result.filters), run.file("filters.png"), dpi=130):
            run.wrote(p)
    table = parts_table(result)
    if table:
        for p in save_figure(parts_figure(result, table), run.file("parts.png")):
            run.wrote(p)


def units(model: Any, data: str | Path, layers: Any = "stages", *, top: int = 8,
          masks: str | Path | None = None, keypoints: str | Path | None = None,
          device: str = "auto", dtype: str = "float32", batch_size: int = 32,
          progress: ProgressFn | None = None, **model_kwargs: Any) -> UnitsResult:
    """The unit atlas as data (the numbers `fgscope units` writes, no files).

    Args:
        model: a model spec or `nn.Module` (`fgscope.load_model`), or a `LoadedModel`.
        data: images (ImageFolder layout for class labels and selectivity).
        layers: selection as in `fgscope.selection`.
        top: K, examples per unit.
        masks, keypoints: part annotations (`fgscope.units.parts`).

    Raises:
        FgscopeError: bad model, data, annotations or layers.
    """
    from fgscope.data import resolve_inputs
    from fgscope.models import LoadedModel, load_model
    from fgscope.units.compute import compute_units
    from fgscope.units.parts import load_keypoints, load_masks

    lm = model if isinstance(model, LoadedModel) else load_model(model, **model_kwargs)
    inputs = resolve_inputs([data])
    root = Path(data)
    ann = load_masks(Path(masks), list(inputs.paths), root) if masks is not None else None
    if keypoints is not None:
        ann = load_keypoints(Path(keypoints), list(inputs.paths), root, into=ann)
    return compute_units(lm, list(inputs.paths), inputs.labels, inputs.classes, layers, top_k=top,
                         annotations=ann, device=device, dtype=dtype, batch_size=batch_size,
                         progress=progress)


def run_units(config: UnitsConfig, console: Console | None = None,
              progress: ProgressFn | None = None) -> tuple[Path, UnitsResult]:
    """Run the whole `units` job and write its files; returns the output folder and result.

    `progress`, when given, also receives every phase's updates (`fgscope.progress`: a report
    shows them on its own display).

    Raises:
        FgscopeError: bad model, data, annotations, layers or options (before anything is written).
    """
    import torch
    from rich.console import Console
    from rich.markup import escape

    from fgscope.models import load_model
    from fgscope.progress import Phases

    console = console or Console(quiet=True)
    config.check()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    with Phases(console, relay=progress) as phases:
        phases.update("load model", 0)
        lm = load_model(config.model, **config.model_kwargs)
        t0 = time.perf_counter()
        result = units(lm, config.data, config.layers, top=config.top, masks=config.masks,
                       keypoints=config.keypoints, device=config.device, dtype=config.dtype,
                       batch_size=config.batch_size, progress=phases.update)
        t_units = time.perf_counter() - t0
        run = RunDir(new_run_dir(config.out, "units", config.overwrite,
                                 [config.data, config.masks, config.keypoints]), "units", started=started)
        run.manifest.update(model=model_entry(lm), data=str(config.data), n_images=result.kept,
                            options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
                            notes=list(result.notes))
        run.time("units", t_units)
        write_json(run.file("units.json"), units_json(result))
        write_text(run.file("units.csv"), units_csv(result))
        names = ["units.json", "units.csv"]
        if result.parts:
            write_text(run.file("parts.md"), parts_markdown(result))
            names.append("parts.md")
        for name in names:
            run.wrote(run.path / name)
        t0 = time.perf_counter()
        if config.figures:
            _write_figures(run, lm, result, config, phases.update)
        run.time("figures", time.perf_counter() - t0)
    run.finish()
    _print_summary(console, result)
    console.print(f"wrote {len(run.manifest['files']) + 1} files to [bold]{escape(str(run.path))}[/]")
    return run.path, result


def _print_summary(console: Console, result: UnitsResult) -> None:
    from fgscope.render.table import Col, print_table

    cols = [Col("layer", "left", wrap=True), Col("stage", "left"), Col("rf"), Col("units"),
            Col("median SI", drop=1)]
    if result.parts:
        cols += [Col("detectors"), Col("best part (IoU)", "left")]
    table = {r["layer"]: r for r in parts_table(result)}
    rows = []
    for u in result.layers:
        si = u.selectivity[np.isfinite(u.selectivity)]
        row: list[Any] = [u.name, u.stage, f"{u.rf:g}" if u.rf else "", str(u.channels),
                          f"{np.median(si):.2f}" if si.size else ""]
        if result.parts:
            r = table[u.name]
            p = max(result.parts, key=lambda q: r["best"][q]["iou"] or 0)
            row += [f"{r['detector_fraction']:.0%}", f"{p} ({r['best'][p]['iou']:.2f})"]
        rows.append(row)
    print_table(console, f"units of {len(result.layers)} layers over {result.kept} images", cols, rows,
                left_out_note="units.csv has every unit")
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}", markup=True)


def load_units(folder: str | Path) -> dict[str, Any]:
    """Read `units.json` from a units run folder (or the file itself).

    Raises:
        ConfigError: no readable units.json there.
    """
    path = Path(folder)
    path = path / "units.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no units.json in {folder}", hint="pass the folder of a `fgscope units` run") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "layers" not in data:
        raise ConfigError(f"{path} is not a units.json (no layers)", hint="pass a `fgscope units` run folder")
    return data
