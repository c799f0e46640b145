"""Find image files and decode any of them to an RGB `PIL.Image.Image`, robustly.

The first stage of the data flow. `discover` turns what the user typed (files, folders, glob
patterns) into paths, `image_folder` reads an ImageFolder layout; `load_image` decodes one
path to RGB (EXIF orientation applied); `load_images` and `iter_images` load many, each bad
file an `ImageFailure` instead of a stop. Every problem a user can cause is an `ImageError`
whose one-line message names the file (exactly: `image_decode.show_path`) and what to do.
Folders are searched by `image_walk.Walker`: links followed once, never into a loop, and
unreadable folders listed in the `failures` of what `discover` and `image_folder` return.
Only regular files are ever opened (a FIFO named `x.jpg` would block forever).

Limits (each refusal names the file and the way to lift it):

- `max_pixels`: images with more pixels are refused as decompression bombs before decoding.
  Its default, `"default"`, is the environment variable `FGSCOPE_MAX_PIXELS` when set (a
  positive whole number of pixels, `_` or `,` allowed as separators, or `none` for no limit),
  else Pillow's limit of 89,478,485 pixels. It is read at each call, so it reaches every
  command and the decoding worker processes.
- `resize_size`: when given (a model's `Preprocess.resize_size`), images whose shorter side
  resized to it would exceed `MAX_RESIZED_PIXELS` (64 Mpx) are refused, e.g. a 40000x1 strip.

torch is deliberately not imported here: the CLI imports this module at start-up.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from PIL import Image

from fgscope.errors import ConfigError, ImageError
from fgscope.image_decode import (
    MAX_RESIZED_PIXELS,
    ImageFailure,
    decode,
    os_error,
    read_regular,
    reason,
    show_path,
    stat_regular,
)
from fgscope.image_walk import GLOB_CHARS, Walker, files_under, glob_files, real_chain

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_ENV",
    "MAX_RESIZED_PIXELS",
    "Discovered",
    "LabelledPaths",
    "image_folder",
    "ImageFailure",
    "LoadedImage",
    "MaxPixels",
    "default_image",
    "discover",
    "iter_images",
    "load_image",
    "load_images",
    "load_inputs",
    "resolve_max_pixels",
    "sha256_file",
]

# `.heic` is left out: Pillow opens it only through the separate `pillow-heif` plugin.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    ".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm".split()
)
MAX_PIXELS_ENV = "FGSCOPE_MAX_PIXELS"
# Pillow's own default, taken before anything here changes its global for a decode.
_PILLOW_MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS
MaxPixels = Union[int, None, Literal["default"]]  # noqa: UP007 (a runtime alias on 3.10)

_CHUNK = 1 << 20
_EXTENSION_LIST = ", ".join(sorted(IMAGE_EXTENSIONS))
_ENV_HINT = (
    f"if you trust the file, set the environment variable {MAX_PIXELS_ENV} to a larger number "
    "of pixels, or to none to remove the limit"
)
_ARG_HINT = "if you trust the file, pass a larger max_pixels, or None to remove the limit"


@dataclass(frozen=True)
class LoadedImage:
    """One decoded input.

    Attributes:
        path: the path as given.
        image: the decoded RGB image (EXIF orientation applied, first frame only).
        size: (width, height) of `image`, i.e. after the EXIF transpose.
        sha256: hex digest of the file's bytes (the same bytes that were decoded).
    """

    path: Path
    image: Image.Image
    size: tuple[int, int]
    sha256: str


class Discovered(list[Path]):
    """What `discover` found: the image paths (it is a plain list of them), plus `failures`,
    the folders and entries that were skipped while searching (unreadable, a link loop)."""

    def __init__(self, paths: Iterable[Path] = (), failures: Iterable[ImageFailure] = ()):
        super().__init__(paths)
        self.failures: list[ImageFailure] = list(failures)


@dataclass(frozen=True)
class LabelledPaths:
    """An ImageFolder-layout data set: `root/<class>/**/<image>`.

    Attributes:
        paths: image files, class by class (classes sorted by name), each class's files sorted.
        labels: integer label per path (index into `classes`).
        classes: class names (the subfolder names), sorted; a class whose folder could not be
            searched at all is left out (and listed in `failures`).
        failures: folders and entries skipped while searching, each with its reason.
    """

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    failures: list[ImageFailure] = field(default_factory=list)


def resolve_max_pixels(max_pixels: MaxPixels = "default") -> int | None:
    """The pixel limit `max_pixels` stands for (see the module docstring).

    Raises:
        ConfigError: not a positive integer, None or "default", or a malformed
            `FGSCOPE_MAX_PIXELS`.
    """
    return _limit(max_pixels)[0]


def _limit(max_pixels: MaxPixels) -> tuple[int | None, str]:
    """(the limit, how to raise it): the hint must name a knob the caller really has."""
    if isinstance(max_pixels, str) and max_pixels == "default":
        value = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not value:
            return _PILLOW_MAX_PIXELS, _ENV_HINT
        if value.lower() == "none":
            return None, _ENV_HINT
        digits = value.replace(",", "").replace("_", "")
        pixels = int(digits) if digits.isdigit() else 0
        if pixels < 1:
            raise ConfigError(
                f"the environment variable {MAX_PIXELS_ENV} must be a positive whole number of "
                f"pixels or none, got {value!r}",
                "fix or unset it",
            )
        return pixels, _ENV_HINT
    integral = isinstance(max_pixels, numbers.Integral) and not isinstance(max_pixels, bool)
    if max_pixels is not None and (not integral or max_pixels < 1):
        raise ConfigError(
            f"max_pixels must be a positive integer, None or 'default', got {max_pixels!r}"
        )
    return (int(max_pixels) if max_pixels is not None else None), _ARG_HINT


def discover(inputs: Sequence[str | os.PathLike[str]]) -> Discovered:
    """Expand files, folders and glob patterns into a de-duplicated list of image paths.

    A file named explicitly is kept whatever its extension (decoding reports non-images, and
    refuses FIFOs and devices without opening them). A folder is searched recursively for
    files with an image extension (case-insensitive), skipping hidden files and folders, its
    content sorted; links to folders are followed once, never into a loop. A pattern (`*`,
    `?`, `[`, `**`) is expanded like `glob(recursive=True)`; matched folders are searched like
    folders and matched files kept if they have an image extension. Order follows `inputs`;
    repeats are dropped. Folders that could not be searched are in the result's `failures`.

    Raises:
        ImageError: an input does not exist (or is a broken link), a pattern matches no image,
            or a folder holds none (or cannot be read).
    """
    found = Discovered()
    seen: set[str] = set()
    for raw in inputs:
        text = os.path.expanduser(os.fspath(raw))
        path = Path(text)
        before = len(found.failures)
        if path.is_dir():
            paths = files_under(path, IMAGE_EXTENSIONS, found.failures)
            if not paths:
                raise _nothing_found(f"folder {show_path(path)}", found.failures[before:])
        elif path.exists():
            paths = [path]
        elif os.path.lexists(path):  # a link that leads nowhere: says broken or a loop
            stat_regular(path, "cannot use input")
            paths = [path]  # its target appeared meanwhile
        elif GLOB_CHARS.search(text):
            paths = glob_files(text, IMAGE_EXTENSIONS, found.failures)
            if not paths:
                raise _nothing_found(
                    f"pattern {show_path(text)}", found.failures[before:],
                    "check the pattern; quote it so the shell does not expand it",
                )
        else:
            raise ImageError(f"no such file or folder: {show_path(path)}", "check the path")
        for item in paths:
            key = os.path.realpath(item)  # unlike Path.resolve, never raises on a link loop
            if key not in seen:
                seen.add(key)
                found.append(item)
    unique = {(f.path, f.reason): f for f in found.failures}  # two patterns, one bad folder
    found.failures = list(unique.values())
    return found


def _nothing_found(
    what: str,
    failures: Sequence[ImageFailure],
    hint: str = "check the folder, or pass the files explicitly",
) -> ImageError:
    """The error for a folder or pattern without images, saying why when folders failed."""
    if failures:
        more = len(failures) - 1
        tail = f"; {more} more folder(s) could not be searched" if more else ""
        return ImageError(f"{what} gave no image: {failures[0].reason}{tail}")
    matches = "matches no" if what.startswith("pattern") else "contains no"
    return ImageError(f"{what} {matches} files ending in {_EXTENSION_LIST}", hint)


def image_folder(root: str | os.PathLike[str]) -> LabelledPaths:
    """Read an ImageFolder layout: each non-hidden subfolder of `root` is a class whose
    images (recursive) get its index in the sorted class list, as torchvision's
    `ImageFolder` does.

    A subfolder that links back to `root` (or above) is a loop, not a class; a class folder
    that cannot be searched is left out; both are listed in the result's `failures`, as are
    unreadable folders inside classes.

    Raises:
        ImageError: `root` is not a readable folder, has no class subfolders, or a class has
            no images (and no unreadable folder explains it).
    """
    root = Path(os.path.expanduser(os.fspath(root)))
    if not root.is_dir():
        raise ImageError(
            f"{show_path(root)} is not a folder", "pass a folder with one subfolder per class"
        )
    failures: list[ImageFailure] = []
    stop = real_chain(root)  # a link to the root or above would search the data set in a class
    subfolders = Walker(failures, stop).subfolders(root)
    if subfolders is None:
        raise ImageError(failures[0].reason)
    if not subfolders:
        if failures:
            raise ImageError(f"{show_path(root)} has no usable class folder: {failures[0].reason}")
        raise ImageError(
            f"{show_path(root)} has no class subfolders",
            "expected ImageFolder layout: ROOT/<class>/<image>",
        )
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for folder in subfolders:
        before = len(failures)
        found = files_under(folder, IMAGE_EXTENSIONS, failures, stop)
        if not found and len(failures) == before:
            raise ImageError(
                f"class folder {show_path(folder)} contains no files ending in {_EXTENSION_LIST}",
                "remove it or add images",
            )
        if not found:  # its folders could not be searched: listed, the others still run
            if all(f.path != folder for f in failures[before:]):
                failures.append(ImageFailure(folder, (
                    f"skipped class folder {show_path(folder)}: none of its images could be "
                    "reached (its unreadable folders are listed)"
                )))
            continue
        paths.extend(found)
        labels.extend([len(classes)] * len(found))
        classes.append(folder.name)
    if not classes:
        raise ImageError(f"{show_path(root)} has no usable class folder: {failures[0].reason}")
    return LabelledPaths(paths, labels, classes, failures)


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: MaxPixels = "default",
    resize_size: int | None = None,
) -> Image.Image:
    """Decode the first frame of an image file to an RGB image, EXIF orientation applied.

    Grey images of more than 8 bits are scaled by their bit depth, float images min-max
    scaled, transparent ones composited on white.

    Args:
        path: the image file (a regular file: FIFOs and devices are refused unopened).
        max_pixels: refuse images with more pixels than this (decompression bombs); None
            removes the limit; "default" reads `FGSCOPE_MAX_PIXELS` (module docstring).
        resize_size: the shorter side the caller resizes to (`Preprocess.resize_size`), to
            refuse images that would exceed `MAX_RESIZED_PIXELS` after it; None: no check.

    Raises:
        ImageError: missing, unreadable, not a regular file, empty, corrupt, truncated, not an
            image, too large, or too long for the resize.
        ConfigError: a bad `max_pixels` or `FGSCOPE_MAX_PIXELS`.
    """
    limit, hint = _limit(max_pixels)
    path = Path(path)
    return decode(read_regular(path), path, limit, hint, resize_size)


def iter_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: MaxPixels = "default",
    resize_size: int | None = None,
) -> Iterator[LoadedImage | ImageFailure]:
    """Load images one at a time (as `load_image`), yielding an `ImageFailure` for each file
    that fails."""
    limit, hint = _limit(max_pixels)  # a bad limit stops the run: it is no image's fault
    for raw in paths:
        path = Path(raw)
        try:
            data = read_regular(path)
            image = decode(data, path, limit, hint, resize_size)
        except ImageError as exc:
            yield ImageFailure(path, reason(exc))
            continue
        yield LoadedImage(path, image, image.size, hashlib.sha256(data).hexdigest())


def load_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: MaxPixels = "default",
    resize_size: int | None = None,
) -> tuple[list[LoadedImage], list[ImageFailure]]:
    """Load every path; bad files become failures and the rest still load, in order."""
    loaded: list[LoadedImage] = []
    failures: list[ImageFailure] = []
    for item in iter_images(paths, max_pixels=max_pixels, resize_size=resize_size):
        (loaded if isinstance(item, LoadedImage) else failures).append(item)
    return loaded, failures


def load_inputs(
    images: Sequence[str | os.PathLike[str] | Image.Image],
    *,
    max_pixels: MaxPixels = "default",
    resize_size: int | None = None,
) -> tuple[list[LoadedImage], list[ImageFailure]]:
    """PIL images as given (named `<image i>`), or files, folders and globs discovered and
    loaded (as `load_images`); the failures are the folders `discover` skipped, then the
    files that did not load.

    Raises:
        ImageError: PIL images mixed with paths, or an input path that does not exist.
    """
    pil = [im for im in images if isinstance(im, Image.Image)]
    if pil:
        if len(pil) != len(images):
            raise ImageError("pass either PIL images or paths, not both")
        return [
            LoadedImage(path=Path(f"<image {i}>"), image=im.convert("RGB"), size=im.size, sha256="")
            for i, im in enumerate(pil)
        ], []
    found = discover([os.fspath(p) for p in images])  # type: ignore[arg-type]
    loaded, failures = load_images(found, max_pixels=max_pixels, resize_size=resize_size)
    return loaded, [*found.failures, *failures]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a regular file, read in 1 MiB chunks.

    Raises:
        ImageError: the file is missing, unreadable or not a regular file.
    """
    path = Path(path)
    stat_regular(path)  # a FIFO would block the read forever
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise os_error(path, exc) from exc
    return digest.hexdigest()


def default_image() -> Path:
    """The sample photo shipped with matplotlib (Grace Hopper, 512x600 JPEG).

    Raises:
        ImageError: this matplotlib installation does not include its sample data.
    """
    from matplotlib.cbook import get_sample_data  # lazy: matplotlib is slow to import

    # With asfileobj=False matplotlib only builds the path (a str); it does not check it.
    path = Path(get_sample_data("grace_hopper.jpg", asfileobj=False))
    if not path.is_file():
        raise ImageError(f"matplotlib's sample image is missing: {path}", "pass an image path")
    return path
