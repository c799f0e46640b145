"""`fgscope advise`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

__all__ = ["advise"]


def advise() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope advise` is not implemented yet")
