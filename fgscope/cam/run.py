"""`fgscope cam`: Grad-CAM at every stage, so one sees at which depth class evidence appears.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual explanations from deep networks via
gradient-based localization"): for a layer's maps A_k (k = channel) and a score y,
alpha_k = mean over positions of dy/dA_k, and the map is ReLU(sum_k alpha_k A_k). y is the
class logit *before* softmax, or, with a contrast A vs B, logit_A - logit_B: the map then
shows where the evidence for A *over* B lies (what separates a Siamese from a Persian cat),
the contrastive reading of FinerCAM's idea applied at every depth.

The gradient is taken at the value each layer produced: the layer's output tensor is
recorded with its place in the autograd graph (`torch.autograd.graph.get_gradient_edge`)
when the forward hook fires, so a later in-place operation (a `ReLU(inplace=True)` after a
BatchNorm) does not change which quantity is differentiated.

Output folder (one image):
    cam.json                 target, score, per layer: geometry, stage, peak, raw statistics
    cam.png                  the image, then the Grad-CAM of each layer over it
    cam_<NN>_<layer>.png     each layer's map over the image, at the model's input size
    cam_raw.npz              the raw maps (h, w) and channel weights (C,) per layer
    manifest.json            versions, model, image, command, timings

Several images run one at a time (the memory of one image's forward and backward, however
many there are): cam.json holds every image's entry under `images` and, per layer, the means
over all images under `summary`; the figures, maps and raw arrays are written for the first
`max_images` images only, into `<image>/` (cam.png, cam_<NN>_<layer>.png) and under
`<image>/` keys of cam_raw.npz.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape

from fgscope.cam.compute import CamResult, compute_cams
from fgscope.cam.figure import MAX_LAYERS, cam_figure, cam_overlay, cam_title, fmt_value
from fgscope.errors import ConfigError
from fgscope.images import default_image, load_image, sha256_file
from fgscope.models import load_model
from fgscope.progress import Phases, ProgressFn
from fgscope.render import save_figure, save_png
from fgscope.runs import RunDir, atomic_write_bytes, model_entry, new_run_dir, write_json

__all__ = ["CamConfig", "run_cam"]



# --- the command's job ---------------------------------------------------------------------


@dataclass(frozen=True)
class CamConfig:
    """Options of one `fgscope cam` run (see the command's help for each)."""

    model: str = "mobilenet_v2"
    image: str | None = None
    target: str | None = None
    contrast: tuple[str, str] | None = None
    layers: str = "stages"
    out: Path | None = None
    overwrite: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    images: list[str] = field(default_factory=list)
    max_images: int = 8

    def inputs(self) -> list[str]:
        """The images to explain: `images`, else `image` (None: the sample photo)."""
        return list(self.images) or ([self.image] if self.image else [])



def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "_", name).replace(":", "-") or "output"


def run_cam(config: CamConfig, console: Console | None = None,
            progress: ProgressFn | None = None) -> tuple[Path, CamResult]:
    """Run the whole `cam` job; returns the output folder and the maps (of the first image).

    `progress`, when given, also receives every phase's updates (`fgscope.progress`: a report
    shows them on its own display).

    Raises:
        FgscopeError: bad model, image, class, layers or options (before anything is written).
    """
    from fgscope.images import discover

    console = console or Console(quiet=True)
    if config.target is not None and config.contrast is not None:
        raise ConfigError("pass either --class or --contrast, not both")
    if config.max_images < 1:
        raise ConfigError(f"--max-images must be at least 1, got {config.max_images}")
    given = config.inputs()
    several = len(given) > 1 or (given and (Path(given[0]).is_dir() or any(c in given[0] for c in "*?[")))
    paths = [Path(p) for p in discover(given)] if several else [Path(given[0]) if given else default_image()]
    many = len(paths) > 1
    with Phases(console, relay=progress) as phases:
        phases.update("load model", 0)
        t0 = time.perf_counter()
        lm = load_model(config.model, **config.model_kwargs)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        phases.update("grad-cam", 0, len(paths))
        first = compute_cams(lm, paths[0], config.layers, target=config.target,
                             contrast=config.contrast, device=config.device)
        phases.update("grad-cam", 1, len(paths))
        run = RunDir(new_run_dir(config.out, "cam", config.overwrite, given), "cam")
        run.manifest.update(
            model=model_entry(lm), device=first.device, layers=config.layers,
            options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
            notes=list(first.notes),
        )
        raw: dict[str, np.ndarray] = {}
        entries, infos, t_files = [], [], 0.0
        stems = _stems(paths) if many else [""]
        for i, path in enumerate(paths):
            result = first if i == 0 else compute_cams(
                lm, path, config.layers, target=config.target, contrast=config.contrast,
                device=config.device)
            infos.append({"path": str(path), "sha256": sha256_file(path), "size": list(load_image(path).size)})
            t1 = time.perf_counter()
            files = i < config.max_images
            entries.append(_write_image(run, result, f"{stems[i]}/" if many else "", raw if files else None))
            if files:
                for p in save_figure(cam_figure(result), run.file(f"{stems[i]}/cam.png" if many else "cam.png")):
                    run.wrote(p)
            t_files += time.perf_counter() - t1
            phases.update("grad-cam", i + 1, len(paths))
        t_cam = time.perf_counter() - t0 - t_files
        phases.update("files", 0)
        t1 = time.perf_counter()
        buf = io.BytesIO()
        np.savez_compressed(buf, **raw)
        atomic_write_bytes(run.file("cam_raw.npz"), buf.getvalue())
        run.wrote(run.path / "cam_raw.npz")
        data = {"model": lm.source.spec, "input_size": list(lm.input_size), **entries[0],
                "raw_file": "cam_raw.npz", "notes": list(first.notes)}
        if many:
            data = {"model": lm.source.spec, "input_size": list(lm.input_size), "images": entries,
                    "summary": _summary(entries), "max_images": config.max_images,
                    "raw_file": "cam_raw.npz", "notes": list(first.notes)}
        write_json(run.file("cam.json"), data)
        run.wrote(run.path / "cam.json")
        run.manifest["images"] = infos
        run.time("load_model", t_load)
        run.time("grad_cam", t_cam)
        run.time("files", t_files + time.perf_counter() - t1)
        manifest = run.finish()

    for note in first.notes:
        console.print(f"[dim]note:[/] {escape(note)}")
    if first.top5 and not many:
        console.print(escape("top-5: " + ", ".join(f"{lab} {p:.1%}" for lab, p in first.top5)), soft_wrap=True)
    if many:
        _print_summary(console, first, entries)
        shown = min(len(paths), config.max_images)
        console.print(f"figures and maps of the first {shown} of {len(paths)} images (--max-images); "
                      "cam.json has every image", markup=False, soft_wrap=True)
    else:
        _print_layers(console, first)
    if len(first.layers) > MAX_LAYERS:
        console.print(f"note: cam.png shows {MAX_LAYERS} of the {len(first.layers)} layers, spread "
                      "over depth; every layer has its own cam_NN_<layer>.png", markup=False)
    console.print(
        f"wrote {len(run.manifest['files'])} files to [bold]{escape(str(run.path))}[/] "
        f"({manifest.name}, cam.json, cam.png, cam_raw.npz, one PNG per layer"
        f"{' and image' if many else ''})", soft_wrap=True,
    )
    return run.path, first


def _write_image(run: RunDir, result: CamResult, prefix: str, raw: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """One image's cam.json entry; with `raw`, also its per-layer PNGs and raw arrays."""
    layers = []
    for i, lay in enumerate(result.layers):
        fname = f"{prefix}cam_{i:02d}_{_safe(lay.name)}.png"
        if raw is not None:
            save_png(Image.fromarray(cam_overlay(result.display, lay.cam), "RGB"), run.file(fname))
            run.wrote(run.path / fname)
            raw[f"{prefix}{i:02d}_{lay.name}/cam"] = lay.cam.numpy()
            raw[f"{prefix}{i:02d}_{lay.name}/weights"] = lay.weights.numpy()
        layers.append({
            "name": lay.name, "stride": lay.stride, "rf": lay.rf, "stage": lay.stage,
            "shape": lay.shape, "peak": lay.peak, "peak_unit": lay.peak_unit,
            "file": fname if raw is not None else None, "raw_max": lay.raw_max, "raw_mean": lay.raw_mean,
        })
    return {
        "image": result.image,
        "target": result.target.to_dict(),
        "contrast": None if result.contrast is None
        else {"a": result.contrast[0].to_dict(), "b": result.contrast[1].to_dict()},
        "score": result.score,
        "score_kind": "logit difference" if result.contrast else "logit",
        "layers": layers,
        "top5": [{"label": lab, "prob": p} for lab, p in result.top5] if result.top5 else None,
    }


def _summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer over all images: mean raw max and mean, and the fraction of images with
    positive evidence (a peak) at that layer."""
    out = []
    for j, lay in enumerate(entries[0]["layers"]):
        vals = [e["layers"][j] for e in entries if len(e["layers"]) > j and e["layers"][j]["name"] == lay["name"]]
        out.append({
            "name": lay["name"], "stride": lay["stride"], "rf": lay["rf"], "stage": lay["stage"],
            "images": len(vals),
            "raw_max_mean": sum(v["raw_max"] for v in vals) / len(vals),
            "raw_mean_mean": sum(v["raw_mean"] for v in vals) / len(vals),
            "evidence_frac": sum(v["peak"] is not None for v in vals) / len(vals),
        })
    return out


def _stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = _safe(p.stem)
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def _print_summary(console: Console, first: CamResult, entries: list[dict[str, Any]]) -> None:
    """One row per layer: geometry, stage and the means over every image."""
    from fgscope.render.table import Col, print_table

    cols = [Col("layer", "left", wrap=True), Col("stride"), Col("rf (px)"), Col("stage", "left"),
            Col("mean max"), Col("with evidence", drop=1)]
    rows = [[s["name"], fmt_value(s["stride"]), fmt_value(s["rf"]), s["stage"], f"{s['raw_max_mean']:.3g}",
             f"{s['evidence_frac']:.0%} of {s['images']}"] for s in _summary(entries)]
    target = "each image's top-1 class" if first.contrast is None and len({e["target"]["index"] for e in entries}) > 1 \
        else cam_title(first)
    print_table(console, f"Grad-CAM over {len(entries)} images: {target}", cols, rows,
                left_out_note="cam.json has every value")


def _print_layers(console: Console, result: CamResult) -> None:
    """One table row per layer: geometry, stage, the map's raw maximum and where it peaks."""
    from fgscope.render.table import Col, print_table

    cols = [Col("layer", "left", wrap=True), Col("stride"), Col("rf (px)"), Col("stage", "left"),
            Col("max"), Col("peak (y, x)", "left", drop=1)]
    rows = [[lay.name, fmt_value(lay.stride), fmt_value(lay.rf), lay.stage, f"{lay.raw_max:.3g}",
             f"{lay.peak[0]}, {lay.peak[1]}" if lay.peak else "no positive evidence"]
            for lay in result.layers]
    print_table(console, cam_title(result), cols, rows, left_out_note="cam.json has every value")
