"""`fgscope units`: a unit atlas. What each unit (channel) of every selected layer detects,
measured over the user's whole data set in one streaming pass.

- per unit: its top-K images by peak activation with the peak's map position (exact running
  top-K), mean, max, activation quantiles from a streaming histogram (error at most one bin
  width, reported), and Morcos et al. 2018's class selectivity index when DATA has class
  folders (`fgscope.units.topk`);
- dataset examples: each example cropped at the unit's exact receptive field (start, stride
  and size per axis from `fgscope.geometry`), outside-image pixels shown as grey padding
  (`fgscope.units.crops`), the unit's map over it, the first layer's filters, an overview;
- part localization with `--masks` / `--keypoints`: Network Dissection's IoU at the unit's
  0.995 quantile, the fraction of part-detector units per layer, the best unit per part and
  the pointing game (`fgscope.units.parts`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "BINS": "topk",
    "QUANTILES": "topk",
    "RunningTopK": "topk",
    "QuantileSketch": "topk",
    "ChannelStats": "topk",
    "ClassMeans": "topk",
    "selectivity_index": "topk",
    "PAD": "crops",
    "RFBox": "crops",
    "rf_box": "crops",
    "crop": "crops",
    "KEYPOINT_RADIUS": "parts",
    "IOU_SIDE": "parts",
    "DETECTOR_IOU": "parts",
    "Annotations": "parts",
    "load_masks": "parts",
    "load_keypoints": "parts",
    "iou": "parts",
    "pointing_game": "parts",
    "UnitLayer": "compute",
    "UnitsResult": "compute",
    "compute_units": "compute",
    "RANKS": "figures",
    "choose_units": "figures",
    "UnitsConfig": "run",
    "parse_units": "run",
    "units": "run",
    "run_units": "run",
    "parts_table": "run",
    "load_units": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _CallablePackage(types.ModuleType):
    """`fgscope.units(...)` is the API function even once this package is imported (Python
    then sets the attribute `fgscope.units` to the package itself)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fgscope.units.run import units

        return units(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
