"""`fgscope probe`: where does (fine-grained) information live? Linear probes at every depth.

For each selected layer the images' features are pooled on the fly while the model runs
(`capture(..., on_record=...)`, so memory is n x dim, never the raw maps):

- `avg`, `max`: global average / max pooling, (N, C, H, W) -> (N, C); vectors pass through.
- `bilinear`: B-CNN second-order pooling (`metrics.bilinear_pool`: mean of x x^T over
  positions, signed square root, L2 norm). Layers with more than `BILINEAR_CHANNELS`
  channels are first reduced with a fixed Gaussian random projection P (seeded; a 1x1
  convolution), so z = P (sum x x^T) P^T: a random linear sketch of the full bilinear matrix.
  The matrix is symmetric, so its upper triangle is kept: k (k + 1) / 2 dims for k channels.
- `hypercolumn`: cumulative FPN-like fusion. The row at layer k fuses every selected map up
  to and including k: each map is resized to one grid (the largest map among the selected
  layers, capped at `HYPERCOLUMN_GRID` x `HYPERCOLUMN_GRID`; per axis, a shorter map is
  upsampled bilinearly and a longer one area-averaged), the maps are concatenated along
  channels (`metrics.hypercolumns`) and averaged over the grid. After global averaging this is close
  to the concatenation of each layer's average, so the row measures what fusing depths adds
  over one layer, not spatial alignment.

A linear probe then predicts the class from each feature set: multinomial logistic regression
with L2 (scikit-learn `LogisticRegression`, lbfgs, C = `c`) on standardised features (the
`StandardScaler` is fit inside each training fold, via a `Pipeline`), scored by stratified
k-fold cross-validation with a fixed seed. Accuracy is reported as mean and std over folds,
for the fine labels (the ImageFolder classes) and, with a fine -> coarse map, for the coarse
labels too. The BLAS pools run single-threaded during the fits: these small problems are
fastest that way and multi-threaded BLAS slowed them down 10-50x on a busy 2-core machine.
"""

from __future__ import annotations

import json
import math
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, FgscopeError, ImageError
from ..runs import RunDir, new_run_dir, write_json, write_text

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from rich.console import Console

    from ..models import LoadedModel

__all__ = [
    "POOLS",
    "GRANULARITIES",
    "BILINEAR_CHANNELS",
    "HYPERCOLUMN_GRID",
    "ProbeConfig",
    "ProbeRow",
    "ProbeLayer",
    "ProbeResult",
    "Features",
    "load_coarse_map",
    "chance_level",
    "cross_validate",
    "bilinear_features",
    "hypercolumn_features",
    "extract_features",
    "probe",
    "transfer_accuracy",
    "run_probe",
    "write_probe_files",
    "probe_figure",
    "probe_markdown",
    "probe_csv",
    "print_summary",
    "load_probe",
    "model_manifest",
    "check_pools",
    "CSV_COLUMNS",
    "seed_everything",
    "write_manifest_inputs",
]

POOLS = ("avg", "max", "bilinear", "hypercolumn")
GRANULARITIES = ("fine", "coarse")
BILINEAR_CHANNELS = 64
"""Bilinear pooling reduces layers with more channels to this many first (random projection)."""
HYPERCOLUMN_GRID = 28
"""Hypercolumns are fused on a grid no larger than this many units per side."""
_MAX_ITER = 1000


# --- configuration and results ---------------------------------------------------------------


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


def check_pools(pools: Sequence[str]) -> tuple[str, ...]:
    """Validate pool names (order kept, repeats dropped). Raises ConfigError."""
    out = tuple(dict.fromkeys(p.strip().lower() for p in pools if p.strip()))
    if not out:
        raise ConfigError("no pooling given", hint=f"use one or more of {', '.join(POOLS)}")
    bad = [p for p in out if p not in POOLS]
    if bad:
        raise ConfigError(f"unknown pooling {', '.join(bad)}; choose from {', '.join(POOLS)}")
    return out


@dataclass(frozen=True)
class ProbeLayer:
    """A probed layer: record name, position in execution order and geometry."""

    name: str
    index: int
    stage: str
    stride: float | None
    rf: float | None
    shape: tuple[int, ...]


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


# --- pooled features -------------------------------------------------------------------------


def _projection(channels: int, out: int, seed: int, name: str) -> torch.Tensor:
    """Fixed Gaussian (out, channels) projection, the same for the same seed and layer name."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(out, channels, generator=g) / math.sqrt(out)


def bilinear_features(
    x: torch.Tensor, *, channels: int = BILINEAR_CHANNELS, projection: torch.Tensor | None = None
) -> torch.Tensor:
    """Bilinear pooling with channel reduction: (N, C, H, W) -> (N, k (k + 1) / 2).

    k = C when C <= `channels`, else x is first projected to k = `channels` with
    `projection` ((k, C); required then). The B-CNN matrix (`metrics.bilinear_pool`: mean
    of x x^T over positions, signed sqrt, L2 norm) is symmetric; its upper triangle (row
    major, diagonal included) is returned.
    """
    import torch

    from .. import metrics

    c = x.shape[1]
    if c > channels:
        if projection is None or projection.shape != (channels, c):
            raise ValueError(f"a ({channels}, {c}) projection is needed for {c} channels")
        x = torch.einsum("kc,nchw->nkhw", projection.to(x.device, x.dtype), x)  # (N, k, H, W)
    k = x.shape[1]
    z = metrics.bilinear_pool(x)  # (N, k*k), symmetric per sample
    iu = torch.triu_indices(k, k, device=z.device)
    return z.reshape(-1, k, k)[:, iu[0], iu[1]]  # (N, k (k + 1) / 2)


def hypercolumn_features(maps: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Hypercolumn pooling: (N, C_i, H_i, W_i) maps -> (N, sum C_i).

    Definition: every map is brought to `grid` (per axis: bilinear upsampling with
    align_corners=False where it is shorter, area averaging as `adaptive_avg_pool2d` where
    it is longer), the maps are concatenated
    along channels (`metrics.hypercolumns`) and averaged over the grid. Both resizings are
    linear and separable, so the grid average of a resized map is a weighted sum of the map,
    sum_ij x_ij a_i b_j, with per-axis weights `_grid_weights`; computing it that way gives
    the same numbers without materialising the (N, sum C, grid) tensor.
    """
    import torch

    out = []
    for m in maps:
        a = _grid_weights(m.shape[2], grid[0]).to(m.device, m.dtype)  # (H,)
        b = _grid_weights(m.shape[3], grid[1]).to(m.device, m.dtype)  # (W,)
        out.append(torch.einsum("nchw,h,w->nc", m, a, b))  # (N, C)
    return torch.cat(out, 1)  # (N, sum C)


_WEIGHTS: dict[tuple[int, int], torch.Tensor] = {}


def _grid_weights(n: int, g: int) -> torch.Tensor:
    """(n,) float64: the mean over `g` outputs of resizing a length-n axis to g, per input.

    Upsampling (n < g) is `F.interpolate(mode="linear", align_corners=False)`, downsampling
    (n > g) `adaptive_avg_pool1d`, equal sizes the identity; each row of the identity matrix
    goes through the operation and is averaged."""
    import torch
    import torch.nn.functional as F

    key = (n, g)
    if key not in _WEIGHTS:
        eye = torch.eye(n, dtype=torch.float64)[None]  # (1, n, n): n one-hot signals of length n
        if n < g:
            out = F.interpolate(eye, size=g, mode="linear", align_corners=False)
        elif n > g:
            out = F.adaptive_avg_pool1d(eye, g)
        else:
            out = eye
        _WEIGHTS[key] = out[0].mean(1)  # (n,)
    return _WEIGHTS[key]


@dataclass
class Features:
    """Pooled features of every probed layer, and what went in.

    Attributes:
        layers: the probed layers in execution order.
        values: (layer name, pool) -> (n, dim) float32 array; `hypercolumn` per single layer
            holds that layer's part of the fused vector (cumulative fusion is done later).
        kept: indices (into the given paths) of the images that loaded, in order.
        hashes: sha256 of each kept image's file, in the order of `kept`.
        failures: (path, reason) of images that could not be read.
        grid: the hypercolumn grid, None when no map was probed.
    """

    layers: list[ProbeLayer]
    values: dict[tuple[str, str], np.ndarray]
    kept: list[int]
    hashes: list[str]
    failures: list[tuple[str, str]]
    grid: tuple[int, int] | None

    def hypercolumn(self, upto: int) -> tuple[np.ndarray, tuple[str, ...]]:
        """Cumulative hypercolumn: maps among layers[0..upto] concatenated -> (n, dim), names."""
        names = tuple(
            layer.name for layer in self.layers[: upto + 1] if (layer.name, "hypercolumn") in self.values
        )
        return np.concatenate([self.values[(n, "hypercolumn")] for n in names], 1), names


def _grid_for(shapes: Sequence[tuple[int, ...]]) -> tuple[int, int] | None:
    maps = [s for s in shapes if len(s) == 3]
    if not maps:
        return None
    return (min(max(s[1] for s in maps), HYPERCOLUMN_GRID), min(max(s[2] for s in maps), HYPERCOLUMN_GRID))


def extract_features(
    lm: LoadedModel,
    paths: Sequence[Path],
    layers: Any = "stages",
    pools: Sequence[str] = ("avg",),
    *,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
    seed: int = 0,
    bilinear_channels: int = BILINEAR_CHANNELS,
    on_batch: Callable[[int], None] | None = None,
) -> Features:
    """Run every image once and pool each selected layer's output on the fly.

    Args:
        lm: the loaded model.
        paths: image files; unreadable ones are skipped and reported in `failures`.
        layers: selection as in `fgscope.capture`.
        pools: from `POOLS`; bilinear and hypercolumn apply to maps only.
        seed: seed of the bilinear random projections.
        bilinear_channels: layers with more channels are projected to this many before
            bilinear pooling.
        on_batch: called with the number of paths handled after each batch (progress).

    Raises:
        ImageError: no image could be read.
        LayerNotFoundError: an unknown layer (before any forward).
    """
    import torch

    from .. import metrics
    from ..capture import capture, select_layers
    from ..device import autocast, resolve_device, resolve_dtype, to_device
    from ..geometry import trace_geometry
    from ..images import LoadedImage, iter_images
    from .stages import assign_stages

    pools = check_pools(pools)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    module = lm.module
    module.to(dev)
    example = torch.zeros(1, 3, *lm.input_size, device=dev)
    selected = list(select_layers(module, layers, example))
    shapes: dict[str, tuple[int, ...]] = {}  # record name -> shape without batch, in run order

    def probe_shapes(rec: Any, _geometry: Any) -> None:
        if rec.tensor.dim() in (2, 4):  # vectors and maps; other outputs are not probed
            shapes.setdefault(rec.name, tuple(int(s) for s in rec.tensor.shape[1:]))

    geo, _ = trace_geometry(module, example, selected, on_record=probe_shapes)
    names = list(shapes)
    grid = _grid_for(list(shapes.values())) if "hypercolumn" in pools else None
    proj = {
        n: _projection(s[0], bilinear_channels, seed, n).to(dev)
        for n, s in shapes.items() if "bilinear" in pools and len(s) == 3 and s[0] > bilinear_channels
    }
    chunks: dict[tuple[str, str], list[np.ndarray]] = {}

    def on_record(rec: Any) -> None:
        if rec.name not in shapes:
            return
        t = rec.tensor.float()
        is_map = t.dim() == 4
        for how in pools:
            if how in ("avg", "max"):
                f = metrics.pool(t, how)
            elif not is_map:
                continue
            elif how == "bilinear":
                f = bilinear_features(t, channels=bilinear_channels, projection=proj.get(rec.name))
            else:
                assert grid is not None
                f = hypercolumn_features([t], grid)
            chunks.setdefault((rec.name, how), []).append(f.float().cpu().numpy())

    kept: list[int] = []
    hashes: list[str] = []
    failures: list[tuple[str, str]] = []
    done = 0
    with capture(module, selected, on_record=on_record, to=None):
        for start in range(0, len(paths), batch_size):
            part = paths[start : start + batch_size]
            tensors = []
            for j, item in enumerate(iter_images(part)):
                if isinstance(item, LoadedImage):
                    tensors.append(lm.preprocess(item.image))
                    kept.append(start + j)
                    hashes.append(item.sha256)
                else:
                    failures.append((str(item.path), item.reason))
            if tensors:
                with autocast(dev, dt):
                    module(to_device(torch.stack(tensors), dev))
            done += len(part)
            if on_batch is not None:
                on_batch(done)
    if not kept:
        reasons = "; ".join(r for _, r in failures[:3])
        raise ImageError(f"none of the {len(failures)} image(s) could be read: {reasons}")
    values = {k: np.concatenate(v) for k, v in chunks.items()}
    geos = [geo.get(n) for n in names]
    strides = [max(g.stride) if g is not None and g.spatial else None for g in geos]
    stages = assign_stages(strides, [len(shapes[n]) == 3 for n in names])
    infos = [
        ProbeLayer(n, i, stages[i], strides[i], max(g.rf) if g is not None else None, shapes[n])
        for i, (n, g) in enumerate(zip(names, geos))
    ]
    return Features(infos, values, kept, hashes, failures, grid)


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

    from .. import metrics
    from ..images import image_folder

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


# --- files -----------------------------------------------------------------------------------

CSV_COLUMNS = ("layer", "index", "stage", "stride", "rf", "pool", "granularity", "acc_mean",
               "acc_std", "chance", "dim")


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}" if v == int(v) else f"{v:.4f}"
    return str(v)


def probe_csv(result: ProbeResult) -> str:
    """One line per row (the `probe.json` rows without the per-fold values)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in result.rows:
        d = r.to_dict()
        w.writerow([_num(d[k]) for k in CSV_COLUMNS])
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
                                         _num(layer.stride) or "–", _num(layer.rf) or "–", *vals]) + " |")
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


_POOL_COLORS = {"avg": "#222222", "max": "#8c8c8c", "bilinear": "#c44e52", "hypercolumn": "#8172b3"}
_GRAN_STYLE = {"fine": ("-", "o"), "coarse": ("--", "s")}


def probe_figure(result: ProbeResult) -> Figure:
    """Accuracy against depth: one line per pooling x granularity, ± std bands, stages
    shaded, chance levels dotted. Returns a `matplotlib.figure.Figure` (7 in wide)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from ..render.style import STYLE, style_context

    layers = list(result.layers)
    xs = {layer.name: i for i, layer in enumerate(layers)}
    series = list(dict.fromkeys((r.pool, r.granularity) for r in result.rows))
    colors = STYLE["stage_colors"]
    with style_context():
        fig = Figure(figsize=(STYLE["double_column_in"], 3.6), layout="constrained")
        ax = fig.add_subplot()
        start = 0
        for i in range(1, len(layers) + 1):
            if i == len(layers) or layers[i].stage != layers[start].stage:
                ax.axvspan(start - 0.5, i - 0.5, color=colors.get(layers[start].stage, "#999999"),
                           alpha=0.12, lw=0)
                start = i
        handles: list[Any] = []
        for pool, gran in series:
            rows = sorted((r for r in result.rows if r.pool == pool and r.granularity == gran),
                          key=lambda r: r.index)
            x = [xs[r.layer] for r in rows]
            m = np.array([r.acc_mean for r in rows])
            s = np.array([r.acc_std for r in rows])
            ls, marker = _GRAN_STYLE[gran]
            col = _POOL_COLORS[pool]
            ax.fill_between(x, m - s, m + s, color=col, alpha=0.10, lw=0)
            ax.plot(x, m, ls=ls, marker=marker, ms=3.5, lw=1.4, color=col)
        # Legend: colour = pooling, line style = label granularity, shading = stage.
        for pool in dict.fromkeys(p for p, _ in series):
            label = "hypercolumn (cumulative)" if pool == "hypercolumn" else pool
            handles.append(Line2D([], [], color=_POOL_COLORS[pool], lw=1.8, label=label))
        for gran in dict.fromkeys(g for _, g in series):
            ls, marker = _GRAN_STYLE[gran]
            handles.append(Line2D([], [], color="#444444", ls=ls, marker=marker, ms=3.5, label=f"{gran} labels"))
        for gran in dict.fromkeys(g for _, g in series):
            ch = next(r.chance for r in result.rows if r.granularity == gran)
            ax.axhline(ch, color="#555555", ls=":", lw=1.0)
            ax.annotate(f"chance ({gran}) {ch:.2f}", (len(layers) - 0.5, ch), xytext=(-2, 2),
                        textcoords="offset points", ha="right", va="bottom", fontsize=STYLE["font_size"],
                        color="#555555", zorder=1)  # under the curves: data stays visible
        ax.set_ylim(0, 1.02)
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_ylabel(f"probe accuracy ({result.folds}-fold CV)")
        rotate = len(layers) > 8
        sep = " " if rotate else "\n"
        labels = [f"{layer.name}{sep}/{_num(layer.stride)}" if layer.stride else layer.name for layer in layers]
        ax.set_xticks(range(len(layers)), labels=labels, rotation=45 if rotate else 0,
                      ha="right" if rotate else "center")
        ax.set_xlabel("layer in execution order  (/n: effective stride n px)")
        present = list(dict.fromkeys(layer.stage for layer in layers))
        handles += [Patch(color=colors.get(s, "#999999"), alpha=0.3, label=s) for s in present]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        n_coarse = f", {len(result.coarse_classes)} coarse" if result.coarse_classes else ""
        ax.set_title(f"Linear probe by depth · {Path(result.model).name} · {result.n_images} images, "
                     f"{len(result.classes)} fine classes{n_coarse}", loc="left")
    return fig


def write_probe_files(run: RunDir, result: ProbeResult) -> None:
    """Write probe.json, probe.csv, probe.md and probe.png (atomically) into `run`."""
    from ..render import save_figure

    write_json(run.file("probe.json"), result.to_json())
    write_text(run.file("probe.csv"), probe_csv(result))
    write_text(run.file("probe.md"), probe_markdown(result))
    for name in ("probe.json", "probe.csv", "probe.md"):
        run.wrote(run.path / name)
    for p in save_figure(probe_figure(result), run.file("probe.png")):
        run.wrote(p)


def model_manifest(lm: LoadedModel) -> dict[str, Any]:
    """The model part of a manifest (source, hash, preprocessing)."""
    src = lm.source
    return {
        "spec": src.spec, "kind": src.kind, "arch": src.arch, "weights": src.weights,
        "path": src.path, "sha256": src.sha256, "notes": list(src.notes),
        "input_size": list(lm.input_size),
    }


def write_manifest_inputs(run: RunDir, lm: LoadedModel, config: Any, result: ProbeResult,
                          feats: Features) -> None:
    """Model, data, images (path, class, sha256), failures, device, options and notes."""
    from ..device import resolve_device

    paths = _data_paths(config.data, config.max_per_class, config.seed)
    run.manifest.update(
        model=model_manifest(lm), data=str(config.data), n_images=result.n_images,
        images=[{"path": str(paths[i][0]), "class": paths[i][1], "sha256": h}
                for i, h in zip(feats.kept, feats.hashes)],
        failures=[{"path": p, "reason": r} for p, r in feats.failures],
        device=str(resolve_device(config.device)), dtype=config.dtype,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        notes=list(result.notes),
    )


def _data_paths(data: str | Path, max_per_class: int | None, seed: int) -> list[tuple[Path, str]]:
    """(path, class name) of the images a probe of `data` uses, in probe order."""
    from ..images import image_folder

    ds = image_folder(data)
    return [(ds.paths[i], ds.classes[ds.labels[i]]) for i in _subsample(ds.labels, max_per_class, seed)]


def seed_everything(seed: int) -> None:
    """Seed torch's global generator, so that a random-init model (`--weights none`) is the
    same in every run with the same seed."""
    import torch

    torch.manual_seed(seed)


def run_probe(config: ProbeConfig, console: Console | None = None) -> tuple[Path, ProbeResult]:
    """Run the whole `probe` job; returns the output folder and the result.

    Raises:
        FgscopeError: bad model, data, coarse map, layers or options (before anything is written).
    """
    from rich.console import Console

    from ..models import load_model

    console = console or Console(quiet=True)
    config.check()
    t0 = started = time.perf_counter()
    seed_everything(config.seed)
    lm = load_model(config.model, **config.model_kwargs)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    result, feats = probe(
        lm, config.data, config.layers, config.pools, coarse_map=config.coarse_map,
        folds=config.folds, seed=config.seed, c=config.c, device=config.device, dtype=config.dtype,
        batch_size=config.batch_size, max_per_class=config.max_per_class, console=console,
    )
    t_probe = time.perf_counter() - t0
    run = RunDir(new_run_dir(config.out, "probe", config.overwrite), "probe", started=started)
    write_manifest_inputs(run, lm, config, result, feats)
    run.time("load_model", t_load)
    run.time("features_and_probes", t_probe)
    t0 = time.perf_counter()
    write_probe_files(run, result)
    run.time("files", time.perf_counter() - t0)
    run.finish()
    print_summary(console, result)
    console.print(f"wrote {len(run.manifest['files']) + 1} files to [bold]{run.path}[/] "
                  "(probe.json/.csv/.md, probe.png, manifest.json)")
    return run.path, result


def print_summary(console: Console, result: ProbeResult) -> None:
    """The pivot table on the console, best value per column in bold; on a narrow terminal
    the means only (probe.md has everything)."""
    from rich import box
    from rich.table import Table

    series = list(dict.fromkeys((r.pool, r.granularity) for r in result.rows))
    cell = {(r.layer, r.pool, r.granularity): r for r in result.rows}
    best = {s: max(r.acc_mean for r in result.rows if (r.pool, r.granularity) == s) for s in series}
    name_w = max(len(layer.name) for layer in result.layers)
    full = 4 + name_w + 8 + 8 + 15 * len(series) <= console.width
    t = Table(title="linear probe accuracy" + (" (mean ± std over folds)" if full else " (mean over folds)"),
              box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True)
    for col in ("#", "layer", "stage", "stride") if full else ("#", "layer", "stride"):
        t.add_column(col, justify="left" if col in ("layer", "stage") else "right", no_wrap=True)
    for p, g in series:
        t.add_column(f"{p} {g}" if full else f"{p[:5]}\n{g}", justify="right", no_wrap=True)
    for layer in result.layers:
        vals = []
        for s in series:
            r = cell.get((layer.name, *s))
            text = "–" if r is None else (f"{r.acc_mean:.3f} ± {r.acc_std:.3f}" if full else f"{r.acc_mean:.3f}")
            vals.append(f"[bold]{text}[/]" if r is not None and r.acc_mean == best[s] else text)
        head = [str(layer.index), layer.name] + ([layer.stage] if full else []) + [_num(layer.stride) or "–"]
        t.add_row(*head, *vals)
    console.print(t)
    chance = {r.granularity: r.chance for r in result.rows}
    console.print("chance (majority class): " + ", ".join(f"{g} {v:.3f}" for g, v in chance.items()))
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}")


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
        raise FgscopeError(f"no probe.json in {folder}", hint="pass the folder of a `fgscope probe` run") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise FgscopeError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "rows" not in data or "classes" not in data:
        raise FgscopeError(f"{path} is not a probe.json (no rows/classes)", hint="pass a `fgscope probe` run folder")
    return data
