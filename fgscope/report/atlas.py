"""The report's unit-atlas section, read from a `fgscope units` run folder.

Reads `units.json` (the part-detector table, per-layer selectivity) and the figures the run
wrote: `overview.png`, `filters.png`, `examples/<layer>.png` (one per layer, shallow to
deep) and `parts.png`. Nothing is recomputed; missing files are left out, missing keys show
as blanks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from fgscope.report.cells import fmt, name_cell, stage_cell
from fgscope.report.html import Cell, Section, cite, esc, img_html, table_html
from fgscope.report.runs import RunFolder, read_json

__all__ = ["atlas_section", "units_folder"]


def units_folder(path: str | Path) -> RunFolder:
    """A `fgscope units` output folder as a `RunFolder` (its manifest must say `units`).

    Raises:
        ConfigError: no manifest, or the folder is not a units run.
    """
    from fgscope.errors import ConfigError

    folder = Path(path)
    manifest = read_json(folder / "manifest.json", "units manifest") if (folder / "manifest.json").is_file() else None
    if not isinstance(manifest, dict) or manifest.get("command") != "units":
        raise ConfigError(f"{folder} is not the output folder of `fgscope units`",
                          hint="pass the --out folder of a `fgscope units` run")
    return RunFolder("units", folder, manifest)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "layer"


def _median(values: Any) -> float | None:
    vals = sorted(v for v in (values or []) if isinstance(v, (int, float)) and math.isfinite(v))
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def _layer_rows(data: dict[str, Any]) -> str:
    parts = data.get("parts") or []
    table = {r.get("layer"): r for r in data.get("parts_table") or []}
    header = [("layer", ""), ("stage", ""), ("rf", "receptive field, input pixels"),
              ("units", "channels"), ("median SI", "median class selectivity index (Morcos et al. 2018)")]
    if parts:
        header += [("detectors", "fraction of units whose IoU with some part > 0.04")]
        header += [(f"{p}: best unit / IoU / pointing", "") for p in parts]
    rows = []
    for layer in data.get("layers") or []:
        rf = layer.get("rf")
        rf_v = max(rf) if isinstance(rf, list) and rf else None
        si = _median(layer.get("selectivity"))
        shape = layer.get("shape") or [None]
        row = [name_cell(layer.get("name")), stage_cell(layer.get("stage")),
               Cell(fmt(rf_v, "g"), rf_v), Cell(fmt(shape[0], "d") if shape[0] is not None else "", shape[0]),
               Cell(fmt(si, ".2f"), si)]
        if parts:
            t = table.get(layer.get("name")) or {}
            frac = t.get("detector_fraction")
            row.append(Cell("" if frac is None else f"{frac:.0%}", frac))
            for p in parts:
                b = (t.get("best") or {}).get(p) or {}
                txt = "" if not b else (f"{b.get('unit')} / {fmt(b.get('iou'), '.3f')} / "
                                        f"{fmt(b.get('pointing'), '.2f')}")
                row.append(Cell(esc(txt), b.get("iou")))
        rows.append(row)
    return table_html(header, rows, fit=True)


def atlas_section(run: RunFolder | str | Path) -> Section | None:
    """Dataset examples per stage, the first layer's filters and the part-detector table of a
    units run; None when the folder has no units.json."""
    if not isinstance(run, RunFolder):
        run = units_folder(run)
    path = run.path / "units.json"
    if not path.is_file():
        return None
    data = read_json(path, "units.json")
    if not isinstance(data, dict):
        return None
    n = data.get("n_images")
    lead = (
        "What single units detect at each depth: for a few units of every layer, the images of "
        f"the data set ({fmt(n, 'd') if isinstance(n, int) else '?'} images) that drive them hardest, "
        f"each cropped at the unit's receptive field {cite('zeiler2014', 'araujo2019')}; class "
        f"selectivity as in {cite('morcos2018')}. With part annotations, each unit's map "
        "thresholded at its 0.995 quantile is scored against each part by IoU (Network "
        f"Dissection, {cite('bau2017')}) and by the pointing game."
    )
    body = [_layer_rows(data)]
    for name, alt in (("overview.png", "top image patches of a few units per layer, shallow to deep"),
                      ("parts.png", "part detectors by depth"),
                      ("filters.png", "the first convolution's filters as RGB tiles")):
        if (run.path / name).is_file():
            body.append(img_html(run.path / name, alt))
    for layer in data.get("layers") or []:
        fig = run.path / "examples" / f"{_safe(str(layer.get('name')))}.png"
        if fig.is_file():
            body.append("<details><summary>" + esc(f"{layer.get('name')} ({layer.get('stage')}): dataset examples")
                        + "</summary>" + img_html(fig, f"dataset examples of {layer.get('name')}") + "</details>")
    for note in data.get("notes") or []:
        body.append(f'<p class="note">{esc(note)}</p>')
    return Section("atlas", "Unit atlas", lead, "\n".join(body))
