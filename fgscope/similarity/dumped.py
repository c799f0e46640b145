"""`fgscope similarity --from-dump DIR`: linear CKA between the stored layers of a
`fgscope dump` folder, without the model (`similarity_from_dump`).

A layer's representation of an image is what the dump stores for it, flattened: the raw map
(`--pool none`, C*H*W numbers, exactly what a live `similarity` run compares), a map resized
with `--resize-to`, or a pooled vector (`avg`, `max`: C numbers; `bilinear`: C*C). Only raw
maps give the live run's numbers; CKA of pooled features is another (coarser) quantity, and
the result says which (`features`, in similarity.json and the manifest). The images are
batched exactly as a live run batches them (`_batches`: the same rows in the same minibatches),
so with a float32 dump of raw maps the matrices equal the live run's to float rounding; a
float16 dump rounds every stored value to 11 significant bits first (CKA moves in the third
or fourth decimal). Memory: one minibatch of rows of one layer at a time (`minibatch`); for
`full`, one layer's features of all images at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fgscope.errors import ConfigError
from fgscope.places import LayerPlace
from fgscope.similarity.cka import CkaAccumulator, centered_gram
from fgscope.similarity.compute import MIN_IMAGES, ImageInfo, SimilarityResult, _batches

__all__ = ["similarity_from_dump", "dump_features_text"]


def dump_features_text(dump: object, names: list[str]) -> str:
    """What the compared representations are, in words (for similarity.json)."""
    from fgscope.store.analysis import describe_storage

    kinds = list(dict.fromkeys(describe_storage(dump.layer(n)).split(" (")[0] for n in names))  # type: ignore[attr-defined]
    if kinds == ["raw map"]:
        return "each layer's whole output per image, flattened (not pooled), read from a dump"
    return ("what the dump stores per layer, flattened: " + ", ".join(kinds)
            + " (CKA of pooled or resized features, not of the whole outputs)")


def similarity_from_dump(
    dump: object,
    layers: str | None = None,
    *,
    batch_size: int = 32,
    minibatch: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> SimilarityResult:
    """Linear CKA (biased and debiased) between the stored layers of an open dump.

    Raises:
        ConfigError: fewer than 4 rows, or batch_size < 4.
        LayerNotFoundError: a selected layer that is not stored.
    """
    from fgscope.store import Dump
    from fgscope.store.analysis import pick_layers

    assert isinstance(dump, Dump)
    if batch_size < 4:
        raise ConfigError(f"--batch-size must be at least 4 for CKA, got {batch_size}")
    names = pick_layers(dump, layers)
    n = len(dump)
    if n < MIN_IMAGES:
        raise ConfigError(f"similarity needs at least {MIN_IMAGES} images, the dump {dump.root} holds {n}")
    method, batches = _batches(n, batch_size, minibatch)
    notes = [f"features read from the dump {dump.root} (the model did not run); stages and "
             "strides are not stored there"]
    if method == "full" and minibatch:
        notes.append(f"{n} images are fewer than two batches of {batch_size}: CKA computed on all "
                     f"{n} at once (n x n Grams) instead of in minibatches")

    def grams(idx: np.ndarray, name: str) -> torch.Tensor:
        x = dump[name][int(idx[0]) : int(idx[-1]) + 1]  # batches are contiguous rows
        return centered_gram(torch.from_numpy(np.asarray(x, dtype=np.float32)))

    acc = CkaAccumulator(len(names))
    if method == "minibatch":
        for done, idx in enumerate(batches, 1):
            acc.update([grams(idx, nm) for nm in names])
            if progress is not None:
                progress(done, len(batches))
    else:
        everything = np.arange(n)
        ks = []
        for done, nm in enumerate(names, 1):
            ks.append(grams(everything, nm))
            if progress is not None:
                progress(done, len(names))
        acc.update(ks)
    cka, cka_u = acc.compute()
    places = [LayerPlace(nm, None, "n/a") for nm in names]
    images = [ImageInfo(Path(p), None, "") for p in dump.paths]
    ident = dump.index.get("manifest", {}).get("identity", {})
    return SimilarityResult(
        layers_x=names, layers_y=names, places_x=places, places_y=places, cka=cka,
        cka_debiased=cka_u, method=method, batch_size=batch_size, n_batches=acc.batches,
        images=images, failures=[], model=None, vs_model=None, vs_preprocess=None,
        device="none (read from a dump)", dtype=str(ident.get("dtype", "")), notes=tuple(notes),
        features=dump_features_text(dump, names),
    )

