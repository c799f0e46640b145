"""Notes about a model: what fgscope can and cannot record from it, which output it used.

The library never prints (it takes a console or returns data), so a note is a warning of the
category `Note`; the CLI prints each as one yellow `note:` line on stdout, once per command
(`fgscope.cli._common`), and in Python it is an ordinary `UserWarning` subclass that can be
filtered. Notes also stay in the model's `ModelSource.notes` (written to manifest.json).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

__all__ = ["Note", "note", "announce"]


class Note(UserWarning):
    """Something about the model a user should know (not an error)."""


def note(text: str, category: type[Note] = Note) -> None:
    """Emit `text` as a `Note` (shown once per command by the CLI)."""
    warnings.warn(category(" ".join(str(text).split())), stacklevel=2)


def announce(notes: Iterable[str]) -> None:
    """Emit each of a model's notes (`ModelSource.notes`) once."""
    for text in dict.fromkeys(notes):
        note(text)
