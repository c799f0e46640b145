"""The page's sections for the other commands' results: Grad-CAM, linear probes, advice,
layer similarity (CKA) and activation dumps, each read from its run folder's files.

The file contracts are in each function's docstring; missing optional keys show as blanks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fgscope.report.cells import fmt, fmt_int, kv_table, name_cell, sort_value, stage_cell
from fgscope.report.html import Cell, Section, cite, esc, img_html, inline, table_html
from fgscope.report.runs import RunFolder, model_name, read_json

__all__ = [
    "cam_section", "probe_section", "advice_section", "similarity_section", "dump_section",
    "pooling_sentence",
]


def class_label(ref: Any) -> str:
    """A class as cam.json writes it ({"index", "label"}; a bare name is accepted too)."""
    if isinstance(ref, dict):
        if ref.get("label"):
            return str(ref["label"])
        return f"class #{ref['index']}" if ref.get("index") is not None else ""
    return "" if ref is None else str(ref)


def _peak(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, "g") for x in v)
    return fmt(v, ".3g")


def cam_section(runs: Sequence[RunFolder]) -> Section | None:
    """Grad-CAM runs: `cam.json` ({"image", "target": {"index", "label"}, "contrast":
    null|{"a", "b"}, "score", "layers": [{"name", "stride", "rf", "stage", "shape", "peak",
    "file"}], "top5"}) and `cam.png`."""
    body = []
    for run in runs:
        data = read_json(run.path / "cam.json", "cam")
        target = data.get("target") or {}
        contrast = data.get("contrast")
        label = class_label(target) or "?"
        what = (f"evidence for <strong>{esc(class_label(contrast.get('a')))}</strong> over "
                f"<strong>{esc(class_label(contrast.get('b')))}</strong>" if contrast else
                f"target <strong>{esc(label)}</strong>")
        score = data.get("score")
        head = f'<h3><span class="mono">{esc(Path(str(data.get("image", "?"))).name)}</span>: {what}'
        if isinstance(score, (int, float)):
            head += f" ({esc(data.get('score_kind') or 'score')} {score:.3g})"
        head += "</h3>"
        parts = [head]
        if (run.path / "cam.png").is_file():
            parts.append(img_html(run.path / "cam.png", f"Grad-CAM on {data.get('image')}"))
        layers = data.get("layers") or []
        if layers:
            parts.append(table_html(
                [("layer", ""), ("stage", ""), ("stride", "effective stride (px)"),
                 ("rf (px)", "receptive field"), ("shape", ""),
                 ("peak (y, x)", "where the map peaks, in input pixels"),
                 ("max", "the map's largest value (before scaling per panel)")],
                [[name_cell(lay.get("name")), stage_cell(lay.get("stage")),
                  Cell(fmt_int(lay.get("stride")), sort_value(lay.get("stride"))),
                  Cell(fmt_int(lay.get("rf")), sort_value(lay.get("rf"))),
                  Cell(esc(fmt(lay.get("shape"), "g")), sort_value(lay.get("shape")), "l"),
                  Cell(esc(_peak(lay.get("peak"))), None),
                  Cell(fmt(lay.get("raw_max"), ".3g"), None)]
                 for lay in layers],
                sortable=False, fit=True,
            ))
        body.append("".join(parts))
    if not body:
        return None
    lead = (
        "Grad-CAM at the last layer of each stage: the regions whose activations raise the "
        f"target's score {cite('selvaraju2017')}. Early stages give sharp but noisy maps, late "
        "stages coarse, class-specific ones; with a contrast, the map shows what separates two "
        "similar classes."
    )
    return Section("cam", "Class activation maps (Grad-CAM)", lead, "".join(body))


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * float(v):.1f}"


def probe_section(run: RunFolder) -> Section | None:
    """Linear probes: `probe.json` ({"model", "data", "n_images", "classes", "coarse_classes",
    "folds", "seed", "rows": [{"layer", "index", "stage", "stride", "rf", "pool",
    "granularity", "acc_mean", "acc_std", "chance", "dim"}]}) and `probe.png`."""
    data = read_json(run.path / "probe.json", "probe")
    rows = data.get("rows") or []
    best: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in rows:
        key = (r.get("pool"), r.get("granularity"))
        if r.get("acc_mean") is not None and (key not in best or r["acc_mean"] > best[key]["acc_mean"]):
            best[key] = r
    best_ids = {id(r) for r in best.values()}
    classes = data.get("classes")
    n_classes = len(classes) if isinstance(classes, list) else classes
    facts = [
        ("data", f'<span class="mono">{esc(data.get("data", ""))}</span>'),
        ("images", esc(data.get("n_images", ""))),
        ("classes", esc(n_classes if n_classes is not None else "")),
        ("coarse classes", esc(len(data["coarse_classes"]) if isinstance(data.get("coarse_classes"), list)
                              else data.get("coarse_classes") or "")),
        ("folds · seed", esc(" · ".join(str(data[k]) for k in ("folds", "seed") if data.get(k) is not None))),
        ("best", "<br />".join(
            f'{esc(" · ".join(str(x) for x in k if x))}: <span class="mono">{esc(r["layer"])}</span> '
            f'{_pct(r["acc_mean"])}% ± {_pct(r.get("acc_std") or 0)} (chance {_pct(r.get("chance"))}%)'
            for k, r in best.items())),
    ]
    body = kv_table(facts)
    if (run.path / "probe.png").is_file():
        body += img_html(run.path / "probe.png", "linear probe accuracy against depth")
    body += table_html(
        [("layer", ""), ("stage", ""), ("stride", "effective stride (px)"), ("rf (px)", "receptive field"),
         ("pool", "how the map becomes a vector"), ("granularity", "fine or coarse labels"),
         ("acc (%)", "cross-validated accuracy, mean over folds; bold = best for its pool and granularity"),
         ("± std", "standard deviation over folds"), ("chance (%)", "majority-class accuracy"),
         ("dim", "feature dimension")],
        [[name_cell(r.get("layer")), stage_cell(r.get("stage")),
          Cell(fmt_int(r.get("stride")), sort_value(r.get("stride"))),
          Cell(fmt_int(r.get("rf")), sort_value(r.get("rf"))),
          Cell(esc(r.get("pool", "")), r.get("pool"), "l"),
          Cell(esc(r.get("granularity", "")), r.get("granularity"), "l"),
          Cell(f'<span class="best">{_pct(r.get("acc_mean"))}</span>' if id(r) in best_ids
               else _pct(r.get("acc_mean")), sort_value(r.get("acc_mean"))),
          Cell(_pct(r.get("acc_std")), sort_value(r.get("acc_std"))),
          Cell(_pct(r.get("chance")), sort_value(r.get("chance"))),
          Cell("" if r.get("dim") is None else f"{int(r['dim']):,}", sort_value(r.get("dim")))]
         for r in rows],
    )
    lead = (
        "How much class information a linear classifier can read from each layer's pooled "
        f"features, cross-validated: linear probes {cite('alain2016')}. Pooling by average, max, "
        f"bilinear {cite('lin2015')} or hypercolumns {cite('hariharan2015')}; fine-grained labels "
        "often peak in the middle stages, where parts keep their layout."
    )
    return Section("probe", "Linear probes", lead, body)


def similarity_section(run: RunFolder) -> Section | None:
    """Layer-by-layer CKA: `similarity.json` ({"model", "vs", "layers_x", "layers_y",
    "stages_x", "stages_y", "n_images", "cka", "cka_debiased", "method", "batch_size",
    "diagonal": [{"layer", "cka", "cka_debiased"}]}) and `similarity.png`."""
    data = read_json(run.path / "similarity.json", "similarity")
    method = data.get("method")
    n_img, batch, n_batches = data.get("n_images"), data.get("batch_size"), data.get("n_batches")
    if method == "minibatch":
        how = "minibatch: " + " of ".join(x for x in (
            f"{n_batches} batches" if n_batches else "batches", f"{batch} images" if batch else "") if x)
        computed = f"accumulated over minibatches of the images {cite('nguyen2021')}"
    elif method == "full":
        how = "full: all images at once" + (f" ({n_img})" if n_img else "")
        computed = "computed on all the images at once (full Gram matrices)"
    else:
        how, computed = str(method or ""), "over the images"
    facts = [
        ("model", f'<span class="mono">{esc(data.get("model", ""))}</span>'),
        ("compared with", f'<span class="mono">{esc(data["vs"])}</span>' if data.get("vs") else ""),
        ("images", esc(data.get("n_images", ""))),
        ("layers", esc(f"{len(data.get('layers_y') or [])} × {len(data.get('layers_x') or [])}")),
        ("method", esc(how)),
    ]
    body = kv_table(facts)
    if (run.path / "similarity.png").is_file():
        body += img_html(run.path / "similarity.png", "linear CKA between layers")
    diag = data.get("diagonal") or []
    if diag:
        body += "<h3>Same layer, two models</h3>" + table_html(
            [("layer", ""), ("CKA", "linear CKA"), ("debiased", "debiased linear CKA")],
            [[name_cell(d.get("layer")), Cell(fmt(d.get("cka")), sort_value(d.get("cka"))),
              Cell(fmt(d.get("cka_debiased")), sort_value(d.get("cka_debiased")))] for d in diag],
        )
    lead = (
        f"Linear CKA {cite('kornblith2019')} between every pair of layers, {computed}: "
        "bright blocks are layers that "
        "represent the images alike; a long bright block late in a network means the layers there "
        "add little."
    )
    return Section("similarity", "Layer similarity (CKA)", lead, body)


_BULLET = re.compile(r"^\s*[-*] ")


def _md_blocks(text: str) -> str:
    """A very small Markdown subset: paragraphs, `- ` lists, `#` headings, `code`, **bold**."""
    html: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [ln.rstrip() for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if all(_BULLET.match(ln) for ln in lines):
            items = "".join(f"<li>{inline(_BULLET.sub('', ln))}</li>" for ln in lines)
            html.append(f"<ul>{items}</ul>")
        elif lines[0].startswith("#"):
            html.append(f"<h3>{inline(lines[0].lstrip('#').strip())}</h3>")
            if lines[1:]:
                html.append(_md_blocks("\n".join(lines[1:])))
        else:
            html.append(f"<p>{inline(' '.join(lines))}</p>")
    return "".join(html)


def advice_section(run: RunFolder) -> Section | None:
    """`advice.json` ({"text", "tap_layers", "over_compression_after", "best_pooling",
    "finetune_stages", "numbers"}), else `advice.md`."""
    if (run.path / "advice.json").is_file():
        data = read_json(run.path / "advice.json", "advise")
        text = str(data.get("text") or "")
    elif (run.path / "advice.md").is_file():
        data, text = {}, (run.path / "advice.md").read_text(encoding="utf-8")
    else:
        return None

    def listing(v: Any) -> str:
        if v is None or v == [] or v == {} or isinstance(v, dict):
            return ""
        vals = v if isinstance(v, list) else [v]
        return ", ".join(f'<span class="mono">{esc(x)}</span>' for x in vals)

    facts = kv_table([
        ("tap layers", listing(data.get("tap_layers"))),
        ("over-compression", f"after {listing(c)}" if (c := data.get("over_compression_after"))
         else "none seen"),
        ("pooling", pooling_sentence(data.get("best_pooling"))),
        ("fine-tune stages", esc(", ".join(str(x) for x in data.get("finetune_stages") or []))),
    ]) if data else ""
    lead = (
        "Which layers to tap and which stages to fine-tune for fine-grained recognition, read "
        "off the probes: middle layers keep parts with their layout "
        f"{cite('hariharan2015', 'lin2015')}, and later layers are the most task-specific "
        f"{cite('yosinski2014')}."
    )
    return Section("advice", "Advice for fine-grained recognition", lead, facts + _md_blocks(text))


def pooling_sentence(best: Any) -> str:
    """advice.json's `best_pooling` ({"fine", "gain", "significant", "best_by_mean"}) as a
    sentence (HTML): which pooling to use and why."""
    if not isinstance(best, dict) or not best.get("fine"):
        return ""
    fine, top = str(best["fine"]), str(best.get("best_by_mean") or best["fine"])
    gain = best.get("gain")
    g = f"{gain:+.3f}" if isinstance(gain, (int, float)) else "?"

    def mono(x: str) -> str:
        return f'<span class="mono">{esc(x)}</span>'

    if best.get("significant"):
        return f"use {mono(fine)}: {g} accuracy over {mono('avg')}, more than the spread over folds"
    if top not in ("avg", fine):
        return (f"{mono('avg')} is enough: the best alternative, {mono(top)}, changes accuracy by "
                f"{g}, within the spread over folds")
    return f"{mono(fine)}: no other pooling did better"


def dump_section(run: RunFolder) -> Section | None:
    """An activation dump: `index.json` ({"layers": [{"name", "type", "source_shape",
    "shape", "dtype", "pool"}] or {name: {"shape", "dtype"}}, "shards", "paths", "labels",
    "failures", "rows", "complete"})."""
    data = read_json(run.path / "index.json", "dump")
    layers = data.get("layers") or []
    if isinstance(layers, dict):
        layers = [{"name": k, **v} for k, v in layers.items()]
    model = model_name((data.get("manifest") or {}) if isinstance(data.get("manifest"), dict) else {})
    facts = kv_table([
        ("model", f'<span class="mono">{esc(model)}</span>' if model else ""),
        ("folder", f'<span class="mono">{esc(run.path)}</span>'),
        ("images", esc(len(data.get("paths") or []))),
        ("labelled", "yes" if data.get("labels") else ""),
        ("shards", esc(len(data.get("shards") or []))),
        ("complete", "no: some parts are missing" if data.get("complete") is False else ""),
        ("unreadable", esc(len(data.get("failures") or [])) if data.get("failures") else ""),
    ])
    table = table_html(
        [("layer", ""), ("type", "module class"), ("output", "the layer's output per image"),
         ("stored", "stored row shape (after pooling)"), ("pool", ""), ("dtype", "storage dtype")],
        [[name_cell(d.get("name")), Cell(esc(d.get("type", "")), d.get("type"), "l"),
          Cell(esc(fmt(d.get("source_shape"), "g")), sort_value(d.get("source_shape")), "l"),
          Cell(esc(fmt(d.get("shape"), "g")), sort_value(d.get("shape")), "l"),
          Cell(esc(d.get("pool", "")), d.get("pool"), "l"),
          Cell(esc(d.get("dtype", "")), d.get("dtype"), "l")] for d in layers],
    )
    lead = (
        "Activations stored for offline analysis: sharded safetensors files with a JSON index, "
        "readable with numpy, torch or safetensors alone."
    )
    return Section("dump", "Activation dump", lead, facts + table)
