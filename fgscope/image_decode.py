"""Read one image file and decode it to RGB, refusing what would hang, crash or explode.

The decoding half of `fgscope.images` (which holds the public API and says where the limits
come from). Every refusal is an `ImageError` whose message is one line naming the file:

- anything but a regular file (FIFO, socket, device, a link to one) is refused after an
  `os.stat` and before any `open`, since reading a FIFO blocks forever and a device may never end;
- an image with more pixels than the caller's limit (a decompression bomb) is refused by Pillow
  before its pixels are decoded;
- an image whose resize step (shorter side to `resize_size`, as `Preprocess` does) would give
  more than `MAX_RESIZED_PIXELS` pixels is refused from its header: a 40000x1 strip would
  become 10,240,000x256, gigabytes for one input.

torch is deliberately not imported here: the CLI imports this module at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fgscope.errors import FgscopeError, ImageError

__all__ = [
    "MAX_RESIZED_PIXELS",
    "ImageFailure",
    "check_resize",
    "decode",
    "os_error",
    "read_regular",
    "reason",
    "resized_size",
    "show_path",
    "stat_regular",
]

# 64 Mpx (192 MiB as RGB bytes): far above any real resize (a 4:3 photo with its shorter side
# at 1024 is 1.4 Mpx), far below what stops a run. A 40000x1 strip at 256 would be 2.6 Gpx.
MAX_RESIZED_PIXELS = 64 * 2**20

# What Pillow raises on corrupt or truncated data besides OSError (its plugins are not uniform).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
# Pillow reads its pixel limit from a module global; changing it briefly is serialised.
_LIMIT_LOCK = threading.Lock()
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class ImageFailure:
    """An input that could not be loaded, or a folder entry that could not be searched.

    Attributes:
        path: the path as given or found.
        reason: the one-line `ImageError` message (with its hint), the path in it intact.
    """

    path: Path
    reason: str


def show_path(path: str | os.PathLike[str]) -> str:
    """`path` as it appears in a message: exactly as is, or quoted with Python escapes when it
    holds characters that cannot be printed on one line (a newline, a tab, bytes that are not
    UTF-8), so that a message stays one line and the path stays exact, never shortened."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def reason(exc: FgscopeError) -> str:
    """The one-line text of `exc` for a failure list: message and hint, not re-folded.

    `str(exc)` folds every run of whitespace, which would alter a path holding two spaces;
    messages built here are one line already (paths through `show_path`).
    """
    return exc.message if not exc.hint else f"{exc.message} ({exc.hint})"


def _fold(text: object) -> str:
    """A library's message on one line (Pillow's can span several)."""
    return " ".join(str(text).split())


def os_error(
    path: Path, exc: OSError | ValueError, action: str = "cannot load image"
) -> ImageError:
    """The `ImageError` for an OS error on `path` (ValueError: a NUL byte in the path)."""
    head = f"{action} {show_path(path)}"
    if isinstance(exc, ValueError):
        return ImageError(f"{head}: the path contains a NUL byte", "check the path")
    if exc.errno == errno.ELOOP:
        return ImageError(f"{head}: it is a symbolic link loop", "fix or remove the link")
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return ImageError(f"{head}: it is a broken symbolic link", "fix or remove the link")
        return ImageError(f"{head}: no such file", "check the path")
    if isinstance(exc, NotADirectoryError):
        return ImageError(f"{head}: a part of the path is a file, not a folder", "check the path")
    if isinstance(exc, IsADirectoryError):
        return _folder_error(head)
    if isinstance(exc, PermissionError):
        return ImageError(f"{head}: permission denied", "check its permissions")
    return ImageError(f"{head}: {_fold(exc.strerror or exc)}", "check the path")


def _folder_error(head: str) -> ImageError:
    return ImageError(
        f"{head}: it is a folder, not a file",
        "pass the folder as an input to search it for images",
    )


def stat_regular(path: Path, action: str = "cannot load image") -> os.stat_result:
    """`os.stat(path)`, refusing anything but a regular file before anything opens it.

    `os.stat` follows symbolic links, so a link to a FIFO is refused like the FIFO.

    Raises:
        ImageError: missing, unreachable, a folder, or not a regular file.
    """
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        raise os_error(path, exc, action) from None
    if stat.S_ISREG(info.st_mode):
        return info
    head = f"{action} {show_path(path)}"
    if stat.S_ISDIR(info.st_mode):
        raise _folder_error(head)
    kind = next((name for test, name in _KINDS if test(info.st_mode)), "a special file")
    raise ImageError(
        f"{head}: not a regular file but {kind}, so it was not opened",
        "pass image files only",
    )


def read_regular(path: Path) -> bytes:
    """All bytes of the regular file `path`, read once (the hash and the decode see the same).

    The type check and the read are two steps; a file swapped for a FIFO in between would
    still block, which needs someone racing the run on purpose.

    Raises:
        ImageError: not a readable regular file, or empty.
    """
    info = stat_regular(path)
    data = b""
    if info.st_size:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise os_error(path, exc) from None
    if not data:
        raise ImageError(
            f"cannot load image {show_path(path)}: the file is empty", "re-export the image"
        )
    return data


def resized_size(size: tuple[int, int], resize_size: int) -> tuple[int, int]:
    """(W, H) of a (W, H) image once its shorter side is resized to `resize_size`.

    The same arithmetic as torchvision's `resize(img, [resize_size])` (what `Preprocess` does
    before its center crop): the longer side is scaled by the same factor and truncated.
    """
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_size * long / short)
    return (resize_size, new_long) if w <= h else (new_long, resize_size)


def check_resize(path: Path, size: tuple[int, int], resize_size: int | None) -> None:
    """Refuse an image whose resize step would give more than `MAX_RESIZED_PIXELS` pixels.

    Args:
        path: the file, for the message.
        size: (W, H) of the image (its header is enough: the check runs before decoding).
        resize_size: the shorter side's target (`Preprocess.resize_size`); None: no check (a
            plain resize to the crop size cannot explode).

    Raises:
        ImageError: naming the file, its size, the resized size and the bound.
    """
    w, h = size
    if resize_size is None or min(w, h) < 1:
        return
    new_w, new_h = resized_size(size, resize_size)
    if new_w * new_h <= MAX_RESIZED_PIXELS:
        return
    ratio = MAX_RESIZED_PIXELS // resize_size // resize_size
    raise ImageError(
        f"cannot load image {show_path(path)}: it is {w}x{h} pixels and would become "
        f"{new_w:,}x{new_h:,} ({new_w * new_h:,} pixels) when its shorter side is resized to "
        f"{resize_size}, more than the limit of {MAX_RESIZED_PIXELS:,} pixels",
        f"crop it so that its longer side is at most {ratio:,} times its shorter side",
    )


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Apply `max_pixels` to Pillow for one decode, restoring its global limit afterwards.

    Pillow only warns between 1x and 2x its limit (and raises above); both are refused here.
    """
    with _LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode(
    data: bytes, path: Path, max_pixels: int | None, raise_hint: str, resize_size: int | None
) -> Image.Image:
    """Decode the first frame of `data` (the bytes of `path`) to RGB, EXIF orientation applied.

    Args:
        data: the file's bytes.
        path: the file, for messages.
        max_pixels: refuse images with more pixels (decompression bombs); None: no limit.
        raise_hint: how the user raises `max_pixels` (said when an image is refused).
        resize_size: refuse images whose resize step would explode (see `check_resize`).

    Raises:
        ImageError: not an image, corrupt, truncated, too large, or too long for the resize.
    """
    shown = show_path(path)
    try:
        with _pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as img:
            check_resize(path, img.size, resize_size)  # from the header, before decoding
            img.load()  # first frame; decoding here surfaces truncation and corruption
            return _to_rgb(ImageOps.exif_transpose(img), path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found.group(1)):,} pixels)" if found else ""
        limit = f"{max_pixels:,}" if max_pixels is not None else "?"
        raise ImageError(
            f"cannot load image {shown}: it is larger{size} than the limit of {limit} pixels",
            raise_hint,
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"cannot load image {shown}: not a recognised image format, or cut short",
            "check that it is an image, or re-export it as PNG or JPEG",
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"cannot load image {shown}: corrupt or truncated data: {_fold(exc)}",
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
            f"cannot load image {show_path(path)}: colour mode {mode} cannot be converted to RGB",
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
