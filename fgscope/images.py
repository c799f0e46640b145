"""Find image files and decode any of them to an RGB `PIL.Image.Image`, robustly.

This is the first stage of the data flow. `discover` turns what the user typed (files,
folders, glob patterns) into a list of paths; `load_image` decodes one path to RGB, applying
EXIF orientation and refusing decompression bombs; `load_images` and `iter_images` load many,
turning each bad file into an `ImageFailure` instead of stopping. Every problem a user can
cause is an `ImageError` whose message is one line naming the file and saying what to do.

torch is deliberately not imported here: the CLI imports this module at start-up.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fgscope.errors import ConfigError, ImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LabelledPaths",
    "image_folder",
    "ImageFailure",
    "LoadedImage",
    "default_image",
    "discover",
    "iter_images",
    "load_image",
    "load_images",
    "load_inputs",
    "sha256_file",
]

# `.heic` is left out: Pillow opens it only through the separate `pillow-heif` plugin.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    ".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm".split()
)

_GLOB_CHARS = re.compile(r"[*?\[]")
# What Pillow raises on corrupt or truncated data besides OSError (its plugins are not uniform).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
# Pillow reads its pixel limit from a module global; changing it briefly is serialised.
_LIMIT_LOCK = threading.Lock()
_CHUNK = 1 << 20
_EXTENSION_LIST = ", ".join(sorted(IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class ImageFailure:
    """An input that could not be loaded.

    Attributes:
        path: the path as given.
        reason: the one-line `ImageError` message.
    """

    path: Path
    reason: str


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


def discover(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, folders and glob patterns into a de-duplicated list of image paths.

    A file named explicitly is kept whatever its extension (decoding reports non-images). A
    folder is searched recursively for files with an image extension (case-insensitive),
    skipping hidden files and folders, its content sorted. A pattern (`*`, `?`, `[`, `**`) is
    expanded with `glob(recursive=True)`; matched folders are searched like folders and matched
    files kept if they have an image extension. Order follows `inputs`; repeats are dropped.

    Raises:
        ImageError: an input does not exist, a pattern matches no image, or a folder holds none.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        text = os.path.expanduser(os.fspath(raw))
        path = Path(text)
        if path.is_dir():
            paths = _walk(path)
            if not paths:
                raise ImageError(
                    f"folder {path} contains no files ending in {_EXTENSION_LIST}",
                    "check the folder, or pass the files explicitly",
                )
        elif path.exists():
            paths = [path]
        elif _GLOB_CHARS.search(text):
            paths = _expand_glob(text)
        else:
            raise ImageError(f"no such file or folder: {path}", "check the path")
        for item in paths:
            key = item.resolve()
            if key not in seen:
                seen.add(key)
                found.append(item)
    return found


@dataclass(frozen=True)
class LabelledPaths:
    """An ImageFolder-layout data set: `root/<class>/**/<image>`.

    Attributes:
        paths: image files, class by class (classes sorted by name), each class's files sorted.
        labels: integer label per path (index into `classes`).
        classes: class names (the subfolder names), sorted.
    """

    paths: list[Path]
    labels: list[int]
    classes: list[str]


def image_folder(root: str | os.PathLike[str]) -> LabelledPaths:
    """Read an ImageFolder layout: each non-hidden subfolder of `root` is a class whose
    images (recursive) get its index in the sorted class list, as torchvision's
    `ImageFolder` does.

    Raises:
        ImageError: `root` is not a folder, has no class subfolders, or a class has no images.
    """
    root = Path(os.path.expanduser(os.fspath(root)))
    if not root.is_dir():
        raise ImageError(f"{root} is not a folder", "pass a folder with one subfolder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ImageError(
            f"{root} has no class subfolders",
            "expected ImageFolder layout: ROOT/<class>/<image>",
        )
    paths: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        found = _walk(root / name)
        if not found:
            raise ImageError(
                f"class folder {root / name} contains no files ending in {_EXTENSION_LIST}",
                "remove it or add images",
            )
        paths.extend(found)
        labels.extend([i] * len(found))
    return LabelledPaths(paths, labels, classes)


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = Image.MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode the first frame of an image file to an RGB image, EXIF orientation applied.

    Grey images of more than 8 bits are scaled by their bit depth, float images min-max
    scaled, transparent ones composited on white (see `_to_rgb`).

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this (decompression bombs); the
            default is Pillow's limit, None removes the limit.

    Raises:
        ImageError: missing, unreadable, empty, corrupt, truncated, not an image, or too large.
    """
    path = Path(path)
    return _decode(_read_bytes(path), path, max_pixels)


def iter_images(
    paths: Iterable[str | os.PathLike[str]], *, max_pixels: int | None = Image.MAX_IMAGE_PIXELS
) -> Iterator[LoadedImage | ImageFailure]:
    """Load images one at a time, yielding an `ImageFailure` for each file that fails."""
    for raw in paths:
        path = Path(raw)
        try:
            data = _read_bytes(path)
            image = _decode(data, path, max_pixels)
        except ImageError as exc:
            yield ImageFailure(path, str(exc))
            continue
        yield LoadedImage(path, image, image.size, hashlib.sha256(data).hexdigest())


def load_images(
    paths: Iterable[str | os.PathLike[str]], *, max_pixels: int | None = Image.MAX_IMAGE_PIXELS
) -> tuple[list[LoadedImage], list[ImageFailure]]:
    """Load every path; bad files become failures and the rest still load, in order."""
    loaded: list[LoadedImage] = []
    failures: list[ImageFailure] = []
    for item in iter_images(paths, max_pixels=max_pixels):
        (loaded if isinstance(item, LoadedImage) else failures).append(item)
    return loaded, failures


def load_inputs(
    images: Sequence[str | os.PathLike[str] | Image.Image],
) -> tuple[list[LoadedImage], list[ImageFailure]]:
    """PIL images as given (named `<image i>`), or files, folders and globs discovered and
    loaded, each bad file an `ImageFailure`.

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
    return load_images(discover([os.fspath(p) for p in images]))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB chunks.

    Raises:
        ImageError: the file is missing or unreadable.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise _os_error(path, exc) from exc
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


def _walk(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, hidden entries skipped, sorted by path parts."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths.extend(
            Path(root, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(paths, key=lambda p: p.relative_to(folder).parts)


def _expand_glob(pattern: str) -> list[Path]:
    """Image files matched by `pattern` (matched folders are searched); an error if none."""
    paths: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            paths.extend(_walk(path))
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(path)
    if not paths:
        raise ImageError(
            f"pattern {pattern} matches no files ending in {_EXTENSION_LIST}",
            "check the pattern; quote it so the shell does not expand it",
        )
    return paths


def _read_bytes(path: Path) -> bytes:
    """All bytes of `path`, read once so that the hash and the decode see the same data."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _os_error(path, exc) from exc
    if not data:
        raise ImageError(f"cannot load image {path}: the file is empty", "re-export the image")
    return data


def _os_error(path: Path, exc: OSError) -> ImageError:
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"cannot load image {path}: no such file", "check the path")
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return ImageError(
            f"cannot load image {path}: it is a folder, not a file",
            "pass the folder as an input to search it for images",
        )
    if isinstance(exc, PermissionError):
        return ImageError(f"cannot load image {path}: permission denied", "check its permissions")
    return ImageError(f"cannot load image {path}: {exc.strerror or exc}", "check the path")


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Apply `max_pixels` to Pillow for one decode, restoring its global limit afterwards.

    Pillow only warns between 1x and 2x its limit (and raises above); both are refused here.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels < 1):
        raise ConfigError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    with _LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode(data: bytes, path: Path, max_pixels: int | None) -> Image.Image:
    try:
        with _pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as img:
            img.load()  # first frame; decoding here surfaces truncation and corruption
            return _to_rgb(ImageOps.exif_transpose(img), path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found.group(1)):,} pixels)" if found else ""
        raise ImageError(
            f"cannot load image {path}: it is larger{size} than the limit of {max_pixels:,} pixels",
            "if you trust the file, raise max_pixels or set it to None",
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"cannot load image {path}: not a recognised image format, or cut short",
            "check that it is an image, or re-export it as PNG or JPEG",
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"cannot load image {path}: corrupt or truncated data: {exc}",
            "re-export the image",
        ) from exc


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited on white: a plain `convert("RGB")` drops alpha and
    exposes whatever colour the pixel stores, usually black, which would turn a logo's
    background into a black field the network then "sees".
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        grey = _grey_to_uint8(np.asarray(img), mode)
        return Image.fromarray(grey).convert("RGB")  # (H, W) uint8 -> L -> RGB
    if mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        img, mode = img.convert("LA"), "LA"
    if mode in {"RGBA", "LA", "PA", "RGBa"} or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(
            f"cannot load image {path}: colour mode {mode} cannot be converted to RGB",
            "re-export the image as RGB",
        ) from exc


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) int or float grey -> (H, W) uint8.

    `I;16*` is 16-bit (65535 -> 255, via /257). `I` is a 32-bit container whose real depth
    Pillow does not record, so it is inferred: values in 0..255 are kept, 0..65535 scaled as
    16-bit, anything wider min-max scaled, as is `F` (non-finite values count as the minimum).
    """
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    lo = float(values[finite].min()) if finite.any() else 0.0
    hi = float(values[finite].max()) if finite.any() else 0.0
    values = np.where(finite, values, lo)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi > 255 and hi <= 65535):
        scaled = values / 257.0
    elif mode == "I" and lo >= 0 and hi <= 255:
        scaled = values
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
