"""The Typer classes of fgscope's app: how its commands read their arguments and show help.

- Flags (`--overwrite/--no-overwrite`, `--trust`, `--help`) take no value, so their help
  shows no value placeholder (Typer would print `<bool>` for each).
- Options that take several numbers (`--mean`, `--std`: three floats) accept them as one
  comma-separated word as well: `--mean 0.5,0.5,0.5` is `--mean 0.5 0.5 0.5`.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["Command", "Group", "expand_number_lists"]


def _bare_flags(params: Sequence[Any]) -> None:
    for p in params:
        if getattr(p, "is_flag", False) and getattr(p, "metavar", "") is None:
            p.metavar = ""  # shown as is: nothing


def _number_tuple(param: Any) -> bool:
    """An option of several numbers (`tuple[float, float, float]`)."""
    desc = getattr(param, "type_descriptor", None)
    ann = getattr(desc, "annotation", None)
    if typing.get_origin(ann) is not tuple or getattr(param, "nargs", 1) < 2:
        return False
    return all(a in (int, float) for a in typing.get_args(ann))


def expand_number_lists(params: Sequence[Any], args: list[str]) -> list[str]:
    """`--mean 0.5,0.5,0.5` (or `--mean=0.5,0.5,0.5`) -> `--mean 0.5 0.5 0.5` for options of
    several numbers; everything else, and everything after `--`, unchanged.

    Raises:
        typer.BadParameter: a comma-separated value with the wrong count of numbers.
    """
    wanted = {o: p for p in params if _number_tuple(p) for o in p.opts}
    out: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            out += args[i:]
            break
        name, eq, inline = tok.partition("=")
        param = wanted.get(name) if tok.startswith("--") else wanted.get(tok)
        if param is None:
            out.append(tok)
            i += 1
            continue
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        if value is None or "," not in value:
            out.append(tok)
            i += 1
            continue
        parts = [v.strip() for v in value.split(",")]
        if len(parts) != param.nargs or not all(parts):
            raise typer.BadParameter(
                f"takes {param.nargs} numbers, comma-separated or not (e.g. "
                f"{','.join(['0.5'] * param.nargs)}); got {value!r}",
                param_hint=f"'{name}'",
            )
        out += [name, *parts]
        i += 1 if eq else 2
    return out


class Command(TyperCommand):
    """A command of the fgscope app (see the module docstring)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _bare_flags(params)
        return params

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_number_lists(self.params, list(args)))


class Group(TyperGroup):
    """The fgscope app itself: its root options get the same help as the commands'."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _bare_flags(params)
        return params
