"""The `fgscope probe` job: options (`ProbeConfig`), `run_probe`, and the files and console
summary of a `ProbeResult` (probe.json/.csv/.md/.png, manifest)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.text import Text

from fgscope.errors import ConfigError
from fgscope.probe.features import Features, check_pools
from fgscope.probe.figure import fmt_num
from fgscope.probe.fit import probe
from fgscope.probe.labels import probe_paths
from fgscope.probe.results import ProbeResult
from fgscope.runs import RunDir, model_entry, new_run_dir, write_json, write_text

if TYPE_CHECKING:
    from rich.console import Console

    from fgscope.models import LoadedModel
    from fgscope.progress import ProgressFn

__all__ = [
    "ProbeConfig",
    "run_probe",
    "write_probe_files",
    "probe_markdown",
    "probe_csv",
    "print_summary",
    "load_probe",
    "model_manifest",
    "CSV_COLUMNS",
    "seed_everything",
    "write_manifest_inputs",
    "dump_manifest_inputs",
]


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig:
    """Options of one `fgscope probe` run (see the command's help for each).

    Attributes:
        model: model spec for `fgscope.load_model`.
        data: ImageFolder root: one subfolder per (fine) class.
        layers: layer selection (`stages`, `blocks`, names, globs, regexes).
        pools: poolings to probe, from `POOLS`.
        coarse_map: JSON file {fine class: coarse class}; None probes fine labels only.
        folds: k of the stratified k-fold cross-validation.
        seed: seed of the fold split, the subsampling and the bilinear projections.
        out: output folder (None: a new one under fgscope-out/).
        overwrite: replace the files of an existing `out`.
        model_kwargs: extra keyword arguments for `load_model`.
        device, dtype: where and in which precision the model runs.
        batch_size: images per forward.
        max_per_class: use at most this many images per class (seeded random subset).
        c: inverse L2 strength of the logistic regression (scikit-learn's C).
        from_dump: read the pooled features from this `fgscope dump` folder instead of
            running `model` over `data` (`fgscope.probe.dumped`).
    """

    model: str = "mobilenet_v2"
    data: Path = Path(".")
    layers: str = "stages"
    pools: tuple[str, ...] = ("avg",)
    coarse_map: Path | None = None
    folds: int = 5
    seed: int = 0
    out: Path | None = None
    overwrite: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32
    max_per_class: int | None = None
    c: float = 1.0
    from_dump: Path | None = None

    def check(self) -> None:
        """Raises ConfigError for malformed options (before anything runs)."""
        check_pools(self.pools)
        if self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")
        if self.max_per_class is not None and self.max_per_class < self.folds:
            raise ConfigError(
                f"--max-per-class {self.max_per_class} is below --folds {self.folds}",
                hint="each class needs at least one image per fold",
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.c > 0:
            raise ConfigError(f"--c must be positive, got {self.c}")


# --- files -----------------------------------------------------------------------------------

CSV_COLUMNS = ("layer", "index", "stage", "stride", "rf", "pool", "granularity", "acc_mean",
               "acc_std", "chance", "dim")



def probe_csv(result: ProbeResult) -> str:
    """One line per row (the `probe.json` rows without the per-fold values)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in result.rows:
        d = r.to_dict()
        w.writerow([fmt_num(d[k]) for k in CSV_COLUMNS])
    return buf.getvalue()


def probe_markdown(result: ProbeResult) -> str:
    """A pivot table: one line per layer, one column per pooling x granularity (mean ± std)."""
    series = list(dict.fromkeys((r.pool, r.granularity) for r in result.rows))
    cell = {(r.layer, r.pool, r.granularity): r for r in result.rows}
    head = ["#", "layer", "stage", "stride", "rf"] + [f"{p} {g}" for p, g in series]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in result.layers:
        vals = []
        for p, g in series:
            r = cell.get((layer.name, p, g))
            vals.append("–" if r is None else f"{r.acc_mean:.3f} ± {r.acc_std:.3f}")
        lines.append("| " + " | ".join([str(layer.index), layer.name, layer.stage,
                                         fmt_num(layer.stride) or "–", fmt_num(layer.rf) or "–", *vals]) + " |")
    chance = {g: r.chance for r in result.rows for g in [r.granularity]}
    foot = [
        "",
        f"{result.n_images} images, {len(result.classes)} fine classes"
        + (f", {len(result.coarse_classes)} coarse classes" if result.coarse_classes else "")
        + f"; {result.folds}-fold stratified CV (seed {result.seed}), accuracy mean ± std over folds; "
        + "chance (majority class): " + ", ".join(f"{g} {v:.3f}" for g, v in chance.items()) + ".",
    ]
    if any(r.pool == "hypercolumn" for r in result.rows):
        foot.append("hypercolumn at a layer = all probed maps up to that layer, fused on a "
                    f"{result.hypercolumn_grid[0]}x{result.hypercolumn_grid[1]} grid, then averaged."
                    if result.hypercolumn_grid else "")
    return "\n".join(lines + foot) + "\n"


def write_probe_files(run: RunDir, result: ProbeResult) -> None:
    """Write probe.json, probe.csv, probe.md and probe.png (atomically) into `run`."""
    from fgscope.probe.figure import probe_figure
    from fgscope.render import save_figure

    write_json(run.file("probe.json"), result.to_json())
    write_text(run.file("probe.csv"), probe_csv(result))
    write_text(run.file("probe.md"), probe_markdown(result))
    for name in ("probe.json", "probe.csv", "probe.md"):
        run.wrote(run.path / name)
    for p in save_figure(probe_figure(result), run.file("probe.png")):
        run.wrote(p)


def model_manifest(lm: LoadedModel) -> dict[str, Any]:
    """The model part of a manifest (source, hash, preprocessing): `fgscope.runs.model_entry`."""
    return model_entry(lm)


def write_manifest_inputs(run: RunDir, lm: LoadedModel, config: Any, result: ProbeResult,
                          feats: Features) -> None:
    """Model, data, images (path, class, sha256), failures, device, options and notes."""
    from fgscope.device import resolve_device

    paths = probe_paths(config.data, config.max_per_class, config.seed)
    run.manifest.update(
        model=model_manifest(lm), data=str(config.data), n_images=result.n_images,
        images=[{"path": str(paths[i][0]), "class": paths[i][1], "sha256": h}
                for i, h in zip(feats.kept, feats.hashes)],
        failures=[{"path": p, "reason": r} for p, r in feats.failures],
        device=str(resolve_device(config.device)), dtype=config.dtype,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        notes=list(result.notes),
    )


def seed_everything(seed: int) -> None:
    """Seed torch's global generator, so that a random-init model (`--weights none`) is the
    same in every run with the same seed."""
    import torch

    torch.manual_seed(seed)


def run_probe(config: ProbeConfig, console: Console | None = None,
              progress: ProgressFn | None = None) -> tuple[Path, ProbeResult]:
    """Run the whole `probe` job; returns the output folder and the result.

    `progress`, when given, also receives every phase's updates (`fgscope.progress`: a report
    shows them on its own display).

    Raises:
        FgscopeError: bad model, data, coarse map, layers or options (before anything is written).
    """
    from rich.console import Console

    from fgscope.models import load_model
    from fgscope.progress import Phases

    console = console or Console(quiet=True)
    config.check()
    if config.from_dump is not None:
        return _run_from_dump(config, console)
    t0 = started = time.perf_counter()
    seed_everything(config.seed)
    with Phases(console, relay=progress) as phases:
        phases.update("load model", 0)
        lm = load_model(config.model, **config.model_kwargs)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        result, feats = probe(
            lm, config.data, config.layers, config.pools, coarse_map=config.coarse_map,
            folds=config.folds, seed=config.seed, c=config.c, device=config.device, dtype=config.dtype,
            batch_size=config.batch_size, max_per_class=config.max_per_class, progress=phases.update,
        )
        t_probe = time.perf_counter() - t0
        run = RunDir(new_run_dir(config.out, "probe", config.overwrite, [config.data, config.coarse_map]), "probe", started=started)
        write_manifest_inputs(run, lm, config, result, feats)
        run.time("load_model", t_load)
        run.time("features_and_probes", t_probe)
        _write_files(run, result, phases)
    return _finish(run, result, console)


def _write_files(run: RunDir, result: ProbeResult, phases: Any) -> None:
    t0 = time.perf_counter()
    phases.update("files and figure", 0)
    write_probe_files(run, result)
    run.time("files", time.perf_counter() - t0)


def _finish(run: RunDir, result: ProbeResult, console: Console) -> tuple[Path, ProbeResult]:
    run.finish()
    print_summary(console, result)
    console.print(f"wrote {len(run.manifest['files']) + 1} files to [bold]{escape(str(run.path))}[/] "
                  "(probe.json/.csv/.md, probe.png, manifest.json)")
    return run.path, result


def dump_manifest_inputs(run: RunDir, dump: Any, rows: Any, config: Any, notes: Any) -> None:
    """The manifest of a probe read from a dump: the dump (folder, hash, its model), the rows
    used (path, class), and the options."""
    labels = dump.labels
    classes = dump.classes
    run.manifest.update(
        model=dump.index.get("manifest", {}).get("model"),
        from_dump={"path": str(dump.root), "hash": dump.index.get("hash"), "rows": len(dump),
                   "layers": [dump.layer(n).to_json() for n in dump.layers]},
        data=str(dump.root), n_images=int(len(rows)),
        images=[{"path": dump.paths[i], "class": classes[labels[i]] if labels is not None and classes else None}
                for i in rows.tolist()],
        failures=[{"path": f.path, "reason": f.reason} for f in dump.failures],
        device=None, dtype=None,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        notes=list(notes),
    )


def _run_from_dump(config: ProbeConfig, console: Console) -> tuple[Path, ProbeResult]:
    from fgscope.probe.dumped import probe_dump
    from fgscope.progress import Phases
    from fgscope.store.analysis import open_for_analysis

    started = time.perf_counter()
    dump = open_for_analysis(config.from_dump)  # type: ignore[arg-type]
    with Phases(console, unit="rows") as phases:
        result, _feats, rows = probe_dump(
            dump, config.layers, config.pools, coarse_map=config.coarse_map, folds=config.folds,
            seed=config.seed, c=config.c, max_per_class=config.max_per_class, progress=phases.update,
        )
        t_probe = time.perf_counter() - started
        run = RunDir(new_run_dir(config.out, "probe", config.overwrite, [config.from_dump, config.coarse_map]),
                     "probe", started=started)
        dump_manifest_inputs(run, dump, rows, config, result.notes)
        run.time("read_features_and_probes", t_probe)
        _write_files(run, result, phases)
    return _finish(run, result, console)


def print_summary(console: Console, result: ProbeResult) -> None:
    """The pivot table on the console, the best value per column in bold; on a narrow
    terminal the standard deviations and then the stages are left out first (probe.md has
    everything)."""
    from fgscope.render.table import Col, print_table

    series = list(dict.fromkeys((r.pool, r.granularity) for r in result.rows))
    cell = {(r.layer, r.pool, r.granularity): r for r in result.rows}
    best = {s: max(r.acc_mean for r in result.rows if (r.pool, r.granularity) == s) for s in series}
    cols = [Col("#"), Col("layer", "left", wrap=True), Col("stage", "left", drop=1), Col("stride", drop=1)]
    for p, g in series:
        cols += [Col(f"{p} {g}"), Col("±", drop=2)]
    rows = []
    for layer in result.layers:
        row: list[Any] = [str(layer.index), layer.name, layer.stage, fmt_num(layer.stride) or "–"]
        for s in series:
            r = cell.get((layer.name, *s))
            bold = "bold" if r is not None and r.acc_mean == best[s] else ""
            row += [Text("–" if r is None else f"{r.acc_mean:.3f}", style=bold),
                    "" if r is None else f"{r.acc_std:.3f}"]
        rows.append(row)
    print_table(console, "linear probe accuracy (mean and ± std over folds)", cols, rows,
                left_out_note="probe.md and probe.csv have every column")
    chance = {r.granularity: r.chance for r in result.rows}
    console.print("chance (majority class): " + ", ".join(f"{g} {v:.3f}" for g, v in chance.items()), markup=False)
    for note in result.notes:
        console.print(f"[yellow]note[/]: {escape(note)}")


def load_probe(folder: str | Path) -> dict[str, Any]:
    """Read `probe.json` from a probe (or advise) run folder.

    Raises:
        FgscopeError: the folder has no readable probe.json.
    """
    path = Path(folder)
    path = path / "probe.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no probe.json in {folder}", hint="pass the folder of a `fgscope probe` run") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "rows" not in data or "classes" not in data:
        raise ConfigError(f"{path} is not a probe.json (no rows/classes)", hint="pass a `fgscope probe` run folder")
    return data
