"""Where each recorded layer sits in the model: its geometry (stride, receptive field) and its
stage, with stages assigned over all leaf calls of the model (`fgscope.stages`), so a layer
gets the same stage whichever subset of layers is selected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from fgscope.geometry import LayerGeometry, trace_geometry
from fgscope.stages import assign_stages

__all__ = ["LayerPlace", "locate_layers"]


@dataclass(frozen=True)
class LayerPlace:
    """Geometry and stage of one recorded layer.

    Attributes:
        name: record name (`features.3`, `layer1.0.relu:2`).
        geometry: stride and receptive field, None when unknown.
        stage: `early`, `middle` or `late` among *all* layers of the model (the rule of
            `fgscope.stages` applied to every leaf call plus the selection).
    """

    name: str
    geometry: LayerGeometry | None
    stage: str

    @property
    def stride(self) -> float | None:
        g = self.geometry
        return float(max(g.stride)) if g is not None and g.spatial else None

    @property
    def rf(self) -> float | None:
        return float(max(self.geometry.rf)) if self.geometry is not None else None


def locate_layers(
    module: nn.Module, example_input: Tensor, selected: Sequence[str]
) -> dict[str, LayerPlace]:
    """Geometry and stage of every record of the `selected` modules, in execution order.

    Stages are assigned over all leaf calls of the model, so a layer gets the same stage
    whichever subset is selected.
    """
    geo, _ = trace_geometry(module, example_input, ["all", *selected])
    names = list(geo)
    stages = assign_stages(
        [max(g.stride) if g is not None and g.spatial else None for g in geo.values()],
        [g is None or g.spatial for g in geo.values()],
    )
    return {n: LayerPlace(n, geo[n], s) for n, s in zip(names, stages)}
