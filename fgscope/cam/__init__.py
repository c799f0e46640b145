"""`fgscope cam`: Grad-CAM at every stage.

- `compute`: classes, gradients and maps (`compute_cams`).
- `run`: the command's job and files.
- `figure`: the panels beside the image.
"""

from __future__ import annotations

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "ClassRef": "compute",
    "CamLayer": "compute",
    "CamResult": "compute",
    "grad_cam": "compute",
    "resolve_class": "compute",
    "compute_cams": "compute",
    "cam_overlay": "figure",
    "cam_figure": "figure",
    "CamConfig": "run",
    "run_cam": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
