"""`fgscope summary`: shapes, strides, receptive fields and parameters, without images."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fgscope.capture import LayerRecord
from fgscope.geometry import LayerGeometry, trace
from fgscope.selection import LayerSpec

__all__ = ["SummaryRow", "ModelSummary", "summarize"]


@dataclass(frozen=True)
class SummaryRow:
    """One recorded layer call of a dummy forward.

    Attributes:
        index: position in execution order.
        name: record name (`layer1.0.relu:2`, `aux[0]`).
        type: module class name.
        shape: output shape without the batch dimension: [C, H, W] or [F].
        stride: effective stride in input pixels (the larger of H and W); None for vectors
            (after global pooling) and when unknown.
        rf: theoretical receptive field in input pixels (the larger of H and W); for vectors
            the union of all units of the last map; None if unknown.
        stride_hw, rf_hw, padding_hw: per axis (H, W); padding = effective padding.
        rf_exact: False when the geometry involved an approximation.
        global_context: a broadcast global gate (squeeze-excitation) feeds this layer.
        params: parameters of the module (including its submodules); 0 for a functional
            operation (`layer1.0.add`).
        rf_note: why `rf_exact` is False (the first reason, `(+k more)`), None when exact.
        layout: where the map is in the output: `NCHW`, `NHWC`, `tokens`, `vector`, ...
            (`fgscope.layouts`); None when unknown.
    """

    index: int
    name: str
    type: str
    shape: list[int]
    stride: float | None
    rf: float | None
    stride_hw: list[float] | None
    rf_hw: list[float] | None
    padding_hw: list[float] | None
    rf_exact: bool
    global_context: bool
    params: int
    rf_note: str | None = None
    layout: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelSummary:
    """The summary table plus totals.

    Attributes:
        rows: one per recorded layer call.
        input_size: (H, W) of the dummy input.
        total_params: unique parameters of the model.
        trainable_params: those with `requires_grad`.
        macs: multiply-accumulates of convolutions and linear layers per image.
        notes: things the terminal should say once (functional operations that change the
            representation and that the selection does not record).
    """

    rows: list[SummaryRow]
    input_size: tuple[int, int]
    total_params: int
    trainable_params: int
    macs: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "macs": self.macs,
            "notes": list(self.notes),
            "layers": [r.to_dict() for r in self.rows],
        }


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(
    model: nn.Module,
    input_size: tuple[int, int] = (224, 224),
    layers: LayerSpec = "all",
    in_channels: int = 3,
    device: torch.device | str = "cpu",
    report_ops: bool = True,
) -> ModelSummary:
    """Trace one dummy input of `input_size` through `model` and tabulate every selected call.

    With `report_ops`, `notes` names the functional operations that change the representation
    and that the selection does not record (`fgscope.geometry.trace`); a model torch.fx cannot
    trace costs one more forward for it.

    Raises:
        LayerNotFoundError: an unknown layer name, before anything runs.
    """
    x = torch.zeros(1, in_channels, *input_size, device=device)
    modules = dict(model.named_modules())
    rows: list[SummaryRow] = []

    def on_record(rec: LayerRecord, geo: LayerGeometry | None) -> None:
        spatial = geo is not None
        is_map = spatial and geo.spatial  # vectors: no stride, the rf is all units' union
        rows.append(
            SummaryRow(
                index=len(rows),
                name=rec.name,
                type=rec.module_type,
                shape=[int(s) for s in rec.tensor.shape[1:]],
                stride=max(geo.stride) if is_map else None,
                rf=max(geo.rf) if spatial else None,
                stride_hw=list(geo.stride) if is_map else None,
                rf_hw=list(geo.rf) if spatial else None,
                padding_hw=list(geo.padding) if spatial else None,
                rf_exact=geo.exact if spatial else False,
                global_context=geo.global_context if spatial else False,
                params=_params(modules[rec.module_name]) if rec.op is None else 0,
                rf_note=geo.note if spatial else None,
                layout=geo.layout.label if spatial and geo.layout is not None else None,
            )
        )

    traced = trace(model, x, layers, on_record=on_record, report_ops=report_ops)
    macs = traced.macs
    note = traced.missed_note()
    unique = {id(p): p for p in model.parameters()}.values()
    return ModelSummary(
        rows=rows,
        input_size=tuple(input_size),
        total_params=sum(p.numel() for p in unique),
        trainable_params=sum(p.numel() for p in unique if p.requires_grad),
        macs=macs,
        notes=[note] if note else [],
    )
