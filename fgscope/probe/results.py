"""What a probe measured: one `ProbeRow` per layer x pooling x granularity, collected in a
`ProbeResult` that round-trips through `probe.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fgscope.probe.features import BILINEAR_CHANNELS, ProbeLayer

__all__ = ["ProbeRow", "ProbeResult"]


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
