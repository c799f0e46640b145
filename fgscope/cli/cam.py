"""`fgscope cam`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

__all__ = ["cam"]


def cam() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope cam` is not implemented yet")
