"""`fgscope summary`: every layer call's shape, stride, receptive field and parameters, no images.
"""

from __future__ import annotations

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "SummaryRow": "compute",
    "ModelSummary": "compute",
    "summarize": "compute",
    "SummaryConfig": "run",
    "run_summary": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
