"""`fgscope dump`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

__all__ = ["dump"]


def dump() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope dump` is not implemented yet")
