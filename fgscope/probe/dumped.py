"""`fgscope probe --from-dump DIR`: the probe's pooled features read from a `fgscope dump`
folder instead of running the model (`dump_features`, `probe_dump`).

What each pooling needs from the dump, per map layer (vectors are used as stored):

- `avg`, `max`: a dump with that `--pool`, or raw maps (`--pool none`, not resized), pooled
  here exactly as the live probe pools them;
- `bilinear`: a `--pool bilinear` dump (the full C x C B-CNN matrix; the probe keeps its
  upper triangle) or raw maps. For a layer with more than `BILINEAR_CHANNELS` channels the
  live probe first applies a seeded random projection; from raw maps it does the same, from a
  stored C x C matrix it cannot, and uses the exact (unprojected) matrix, with a note;
- `hypercolumn`: raw maps (`--pool none`, not resized).

Raw maps are read in blocks of rows, so memory is the pooled features (n x dim) plus one
block. The numbers equal the live run's on the same stored values: with a float32 dump, to
float rounding; a float16 (or bfloat16) dump rounds every stored value to 11 (8) significant
bits first, which moves accuracies by a fold's test image now and then. Stage, stride and
receptive field need the model's geometry, which a dump does not store: those cells are
empty (stage `n/a`), and so the over-compression rule of `advise` cannot use `--part-size`.
Labels are the dump's ImageFolder labels (`index.json` `labels`, `classes`); a dump of
unlabelled inputs is labelled by each image's parent folder name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fgscope.errors import ConfigError
from fgscope.probe.features import (
    BILINEAR_CHANNELS,
    HYPERCOLUMN_GRID,
    Features,
    ProbeLayer,
    _projection,
    bilinear_features,
    check_pools,
    hypercolumn_features,
)
from fgscope.probe.labels import _subsample, load_coarse_map

if TYPE_CHECKING:
    from fgscope.probe.results import ProbeResult
    from fgscope.progress import ProgressFn
    from fgscope.store import Dump

__all__ = ["dump_features", "dump_labels", "dump_pools", "probe_dump"]

_BLOCK_BYTES = 256 << 20  # raw-map rows read at once


def dump_pools(dump: Dump, names: Sequence[str]) -> tuple[str, ...]:
    """The poolings every map layer among `names` can give (vectors give any)."""
    out = []
    for how in ("avg", "max", "bilinear", "hypercolumn"):
        if all(_source(dump.layer(n), how) is not None for n in names):
            out.append(how)
    return tuple(out)


def _source(info: Any, how: str) -> str | None:
    """How pooling `how` is obtained for a stored layer: `raw`, `stored`, `vector`, None."""
    if len(info.source_shape) == 1:
        return "vector" if how in ("avg", "max") else "skip"
    if len(info.source_shape) != 3:
        return "skip"
    if info.pool == "none" and info.resize is None:
        return "raw"
    if info.pool == how and how in ("avg", "max", "bilinear"):
        return "stored"
    return None


def dump_labels(dump: Dump) -> tuple[np.ndarray, tuple[str, ...], str | None]:
    """(labels per row, class names, a note or None): the ImageFolder labels stored in the
    dump, else each image's parent folder name."""
    if dump.labels is not None and dump.classes is not None:
        return dump.labels, tuple(dump.classes), None
    parents = [Path(p).parent.name for p in dump.paths]
    classes = tuple(sorted(set(parents)))
    index = {c: i for i, c in enumerate(classes)}
    note = ("the dump has no labels (its inputs were not an ImageFolder): each image is "
            "labelled by its parent folder name")
    return np.asarray([index[p] for p in parents], dtype=np.int64), classes, note


def dump_features(
    dump: Dump,
    names: Sequence[str],
    pools: Sequence[str],
    rows: np.ndarray,
    *,
    seed: int = 0,
    bilinear_channels: int = BILINEAR_CHANNELS,
    progress: ProgressFn | None = None,
) -> tuple[Features, list[str]]:
    """The probe's pooled features of `rows` of the dump (see the module docstring).

    Returns:
        The features (`kept` = positions in `rows`, `hashes` empty) and notes.

    Raises:
        ConfigError: a layer's storage cannot give an asked-for pooling (naming the layer,
            what it holds and the `fgscope dump` option that would).
    """
    from fgscope.progress import report
    from fgscope.store.analysis import describe_storage, iter_rows

    pools = check_pools(pools)
    infos = {n: dump.layer(n) for n in names}
    for n, info in infos.items():
        if len(info.source_shape) not in (1, 3):
            continue
        for how in pools:
            if _source(info, how) is None:
                need = "--pool none (without --resize-to)" if how == "hypercolumn" else \
                    f"--pool {how} or --pool none (without --resize-to)"
                raise ConfigError(
                    f"layer {n} of the dump {dump.root} holds {describe_storage(info)}, "
                    f"which cannot give {how} pooling",
                    hint=f"dump it with {need}, or probe with --pool "
                    + (",".join(dump_pools(dump, names)) or "of what it holds"),
                )
    shapes = {n: tuple(info.source_shape) for n, info in infos.items() if len(info.source_shape) in (1, 3)}
    maps = [s for s in shapes.values() if len(s) == 3]
    grid = None
    if "hypercolumn" in pools and maps:
        grid = (min(max(s[1] for s in maps), HYPERCOLUMN_GRID), min(max(s[2] for s in maps), HYPERCOLUMN_GRID))
    notes: list[str] = []
    values: dict[tuple[str, str], np.ndarray] = {}
    total = len(rows) * len(shapes)
    done = 0
    for n, shape in shapes.items():
        info = infos[n]
        if len(shape) == 1 or info.pool != "none":
            vals = np.asarray(dump[n][rows] if len(rows) != len(dump) else dump[n][:], np.float32)
            for how in pools:
                src = _source(info, how)
                if src == "vector":
                    values[(n, how)] = vals
                elif src == "stored" and how == "bilinear":
                    k = shape[0]
                    iu = np.triu_indices(k)
                    values[(n, how)] = np.ascontiguousarray(vals.reshape(-1, k, k)[:, iu[0], iu[1]])
                    if k > bilinear_channels:
                        notes.append(f"{n}: bilinear from the stored {k}x{k} matrix, not projected to "
                                     f"{bilinear_channels} channels as a live probe does (other numbers)")
                elif src == "stored":
                    values[(n, how)] = vals
            done += len(rows)
            report(progress, "read features", done, total)
            continue
        import torch

        from fgscope import metrics

        proj = (_projection(shape[0], bilinear_channels, seed, n)
                if "bilinear" in pools and shape[0] > bilinear_channels else None)
        block = max(1, _BLOCK_BYTES // max(1, info.row_bytes))
        for pos, vals in iter_rows(dump[n], rows, block):
            t = torch.from_numpy(vals)
            for how in pools:
                if how in ("avg", "max"):
                    f = metrics.pool(t, how)
                elif how == "bilinear":
                    f = bilinear_features(t, channels=bilinear_channels, projection=proj)
                else:
                    assert grid is not None
                    f = hypercolumn_features([t], grid)
                buf = values.get((n, how))
                if buf is None:
                    buf = values[(n, how)] = np.empty((len(rows), f.shape[1]), np.float32)
                buf[pos[0] : pos[-1] + 1] = f.float().numpy()
            done += len(pos)
            report(progress, "read features", done, total)
    layers = [ProbeLayer(n, i, "n/a", None, None, s) for i, (n, s) in enumerate(shapes.items())]
    return Features(layers, values, list(range(len(rows))), [], [], grid, pools), notes


def probe_dump(
    dump: Dump,
    layers: str | None = None,
    pools: Sequence[str] = ("avg",),
    *,
    coarse_map: str | Path | None = None,
    folds: int = 5,
    seed: int = 0,
    c: float = 1.0,
    max_per_class: int | None = None,
    bilinear_channels: int = BILINEAR_CHANNELS,
    progress: ProgressFn | None = None,
) -> tuple[ProbeResult, Features, np.ndarray]:
    """Probe the stored layers of an open dump (as `fgscope.probe.probe`, no model).

    Returns:
        The result, the features, and the dump rows used (`kept` indexes into them).

    Raises:
        FgscopeError: unknown layers, a pooling the dump cannot give, bad labels or options.
    """
    from fgscope.probe.fit import fit_probes
    from fgscope.store.analysis import pick_layers

    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    names = pick_layers(dump, layers)
    labels, classes, note = dump_labels(dump)
    if len(set(labels.tolist())) < 2:
        raise ConfigError(f"the dump {dump.root} holds one class only ({classes[0]})",
                          hint="a probe needs images of 2 or more classes")
    cmap = load_coarse_map(coarse_map, classes) if coarse_map is not None else None
    rows = np.asarray(_subsample(labels.tolist(), max_per_class, seed), dtype=np.int64)
    feats, notes = dump_features(dump, names, pools, rows, seed=seed,
                                 bilinear_channels=bilinear_channels, progress=progress)
    notes = ([note] if note else []) + notes + [
        f"features read from the dump {dump.root} (the model did not run); stage, stride and "
        "receptive field are not stored there"]
    ident = dump.index.get("manifest", {}).get("identity", {}).get("model", {})
    model = dump.index.get("manifest", {}).get("model", {}).get("spec") or ident.get("arch") or "?"
    result = fit_probes(
        feats, labels[rows], classes, cmap, folds=folds, seed=seed, c=c,
        input_size=tuple(ident.get("input_size") or (0, 0)), model=model, data=str(dump.root),
        bilinear_channels=bilinear_channels, notes=notes, progress=progress,
    )
    return result, feats, rows
