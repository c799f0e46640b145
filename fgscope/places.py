"""Where each recorded layer sits in the model: its geometry (stride, receptive field) and its
stage. Stages come from the whole model (`fgscope.stages`): one geometry pass records the
model's blocks together with the selection, the blocks' strides define the resolution
levels, and so a layer gets the same stage whichever subset of layers is selected and
whichever command (layers, probe, advise, similarity, cam, report) asks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from fgscope.capture import LayerRecord
from fgscope.geometry import LayerGeometry, trace_geometry
from fgscope.names import plan_records
from fgscope.selection import block_modules
from fgscope.stages import assign_stages

__all__ = ["LayerPlace", "locate_layers", "trace_places"]


@dataclass(frozen=True)
class LayerPlace:
    """Geometry and stage of one recorded layer.

    Attributes:
        name: record name (`features.3`, `layer1.0.relu:2`).
        geometry: stride and receptive field, None when unknown.
        stage: `early`, `middle` or `late` by the rule of `fgscope.stages`, with the
            resolution levels of the whole model's blocks (not of the selection).
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


def trace_places(
    module: nn.Module,
    example_input: Tensor,
    selected: Sequence[str],
    on_record: Callable[[LayerRecord, LayerGeometry | None], None] | None = None,
) -> tuple[dict[str, LayerPlace], int]:
    """Geometry and stage of every record of the `selected` modules, and the model's
    multiply-accumulates per input, from one forward of `example_input`.

    Args:
        module: the model (not changed).
        example_input: (N, C, H, W); only its spatial size matters.
        selected: qualified module names (`fgscope.selection.select_layers`).
        on_record: called with each record of a selected module and its geometry.

    Returns:
        (place per record name of the selected modules, in execution order; MACs per input).
    """
    blocks = set(block_modules(module))
    wanted = plan_records(selected, dict(module.named_modules()))  # `relu:2`, ops: records
    is_block: dict[str, bool] = {}
    of_selection: dict[str, bool] = {}

    def on_rec(rec: LayerRecord, g: LayerGeometry | None) -> None:
        is_block[rec.name] = rec.module_name in blocks
        of_selection[rec.name] = wanted.wants_record(rec)
        if on_record is not None and of_selection[rec.name]:
            on_record(rec, g)

    geo, macs = trace_geometry(module, example_input, ["kw:blocks", *selected], on_record=on_rec)
    names = list(geo)
    stages = assign_stages(
        [max(g.stride) if g is not None and g.spatial else None for g in geo.values()],
        [g is None or g.spatial for g in geo.values()],
        [is_block.get(n, False) for n in names],
    )
    places = {
        n: LayerPlace(n, geo[n], s) for n, s in zip(names, stages) if of_selection.get(n, False)
    }
    return places, macs


def locate_layers(
    module: nn.Module, example_input: Tensor, selected: Sequence[str]
) -> dict[str, LayerPlace]:
    """Geometry and stage of every record of the `selected` modules, in execution order
    (`trace_places` without the MACs)."""
    return trace_places(module, example_input, selected)[0]
