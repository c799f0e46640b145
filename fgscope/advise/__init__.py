"""`fgscope advise`: a written recommendation from the linear probes.

- `rules`: `make_advice`, the rules that turn probe numbers into advice.
- `run`: the command's job.
"""

from __future__ import annotations

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "AdviseConfig": "run",
    "Advice": "rules",
    "make_advice": "rules",
    "run_advise": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
