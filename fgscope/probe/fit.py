"""The fits of `fgscope probe`: stratified k-fold logistic regression (`cross_validate`) and
the whole probe of every selected layer (features from `fgscope.probe.features`, labels from
`fgscope.probe.labels`), collected in a `ProbeResult` (`fgscope.probe.results`). No files are
written here (see `fgscope.probe.run`)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fgscope.errors import ConfigError, ImageError
from fgscope.probe.features import (
    BILINEAR_CHANNELS,
    POOLS,
    Features,
    ProbeLayer,
    check_pools,
    extract_features,
)
from fgscope.probe.labels import (
    _check_counts,
    _subsample,
    chance_level,
    load_coarse_map,
    probe_paths,
)
from fgscope.probe.results import ProbeResult, ProbeRow

if TYPE_CHECKING:
    from rich.console import Console

    from fgscope.models import LoadedModel
    from fgscope.progress import ProgressFn

__all__ = [
    "cross_validate",
    "probe",
    "fit_probes",
    "transfer_accuracy",
    # re-exported from fgscope.probe.results and fgscope.probe.labels
    "ProbeRow",
    "ProbeResult",
    "load_coarse_map",
    "chance_level",
    "probe_paths",
]

_MAX_ITER = 1000


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
    progress: ProgressFn | None = None,
) -> tuple[ProbeResult, Features]:
    """Probe every selected layer of `lm` on the ImageFolder data set `data` (no files written).

    Progress goes to `progress(phase, done, total)` (phases `forward`, `probe fits`); without
    it, to a transient display on `console` when that is a terminal.

    Returns:
        The result (rows in the order fine then coarse, by pooling, by depth) and the
        features it was computed from.

    Raises:
        FgscopeError: bad data, coarse map, layers or options, before the probes run.
    """
    from fgscope.images import image_folder
    from fgscope.progress import Phases, report

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

    with contextlib.ExitStack() as stack:
        if progress is None:  # no callback from the caller: draw on `console` (terminal only)
            progress = stack.enter_context(Phases(console)).update
        feats = extract_features(
            lm, paths, layers, pools, device=device, dtype=dtype, batch_size=batch_size, seed=seed,
            bilinear_channels=bilinear_channels,
            on_batch=lambda done: report(progress, "forward", done, len(paths)),
        )
        feats.failures[:0] = [(str(f.path), f.reason) for f in ds.failures]  # folders skipped
        result = fit_probes(
            feats, labels[feats.kept], ds.classes, cmap, folds=folds, seed=seed, c=c,
            input_size=tuple(lm.input_size), model=lm.source.spec, data=str(data),
            bilinear_channels=bilinear_channels, progress=progress,
        )
    return result, feats


def fit_probes(
    feats: Features,
    y_fine: np.ndarray,
    classes: Sequence[str],
    cmap: dict[str, str] | None,
    *,
    folds: int,
    seed: int,
    c: float,
    input_size: tuple[int, ...],
    model: str,
    data: str,
    bilinear_channels: int = BILINEAR_CHANNELS,
    notes: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> ProbeResult:
    """The probes of every layer x pooling x granularity on pooled features (no model runs).

    Args:
        feats: the pooled features (from `extract_features` or a dump).
        y_fine: (n,) fine label of each row of `feats`.
        classes: fine class names (index = label).
        cmap: {fine class: coarse class}, or None for fine labels only.
        input_size: the model's input (H, W): the hypercolumn row's stride is H / grid.
        model, data: what the result names as its model and data.
        notes: remarks put before the probe's own.
        progress: `progress("probe fits", done, total)` after each fit.

    Raises:
        ConfigError: a class with fewer rows than folds, or non-finite features.
    """
    from fgscope import metrics
    from fgscope.progress import report

    _check_counts(y_fine, classes, folds, "fine")
    targets: dict[str, np.ndarray] = {"fine": y_fine}
    coarse_classes: tuple[str, ...] | None = None
    if cmap is not None:
        coarse_classes = tuple(sorted(set(cmap.values())))
        cindex = {name: i for i, name in enumerate(coarse_classes)}
        targets["coarse"] = np.asarray([cindex[cmap[classes[k]]] for k in y_fine])
    pools = list(dict.fromkeys(how for _, how in feats.values))
    pools.sort(key=lambda p: POOLS.index(p))

    # What to fit: (layer info, pool, features, fused names, stride, rf).
    jobs: list[tuple[ProbeLayer, str, np.ndarray, tuple[str, ...], float | None, float | None]] = []
    for how in feats.pools or pools:
        for i, layer in enumerate(feats.layers):
            if how == "hypercolumn":
                if (layer.name, how) not in feats.values:
                    continue
                x, fused = feats.hypercolumn(i)
                assert feats.grid is not None
                stride = round(input_size[0] / feats.grid[0], 3)
                jobs.append((layer, how, x, fused, stride, layer.rf))
            elif (layer.name, how) in feats.values:
                jobs.append((layer, how, feats.values[(layer.name, how)], (), layer.stride, layer.rf))
    rows: list[ProbeRow] = []
    unconverged = 0
    total = len(jobs) * len(targets)
    report(progress, "probe fits", 0, total)
    for gran, y in targets.items():
        chance = chance_level(y)
        for layer, how, x, fused, stride, rf in jobs:
            mean, std, per_fold, bad = cross_validate(x, y, folds=folds, seed=seed, c=c)
            unconverged += bad
            rows.append(ProbeRow(
                layer.name, layer.index, layer.stage, stride, rf, how, gran, mean, std, chance,
                int(x.shape[1]), per_fold, fused,
            ))
            report(progress, "probe fits", len(rows), total)

    cka: list[dict[str, Any]] = []
    avg = [layer for layer in feats.layers if (layer.name, "avg") in feats.values]
    if len(y_fine) >= 4:
        for a, b in zip(avg, avg[1:]):
            value = metrics.linear_cka(feats.values[(a.name, "avg")], feats.values[(b.name, "avg")], debiased=True)
            cka.append({"a": a.name, "b": b.name, "cka": None if math.isnan(value) else round(value, 4),
                        "features": "avg", "debiased": True})
    out_notes = list(notes)
    if unconverged:
        out_notes.append(
            f"{unconverged} of {len(rows) * folds} logistic-regression fits stopped at "
            f"{_MAX_ITER} iterations before converging (accuracies are still valid estimates)"
        )
    if feats.failures:
        out_notes.append(f"{len(feats.failures)} image(s) could not be read and were skipped")
    return ProbeResult(
        model=model, data=data, n_images=len(y_fine), classes=tuple(classes),
        coarse_classes=coarse_classes, folds=folds, seed=seed, rows=tuple(rows),
        layers=tuple(feats.layers), input_size=tuple(input_size), cka=tuple(cka),  # type: ignore[arg-type]
        notes=tuple(out_notes), hypercolumn_grid=feats.grid, c=c, bilinear_channels=bilinear_channels,
    )


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
    progress: ProgressFn | None = None,
) -> tuple[dict[str, tuple[float, float]], ProbeResult]:
    """The `transfer` column of `fgscope layers`: fine-label probe accuracy (avg pooling).

    Pass `progress` (e.g. the caller's `Phases.update`) when a display is already active:
    without it the probe draws its own on `console`, and rich allows one at a time.

    Returns:
        ({record name: (accuracy mean, std)}, the probe result).
    """
    result, _ = probe(lm, data, layers, ("avg",), folds=folds, seed=seed, device=device,
                      dtype=dtype, batch_size=batch_size, console=console, progress=progress)
    return {r.layer: (r.acc_mean, r.acc_std) for r in result.rows}, result
