"""Part annotations and the localization scores of Network Dissection (Bau et al. 2017).

Annotations:
- `--masks DIR`: one mask per image, `DIR/<path relative to DATA, suffix .png>` or else
  `DIR/<stem>.png`; 0 is background, every other value a part. `DIR/legend.json`
  ({"1": "wing", "2": "beak"}, or {"wing": 1, ...}) names the values; without it a value v
  is the part `label v` (a binary mask: one part, `label 255` or `label 1`).
- `--keypoints FILE`: rows `image part x y [visible]` (commas or whitespace; a header row
  is skipped): `image` a path relative to DATA or a file stem, (x, y) in pixels of the
  original image, rows with visible = 0 ignored. CUB-200's `part_locs.txt` works as is
  when its `images.txt` (id -> path) and `parts.txt` (id -> name) lie beside it or one
  folder up (in `parts/`). A keypoint becomes a disc of radius `KEYPOINT_RADIUS` x the
  image's shorter side.

Masks go through the model's resize and centre crop (nearest neighbour), so they sit on the
input image, and then to `IOU_SIDE` x `IOU_SIDE` at most (Network Dissection scores at a
similar, reduced resolution). The unit's map is upsampled there (bilinear) and thresholded at
its per-unit top quantile T (`QUANTILES[-1]` = 0.995 by default): A = map >= T.

- IoU(unit, part) = sum over images |A ∩ M| / sum over images |A ∪ M| (data-set-wide, as in
  Network Dissection); images without annotations do not count.
- a unit *detects* a part when its IoU > `DETECTOR_IOU` (0.04, Network Dissection's).
- pointing game (Zhang et al. 2016): over the images where the part is present, the
  fraction where the unit's peak falls inside the part; the peak is the centre of the
  receptive field of the map position with the unit's largest value (on a coarse map the
  upsampled maximum is a flat block, whose first pixel would be a corner).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fgscope.errors import ConfigError

__all__ = [
    "KEYPOINT_RADIUS",
    "IOU_SIDE",
    "DETECTOR_IOU",
    "Annotations",
    "load_masks",
    "load_keypoints",
    "iou",
    "pointing_game",
    "PartScores",
]

KEYPOINT_RADIUS = 0.06
IOU_SIDE = 112
DETECTOR_IOU = 0.04


@dataclass
class Annotations:
    """Part masks per image, found lazily: `parts` names, `mask(i)` the (H0, W0) int label
    image of image i in original pixels (0 background, k = parts[k - 1]) or None."""

    parts: list[str]
    masks: dict[int, Path] = field(default_factory=dict)
    values: list[int] = field(default_factory=list)  # label value of each part (masks)
    points: dict[int, list[tuple[int, float, float]]] = field(default_factory=dict)  # keypoints

    def mask(self, i: int, size: tuple[int, int]) -> np.ndarray | None:
        """(H0, W0) uint8 labels (index into parts + 1) of image i with size (W0, H0), or None."""
        out: np.ndarray | None = None
        if i in self.masks:
            with Image.open(self.masks[i]) as im:
                raw = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I", "I;16") else im)
            if raw.shape[:2] != (size[1], size[0]):
                raise ConfigError(
                    f"mask {self.masks[i]} is {raw.shape[1]}x{raw.shape[0]} but its image is "
                    f"{size[0]}x{size[1]}", hint="masks must have their image's size")
            out = np.zeros(raw.shape[:2], np.uint8)
            for k, v in enumerate(self.values):
                out[raw == v] = k + 1
        if i in self.points:
            img = Image.fromarray(out if out is not None else np.zeros((size[1], size[0]), np.uint8))
            draw = ImageDraw.Draw(img)
            r = KEYPOINT_RADIUS * min(size)
            for k, x, y in self.points[i]:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=k + 1)
            out = np.asarray(img)
        return out


def _relkeys(path: Path, root: Path) -> list[str]:
    try:
        rel = path.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        rel = path.with_suffix("").name
    return [rel, path.stem]


def _legend(folder: Path, seen: set[int]) -> tuple[list[str], list[int]]:
    path = folder / "legend.json"
    if not path.is_file():
        vals = sorted(seen)
        return [f"label {v}" for v in vals], vals
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read mask legend {path}: {exc}", hint="legend.json maps label values to part names") from None
    pairs: list[tuple[int, str]] = []
    try:
        for k, v in (obj.items() if isinstance(obj, dict) else ()):
            pairs.append((int(k), str(v)) if str(k).lstrip("-").isdigit() else (int(v), str(k)))
    except (TypeError, ValueError):
        pairs = []
    if not pairs:
        raise ConfigError(f"mask legend {path} must be a JSON object of label value -> part name",
                          hint='e.g. {"1": "wing", "2": "beak"}')
    pairs = sorted(p for p in pairs if p[0] != 0)
    return [n for _, n in pairs], [v for v, _ in pairs]


def load_masks(folder: Path, paths: list[str], root: Path) -> Annotations:
    """Find each image's mask in `folder` (module docstring).

    Raises:
        ConfigError: no folder, no mask for any image, or a bad legend.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--masks {folder} is not a folder", hint="pass the folder holding one mask PNG per image")
    found: dict[int, Path] = {}
    for i, p in enumerate(paths):
        for key in _relkeys(Path(p), root):
            cand = folder / f"{key}.png"
            if cand.is_file():
                found[i] = cand
                break
    if not found:
        raise ConfigError(f"--masks {folder} has no mask for any of the {len(paths)} images",
                          hint="name each mask like its image (same relative path or stem, .png)")
    seen: set[int] = set()
    if not (folder / "legend.json").is_file():
        for p in list(found.values())[:50]:
            with Image.open(p) as im:
                seen |= {int(v) for v in np.unique(np.asarray(im)) if v != 0}
    parts, values = _legend(folder, seen)
    if not parts:
        raise ConfigError(f"the masks in {folder} have no non-zero label", hint="0 is background; mark parts with 1, 2, ...")
    return Annotations(parts, found, values)


def _id_map(file: Path, name: str) -> dict[str, str]:
    for folder in (file.parent, file.parent.parent):
        p = folder / name
        if p.is_file():
            rows = [ln.split(maxsplit=1) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            return {r[0]: r[1].strip() for r in rows if len(r) == 2}
    return {}


def load_keypoints(file: Path, paths: list[str], root: Path, into: Annotations | None = None) -> Annotations:
    """Read keypoints (module docstring), adding their parts to `into` when given.

    Raises:
        ConfigError: a missing or malformed file, or no row naming one of the images.
    """
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--keypoints {file} does not exist", hint="pass a file of rows: image part x y [visible]") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --keypoints {file}: {exc}") from None
    images, part_names = _id_map(file, "images.txt"), _id_map(file, "parts.txt")
    index: dict[str, int] = {}
    for i, p in enumerate(paths):
        for key in _relkeys(Path(p), root):
            index.setdefault(key, i)
    ann = into or Annotations([])
    matched = 0
    for n, row in enumerate(csv.reader(text.splitlines(), delimiter="," if "," in text else " ", skipinitialspace=True)):
        row = [c for c in row if c != ""]
        if not row:
            continue
        try:
            x, y = float(row[2]), float(row[3])
            visible = float(row[4]) if len(row) > 4 else 1.0
        except (ValueError, IndexError):
            if n == 0:
                continue  # a header
            raise ConfigError(f"--keypoints {file} line {n + 1} is not `image part x y [visible]`: {' '.join(row)[:60]}") from None
        if visible == 0 or not (math.isfinite(x) and math.isfinite(y)):
            continue
        img = images.get(row[0], row[0])
        key = str(Path(img).with_suffix("")) if "/" in img else Path(img).stem
        i = index.get(key, index.get(Path(img).stem))
        if i is None:
            continue
        part = part_names.get(row[1], row[1])
        if part not in ann.parts:
            ann.parts.append(part)
        ann.points.setdefault(i, []).append((ann.parts.index(part), x, y))
        matched += 1
    if not matched:
        raise ConfigError(f"--keypoints {file} has no visible keypoint of any of the {len(paths)} images",
                          hint="the first column must be an image's path relative to DATA or its file stem")
    return ann


# --- scores --------------------------------------------------------------------------------


def iou(active: torch.Tensor, parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersections and unions summed over images.

    active: (N, C, S) bool, where each unit is above its threshold (S pixels per image);
    parts: (N, P, S) bool part masks. Returns (inter (C, P), union (C, P)); IoU = inter / union.
    """
    a = active.to(torch.float64)
    m = parts.to(torch.float64)
    inter = torch.einsum("ncs,nps->cp", a, m)
    union = a.sum(2).sum(0)[:, None] + m.sum(2).sum(0)[None, :] - inter
    return inter, union


def pointing_game(peak: torch.Tensor, parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits and trials: peak (N, C) flat pixel index of each unit's peak, parts (N, P, S) bool.
    Returns (hits (C, P): the peak inside the part, trials (P,): images where the part is present)."""
    present = parts.any(2)  # (N, P)
    at = parts.gather(2, peak[:, None, :].expand(-1, parts.shape[1], -1))  # (N, P, C)
    hits = (at & present[:, :, None]).sum(0).T.to(torch.float64)  # (C, P)
    return hits, present.sum(0).to(torch.float64)


@dataclass
class PartScores:
    """Running sums of one layer's IoU and pointing game over images (see `iou`, `pointing_game`)."""

    inter: torch.Tensor
    union: torch.Tensor
    hits: torch.Tensor
    trials: torch.Tensor

    @classmethod
    def empty(cls, channels: int, parts: int) -> PartScores:
        z = torch.zeros(channels, parts, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone(), torch.zeros(parts, dtype=torch.float64))

    def add(self, active: torch.Tensor, peak: torch.Tensor, parts: torch.Tensor) -> None:
        i, u = iou(active, parts)
        h, t = pointing_game(peak, parts)
        self.inter += i
        self.union += u
        self.hits += h
        self.trials += t

    def iou(self) -> np.ndarray:
        """(C, P) IoU; NaN where the union is empty."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.inter / self.union).numpy()

    def pointing(self) -> np.ndarray:
        """(C, P) pointing-game accuracy; NaN for parts never present."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.hits / self.trials[None, :]).numpy()
