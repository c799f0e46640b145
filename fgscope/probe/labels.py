"""The labels and images of a probe: the fine -> coarse class map, the chance level, and
which images of an ImageFolder a probe uses (at most `max_per_class` per class, seeded), with
the check that every class has enough of them for the folds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fgscope.errors import ConfigError

__all__ = ["load_coarse_map", "chance_level", "probe_paths"]


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


def probe_paths(data: str | Path, max_per_class: int | None, seed: int) -> list[tuple[Path, str]]:
    """(path, class name) of the images a probe of `data` uses, in probe order."""
    from fgscope.images import image_folder

    ds = image_folder(data)
    return [(ds.paths[i], ds.classes[ds.labels[i]]) for i in _subsample(ds.labels, max_per_class, seed)]
