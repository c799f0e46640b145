"""`fgscope dump`: activations of whole data sets to sharded safetensors (format: `fgscope.store`).

- `plan`: options, the part of the inputs this process takes, the stored layers.
- `loop`: the streaming forward loop and the --out folder.
- `run`: `run_dump` and `merge_dump`.
"""

from __future__ import annotations

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "POOLS": "plan",
    "DTYPES": "plan",
    "DumpConfig": "plan",
    "DumpResult": "run",
    "run_dump": "run",
    "merge_dump": "run",
    "parse_hw": "plan",
    "parse_shard": "plan",
    "resolve_part": "plan",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
