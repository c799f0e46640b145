"""`fgscope similarity`: layer-by-layer linear CKA, within a model or against another.

- `cka`: centred Grams and their minibatch accumulation.
- `compute`: `compute_similarity`, streaming the images through one or two models.
- `dumped`: `similarity_from_dump`, the same from a `fgscope dump` folder (no model).
- `run`: the command's job, its files and console table.
- `figure`: the CKA heatmap.
"""

from __future__ import annotations

from fgscope._lazy import lazy_exports

_EXPORTS = {
    "MIN_IMAGES": "compute",
    "SimilarityResult": "compute",
    "compute_similarity": "compute",
    "ImageInfo": "compute",
    "similarity_from_dump": "dumped",
    "centered_gram": "cka",
    "CkaAccumulator": "cka",
    "similarity_figure": "figure",
    "SimilarityConfig": "run",
    "run_similarity": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
