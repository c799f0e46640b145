"""`fgscope layers`: the abstraction table, activation grids and hierarchy figures.

- `compute`: `inspect`, the numbers of every layer call on the images.
- `run`: the command's job: files, grids, figures, console table.
- `stream`: the statistics accumulated while the batches flow (bounded memory).
- `results`: `LayerStats`, `ImageInfo`, `InspectResult`.
- `terminal`: what the command prints.
- `figures`: the hierarchy and geometry figures.
"""

from __future__ import annotations

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "LayerStats": "compute",
    "InspectResult": "compute",
    "ImageInfo": "compute",
    "MAX_IMAGES": "compute",
    "inspect": "compute",
    "MIN_IMAGES_FOR_CKA": "compute",
    "STAT_KEYS": "compute",
    "LayersConfig": "run",
    "run_layers": "run",
    "TABLE_COLUMNS": "run",
    "hierarchy_columns": "run",
    "table_csv": "run",
    "table_markdown": "run",
    "hierarchy_figure": "figures",
    "geometry_figure": "figures",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
