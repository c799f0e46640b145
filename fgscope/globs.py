"""Layer globs: `*` within one name component, `**` across components, as path globs split
at slashes (used by `fgscope.selection`; `glob_regex` documents the rules)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

__all__ = ["glob_regex", "glob_names"]


def _component_regex(part: str) -> str:
    """One name component of a glob (no dots) as a regex: `*` any run of characters but a
    dot, `?` one such character, `[abc]` / `[!abc]` a class, everything else literal."""
    out: list[str] = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c == "*":
            while i + 1 < n and part[i + 1] == "*":  # `a**b` inside one component is `a*b`
                i += 1
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and (end := part.find("]", i + 2 if part[i + 1 : i + 2] in ("!", "^") else i + 1)) > i:
            body = part[i + 1 : end]
            neg = body[:1] in ("!", "^")
            body = body[1:] if neg else body
            out.append("[" + ("^." if neg else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A layer glob as a compiled regex over qualified names, matched whole.

    Components are split at dots, as path globs split at slashes: `*` matches within one
    component (`layer*` is `layer1` .. `layer4`, not `layer1.0.conv1`), `**` as a whole
    component matches any number of components (`layer3.**` is everything inside `layer3`,
    `**.conv1` every `conv1` at any depth, `features.**.0` every first child below
    `features`); `?` and `[...]` match one character of a component.
    """
    parts = pattern.split(".")
    rx = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            if last:  # one or more components (after `a.`: inside a, not a itself)
                rx += r"[^.]+(?:\.[^.]+)*"
            else:  # zero or more components, each with its dot
                rx += r"(?:[^.]+\.)*"
            continue
        rx += _component_regex(part) + ("" if last else r"\.")
    return re.compile(rx)


def glob_names(names: Iterable[str], pattern: str) -> list[str]:
    """The names (in their order) that the glob `pattern` matches whole (see `glob_regex`)."""
    rx = glob_regex(pattern)
    return [n for n in names if n and rx.fullmatch(n)]
