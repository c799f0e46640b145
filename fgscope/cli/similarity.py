"""`fgscope similarity`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

__all__ = ["similarity"]


def similarity() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope similarity` is not implemented yet")
