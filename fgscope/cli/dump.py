"""`fgscope dump`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

__all__ = ["dump", "dump_merge"]


def dump() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope dump` is not implemented yet")


def dump_merge() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope dump-merge` is not implemented yet")
