"""`fgscope report`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

__all__ = ["report"]


def report() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope report` is not implemented yet")
