"""Receptive-field crops: the image region one map unit sees, from fgscope's geometry.

Per axis, unit i of a map with effective stride `j`, receptive field size `r` and effective
padding `p` (`fgscope.geometry.LayerGeometry`) sees input pixels

    start = i * j - p,   end = start + r   (half-open)

in the model's input image (after resize and centre crop). `crop` cuts exactly that box,
and where it reaches past the image it fills the outside with `PAD` (mid grey), so a unit
at the border gets an off-centre image inside a full-size patch: crops are padded, never
shifted back inside the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fgscope.geometry import LayerGeometry

__all__ = ["PAD", "RFBox", "rf_box", "crop"]

PAD = 128
"""Value of the pixels of a crop that lie outside the image."""


@dataclass(frozen=True)
class RFBox:
    """A unit's receptive field in input pixels: rows [top, top + height), cols [left, left + width)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def centre(self) -> tuple[float, float]:
        """(row, column) of the box's centre in input pixels (pixel centres at +0.5)."""
        return self.top + self.height / 2, self.left + self.width / 2


def rf_box(geometry: LayerGeometry, row: int, col: int) -> RFBox:
    """The receptive field of map unit (row, col): (start, size) per axis from `geometry`.

    Non-integer strides (approximate geometry) are rounded to whole pixels.
    """
    (sh, sw), (rh, rw), (ph, pw) = geometry.stride, geometry.rf, geometry.padding
    top = math.floor(row * sh - ph + 0.5)
    left = math.floor(col * sw - pw + 0.5)
    return RFBox(top, left, max(1, round(rh)), max(1, round(rw)))


def crop(image: np.ndarray, box: RFBox, pad: int | float = PAD) -> np.ndarray:
    """Cut `box` out of `image` ((H, W) or (H, W, C)), `pad` outside the image.

    Returns a new (box.height, box.width[, C]) array; the image is not modified.
    """
    h, w = image.shape[:2]
    out = np.full((box.height, box.width, *image.shape[2:]), pad, dtype=image.dtype)
    y0, x0 = max(box.top, 0), max(box.left, 0)
    y1, x1 = min(box.top + box.height, h), min(box.left + box.width, w)
    if y1 > y0 and x1 > x0:
        out[y0 - box.top: y1 - box.top, x0 - box.left: x1 - box.left] = image[y0:y1, x0:x1]
    return out
