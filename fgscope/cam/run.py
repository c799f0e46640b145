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

Output folder:
    cam.json                 target, score, per layer: geometry, stage, peak, raw statistics
    cam.png                  the image, then the Grad-CAM of each layer over it
    cam_<NN>_<layer>.png     each layer's map over the image, at the model's input size
    cam_raw.npz              the raw maps (h, w) and channel weights (C,) per layer
    manifest.json            versions, model, image, command, timings
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



def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "_", name).replace(":", "-") or "output"


def run_cam(config: CamConfig, console: Console | None = None) -> tuple[Path, CamResult]:
    """Run the whole `cam` job; returns the output folder and the maps.

    Raises:
        FgscopeError: bad model, image, class, layers or options (before anything is written).
    """
    from fgscope.render import save_figure, save_png

    console = console or Console(quiet=True)
    if config.target is not None and config.contrast is not None:
        raise ConfigError("pass either --class or --contrast, not both")
    t0 = time.perf_counter()
    lm = load_model(config.model, **config.model_kwargs)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = Path(config.image) if config.image else default_image()
    result = compute_cams(
        lm, image, config.layers, target=config.target, contrast=config.contrast,
        device=config.device,
    )
    t_cam = time.perf_counter() - t0

    run = RunDir(new_run_dir(config.out, "cam", config.overwrite, [config.image]), "cam")
    run.time("load_model", t_load)
    run.time("grad_cam", t_cam)
    run.manifest.update(
        model=model_entry(lm),
        images=[{"path": str(image), "sha256": sha256_file(image), "size": list(load_image(image).size)}],
        device=result.device, layers=config.layers,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        notes=list(result.notes),
    )
    t0 = time.perf_counter()
    entries = []
    raw: dict[str, np.ndarray] = {}
    for i, lay in enumerate(result.layers):
        fname = f"cam_{i:02d}_{_safe(lay.name)}.png"
        save_png(Image.fromarray(cam_overlay(result.display, lay.cam), "RGB"), run.file(fname))
        run.wrote(run.path / fname)
        raw[f"{i:02d}_{lay.name}/cam"] = lay.cam.numpy()
        raw[f"{i:02d}_{lay.name}/weights"] = lay.weights.numpy()
        entries.append({
            "name": lay.name, "stride": lay.stride, "rf": lay.rf, "stage": lay.stage,
            "shape": lay.shape, "peak": lay.peak, "peak_unit": lay.peak_unit, "file": fname,
            "raw_max": lay.raw_max, "raw_mean": lay.raw_mean,
        })
    buf = io.BytesIO()
    np.savez_compressed(buf, **raw)
    atomic_write_bytes(run.file("cam_raw.npz"), buf.getvalue())
    run.wrote(run.path / "cam_raw.npz")
    write_json(run.file("cam.json"), {
        "model": lm.source.spec,
        "image": str(image),
        "input_size": list(lm.input_size),
        "target": result.target.to_dict(),
        "contrast": None if result.contrast is None
        else {"a": result.contrast[0].to_dict(), "b": result.contrast[1].to_dict()},
        "score": result.score,
        "score_kind": "logit difference" if result.contrast else "logit",
        "layers": entries,
        "top5": [{"label": lab, "prob": p} for lab, p in result.top5] if result.top5 else None,
        "raw_file": "cam_raw.npz",
        "notes": list(result.notes),
    })
    run.wrote(run.path / "cam.json")
    for p in save_figure(cam_figure(result), run.file("cam.png")):
        run.wrote(p)
    run.time("files", time.perf_counter() - t0)
    manifest = run.finish()

    for note in result.notes:
        console.print(f"[dim]note:[/] {escape(note)}")
    if result.top5:
        console.print(escape("top-5: " + ", ".join(f"{lab} {p:.1%}" for lab, p in result.top5)), soft_wrap=True)
    _print_layers(console, result)
    if len(result.layers) > MAX_LAYERS:
        console.print(f"note: cam.png shows {MAX_LAYERS} of the {len(result.layers)} layers, spread "
                      "over depth; every layer has its own cam_NN_<layer>.png", markup=False)
    console.print(
        f"wrote {len(run.manifest['files'])} files to [bold]{escape(str(run.path))}[/] "
        f"({manifest.name}, cam.json, cam.png, cam_raw.npz, one PNG per layer)", soft_wrap=True,
    )
    return run.path, result


def _print_layers(console: Console, result: CamResult) -> None:
    """One table row per layer: geometry, stage, the map's raw maximum and where it peaks."""
    from fgscope.render.table import Col, print_table

    cols = [Col("layer", "left", wrap=True), Col("stride"), Col("rf (px)"), Col("stage", "left"),
            Col("max"), Col("peak (y, x)", "left", drop=1)]
    rows = [[lay.name, fmt_value(lay.stride), fmt_value(lay.rf), lay.stage, f"{lay.raw_max:.3g}",
             f"{lay.peak[0]}, {lay.peak[1]}" if lay.peak else "no positive evidence"]
            for lay in result.layers]
    print_table(console, cam_title(result), cols, rows, left_out_note="cam.json has every value")
