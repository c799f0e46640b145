"""Which layers to record: resolve a layer selection to modules before anything runs.

A selection (`LayerSpec`) is `all` (the leaf modules), `blocks` (the model's building blocks,
`block_modules`), `stages` (the last block at each spatial resolution), `ops` (every
functional operation, `fgscope.functional`), exact qualified names, exact record names as
fgscope prints them (`layer1.0.relu:2`, `backbone[out]`, `fgscope.names`), torch.fx node names
as `get_graph_node_names` prints them (`layer1.0.add`, `layer1.0.relu_1`),
globs (`layer*`: `*` within one name component, `**` across components, as in path globs;
see `glob_regex`) and regexes (`re:^layer[12]$` or `/^layer[12]$/`), one string
comma-separated or a sequence of strings. `select_layers` resolves it to modules in the
model's definition order; an unknown name fails here, before any forward, naming close
matches and the command that lists every layer; globs and regexes that select more than
`DEFAULT_MAX_LAYERS` layers are refused unless allowed (`layer_limit`). `fgscope.capture`
records what the selected modules produce.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import nn

from fgscope.errors import ConfigError, LayerNotFoundError
from fgscope.forward import forward
from fgscope.functional import op_names
from fgscope.names import OPS, EveryCall, RecordName, alias_of_call, parse_record_name
from fgscope.stages import last_at_each_resolution

if TYPE_CHECKING:
    from fgscope.capture import LayerRecord

__all__ = [
    "LayerSpec", "select_layers", "leaf_modules", "block_modules", "glob_regex", "glob_names",
    "layer_limit", "DEFAULT_MAX_LAYERS",
]

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
    # names handed back from a selection stay whole (an `EveryCall` is one module, every call)
    parts = [p for item in items for p in ([item] if isinstance(item, EveryCall) else
                                           [q.strip() for q in item.split(",")])]
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


# --- exact record names: `module:k`, `module[key]`, FX node names -----------------------------


def _named_records(
    model: nn.Module, named: dict[str, nn.Module], item: str, example: torch.Tensor | None
) -> dict[str, str] | None:
    """`{selection name: module name}` for an exact record name (`layer1.0.relu:2`,
    `backbone[out]`), a torch.fx name of a repeated module call (`layer1.0.relu_1`) or of a
    functional operation (`layer1.0.add`); None when `item` is none of these (a module
    name or a pattern)."""
    if item in named:
        return None
    rec = parse_record_name(item, named)
    if rec is not None and rec.call is None and rec.key is None:  # `module:*`
        return {EveryCall(rec.module): rec.module}
    if rec is not None:
        return {str(rec): rec.module}
    if any(c in item for c in "*?"):
        return None
    if "[" in item or item.startswith(("re:", "/")):
        return None
    if not _could_be_fx_name(item, named):
        return None
    try:
        names = op_names(model, example)
    except ValueError:
        names = None
    if names is not None and item in names.modules:
        module, call = names.modules[item]
        return {str(RecordName(module, call)): module}
    if names is not None and item in names.ops:
        return {item: names.ops[item][0]}
    alias = alias_of_call(item, named)
    if alias is not None:
        return {str(alias): alias.module}
    if names is not None and not names.aligned and item in names.nodes:
        raise ConfigError(
            f"{item!r} is a functional operation; they are found in one forward of an example "
            "input, and none was given"
        )
    return None


def _could_be_fx_name(item: str, named: dict[str, nn.Module]) -> bool:
    """`scope.op` or `op` with `scope` a module: worth tracing the model for."""
    scope, _, op = item.rpartition(".")
    return (scope in named) and bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", op))


def _all_ops(model: nn.Module, named: dict[str, nn.Module], example: torch.Tensor | None) -> dict[str, str]:
    names = op_names(model, example) if example is not None else None
    if names is None:
        raise ConfigError(
            f"`{OPS}` (every functional operation) needs an example input to name them"
        ) from None
    return {n: names.ops[n][0] for n in names.order if n in names.ops}


def _in_model_order(
    named: dict[str, nn.Module], chosen: set[str], wide: set[str], records: dict[str, str]
) -> dict[str, nn.Module]:
    """Chosen modules in definition order (`EveryCall` names for those chosen whole), each
    followed by its record and operation names."""
    after: dict[str, list[str]] = {}
    for key, module in records.items():
        after.setdefault(module, []).append(key)
    out: dict[str, nn.Module] = {}
    for n, m in named.items():
        if n in wide:
            out[EveryCall(n)] = m
        elif n in chosen:
            out[n] = m
        for key in after.get(n, []):
            out.setdefault(key, m)
    return out


def select_layers(
    model: nn.Module, layers: LayerSpec = "all", example_input: torch.Tensor | None = None
) -> dict[str, nn.Module]:
    """Resolve a layer selection to modules, by qualified name, before anything runs.

    Args:
        model: the model.
        layers: see `LayerSpec`. `stages` needs `example_input` (one dummy forward).
        example_input: an input batch, only used for `stages`.

    Returns:
        Selected modules in the model's definition order, by selection name: a module's
        qualified name (every record of it), an exact record name (`layer1.0.relu:2`,
        `backbone[out]`: that record only) or the torch.fx name of a functional operation
        (`layer1.0.add`, mapped to the module it runs in). Passing these names back selects
        the same records (`fgscope.names.plan_records` splits them for `capture`).

    Raises:
        LayerNotFoundError: a name or pattern matches no module; close matches are listed.
    """
    named = _hookable(model)
    chosen: set[str] = set()
    patterns: dict[str, list[str]] = {}  # glob and regex items -> their hits (see _check_limit)
    records: dict[str, str] = {}  # record and FX names -> the module they belong to
    wide: set[str] = set()  # modules chosen whole (every call): `all`, `blocks`, patterns
    for item in _split_spec(layers):
        low = item.lower()
        if isinstance(item, EveryCall) and item in named:  # passed back from a selection
            wide.add(item)
        elif low == "all":
            wide.update(leaf_modules(model))
        elif low == "blocks":
            wide.update(block_modules(model))
        elif low == "stages":
            wide.update(_stage_names(model, example_input))
        elif item.startswith("re:") or (len(item) > 2 and item[0] == item[-1] == "/"):
            pattern = item[3:] if item.startswith("re:") else item[1:-1]
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"invalid regular expression {pattern!r}: {exc}") from None
            hits = [n for n in named if n and rx.search(n)]
            if not hits:
                raise LayerNotFoundError(f"regex {pattern!r} matches no layer", hint=_LIST_HINT)
            wide.update(hits)
            patterns[item] = hits
        elif low == OPS:
            records.update(_all_ops(model, named, example_input))
        elif (found := _named_records(model, named, item, example_input)) is not None:
            for key, module in found.items():
                if isinstance(key, EveryCall):
                    wide.add(module)
                else:
                    records[key] = module
        elif any(c in item for c in "*?["):
            hits = glob_names(named, item)
            if not hits:
                raise LayerNotFoundError(f"pattern {item!r} matches no layer", hint=_LIST_HINT)
            wide.update(hits)
            patterns[item] = hits
        elif item in named:
            chosen.add(item)
        else:
            close = difflib.get_close_matches(item, [n for n in named if n], n=5, cutoff=0.5)
            found = f"; did you mean {', '.join(close)}?" if close else ""
            raise LayerNotFoundError(f"no layer named {item!r} in the model{found}", hint=_LIST_HINT)
    _check_limit(patterns)
    return _in_model_order(named, chosen, wide, records)


# --- globs: `*` within one name component, `**` across components ---------------------------

DEFAULT_MAX_LAYERS = 64
"""The most layers a glob or regex may select unless allowed more (`layer_limit`,
`--max-layers`): more is almost always a pattern that matched every descendant, and would
write thousands of files. `all` (every leaf call) is never limited: it is asked for by name."""

_MAX_LAYERS: ContextVar[int | None] = ContextVar("fgscope_max_layers", default=DEFAULT_MAX_LAYERS)


@contextlib.contextmanager
def layer_limit(n: int | None) -> Iterator[None]:
    """Inside the block, globs and regexes of a selection may select at most `n` layers
    together (None: any number); outside it, `DEFAULT_MAX_LAYERS`.

    Raises:
        ValueError: `n` is not None and below 1.
    """
    if n is not None and n < 1:
        raise ValueError(f"the layer limit must be at least 1, got {n}")
    token = _MAX_LAYERS.set(n)
    try:
        yield
    finally:
        _MAX_LAYERS.reset(token)


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


def _check_limit(patterns: dict[str, list[str]]) -> None:
    """Refuse globs and regexes that together select more layers than the limit."""
    limit = _MAX_LAYERS.get()
    hits = {n for found in patterns.values() for n in found}
    if limit is None or len(hits) <= limit:
        return
    what = ", ".join(repr(p) for p in patterns)
    hint = ("narrow the pattern (`*` stays inside one name component, `**` crosses them), ask "
            "for every layer with --layers all, or allow more with --max-layers N")
    raise ConfigError(
        f"--layers {what} selects {len(hits)} layers, more than the {limit} a pattern may "
        "select",
        hint=hint,
    )
