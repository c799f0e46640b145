"""fgscope: see and measure how a CNN's features change with depth.

The public API mirrors the CLI. Names are imported lazily so that `import fgscope` (and the
CLI's `--help`) stays fast: torch is imported only when something needs it.

    import fgscope
    lm = fgscope.load_model("mobilenet_v2")
    with fgscope.capture(lm.module, layers="stages") as rec:
        lm.module(x)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "fgscope.models",
    "LoadedModel": "fgscope.models",
    "capture": "fgscope.capture",
    "select_layers": "fgscope.selection",
    "LayerRecord": "fgscope.capture",
    "trace_geometry": "fgscope.geometry",
    "trace": "fgscope.geometry",
    "to_nchw": "fgscope.layouts",
    "summarize": "fgscope.summary.compute",
    "inspect": "fgscope.layers.compute",
    "run_layers": "fgscope.layers.run",
    "load_images": "fgscope.images",
    "discover": "fgscope.images",
    "FgscopeError": "fgscope.errors",
    "run_probe": "fgscope.probe",
    "run_similarity": "fgscope.similarity.run",
    "run_cam": "fgscope.cam.run",
    "run_dump": "fgscope.dump.run",
    "run_report": "fgscope.report.run",
    "units": "fgscope.units.run",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in ("store", "metrics", "models", "images", "geometry"):  # submodules
        return importlib.import_module(f"fgscope.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fgscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
