"""The probes of `fgscope probe`: labels, stratified k-fold logistic regression, and the whole
probe of every selected layer (features from `probe_features`), collected in a `ProbeResult`.
No files are written here (see `probe_run`)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fgscope.errors import ConfigError, ImageError
from fgscope.probe.features import (
    BILINEAR_CHANNELS,
    Features,
    ProbeLayer,
    check_pools,
    extract_features,
)

if TYPE_CHECKING:
    from rich.console import Console

    from fgscope.models import LoadedModel

__all__ = [
    "ProbeRow",
    "ProbeResult",
    "load_coarse_map",
    "chance_level",
    "cross_validate",
    "probe",
    "transfer_accuracy",
    "probe_paths",
]

_MAX_ITER = 1000


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRow:
    """One probe: one layer (or hypercolumn up to it), one pooling, one label granularity.

    Attributes:
        layer: record name; for `hypercolumn`, the deepest fused layer.
        index: the layer's position among the probed layers (depth order).
        stage: early / middle / late.
        stride, rf: effective stride and receptive field (px); for `hypercolumn`, the grid's
            stride and the deepest layer's field.
        pool: avg | max | bilinear | hypercolumn.
        granularity: fine | coarse.
        acc_mean, acc_std: accuracy over the folds (std: population std over folds).
        chance: majority-class accuracy.
        dim: feature dimension.
        fold_acc: accuracy of each fold.
        fused: for `hypercolumn`, the fused layers; empty otherwise.
    """

    layer: str
    index: int
    stage: str
    stride: float | None
    rf: float | None
    pool: str
    granularity: str
    acc_mean: float
    acc_std: float
    chance: float
    dim: int
    fold_acc: tuple[float, ...] = ()
    fused: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fold_acc"], d["fused"] = list(self.fold_acc), list(self.fused)
        return d


@dataclass(frozen=True)
class ProbeResult:
    """Everything a probe run measured (`probe.json` is `to_json()`)."""

    model: str
    data: str
    n_images: int
    classes: tuple[str, ...]
    coarse_classes: tuple[str, ...] | None
    folds: int
    seed: int
    rows: tuple[ProbeRow, ...]
    layers: tuple[ProbeLayer, ...]
    input_size: tuple[int, int]
    cka: tuple[dict[str, Any], ...] = ()
    notes: tuple[str, ...] = ()
    hypercolumn_grid: tuple[int, int] | None = None
    c: float = 1.0
    bilinear_channels: int = BILINEAR_CHANNELS

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeResult:
        """The result back from `probe.json` (e.g. to redraw `probe_figure`)."""

        def tup(d: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        grid = data.get("hypercolumn_grid")
        return cls(
            model=data["model"], data=data["data"], n_images=data["n_images"],
            classes=tuple(data["classes"]),
            coarse_classes=tuple(data["coarse_classes"]) if data.get("coarse_classes") else None,
            folds=data["folds"], seed=data["seed"],
            rows=tuple(ProbeRow(**tup(r)) for r in data["rows"]),
            layers=tuple(ProbeLayer(**tup(layer)) for layer in data.get("layers", [])),
            input_size=tuple(data.get("input_size", (0, 0))),
            cka=tuple(data.get("cka_consecutive", [])), notes=tuple(data.get("notes", [])),
            hypercolumn_grid=tuple(grid) if grid else None,
            c=data.get("probe", {}).get("C", 1.0),
            bilinear_channels=data.get("bilinear_channels", BILINEAR_CHANNELS),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "n_images": self.n_images,
            "classes": list(self.classes),
            "coarse_classes": list(self.coarse_classes) if self.coarse_classes else None,
            "folds": self.folds,
            "seed": self.seed,
            "rows": [r.to_dict() for r in self.rows],
            "layers": [asdict(layer) for layer in self.layers],
            "input_size": list(self.input_size),
            "pools": list(dict.fromkeys(r.pool for r in self.rows)),
            "probe": {
                "model": "LogisticRegression(multinomial, L2, lbfgs)", "C": self.c,
                "standardize": "StandardScaler fit per training fold",
                "cv": f"StratifiedKFold(n_splits={self.folds}, shuffle=True, random_state={self.seed})",
            },
            "bilinear_channels": self.bilinear_channels,
            "hypercolumn_grid": list(self.hypercolumn_grid) if self.hypercolumn_grid else None,
            "cka_consecutive": list(self.cka),
            "notes": list(self.notes),
        }


# --- labels ----------------------------------------------------------------------------------


def load_coarse_map(path: str | Path, classes: Sequence[str]) -> dict[str, str]:
    """Read a {fine class: coarse class} JSON file and check it covers every class.

    Raises:
        ConfigError: missing or unreadable file, not an object of strings, a fine class
            without a coarse class (all such classes are named), or fewer than 2 coarse classes.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"coarse map {path} does not exist", hint="check --coarse-map") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read coarse map {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"coarse map {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise ConfigError(
            f"coarse map {path} must be a JSON object of strings",
            hint='e.g. {"siamese": "cat", "beagle": "dog"}',
        )
    missing = [c for c in classes if c not in obj]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConfigError(
            f"coarse map {path} has no coarse class for {len(missing)} fine class(es): {shown}",
            hint="add an entry for each class folder",
        )
    mapping = {c: obj[c] for c in classes}
    if len(set(mapping.values())) < 2:
        raise ConfigError(
            f"coarse map {path} puts every class into one coarse class",
            hint="a coarse probe needs at least 2 coarse classes",
        )
    return mapping


def chance_level(y: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class: (n,) int labels -> float."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    return float(counts.max() / counts.sum())


# --- the probe -------------------------------------------------------------------------------


def cross_validate(
    x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0, c: float = 1.0
) -> tuple[float, float, tuple[float, ...], int]:
    """Stratified k-fold accuracy of a standardised multinomial L2 logistic regression.

    Args:
        x: (n, d) features.
        y: (n,) integer labels; every class needs at least `folds` examples.
        folds: number of folds (StratifiedKFold, shuffled with `seed`).
        c: inverse L2 strength (scikit-learn's C).

    Returns:
        (mean accuracy, population std over folds, accuracy per fold, number of fits that
        stopped at the iteration limit before converging).

    Raises:
        ConfigError: a class with fewer examples than folds, fewer than 2 classes, or
            non-finite features.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"expected x (n, d) and y (n,), got {x.shape} and {y.shape}")
    counts = np.bincount(y)
    present = counts[counts > 0]
    if len(present) < 2:
        raise ConfigError("a probe needs at least 2 classes with images")
    if present.min() < folds:
        raise ConfigError(
            f"a class has only {int(present.min())} image(s), fewer than --folds {folds}",
            hint="add images or lower --folds",
        )
    if not np.isfinite(x).all():
        raise ConfigError(
            "features contain NaN or infinity (float16 overflow?)", hint="try --dtype float32"
        )
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accs: list[float] = []
    unconverged = 0
    with threadpool_limits(limits=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for train, test in skf.split(np.zeros(len(y)), y):
            model = make_pipeline(
                StandardScaler(), LogisticRegression(C=c, max_iter=_MAX_ITER, random_state=seed)
            )
            model.fit(x[train], y[train])
            accs.append(float(model.score(x[test], y[test])))
        unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    arr = np.asarray(accs)
    return float(arr.mean()), float(arr.std()), tuple(accs), unconverged


# --- the whole probe -------------------------------------------------------------------------


def _subsample(labels: Sequence[int], max_per_class: int | None, seed: int) -> list[int]:
    """Indices of at most `max_per_class` items per label (seeded), in the original order."""
    if max_per_class is None:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    keep: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.extend(rng.choice(idx, size=min(max_per_class, len(idx)), replace=False).tolist())
    return sorted(keep)


def _check_counts(y: np.ndarray, classes: Sequence[str], folds: int, what: str) -> None:
    counts = np.bincount(y, minlength=len(classes))
    few = [f"{classes[i]} ({int(n)})" for i, n in enumerate(counts) if n < folds]
    if few:
        shown = ", ".join(few[:6]) + (f" and {len(few) - 6} more" if len(few) > 6 else "")
        raise ConfigError(
            f"{what} class(es) with fewer readable images than --folds {folds}: {shown}",
            hint="add images or lower --folds",
        )


def probe(
    lm: LoadedModel,
    data: str | Path,
    layers: Any = "stages",
    pools: Sequence[str] = ("avg",),
    *,
    coarse_map: str | Path | None = None,
    folds: int = 5,
    seed: int = 0,
    c: float = 1.0,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
    max_per_class: int | None = None,
    bilinear_channels: int = BILINEAR_CHANNELS,
    console: Console | None = None,
) -> tuple[ProbeResult, Features]:
    """Probe every selected layer of `lm` on the ImageFolder data set `data` (no files written).

    Returns:
        The result (rows in the order fine then coarse, by pooling, by depth) and the
        features it was computed from.

    Raises:
        FgscopeError: bad data, coarse map, layers or options, before the probes run.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from fgscope import metrics
    from fgscope.images import image_folder

    console = console or Console(quiet=True)
    pools = check_pools(pools)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    ds = image_folder(data)
    if len(ds.classes) < 2:
        raise ImageError(f"{data} has only one class folder ({ds.classes[0]})", hint="a probe needs 2 or more")
    cmap = load_coarse_map(coarse_map, ds.classes) if coarse_map is not None else None
    idx = _subsample(ds.labels, max_per_class, seed)
    paths = [ds.paths[i] for i in idx]
    labels = np.asarray([ds.labels[i] for i in idx])
    _check_counts(labels, ds.classes, folds, "fine")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("features", total=len(paths))
        feats = extract_features(
            lm, paths, layers, pools, device=device, dtype=dtype, batch_size=batch_size, seed=seed,
            bilinear_channels=bilinear_channels, on_batch=lambda done: bar.update(task, completed=done),
        )
    feats.failures[:0] = [(str(f.path), f.reason) for f in ds.failures]  # folders skipped
    y_fine = labels[feats.kept]
    _check_counts(y_fine, ds.classes, folds, "fine")
    targets: dict[str, np.ndarray] = {"fine": y_fine}
    coarse_classes: tuple[str, ...] | None = None
    if cmap is not None:
        coarse_classes = tuple(sorted(set(cmap.values())))
        cindex = {name: i for i, name in enumerate(coarse_classes)}
        targets["coarse"] = np.asarray([cindex[cmap[ds.classes[k]]] for k in y_fine])

    # What to fit: (layer info, pool, features, fused names, stride, rf).
    jobs: list[tuple[ProbeLayer, str, np.ndarray, tuple[str, ...], float | None, float | None]] = []
    for how in pools:
        for i, layer in enumerate(feats.layers):
            if how == "hypercolumn":
                if (layer.name, how) not in feats.values:
                    continue
                x, fused = feats.hypercolumn(i)
                assert feats.grid is not None
                stride = round(lm.input_size[0] / feats.grid[0], 3)
                jobs.append((layer, how, x, fused, stride, layer.rf))
            elif (layer.name, how) in feats.values:
                jobs.append((layer, how, feats.values[(layer.name, how)], (), layer.stride, layer.rf))
    rows: list[ProbeRow] = []
    unconverged = 0
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("probes", total=len(jobs) * len(targets))
        for gran, y in targets.items():
            chance = chance_level(y)
            for layer, how, x, fused, stride, rf in jobs:
                mean, std, per_fold, bad = cross_validate(x, y, folds=folds, seed=seed, c=c)
                unconverged += bad
                rows.append(ProbeRow(
                    layer.name, layer.index, layer.stage, stride, rf, how, gran, mean, std, chance,
                    int(x.shape[1]), per_fold, fused,
                ))
                bar.advance(task)

    cka: list[dict[str, Any]] = []
    avg = [layer for layer in feats.layers if (layer.name, "avg") in feats.values]
    if len(feats.kept) >= 4:
        for a, b in zip(avg, avg[1:]):
            value = metrics.linear_cka(feats.values[(a.name, "avg")], feats.values[(b.name, "avg")], debiased=True)
            cka.append({"a": a.name, "b": b.name, "cka": None if math.isnan(value) else round(value, 4),
                        "features": "avg", "debiased": True})
    notes = []
    if unconverged:
        notes.append(
            f"{unconverged} of {len(rows) * folds} logistic-regression fits stopped at "
            f"{_MAX_ITER} iterations before converging (accuracies are still valid estimates)"
        )
    if feats.failures:
        notes.append(f"{len(feats.failures)} image(s) could not be read and were skipped")
    result = ProbeResult(
        model=lm.source.spec, data=str(data), n_images=len(feats.kept), classes=tuple(ds.classes),
        coarse_classes=coarse_classes, folds=folds, seed=seed, rows=tuple(rows),
        layers=tuple(feats.layers), input_size=tuple(lm.input_size), cka=tuple(cka),
        notes=tuple(notes), hypercolumn_grid=feats.grid, c=c, bilinear_channels=bilinear_channels,
    )
    return result, feats


def transfer_accuracy(
    lm: LoadedModel,
    data: str | Path,
    layers: Any,
    *,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
    console: Console | None = None,
) -> tuple[dict[str, tuple[float, float]], ProbeResult]:
    """The `transfer` column of `fgscope layers`: fine-label probe accuracy (avg pooling).

    Returns:
        ({record name: (accuracy mean, std)}, the probe result).
    """
    result, _ = probe(lm, data, layers, ("avg",), folds=folds, seed=seed, device=device,
                      dtype=dtype, batch_size=batch_size, console=console)
    return {r.layer: (r.acc_mean, r.acc_std) for r in result.rows}, result


def probe_paths(data: str | Path, max_per_class: int | None, seed: int) -> list[tuple[Path, str]]:
    """(path, class name) of the images a probe of `data` uses, in probe order."""
    from fgscope.images import image_folder

    ds = image_folder(data)
    return [(ds.paths[i], ds.classes[ds.labels[i]]) for i in _subsample(ds.labels, max_per_class, seed)]
