"""The live part of `fgscope report`: the runs it makes into sub-folders of the report
(layers, Grad-CAM, CKA, probes, advice: each through its own job, so the numbers are those of
the single commands), and `hierarchy.npz`, the energy maps its figures are drawn from."""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console

from fgscope.errors import ConfigError, FgscopeError
from fgscope.progress import Phases, ProgressFn
from fgscope.report.panels import EnergyColumn
from fgscope.runs import RunDir, atomic_write_bytes

if TYPE_CHECKING:
    from fgscope.report.run import ReportConfig

__all__ = ["MIN_IMAGES_FOR_SIMILARITY", "Hierarchy", "run_live", "save_hierarchy", "load_hierarchy"]

MIN_IMAGES_FOR_SIMILARITY = 4
"""Layer-by-layer CKA on fewer images is dominated by noise (and is 1 on two)."""

Hierarchy = tuple[list[np.ndarray], list[EnergyColumn], list[str]]
"""What the hierarchy figures are drawn from: `(H, W, 3)` uint8 images as the model saw them,
one energy column per layer, and the image names."""


def _make(cls: type, **kwargs: Any) -> Any:
    """`cls(**kwargs)` without the keywords `cls` does not take (jobs' configs differ a little)."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    return cls(**{k: v for k, v in kwargs.items() if names is None or k in names})


def _run_path(ret: Any, fallback: Path) -> Path:
    if isinstance(ret, tuple) and ret and isinstance(ret[0], Path):
        return ret[0]
    return ret if isinstance(ret, Path) else fallback


@dataclass
class Live:
    """State of a live run: the sub-run folders, the notes and the energy maps."""

    folders: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hierarchy: Hierarchy | None = None
    log: io.StringIO = field(default_factory=io.StringIO)


def _noted(live: Live, what: str, job: Callable[[], Any]) -> Any:
    """`job()`; an `FgscopeError` of an optional job (it cannot run on this model or these
    images) becomes a note in the page instead of failing the report."""
    try:
        return job()
    except FgscopeError as exc:
        live.notes.append(f"{what}: skipped, {exc}")
        return None


def run_live(config: ReportConfig, out: Path, console: Console, run: RunDir) -> Live:
    """Run the layers job and the optional ones into sub-folders of `out`."""
    from fgscope import metrics
    from fgscope.advise import AdviseConfig, run_advise
    from fgscope.cam import CamConfig, run_cam
    from fgscope.layers.run import LayersConfig, hierarchy_columns, run_layers
    from fgscope.probe import ProbeConfig, run_probe
    from fgscope.similarity import SimilarityConfig, run_similarity
    from fgscope.units.run import UnitsConfig, run_units

    live = Live()
    sub = Console(file=live.log, width=140, highlight=False, color_system=None)
    common = {"model": config.model, "model_kwargs": config.model_kwargs, "device": config.device,
              "dtype": config.dtype}
    steps = ["layers", "cam", "similarity"] + (["probe", "advise", "units"] if config.probe_data else [])
    with Phases(console, prefix="report: ") as bar:
        k = 0

        def relay(name: str) -> ProgressFn:
            """A job's own phases, shown on the report's display (`layers: forward`)."""
            return lambda phase, done, total: bar.update(f"{name}: {phase}", done, total)

        def step(name: str, fn: Callable[[], Any]) -> Any:
            nonlocal k
            k += 1
            bar.update(f"{name} ({k}/{len(steps)})", 0)
            sub.rule(name)
            t0 = time.perf_counter()
            try:
                ret = fn()
            finally:
                run.time(name, time.perf_counter() - t0)
            if ret is not None:
                live.folders.append(_run_path(ret, out / name))
            return ret

        _, result = step("layers", lambda: run_layers(_make(
            LayersConfig, images=list(config.images), layers=config.layers, out=out / "layers",
            max_images=config.max_images, views=config.views, view_seed=config.view_seed, **common), sub,
            relay("layers")))
        images = [str(li.path) for li in result.images]
        cols = hierarchy_columns(result.rows)
        if cols:
            n = min(len(result.display), config.max_images)
            live.hierarchy = (
                [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.display[:n]],
                [EnergyColumn(r.name, r.stride, r.rf, r.stage,
                                    metrics.spatial_energy(result.activations[r.name][:n]).numpy())
                 for r in cols],
                [Path(p).name for p in images[:n]],
            )
        del result  # activations can be large; the other jobs run their own forwards

        step("cam", lambda: _noted(live, "Grad-CAM", lambda: run_cam(_make(
            CamConfig, image=images[0], layers="stages", out=out / "cam", **common), sub, relay("cam"))))

        def similarity() -> Any:
            if len(images) < MIN_IMAGES_FOR_SIMILARITY:
                live.notes.append(
                    f"Layer similarity (CKA): needs at least {MIN_IMAGES_FOR_SIMILARITY} images, "
                    f"got {len(images)}; pass a folder of images."
                )
                return None
            return _noted(live, "Layer similarity (CKA)", lambda: run_similarity(_make(
                SimilarityConfig, images=images, layers=config.layers, out=out / "similarity",
                **common), sub, relay("similarity")))

        step("similarity", similarity)
        if not config.probe_data:
            live.notes.append(
                "Linear probes and advice: pass `--probe-data DATA` (an ImageFolder: one "
                "subfolder of images per class)."
            )
            return live
        probe_ret = step("probe", lambda: _noted(live, "Linear probes", lambda: run_probe(_make(
            ProbeConfig, data=config.probe_data, layers="stages", coarse_map=config.coarse_map,
            out=out / "probe", **common), sub, relay("probe"))))
        if probe_ret is None:
            live.notes.append("Advice: needs the linear probes.")
            return live
        probe_dir = _run_path(probe_ret, out / "probe")
        step("advise", lambda: _noted(live, "Advice", lambda: run_advise(_make(
            AdviseConfig, from_probe=probe_dir, out=out / "advise", **common), sub)))
        # the unit atlas of the same labelled data (dataset examples, class selectivity)
        step("units", lambda: _noted(live, "Unit atlas", lambda: run_units(_make(
            UnitsConfig, data=config.probe_data, layers="stages", out=out / "units", **common), sub,
            relay("units"))))
    return live


def save_hierarchy(path: Path, data: Hierarchy) -> None:
    images, cols, labels = data
    arrays: dict[str, np.ndarray] = {
        "images": np.stack(images),
        "image_labels": np.array(labels, dtype=str),
        "names": np.array([c.name for c in cols], dtype=str),
        "strides": np.array([np.nan if c.stride is None else c.stride for c in cols], float),
        "rfs": np.array([np.nan if c.rf is None else c.rf for c in cols], float),
        "stages": np.array([c.stage for c in cols], dtype=str),
    }
    for i, c in enumerate(cols):
        arrays[f"energy_{i}"] = np.asarray(c.energy, np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_hierarchy(path: Path) -> Hierarchy:
    """Read `hierarchy.npz` back: images `(n, H, W, 3)` uint8, per column name, stride, rf,
    stage and `energy_<i>` `(n, h, w)` float32, and the image labels.

    Raises:
        ConfigError: the file is not such an archive.
    """
    def opt(v: float) -> float | None:
        return None if np.isnan(v) else float(v)

    try:
        with np.load(path, allow_pickle=False) as z:
            cols = [
                EnergyColumn(str(n), opt(s), opt(r), str(st), z[f"energy_{i}"])
                for i, (n, s, r, st) in enumerate(zip(z["names"], z["strides"], z["rfs"], z["stages"]))
            ]
            return list(z["images"]), cols, [str(x) for x in z["image_labels"]]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable hierarchy archive ({exc.__class__.__name__})") from None


