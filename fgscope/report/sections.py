"""The page's sections about the model and its layers, each read from a run folder's files.

One function per section (run summary, abstraction table, hierarchy, geometry, grids,
figures for papers); `fgscope.report.results` has those of the other commands. Nothing is
recomputed: the numbers are the ones the runs wrote. The file each reads is in its docstring;
missing optional keys show as blanks rather than failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fgscope.errors import ConfigError
from fgscope.report.cells import (
    fmt,
    fmt_int,
    kv_table,
    name_cell,
    short_hash,
    sort_value,
    stage_cell,
)
from fgscope.report.html import Cell, Section, cite, esc, img_html, table_html
from fgscope.report.runs import RunFolder, Runs, read_json
from fgscope.stages import last_at_each_resolution

__all__ = [
    "summary_section",
    "table_section",
    "stage_layers",
    "hierarchy_section",
    "geometry_section",
    "grids_section",
    "figures_section",
]


def _model_rows(model: dict[str, Any]) -> list[tuple[str, str]]:
    pre = model.get("preprocess") or {}
    pre_txt = ""
    if pre:
        parts = []
        if pre.get("resize_size") is not None:
            parts.append(f"resize {fmt(pre['resize_size'], 'g')}")
        if pre.get("crop_size") is not None:
            parts.append(f"crop {fmt(pre['crop_size'], 'g')}")
        if pre.get("mean") is not None:
            parts.append("mean " + ", ".join(f"{m:.3f}" for m in pre["mean"]))
        if pre.get("std") is not None:
            parts.append("std " + ", ".join(f"{s:.3f}" for s in pre["std"]))
        pre_txt = esc("; ".join(parts))
    macs = model.get("macs_per_image")
    macs_txt = ""
    if macs:
        macs_txt = f"{macs / 1e9:.2f} G" if macs >= 1e9 else f"{macs / 1e6:.0f} M"
    kind = " · ".join(esc(x) for x in (model.get("kind"), model.get("arch")) if x)
    return [
        ("model", f'<span class="mono">{esc(model.get("spec", "?"))}</span>' + (f" ({kind})" if kind else "")),
        ("weights", esc(model.get("weights") or "none (random init)")),
        ("file", f'<span class="mono">{esc(model["path"])}</span>' if model.get("path") else ""),
        ("sha256", short_hash(model.get("sha256"))),
        ("input size", fmt(model.get("input_size"), "g")),
        ("preprocessing", pre_txt),
        ("mult-adds / image", macs_txt),
        ("notes", esc("; ".join(model.get("notes") or []))),
    ]


def _list(value: object) -> list:
    return list(value) if isinstance(value, list) else []


def summary_section(runs: Runs) -> Section | None:
    """Model, weights, images, device, versions, command and predictions.

    Read from the manifests (`layers` first, else the first run that has a `model`):
    model {spec, kind, arch, weights, path, sha256, notes, input_size, preprocess,
    macs_per_image}, images [{path, sha256, size}], failures, device, dtype, versions, argv,
    predictions [{image, top5: [{label, prob}]}].
    """
    ref = runs.layers or next((r for r in runs.all if r.manifest.get("model")), None)
    if ref is None and not runs.all:
        return None
    man = ref.manifest if ref else runs.all[0].manifest
    model = man.get("model") or {}
    if isinstance(model, str):
        model = {"spec": model}
    rows = _model_rows(model) if model else []
    # Manifests come from several commands and versions: read what has the expected shape.
    images = [im for im in _list(man.get("images")) if isinstance(im, dict)]
    failures = [f for f in _list(man.get("failures")) if isinstance(f, dict)]
    img_txt = f"{len(images)}" + (f" ({len(failures)} unreadable, skipped)" if failures else "")
    versions = man.get("versions") if isinstance(man.get("versions"), dict) else {}
    rows += [
        ("images", img_txt if images else ""),
        ("device", esc(" · ".join(str(x) for x in (man.get("device"), man.get("dtype")) if x))),
        ("versions", esc(" · ".join(f"{k} {v}" for k, v in versions.items()))),
        ("command", f'<code>{esc(" ".join(man.get("argv") or []))}</code>' if man.get("argv") else ""),
        ("run folders", "<br />".join(
            f'{esc(r.kind)}: <span class="mono">{esc(r.path)}</span>' for r in runs.all)),
    ]
    body = kv_table(rows)
    if images:
        shown = images[:12]
        img_rows = [
            [name_cell(Path(str(im.get("path", ""))).name),
             Cell(esc(fmt(im.get("size"), "g")), sort_value(im.get("size"))),
             Cell(short_hash(im.get("sha256")), str(im.get("sha256", "")), "l")]
            for im in shown
        ]
        body += "<h3>Images</h3>" + table_html(
            [("image", ""), ("size (w×h)", "as stored, before preprocessing"), ("sha256", "")],
            img_rows, sortable=False, fit=True,
        )
        if len(images) > len(shown):
            body += f"<p>… and {len(images) - len(shown)} more (all listed in the manifest).</p>"
    for f in failures[:5]:
        body += f'<p class="lead">skipped: {esc(f.get("reason", f.get("path", "")))}</p>'
    preds = [p for p in _list(man.get("predictions")) if isinstance(p, dict)]
    if preds:
        body += "<h3>Top-5 predictions</h3>"
        if len(preds) > 8:
            body += f"<p>The first 8 of {len(preds)} images.</p>"
        blocks = []
        for p in preds[:8]:
            items = "".join(
                f'<tr><td class="l">{esc(t.get("label"))}</td><td class="bar-cell">'
                f'<span class="bar" style="width:{60 * float(t.get("prob", 0)):.1f}px"></span>'
                f'{100 * float(t.get("prob", 0)):.1f}%</td></tr>'
                for t in p.get("top5") or []
            )
            blocks.append(
                f'<div><strong class="mono">{esc(Path(str(p.get("image", ""))).name)}</strong>'
                f'<div class="scroll"><table class="kv"><tbody>{items}</tbody></table></div></div>'
            )
        body += f'<div class="grid2">{"".join(blocks)}</div>'
    lead = (
        "What was run, on what, and where: enough to reproduce every number and figure below. "
        "Each run folder also keeps its own <code>manifest.json</code>."
    )
    return Section("summary", "Run summary", lead, body)


# (column key, header, tooltip, format)
_TABLE: list[tuple[str, str, str, str]] = [
    ("index", "#", "position in execution order", "d"),
    ("name", "layer", "record name (module path; :k = k-th call)", ""),
    ("type", "type", "module class", ""),
    ("shape", "shape", "output shape without the batch: C×H×W or F", ""),
    ("layout", "layout", "where the map is in the output (NHWC, tokens, ...), measured and drawn as C×H×W; shown when some layer is not NCHW", ""),
    ("stride", "stride", "effective stride in input pixels (larger axis)", "g"),
    ("rf", "rf (px)", "theoretical receptive field in input pixels; ~ = approximate", "g"),
    ("rf_note", "rf note", "why the receptive field is approximate (~)", ""),
    ("rf_frac", "rf / input", "receptive field divided by the input side", ".2f"),
    ("params", "params", "parameters of the module, submodules included", ","),
    ("stage", "stage", "early / middle / late, from the model's own downsampling", ""),
    ("signed", "signed", "some outputs are negative: no inactive state, see “negative”", ""),
    ("sparsity", "sparsity", "fraction of exact zeros (inactive units); empty for signed outputs", ".3f"),
    ("negative_frac", "negative", "fraction of outputs < 0", ".3f"),
    ("concentration", "spatial conc.", "concentration: 1 − normalised spatial entropy of the activation energy (Pielou 1966)", ".3f"),
    ("pr_spatial", "PR spatial", "participation ratio of the channel covariance over the positions of one image (≤ H·W − 1)", ".1f"),
    ("pr_images", "PR images", "participation ratio of the avg-pooled features across the images (≤ N − 1; ≥ 10 images)", ".1f"),
    ("mean", "mean", "mean activation", ".3g"),
    ("max", "max", "max activation (per image, averaged)", ".3g"),
    ("abstraction", "abstraction", "view invariance: 1 − D(views of an image) / D(views vs. its tile-shuffled copy); 0 = chance, 1 = invariant; [95% interval over views]", ".2f"),
    ("dcka_input", "dCKA in", "debiased linear CKA to the input pixels [95% jackknife interval over images]; ≥ 10 images, shown when the interval is ≤ 0.5 wide", ".2f"),
    ("dcka_output", "dCKA out", "debiased linear CKA to the model output [95% jackknife interval over images]; ≥ 10 images, shown when the interval is ≤ 0.5 wide", ".2f"),
    # Columns of layers runs written before the columns above (shown when such a run is read).
    ("eff_dim", "eff. dim (old)", "older runs: spatial participation ratio within one image (now “PR spatial”)", ".1f"),
    ("cka_input", "CKA in (biased)", "older runs: biased linear CKA to the input pixels, mostly estimator bias with few images", ".3f"),
    ("cka_output", "CKA out (biased)", "older runs: biased linear CKA to the model output, mostly estimator bias with few images", ".3f"),
    ("transfer", "transfer", "fine-label linear-probe accuracy (avg pooling, k-fold CV)", ".3f"),
]


# Shown inside other columns (spatial, channels: in shape; rf_exact: the ~ of rf).
# signed: a signed layer's sparsity cell is empty and its tooltip says so (the table fits 1280 px).
_HIDDEN = ("spatial", "channels", "rf_exact", "signed", "per_image", "empty", "grid")  # grid: its own section
_OLD_ABSTRACTION = ("abstraction", "abstraction (old)", "older runs: CKA out / (CKA in + CKA out) of biased "
                    "CKA, mostly estimator bias with few images", ".3f")


def _layers_json(run: RunFolder) -> dict[str, Any]:
    data = read_json(run.path / "layers.json", "layers")
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise ConfigError(f"{run.path / 'layers.json'} has no 'layers' list", hint="re-run fgscope layers")
    return data


def table_section(run: RunFolder) -> Section:
    """The abstraction table from `layers.json` ({"columns": [...], "layers": [row, ...]}),
    sortable. Known columns get their format and definition; columns added later (listed
    in "columns") are shown as they are; columns empty in every row are left out."""
    data = _layers_json(run)
    rows = data["layers"]
    known = {c[0]: c for c in _TABLE}
    if any("cka_input" in r for r in rows):  # an older run: its abstraction was biased CKA
        known["abstraction"] = _OLD_ABSTRACTION
    keys = [k for k in (data.get("columns") or list(known)) if k not in _HIDDEN]
    keys = [k for k in keys if not (k.endswith(("_lo", "_hi")) and k[:-3] in keys)]  # folded in
    keys += [k for k in known if k not in keys and k not in _HIDDEN and any(k in r for r in rows)]
    if all(r.get("layout") in (None, "NCHW", "NC", "vector") for r in rows):
        keys = [k for k in keys if k != "layout"]  # the usual layout needs no column
    cols = [known.get(k, (k, k, "", ".3g")) for k in keys if any(r.get(k) is not None for r in rows)]
    body_rows = []
    for r in rows:
        cells = []
        for key, _, _, spec in cols:
            v = r.get(key)
            if key == "name":
                cells.append(name_cell(v))
            elif key == "stage":
                cells.append(stage_cell(v))
            elif key in ("type", "shape") or isinstance(v, (str, list)):
                cells.append(Cell(esc(fmt(v, "g")), sort_value(v), "l"))
            elif key == "rf":
                approx = "~" if v is not None and r.get("rf_exact") is False else ""
                tip = f' title="{esc(r["rf_note"])}"' if approx and r.get("rf_note") else ""
                cells.append(Cell(f"<span{tip}>{approx}{fmt_int(v)}</span>" if tip else approx + fmt_int(v),
                                  sort_value(v)))
            elif key == "params":
                cells.append(Cell("" if v is None else f"{int(v):,}", sort_value(v)))
            elif v is None and (r.get("empty") or {}).get(key):
                cells.append(Cell(f'<span title="{esc(r["empty"][key])}">–</span>', None))
            elif v is not None and r.get(f"{key}_lo") is not None and r.get(f"{key}_hi") is not None:
                lo, hi = fmt(r[f"{key}_lo"], ".2f"), fmt(r[f"{key}_hi"], ".2f")
                # the interval on its own line keeps the column narrow (the table fits 1280 px)
                cells.append(Cell(f"{fmt(v, spec)}<br /><small>[{lo}, {hi}]</small>", sort_value(v)))
            else:
                cells.append(Cell(fmt(v, spec), sort_value(v)))
        body_rows.append(cells)
    table = table_html([(h, tip) for _, h, tip, _ in cols], body_rows, bleed=True, cls="wrap-heads")
    note = _empty_note(rows)
    lead = (
        "One row per recorded layer: geometry, the stage, and statistics measured on the images. "
        "Click a header to sort; hover it for the definition. Receptive fields after "
        f"{cite('araujo2019')}, participation ratio after {cite('gao2017')}, debiased CKA after "
        f"{cite('kornblith2019')}. A dash is an empty cell: hover it for the reason."
    )
    return Section("table", "Abstraction table", lead, table + note)


def _empty_note(rows: Sequence[dict[str, Any]]) -> str:
    """Why cells are empty, grouped by (column, reason), as a list (empty string: none)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for col, why in (r.get("empty") or {}).items():
            groups.setdefault((str(col), str(why).split(" — ")[0]), []).append(str(r.get("name")))
    if not groups:
        return ""
    items = []
    for (col, why), names in groups.items():
        which = ", ".join(names) if len(names) <= 3 else f"{len(names)} of {len(rows)} layers"
        items.append(f"<li><code>{esc(col)}</code> ({esc(which)}): {esc(why)}</li>")
    return '<p class="lead">Empty cells:</p><ul>' + "".join(items) + "</ul>"


def stage_layers(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last recorded map larger than 1x1 at each resolution (the hierarchy figure's
    columns), as rows.

    The rule of `fgscope.layers.run.hierarchy_columns`, on JSON rows
    (`fgscope.stages` imports no torch, so `report --from` stays fast).
    """
    spatial = [r.get("spatial") for r in rows]
    return [rows[i] for i in last_at_each_resolution(spatial)
            if spatial[i] and spatial[i][0] * spatial[i][-1] > 1]  # a 1x1 map has no picture


def hierarchy_section(run: RunFolder, figure: Path | None = None, shown: int | None = None) -> Section | None:
    """`hierarchy.png` of a layers run, or `figure`: the same picture for its first `shown`
    images (a layers run's figure has one row per image, too tall to embed for many)."""
    path = figure or run.path / "hierarchy.png"
    if not path.is_file():
        return None
    n = len(run.manifest.get("images") or [])
    caption = f"The first {shown} of {n} images." if shown is not None and shown < n else None
    lead = (
        "Per image, the activation energy (mean over channels of a²) of the last layer at each "
        "resolution, upsampled over the image and scaled per panel: early layers light up on "
        "edges and textures, middle ones on parts, late ones on whole objects "
        f"{cite('zeiler2014', 'yosinski2014')}."
    )
    return Section("hierarchy", "Hierarchy: edges → parts → objects", lead, img_html(
        path, "activation energy of the last layer at each resolution, per image", caption))


def geometry_section(run: RunFolder) -> Section | None:
    """`geometry.png` of a layers run."""
    path = run.path / "geometry.png"
    if not path.is_file():
        return None
    lead = (
        "Spatial size, channels and theoretical receptive field of every recorded layer against "
        "depth, stages shaded. Receptive fields follow the tensors of a real forward pass, "
        f"across branches and skip connections {cite('araujo2019')}."
    )
    return Section("geometry", "Geometry", lead,
                   img_html(path, "spatial size, channels and receptive field against depth"))


def _grid_folders(run: RunFolder) -> list[Path]:
    grids = run.path / "grids"
    if not grids.is_dir():
        return []
    folders = sorted(p for p in grids.iterdir() if p.is_dir())
    # Image order = order of first appearance in the manifest's file list (images are
    # written in input order); folders it does not list go last, by name.
    first: dict[str, int] = {}
    for i, f in enumerate(run.manifest.get("files") or []):
        parts = Path(f).parts
        if len(parts) >= 3 and parts[0] == "grids":
            first.setdefault(parts[1], i)
    return sorted(folders, key=lambda p: (first.get(p.name, math.inf), p.name))


def grids_section(run: RunFolder, max_images: int = 3) -> Section | None:
    """Per image, the grids (`grids/<image>/<NNN>_<layer>.png`) of the stage layers only."""
    folders = _grid_folders(run)
    if not folders:
        return None
    rows = _layers_json(run)["layers"]
    stages = stage_layers(rows)
    body = []
    for folder in folders[:max_images]:
        figs = []
        for r in stages:
            hits = sorted(folder.glob(f"{int(r['index']):03d}_*.png"))
            if hits:
                cap = (f'<span class="mono">{esc(r["name"])}</span> · stride {fmt_int(r.get("stride"))} · '
                       f'rf {fmt_int(r.get("rf"))} px · <span class="dot-{esc(r.get("stage"))}">'
                       f'{esc(r.get("stage"))}</span>')
                figs.append(img_html(hits[0], f"top channels of {r['name']} on {folder.name}", cap))
        if figs:
            body.append(f'<h3 class="mono">{esc(folder.name)}</h3><div class="gallery">'
                        + "".join(figs) + "</div>")
    if not body:
        return None
    more = ""
    n_run = len(run.manifest.get("images") or []) or len(folders)  # the layers run measured these
    shown = min(len(folders), max_images)
    if n_run > shown:
        kept = ("has every layer for every image" if len(folders) >= n_run else
                f"has grids of the first {len(folders)} (its --max-images); its table measures all {n_run}")
        more = f"<p>Grids of the first {shown} of {n_run} images; the layers run folder {kept}.</p>"
    lead = (
        "The most active channels of the last layer at each resolution, each tile on its own "
        "colour scale: edge and colour detectors early, textures and parts in the middle, "
        f"coarse object-level maps late {cite('zeiler2014')}. Other layers' grids are in the "
        "layers run folder."
    )
    return Section("grids", "Activation grids per stage", lead, "".join(body) + more)


def figures_section(files: Sequence[Path], width_in: float, root: Path) -> Section | None:
    """The paper figures written next to the page (listed, not linked: the page stands alone)."""
    if not files:
        return None
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)
    rows = [
        [name_cell(stem), Cell(", ".join(
            f'<span class="mono">{esc(p.relative_to(root))}</span> ({p.stat().st_size / 1024:.0f} kB)'
            for p in paths), None, "l")]
        for stem, paths in by_stem.items()
    ]
    table = table_html([("figure", ""), ("files", "next to report.html")], rows, sortable=False,
                       fit=True)
    column = "one column" if width_in < 5 else "two columns"
    lead = (
        f"The figures above, re-drawn {width_in:g} in wide ({column}) in fgscope's one style "
        "(7–9 pt text, fonts embedded) for papers. Plots are vector in PDF and SVG; image "
        "panels stay raster inside them, so files stay small."
    )
    return Section("figures", "Figures for papers", lead, table)
