"""Which layers to record: resolve a layer selection to modules before anything runs.

A selection (`LayerSpec`) is `all` (the leaf modules), `blocks` (the model's building blocks,
`block_modules`), `stages` (the last block at each spatial resolution), exact qualified names,
globs (`layer*`) and regexes (`re:^layer[12]$` or `/^layer[12]$/`), one string comma-separated
or a sequence of strings. `select_layers` resolves it to modules in the model's definition
order; an unknown name fails here, before any forward, naming close matches and the command
that lists every layer. `fgscope.capture` records what the selected modules produce.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fgscope.errors import ConfigError, LayerNotFoundError
from fgscope.forward import forward
from fgscope.stages import last_at_each_resolution

if TYPE_CHECKING:
    from fgscope.capture import LayerRecord

__all__ = ["LayerSpec", "select_layers", "leaf_modules", "block_modules"]

LayerSpec = str | Sequence[str] | None
"""`all`, `blocks`, `stages`, exact names, globs (`layer*`) and regexes (`re:^layer[12]$`),
one string comma-separated or a sequence of strings."""

_PURE_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_LIST_HINT = "run `fgscope summary MODEL --layers all` to list every layer name"


def _hookable(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules that accept forward hooks: everything but ScriptModules (torch refuses
    hooks on them) and what lies inside them."""
    out: dict[str, nn.Module] = {}
    opaque: list[str] = []
    for name, m in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in opaque):
            continue
        if isinstance(m, torch.jit.ScriptModule):
            opaque.append(name)
            continue
        out[name] = m
    return out


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Hookable modules without hookable children, by qualified name (the model itself if it
    has none; its record is named `output`)."""
    named = _hookable(model)
    hookable = {id(m) for m in named.values()}
    leaves = {
        n: m for n, m in named.items() if n and not any(id(c) in hookable for c in m.children())
    }
    return leaves or {"": model}


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's building blocks: walking down from the root through pure containers
    (`nn.Sequential`, `nn.ModuleList`, `nn.ModuleDict`, not their subclasses), the first
    module that is a leaf or a module of its own class (a ResNet `BasicBlock`, an
    `InvertedResidual`, a `Conv2dNormActivation`)."""
    out: dict[str, nn.Module] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if isinstance(child, torch.jit.ScriptModule):
                continue
            if type(child) in _PURE_CONTAINERS:
                walk(qual, child)
            else:
                out[qual] = child

    walk("", model)
    return out or {"": model}


def _split_spec(layers: LayerSpec) -> list[str]:
    if layers is None:
        return ["all"]
    items = [layers] if isinstance(layers, str) else list(layers)
    parts = [p.strip() for item in items for p in item.split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise ConfigError("empty layer selection", hint="use all, blocks, stages or names")
    return parts


def _stage_names(model: nn.Module, example_input: torch.Tensor | None) -> list[str]:
    """The last block at each spatial resolution, found with one forward of `example_input`."""
    # Imported here, not at the top: `capture` resolves its own selection with `select_layers`.
    from fgscope.capture import capture

    if example_input is None:
        raise ConfigError(
            "the `stages` selection needs an example input to find where the resolution changes"
        )
    blocks = block_modules(model)
    seen: list[tuple[str, tuple[int, int]]] = []

    def on_record(rec: LayerRecord) -> None:
        t = rec.tensor
        if rec.key is None and t.dim() == 4:
            seen.append((rec.module_name, (int(t.shape[-2]), int(t.shape[-1]))))

    with capture(model, list(blocks), on_record=on_record, to=None):
        forward(model, example_input)
    last = last_at_each_resolution([hw for _, hw in seen])
    return list(dict.fromkeys(seen[i][0] for i in last))


def select_layers(
    model: nn.Module, layers: LayerSpec = "all", example_input: torch.Tensor | None = None
) -> dict[str, nn.Module]:
    """Resolve a layer selection to modules, by qualified name, before anything runs.

    Args:
        model: the model.
        layers: see `LayerSpec`. `stages` needs `example_input` (one dummy forward).
        example_input: an input batch, only used for `stages`.

    Returns:
        Selected modules in the model's definition order.

    Raises:
        LayerNotFoundError: a name or pattern matches no module; close matches are listed.
    """
    named = _hookable(model)
    chosen: set[str] = set()
    for item in _split_spec(layers):
        low = item.lower()
        if low == "all":
            chosen.update(leaf_modules(model))
        elif low == "blocks":
            chosen.update(block_modules(model))
        elif low == "stages":
            chosen.update(_stage_names(model, example_input))
        elif item.startswith("re:") or (len(item) > 2 and item[0] == item[-1] == "/"):
            pattern = item[3:] if item.startswith("re:") else item[1:-1]
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"invalid regular expression {pattern!r}: {exc}") from None
            hits = [n for n in named if n and rx.search(n)]
            if not hits:
                raise LayerNotFoundError(f"regex {pattern!r} matches no layer", hint=_LIST_HINT)
            chosen.update(hits)
        elif any(c in item for c in "*?["):
            hits = [n for n in named if n and fnmatch.fnmatchcase(n, item)]
            if not hits:
                raise LayerNotFoundError(f"pattern {item!r} matches no layer", hint=_LIST_HINT)
            chosen.update(hits)
        elif item in named:
            chosen.add(item)
        else:
            close = difflib.get_close_matches(item, [n for n in named if n], n=5, cutoff=0.5)
            found = f"; did you mean {', '.join(close)}?" if close else ""
            raise LayerNotFoundError(f"no layer named {item!r} in the model{found}", hint=_LIST_HINT)
    return {n: m for n, m in named.items() if n in chosen}
