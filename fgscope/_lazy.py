"""Lazy re-exports for packages: `from fgscope.similarity import run_similarity` works, but
importing the package alone imports none of its modules (and so not torch), which keeps the
CLI's start-up and `import fgscope.layers.figures` light."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, names: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module `__getattr__` and `__dir__` for `package`, where `names` maps each public name
    to the submodule (relative to `package`) that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        setattr(sys.modules[package], name, value)  # once: later lookups are plain attributes
        return value

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
