"""The rules of `fgscope advise`: turn probe curves into a short recommendation that quotes
its numbers (`make_advice` -> `Advice`).

Input: a probe result (`probe.json` as a dict: rows of layer x pooling x granularity with
accuracy mean and std over folds, the layers' strides and receptive fields, and the debiased
linear CKA between consecutive layers' average-pooled features). The rules, each stated in
the text it produces:

1. **Tap layers.** The reference pooling is the single-layer pooling (avg, max, bilinear)
   with the best fine-label accuracy; the best layer under it and every layer within one std
   (of the best) of it are the layers to tap.
2. **Over-compression.** On the reference curve, after the best fine layer k: if fine
   accuracy falls by more than the noise (the larger of the two stds), or stays flat while
   the coarse accuracy still rises by more than the noise, fine detail is being compressed
   away after k. With `part_size`, the first layer whose effective stride exceeds the part
   is where one unit starts to cover more than a part; it is reported too, and used when the
   curves do not settle it.
3. **Pooling.** A pooling "pays off" when its best fine accuracy beats avg's best by more
   than the larger of the two stds; a gain within the stds is reported as no evidence.
4. **Fine-tuning.** The stages from the best fine layer onwards: the earlier stages already
   deliver the information the fine labels need (keep them, or fine-tune them last); the
   later ones are where it is kept or lost.

0. **Can the probes tell the layers apart at all?** A probe's noise is the larger of its std
   over folds and one test image per fold (1 / (n_images / folds): the accuracy's resolution,
   so a 1.000 ± 0.000 probe is not "exact"). When every fine-label probe is within two
   noises of the ceiling (1.0), or every one within two noises of chance, the curves cannot
   discriminate between layers: the advice says so and makes no tap, pooling or stage
   recommendation (`tap_layers` and `finetune_stages` are empty).

Honest about weak evidence: a best fine accuracy within two stds of chance, or a flat curve
(most layers within one std of the best), is said to be so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fgscope.errors import ConfigError

__all__ = ["Advice", "make_advice"]

_SINGLE = ("avg", "max", "bilinear")


@dataclass(frozen=True)
class Advice:
    """The recommendation (`advice.json` is `to_json()`).

    Attributes:
        text: the recommendation as Markdown, quoting its numbers.
        tap_layers: layers to tap for fine-grained features, in depth order.
        over_compression_after: the layer after which fine detail is lost, or None.
        best_pooling: {"fine": recommended pooling, "gain": best alternative's gain over avg,
            "significant": whether that gain exceeds the noise, "best_by_mean": its name}.
        finetune_stages: stages to fine-tune, in depth order.
        numbers: every number the text quotes, by topic.
    """

    text: str
    tap_layers: tuple[str, ...]
    over_compression_after: str | None
    best_pooling: dict[str, Any]
    finetune_stages: tuple[str, ...]
    numbers: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tap_layers"], d["finetune_stages"] = list(self.tap_layers), list(self.finetune_stages)
        return d


def _acc(r: dict[str, Any]) -> str:
    return f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}"


def _curve(rows: list[dict[str, Any]], pool: str, gran: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["pool"] == pool and r["granularity"] == gran),
                  key=lambda r: r["index"])


def _compression(fine: list[dict], coarse: list[dict]) -> dict[str, Any]:
    """Rule 2 on one pooling's curves (same layers, depth order)."""
    k = max(range(len(fine)), key=lambda i: fine[i]["acc_mean"])  # first maximum
    peak = fine[k]
    out: dict[str, Any] = {"peak": peak["layer"], "peak_acc": peak["acc_mean"], "after": None}
    if k == len(fine) - 1:
        out["verdict"] = "rising"
        return out
    later = fine[k + 1 :]
    low = min(later, key=lambda r: r["acc_mean"])
    drop = peak["acc_mean"] - low["acc_mean"]
    noise = max(peak["acc_std"], low["acc_std"])
    out.update(drop=round(drop, 4), drop_to=low["layer"], drop_acc=low["acc_mean"], noise=round(noise, 4))
    by_layer = {r["layer"]: r for r in coarse}
    c1 = max((by_layer[r["layer"]] for r in later if r["layer"] in by_layer),
             key=lambda r: r["acc_mean"], default=None)
    if peak["layer"] in by_layer and c1 is not None:
        c0 = by_layer[peak["layer"]]
        out.update(coarse_at_peak=c0["acc_mean"], coarse_later=c1["acc_mean"], coarse_later_layer=c1["layer"],
                   coarse_gain=round(c1["acc_mean"] - c0["acc_mean"], 4))
        coarse_rises = c1["acc_mean"] - c0["acc_mean"] > max(c0["acc_std"], c1["acc_std"])
    else:
        coarse_rises = False
    if drop > noise:
        out.update(verdict="falls", after=peak["layer"])
    elif coarse_rises:
        out.update(verdict="flat_coarse_rises", after=peak["layer"])
    else:
        out["verdict"] = "flat"
    return out


def _noise_floor(probe: dict[str, Any]) -> float:
    """One test image per fold: the resolution of a fold's accuracy (0 when unknown)."""
    n, folds = probe.get("n_images"), probe.get("folds")
    return folds / n if n and folds and n >= folds else 0.0


def _indiscriminate(probe: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rule 0: None when the fine-label probes can tell layers apart, else what they are stuck
    at ("ceiling" or "chance"), how many, the worst one and the noise floor."""
    fine = [r for r in rows if r["granularity"] == "fine"]
    floor = _noise_floor(probe)

    def noise(r: dict[str, Any]) -> float:
        return max(float(r.get("acc_std") or 0.0), floor)

    for where, gap in (("ceiling", lambda r: 1.0 - r["acc_mean"]),
                       ("chance", lambda r: r["acc_mean"] - r["chance"])):
        if fine and all(gap(r) <= 2 * noise(r) for r in fine):
            worst = max(fine, key=gap)
            return {"at": where, "probes": len(fine), "layers": len({r["layer"] for r in fine}),
                    "poolings": sorted({r["pool"] for r in fine}), "worst_layer": worst["layer"],
                    "worst_pool": worst["pool"], "worst_acc": worst["acc_mean"],
                    "worst_std": worst["acc_std"], "chance": worst["chance"],
                    "noise_floor": round(floor, 4)}
    return None


def _no_discrimination_text(stuck: dict[str, Any]) -> str:
    what = "the ceiling (1.000)" if stuck["at"] == "ceiling" else f"chance ({stuck['chance']:.3f})"
    far = "lowest" if stuck["at"] == "ceiling" else "highest"
    fix = ("harder labels (more or finer classes) or harder images would make the probes "
           "informative" if stuck["at"] == "ceiling" else
           "check the labels, probe more images, or try another pooling (bilinear)")
    return (f"- **The probes cannot tell the layers apart.** All {stuck['probes']} fine-label probes "
            f"({stuck['layers']} layers × {', '.join(stuck['poolings'])}) are within noise of {what}: "
            f"{far} {stuck['worst_acc']:.3f} ± {stuck['worst_std']:.3f} at `{stuck['worst_layer']}` "
            f"({stuck['worst_pool']}); noise = the larger of the std over folds and one test image per "
            f"fold ({stuck['noise_floor']:.3f}), within two noises counts. So these data cannot say which "
            f"layer to tap, whether a pooling pays off, or which stages to fine-tune: **no stage "
            f"recommendation.** {fix[0].upper() + fix[1:]}.")


def make_advice(probe: dict[str, Any], part_size: int | None = None) -> Advice:
    """The recommendation for one probe result (`probe.json` as a dict).

    Raises:
        ConfigError: the probe has no fine-label rows for a single-layer pooling.
    """
    rows = probe["rows"]
    pools = [p for p in _SINGLE if _curve(rows, p, "fine")]
    if not pools:
        raise ConfigError("the probe has no avg, max or bilinear rows to advise from",
                          hint="probe with --pool avg (and optionally bilinear, hypercolumn)")
    has_coarse = any(r["granularity"] == "coarse" for r in rows)
    numbers: dict[str, Any] = {"n_images": probe.get("n_images"), "folds": probe.get("folds"),
                               "fine_classes": len(probe.get("classes", []))}
    best_of = {p: max(_curve(rows, p, "fine"), key=lambda r: r["acc_mean"]) for p in pools}
    ref_pool = max(pools, key=lambda p: best_of[p]["acc_mean"])
    ref = _curve(rows, ref_pool, "fine")
    best = best_of[ref_pool]
    chance = best["chance"]
    tap = [r["layer"] for r in ref if r["acc_mean"] >= best["acc_mean"] - best["acc_std"]]
    numbers["fine_best"] = {"layer": best["layer"], "pool": ref_pool, "acc_mean": best["acc_mean"],
                            "acc_std": best["acc_std"], "chance": chance, "stage": best["stage"],
                            "stride": best["stride"], "rf": best["rf"]}
    numbers["fine_curves"] = {p: {r["layer"]: round(r["acc_mean"], 4) for r in _curve(rows, p, "fine")}
                              for p in dict.fromkeys(r["pool"] for r in rows)}
    if has_coarse:
        numbers["coarse_curves"] = {p: {r["layer"]: round(r["acc_mean"], 4) for r in _curve(rows, p, "coarse")}
                                    for p in dict.fromkeys(r["pool"] for r in rows)}
    lines = ["## Where fine-grained information lives", ""]
    n_txt = f"{numbers['n_images']} images, {numbers['fine_classes']} fine classes, {numbers['folds']}-fold CV"
    lines.append(f"*From linear probes on {n_txt}; accuracy is mean ± std over folds.*")
    lines.append("")

    # 0. Can the probes discriminate at all?
    stuck = _indiscriminate(probe, rows)
    numbers["discriminates"] = stuck is None
    if stuck is not None:
        numbers["indiscriminate"] = stuck
        lines.append(_no_discrimination_text(stuck))
        lines += _context_lines(probe, rows, pools, has_coarse, numbers)
        none_pool = {"fine": "avg", "gain": 0.0, "significant": False, "best_by_mean": ref_pool}
        return Advice("\n".join(lines) + "\n", (), None, none_pool, (), numbers)

    # 1. Tap layers.
    weak = best["acc_mean"] - chance <= 2 * max(best["acc_std"], 1e-9)
    flat = len(tap) > max(1, len(ref) // 2)
    geo = f"stride {_px(best['stride'])}, receptive field {_px(best['rf'])}"
    txt = (f"- **Tap {', '.join(f'`{t}`' for t in tap)}.** Fine-label accuracy is highest at "
           f"`{best['layer']}` ({best['stage']}, {geo}) with {ref_pool} pooling: {_acc(best)} "
           f"(chance {chance:.3f})")
    others = [t for t in tap if t != best["layer"]]
    txt += f"; {', '.join(f'`{t}`' for t in others)} within one std of it." if others else "."
    if weak:
        txt += (" **The evidence is weak:** the best accuracy is within two stds of chance, so no layer "
                "clearly carries the fine labels.")
    elif flat:
        txt += (f" The curve is flat ({len(tap)} of {len(ref)} layers within one std of the best): "
                "depth matters little for these labels.")
    lines.append(txt)

    # 2. Over-compression.
    comp = {p: _compression(_curve(rows, p, "fine"), _curve(rows, p, "coarse")) for p in pools}
    numbers["compression"] = comp
    stride_at = None
    if part_size is not None:
        for r in ref:
            if r.get("stride") is not None and r["stride"] > part_size:
                stride_at = r["layer"]
                break
        first_rf = next((r["layer"] for r in ref if r.get("rf") is not None and r["rf"] >= part_size), None)
        numbers["part_size"] = {"px": part_size, "stride_exceeds_at": stride_at, "rf_covers_from": first_rf}
    cr = comp[ref_pool]
    after = cr["after"]
    sent: list[str] = []
    if cr["verdict"] in ("falls", "flat_coarse_rises"):
        head = f"**Over-compression after `{after}`.**"
        if cr["verdict"] == "falls":
            sent.append(f"With {ref_pool} pooling, fine accuracy falls from {cr['peak_acc']:.3f} to "
                        f"{cr['drop_acc']:.3f} at `{cr['drop_to']}` (drop {cr['drop']:.3f} > noise "
                        f"{cr['noise']:.3f}){_coarse_clause(cr)}: later layers lose detail the fine "
                        "labels need.")
        else:
            sent.append(f"With {ref_pool} pooling, fine accuracy stops rising after `{after}` "
                        f"({cr['peak_acc']:.3f}){_coarse_clause(cr)}: later layers invest in the coarse "
                        "distinction.")
    elif cr["verdict"] == "flat":
        head = "**No clear over-compression.**"
        sent.append(f"With {ref_pool} pooling, fine accuracy peaks at `{cr['peak']}` ({cr['peak_acc']:.3f}) "
                    f"and stays within the noise afterwards (lowest {cr['drop_acc']:.3f} at "
                    f"`{cr['drop_to']}`, noise {cr['noise']:.3f})"
                    + (f"{_coarse_clause(cr)}." if has_coarse else "; without a coarse map the coarse "
                       "side of the rule cannot be checked."))
    else:
        head = "**No over-compression seen.**"
        sent.append(f"With {ref_pool} pooling, fine accuracy still rises at the last probed layer "
                    f"`{cr['peak']}` ({cr['peak_acc']:.3f}).")
    for p in pools:
        c = comp[p]
        if p == ref_pool:
            continue
        if c["verdict"] in ("falls", "flat_coarse_rises"):
            sent.append(f"With {p} pooling it peaks at `{c['peak']}` ({c['peak_acc']:.3f}) and is "
                        f"{c['drop_acc']:.3f} at `{c['drop_to']}`.")
        elif c["verdict"] == "rising":
            sent.append(f"With {p} pooling it still rises at the last layer `{c['peak']}` "
                        f"({c['peak_acc']:.3f}).")
        else:
            sent.append(f"With {p} pooling it peaks at `{c['peak']}` ({c['peak_acc']:.3f}) and stays "
                        "within the noise afterwards.")
    if cr["verdict"] in ("falls", "flat_coarse_rises") and any(
            comp[p]["verdict"] == "rising" for p in pools if p != ref_pool):
        sent.append("The poolings disagree, so the loss is in what "
                    f"{ref_pool} pooling reads, not necessarily in the information itself.")
    if part_size is not None:
        pinfo = numbers["part_size"]
        if stride_at is not None:
            idx = [r["layer"] for r in ref].index(stride_at)
            before = ref[idx - 1]["layer"] if idx > 0 else None
            sent.append(f"For parts of {part_size} px, the effective stride exceeds the part from "
                        f"`{stride_at}` on ({_px(ref[idx]['stride'])}), so one unit steps over more than a "
                        "part" + (f"; layers up to `{before}` keep part-level resolution." if before else "."))
            if after is None and before is not None:
                after = before
        else:
            sent.append(f"No probed layer has an effective stride above the {part_size} px parts.")
        if pinfo["rf_covers_from"]:
            sent.append(f"Units first see a whole part (receptive field ≥ {part_size} px) at "
                        f"`{pinfo['rf_covers_from']}`.")
    lines.append(f"- {head} " + " ".join(sent))

    # 3. Pooling.
    best_pool: dict[str, Any] = {"fine": "avg", "gain": 0.0, "significant": False, "best_by_mean": "avg"}
    if "avg" in best_of:
        base = best_of["avg"]
        gains = {}
        for p, r in _best_rows(rows, "fine").items():
            if p == "avg":
                continue
            gain = r["acc_mean"] - base["acc_mean"]
            noise = max(r["acc_std"], base["acc_std"])
            gains[p] = {"gain": round(gain, 4), "noise": round(noise, 4), "significant": gain > noise,
                        "layer": r["layer"], "acc_mean": r["acc_mean"], "acc_std": r["acc_std"]}
        numbers["pooling_gain_over_avg"] = gains
        if gains:
            top = max(gains, key=lambda p: gains[p]["gain"])
            g = gains[top]
            best_pool = {"fine": top if g["significant"] and g["gain"] > 0 else "avg", "gain": g["gain"],
                         "significant": bool(g["significant"] and g["gain"] > 0), "best_by_mean": top}
            parts = []
            for p, g in gains.items():
                if g["significant"] and g["gain"] > 0:
                    narrow = g["gain"] < 2 * g["noise"]
                    verdict = "pays off" + (" (narrowly: gain under twice the noise)" if narrow else "")
                elif -g["gain"] > g["noise"]:
                    verdict = "is worse"
                else:
                    verdict = "is within the noise"
                parts.append(f"{p} {verdict}: best {g['acc_mean']:.3f} ± {g['acc_std']:.3f} at "
                             f"`{g['layer']}` vs avg {base['acc_mean']:.3f} ± {base['acc_std']:.3f} at "
                             f"`{base['layer']}` (gain {g['gain']:+.3f}, noise {g['noise']:.3f})")
            lines.append(f"- **Pooling: {'use ' + best_pool['fine'] if best_pool['significant'] else 'avg is enough'}.** "
                         + "; ".join(parts) + ".")
    else:
        lines.append("- **Pooling:** avg was not probed, so no gain over it can be measured.")

    # 4. Fine-tuning.
    order = ["early", "middle", "late"]
    stage_of = [r["stage"] for r in ref]
    start = stage_of[[r["layer"] for r in ref].index(best["layer"])]
    finetune = [s for s in order if s in stage_of and order.index(s) >= order.index(start)] or [start]
    frozen = [s for s in order if s in stage_of and s not in finetune]
    why = (f"the fine labels are best decoded at `{best['layer']}` ({start})")
    if after is not None and cr["verdict"] in ("falls", "flat_coarse_rises"):
        why += f" and detail is lost after `{after}`, so the later stages need to learn to keep it"
    elif cr["verdict"] == "rising":
        why += ", and accuracy still rises at the end, so the last stage does the most for them"
    lines.append(f"- **Fine-tune the {' and '.join(finetune)} stage{'s' if len(finetune) > 1 else ''}**: "
                 f"{why}." + (f" The {' and '.join(frozen)} "
                              + ("stages already deliver what the probes need: freeze them, or fine-tune "
                                 "them last" if len(frozen) > 1 else "stage already delivers what the "
                                 "probes need: freeze it, or fine-tune it last")
                              + " with a smaller learning rate." if frozen else ""))

    lines += _context_lines(probe, rows, pools, has_coarse, numbers)
    text = "\n".join(lines) + "\n"
    return Advice(text, tuple(tap), after, best_pool, tuple(finetune), numbers)


def _context_lines(probe: dict[str, Any], rows: list[dict[str, Any]], pools: list[str],
                   has_coarse: bool, numbers: dict[str, Any]) -> list[str]:
    """The lines that advise nothing, only report: the largest representation change (CKA
    between consecutive layers) and the best coarse probe."""
    lines: list[str] = []
    cka = [c for c in probe.get("cka_consecutive", []) if c.get("cka") is not None]
    if cka:
        low = min(cka, key=lambda c: c["cka"])
        numbers["cka_consecutive"] = cka
        lines.append(f"- **Representation change:** the largest change between consecutive probed layers "
                     f"is `{low['a']}` → `{low['b']}` (debiased linear CKA {low['cka']:.3f}; "
                     f"1 = same representation).")
    if has_coarse:
        cbest = max((r for r in rows if r["granularity"] == "coarse" and r["pool"] in pools),
                    key=lambda r: r["acc_mean"])
        numbers["coarse_best"] = {"layer": cbest["layer"], "pool": cbest["pool"], "acc_mean": cbest["acc_mean"],
                                  "acc_std": cbest["acc_std"], "chance": cbest["chance"]}
        lines.append(f"- Coarse labels: best {_acc(cbest)} at `{cbest['layer']}` ({cbest['pool']}; chance "
                     f"{cbest['chance']:.3f}).")
    return lines


def _coarse_clause(c: dict[str, Any]) -> str:
    """", while coarse accuracy rises/holds/falls (a -> b at L)" for a compression record."""
    if "coarse_at_peak" not in c:
        return ""
    a, b = c["coarse_at_peak"], c["coarse_later"]
    verb = "rises" if c["coarse_gain"] > 0.005 else ("falls" if c["coarse_gain"] < -0.005 else "holds")
    return f", while coarse accuracy {verb} ({a:.3f} → {b:.3f} at `{c['coarse_later_layer']}`)"


def _best_rows(rows: list[dict[str, Any]], gran: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["granularity"] == gran and (r["pool"] not in out or r["acc_mean"] > out[r["pool"]]["acc_mean"]):
            out[r["pool"]] = r
    return out


def _px(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:g} px" if isinstance(v, (int, float)) else str(v)
