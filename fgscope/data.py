"""Data sets for batch jobs: which images, in which order, decoded in a torch `DataLoader`.

`resolve_inputs` turns what the user typed (a folder, an ImageFolder-layout folder, a glob, a
`.txt` list of paths) into an `InputList`: paths in a fixed order, with integer labels and
class names when the layout gives them, and the folders that were skipped while searching
(unreadable, a link loop) as `failures`. `ImageDataset` decodes and preprocesses one input per
item and returns a bad file as a failure instead of raising, so a corrupt image among a
million never stops a run (nor does an image whose resize step would explode: see
`ImageDataset`); `collate` drops failures from the batch and keeps their reasons.
`make_loader` builds the `DataLoader` (worker processes, pinned memory for CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fgscope.errors import ImageError
from fgscope.image_decode import reason, show_path, stat_regular
from fgscope.images import (
    IMAGE_EXTENSIONS,
    ImageFailure,
    MaxPixels,
    discover,
    image_folder,
    load_image,
    resolve_max_pixels,
)

__all__ = [
    "InputList",
    "resolve_inputs",
    "read_path_list",
    "Sample",
    "Batch",
    "ImageDataset",
    "collate",
    "shard_batches",
    "make_loader",
]


@dataclass(frozen=True)
class InputList:
    """The inputs of a batch job, in the order their rows are stored.

    Attributes:
        paths: image paths as strings, as given or found (not resolved), in input order.
        labels: integer label per path (index into `classes`), or None without labels.
        classes: class names (ImageFolder subfolders, sorted), or None.
        failures: folders and entries skipped while searching the inputs (unreadable, a
            symbolic link loop), each with its reason; they are no rows.
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None
    failures: tuple[ImageFailure, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)


def _is_image_folder(folder: Path) -> bool:
    """ImageFolder layout: class subfolders and no images directly in the folder."""
    try:
        with os.scandir(folder) as scan:
            entries = [e for e in scan if not e.name.startswith(".")]
    except OSError:
        return False  # `discover` then says why the folder cannot be searched
    has_dirs = any(_test(e.is_dir) for e in entries)
    has_images = any(
        Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and _test(e.is_file) for e in entries
    )
    return has_dirs and not has_images


def _test(check: Callable[[], bool]) -> bool:
    """`DirEntry.is_dir`/`is_file`, False where the link cannot be followed (a loop)."""
    try:
        return check()
    except OSError:
        return False


def read_path_list(path: str | os.PathLike[str]) -> list[str]:
    """Paths listed in a text file: one per line, relative to the file's folder unless
    absolute; blank lines and lines starting with `#` are skipped; repeats are kept (each is a row).
    Files are not checked here: a missing one becomes a failure when it is loaded.

    Raises:
        ImageError: the list is not a readable regular file (a FIFO would block forever), is
            not UTF-8, or lists nothing.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    stat_regular(path, "cannot read the path list")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ImageError(
            f"cannot read the path list {show_path(path)}: {' '.join(why.split())}",
            "check the file",
        ) from None
    base = path.parent
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):  # a `#` inside a line is part of the name
            continue
        item = Path(os.path.expanduser(line))
        out.append(str(item if item.is_absolute() else base / item))
    if not out:
        raise ImageError(
            f"the path list {show_path(path)} lists no paths", "put one image path per line"
        )
    return out


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> InputList:
    """The images a batch job runs over, in a fixed order.

    - one folder in ImageFolder layout (class subfolders, no loose images): its images class
      by class (classes sorted), labels = class indices, as torchvision's `ImageFolder`;
    - a `.txt` file: the paths it lists (see `read_path_list`), in its order;
    - anything else (files, plain folders searched recursively, globs): `images.discover`.

    Several inputs are concatenated in the order given (without labels). Folders skipped
    while searching (unreadable, a link loop) are the result's `failures`.

    Raises:
        ImageError: nothing given, a missing input, or a folder/pattern without images.
    """
    if not inputs:
        raise ImageError("no inputs given", "pass a folder, a glob or a .txt file listing images")
    if len(inputs) == 1:
        only = Path(os.path.expanduser(os.fspath(inputs[0])))
        if only.is_dir() and _is_image_folder(only):
            found = image_folder(only)
            return InputList(
                tuple(str(p) for p in found.paths), tuple(found.labels), tuple(found.classes),
                tuple(found.failures),
            )
    paths: list[str] = []
    failures: list[ImageFailure] = []
    for raw in inputs:
        item = Path(os.path.expanduser(os.fspath(raw)))
        if item.suffix.lower() == ".txt" and item.is_file():
            paths.extend(read_path_list(item))
        else:
            found = discover([raw])
            paths.extend(str(p) for p in found)
            failures.extend(found.failures)
    failures = list(dict.fromkeys(failures))  # one bad folder reached by two inputs, once
    return InputList(tuple(paths), failures=tuple(failures))


@dataclass(frozen=True)
class Sample:
    """One item of an `ImageDataset`.

    Attributes:
        index: position in the input list.
        image: the preprocessed `(3, H, W)` tensor, None when the input failed.
        label: its label, -1 without labels.
        failure: why the input could not be used (one line), None when it loaded.
    """

    index: int
    image: torch.Tensor | None
    label: int
    failure: str | None = None


@dataclass(frozen=True)
class Batch:
    """A collated batch: the inputs that loaded, and the reasons of those that did not.

    Attributes:
        span: (first, last + 1) input index of every item in the batch, failed ones included.
        indices: `(B,)` int64 input indices of the loaded images, in order.
        images: `(B, 3, H, W)` float32, None when every item failed.
        labels: `(B,)` int64 labels (-1 without labels).
        failures: (input index, reason) of each failed item, in order.
    """

    span: tuple[int, int]
    indices: torch.Tensor
    images: torch.Tensor | None
    labels: torch.Tensor
    failures: tuple[tuple[int, str], ...]

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (`pin_memory=True`)."""
        images = self.images.pin_memory() if self.images is not None else None
        return Batch(self.span, self.indices, images, self.labels, self.failures)


class ImageDataset(Dataset):
    """Decodes and preprocesses the images of an `InputList`; failures are returned, not raised.

    Args:
        paths: image paths in input order.
        preprocess: PIL RGB image -> `(3, H, W)` float tensor (a model's `preprocess`).
        labels: one integer label per path, or None.
        max_pixels: refuse larger images (decompression bombs); None removes the limit;
            "default" is `FGSCOPE_MAX_PIXELS` or Pillow's limit (see `fgscope.images`).

    An image whose resize step would exceed `images.MAX_RESIZED_PIXELS` is a failure naming
    it, not a run-wide out-of-memory: the target is `preprocess.resize_size` when the
    preprocess has one (a `Preprocess` resizes its shorter side to it before the crop).

    Raises:
        ConfigError: a bad `max_pixels` or `FGSCOPE_MAX_PIXELS` (here, not in a worker).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        preprocess: Callable[[Image.Image], torch.Tensor],
        labels: Sequence[int] | None = None,
        max_pixels: MaxPixels = "default",
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
        resolve_max_pixels(max_pixels)  # validated once; each load reads it again (cheap)
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self.labels = list(labels) if labels is not None else None
        self.max_pixels = max_pixels
        # Duck-typed so that any job's preprocess gets the check without passing it along.
        resize = getattr(preprocess, "resize_size", None)
        self.resize_size: int | None = resize if isinstance(resize, int) else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        label = self.labels[index] if self.labels is not None else -1
        path = self.paths[index]
        try:
            image = load_image(path, max_pixels=self.max_pixels, resize_size=self.resize_size)
        except ImageError as exc:
            return Sample(index, None, label, reason(exc))
        try:
            tensor = self.preprocess(image)
        except (ValueError, RuntimeError, OSError) as exc:  # e.g. a degenerate size
            why = " ".join(str(exc).split()) or type(exc).__name__
            return Sample(index, None, label, f"cannot preprocess image {show_path(path)}: {why}")
        return Sample(index, tensor, label)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the images that loaded; keep the failed items' reasons.

    Raises:
        ValueError: an empty batch (a bug in the batch sampler).
    """
    if not samples:
        raise ValueError("collate got an empty batch")
    ok = [s for s in samples if s.image is not None]
    span = (min(s.index for s in samples), max(s.index for s in samples) + 1)
    return Batch(
        span=span,
        indices=torch.tensor([s.index for s in ok], dtype=torch.int64),
        images=torch.stack([s.image for s in ok]) if ok else None,  # (B, 3, H, W)
        labels=torch.tensor([s.label for s in ok], dtype=torch.int64),
        failures=tuple(
            (s.index, s.failure or "unknown failure") for s in samples if s.image is None
        ),
    )


def shard_batches(ranges: Iterable[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of input indices that never cross a range boundary.

    Each `[start, stop)` range (a storage shard) is cut into consecutive batches of
    `batch_size` (the last one shorter), so the batches of a shard are the same whichever
    shard a run starts at: a resumed run computes exactly what an uninterrupted one did.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [
        list(range(b, min(b + batch_size, stop)))
        for start, stop in ranges
        for b in range(start, stop, batch_size)
    ]


def make_loader(
    dataset: Dataset,
    batches: Sequence[Sequence[int]],
    *,
    workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 2,
) -> DataLoader:
    """A DataLoader that yields `Batch`es for the given index batches, in order.

    Args:
        dataset: an `ImageDataset`.
        batches: lists of input indices, one per batch (see `shard_batches`).
        workers: decoding processes; 0 decodes in the calling process.
        pin_memory: collate into pinned memory (for non-blocking copies to CUDA).
        prefetch: batches loaded ahead per worker.
    """
    extra = {"prefetch_factor": prefetch, "persistent_workers": False} if workers > 0 else {}
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        **extra,
    )
