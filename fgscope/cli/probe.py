"""`fgscope probe`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

__all__ = ["probe"]


def probe() -> None:
    """(in development)"""
    from ..errors import FgscopeError

    raise FgscopeError("`fgscope probe` is not implemented yet")
