"""The small exception family of fgscope.

Every error a user can cause (a missing file, a corrupt image, an unknown layer, a model file
that does not match its architecture) is an `FgscopeError`. Its message is one line that names
the thing and says what to do; the CLI prints it without a traceback and exits with
`exit_code`. Internal invariants use `assert`, never these classes.
"""

from __future__ import annotations

__all__ = [
    "FgscopeError",
    "ModelLoadError",
    "UnsafeModelError",
    "ModelRunError",
    "UnsupportedModelError",
    "ImageError",
    "LayerNotFoundError",
    "ConfigError",
    "DeviceError",
    "OutputError",
    "StoreError",
]


class FgscopeError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line.

    Args:
        message: what was expected and what was found.
        hint: optional next step for the user ("run `fgscope summary MODEL` to list layers").
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        # One line, always: line breaks in details from libraries are folded (only those:
        # a path with two spaces or a tab must stay the same path).
        return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").strip()


class ModelLoadError(FgscopeError):
    """The model spec or file cannot be turned into a working module."""

    exit_code = 3


class UnsafeModelError(ModelLoadError):
    """The file holds pickled code; loading it needs the user's explicit `--trust`."""

    exit_code = 4


class ModelRunError(FgscopeError):
    """The model cannot run on the input it was given (too small for its kernels, wrong rank,
    a program exported for other shapes)."""

    exit_code = 3


class UnsupportedModelError(ModelLoadError):
    """A kind of model fgscope does not inspect (a video model, a quantized model); the
    message names the kind and what to inspect instead."""

    exit_code = 3


class ImageError(FgscopeError):
    """An image path is missing, unreadable, corrupt or refused (decompression bomb)."""

    exit_code = 5


class LayerNotFoundError(FgscopeError):
    """A layer name or pattern matches no module of the model."""

    exit_code = 6


class ConfigError(FgscopeError):
    """Options that are malformed or contradict each other."""

    exit_code = 2


class DeviceError(FgscopeError):
    """The requested device or dtype is not available on this machine."""

    exit_code = 7


class OutputError(FgscopeError):
    """The output folder cannot be written (exists, no permission, disk full)."""

    exit_code = 8


class StoreError(OutputError):
    """A dump folder is damaged or unreadable (a shard's bytes differ from its index)."""

    exit_code = 8
