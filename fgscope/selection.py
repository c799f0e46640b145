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
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import nn

from fgscope.errors import ConfigError, LayerNotFoundError
from fgscope.forward import forward
from fgscope.functional import op_names
from fgscope.globs import glob_names, glob_regex
from fgscope.names import OPS, EveryCall, RecordName, alias_of_call, parse_record_name
from fgscope.notes import Note, note
from fgscope.stages import last_at_each_resolution
from fgscope.wrappers import (
    check_supported,
    descends_into,
    feature_info,
    feature_layers,
    hierarchy_part,
    is_detector,
)

if TYPE_CHECKING:
    from fgscope.capture import LayerRecord

__all__ = [
    "LayerSpec", "select_layers", "leaf_modules", "block_modules", "glob_regex", "glob_names",
    "layer_limit", "DEFAULT_MAX_LAYERS", "KEYWORDS", "LayerNameClash",
]

LayerSpec = str | Sequence[str] | None
"""`all`, `blocks`, `stages`, exact names, globs (`layer*`) and regexes (`re:^layer[12]$`),
one string comma-separated or a sequence of strings."""

_LIST_HINT = "run `fgscope summary MODEL --layers all` to list every layer name"


def _hookable(modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Of `dict(model.named_modules())`, the modules that accept forward hooks: everything but
    ScriptModules (torch refuses hooks on them) and what lies inside them."""
    out: dict[str, nn.Module] = {}
    opaque: list[str] = []
    for name, m in modules.items():
        if opaque and any(name == p or name.startswith(p + ".") for p in opaque):
            continue
        if isinstance(m, torch.jit.ScriptModule):
            opaque.append(name)
            continue
        out[name] = m
    return out


def leaf_modules(model: nn.Module, named: dict[str, nn.Module] | None = None,
                 ) -> dict[str, nn.Module]:
    """Hookable modules without hookable children, by qualified name (the model itself if it
    has none; its record is named `output`). `named`: `_hookable(modules)`, when known."""
    named = _hookable(dict(model.named_modules())) if named is None else named
    hookable = {id(m) for m in named.values()}
    leaves = {n: m for n, m in named.items()
              if n and not any(id(c) in hookable for c in m._modules.values() if c is not None)}
    return leaves or {"": model}


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's building blocks: walking down from the root through pure containers
    (`nn.Sequential`, `nn.ModuleList`, `nn.ModuleDict`, not their subclasses) and through
    the wrappers that hold a spatial hierarchy (`fgscope.wrappers.descends_into`: a
    `backbone`/`body`/`encoder`, a Hugging Face base model and its stages, timm's
    `features_only` dictionaries and stages), the first module that is a leaf or a module of
    its own class (a ResNet `BasicBlock`, an `InvertedResidual`, a `Conv2dNormActivation`).
    A detector's blocks are its backbone's (`fgscope.wrappers.is_detector`)."""
    out: dict[str, nn.Module] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        base = getattr(module, "base_model_prefix", None)  # a Hugging Face model's base model
        for name, child in module.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if isinstance(child, torch.jit.ScriptModule):
                continue
            if descends_into("model" if name == base else qual, child):
                walk(qual, child)
            else:
                out[qual] = child

    walk("", model)
    if is_detector(model):  # its heads work on proposals and boxes, not on the images
        out = {n: m for n, m in out.items() if n.startswith("backbone.")} or out
    return out or {"": model}


def _split_spec(layers: LayerSpec) -> list[str]:
    if layers is None:
        return ["all"]
    items = [layers] if isinstance(layers, str) else list(layers)
    # names handed back from a selection stay whole (an `EveryCall` is one module, every call)
    parts = [p for item in items for p in ([item] if isinstance(item, EveryCall) else
                                           [q.strip() for q in item.split(",")])]
    # an `EveryCall("")` is the model itself (a TorchScript or leaf-only model's `output`)
    parts = [p for p in parts if p or isinstance(p, EveryCall)]
    if not parts:
        raise ConfigError("empty layer selection", hint="use all, blocks, stages or names")
    return parts


def _stage_names(model: nn.Module, example_input: torch.Tensor | None) -> dict[str, str]:
    """The last block at each spatial resolution (one per resolution), found with one
    forward of `example_input`, as {selection name: module name}. In a wrapper with a
    `backbone` / `body` / `encoder` (`fgscope.wrappers.hierarchy_part`) only its blocks
    count: a segmentation head at the backbone's last resolution is not a stage. A block that returns several maps at once (an FPN's
    dict of levels) takes part with each map (`backbone.fpn[0]`, ..., `backbone.fpn[pool]`)."""
    # Imported here, not at the top: `capture` resolves its own selection with `select_layers`.
    from fgscope.capture import capture

    if example_input is None:
        raise ConfigError(
            "the `stages` selection needs an example input to find where the resolution changes"
        )
    blocks = block_modules(model)
    inside = hierarchy_part(model)  # a wrapper's backbone: its stages, not its head's
    if inside and any(n.startswith(inside + ".") for n in blocks):
        blocks = {n: m for n, m in blocks.items() if n.startswith(inside + ".")}
    seen: list[tuple[str | None, str, tuple[int, int]]] = []  # (key, module, (H, W))
    mixed: set[str] = set()  # blocks with an output element that is not a map

    def on_record(rec: LayerRecord) -> None:
        t = rec.tensor
        if t.dim() == 4 and (rec.key is None or "][" not in rec.key):
            seen.append((rec.key, rec.module_name, (int(t.shape[-2]), int(t.shape[-1]))))
        elif rec.key is not None:
            mixed.add(rec.module_name)

    with capture(model, [EveryCall(n) for n in blocks], on_record=on_record, to=None):
        forward(model, example_input)
    seen = [(k, m, hw) for k, m, hw in seen if k is None or m not in mixed]
    out: dict[str, str] = {}
    last = last_at_each_resolution([hw for _, _, hw in seen])
    # one row per resolution: a size seen again later (HRNet's parallel branches, an FPN's
    # levels after its backbone's) keeps its last map
    final = {seen[i][2]: i for i in last}
    for i in sorted(final.values()):
        key, module, _ = seen[i]
        out.setdefault(module if key is None else f"{module}[{key}]", module)
    return out


KEYWORDS = ("all", "blocks", "stages", "features", OPS)
"""Selection keywords. A bare keyword that is also the name of a module (timm's ConvNeXt and
CSPDarkNet have `stages`, EfficientNet `blocks`, torchvision's VGG and MobileNet `features`)
means: `features` the module when one is so named (as torchvision users expect), timm's
`feature_info` layers otherwise; `all`, `blocks`, `stages`, `ops` always the keyword (every
command's default is one of them), with a note naming the escape. `kw:WORD` is always the
keyword, `name:NAME` always the module named NAME."""


class LayerNameClash(Note):
    """A bare selection keyword is also a module's name (see `KEYWORDS`)."""


def _keyword(raw: str, named: dict[str, nn.Module], model: nn.Module) -> tuple[str, str]:
    """(item, what it is): a keyword's lower-case name, `name` for `name:NAME` (item NAME),
    else the item's lower-case text (neither)."""
    if isinstance(raw, EveryCall):
        return raw, ""
    low = raw.lower()
    if low.startswith("kw:"):
        word = low[3:].strip()
        if word not in KEYWORDS:
            raise ConfigError(f"unknown selection keyword {raw!r}",
                              hint=f"the keywords are {', '.join(KEYWORDS)}")
        return word, word
    if low.startswith("name:"):
        name = raw[5:].strip()
        if name not in named or not name:
            return _keyword_fail(name, named)
        return name, "name"
    if low not in KEYWORDS or raw not in named:
        return raw, low
    if low == "features":
        if feature_info(model) is not None:
            note(f"--layers {raw}: the module named {raw!r}; timm's feature_info layers are "
                 "kw:features", LayerNameClash)
        return raw, "name"
    note(f"--layers {raw}: the {low} keyword; the module named {raw!r} is name:{raw}",
         LayerNameClash)
    return raw, low


def _keyword_fail(name: str, named: dict[str, nn.Module]) -> tuple[str, str]:
    close = difflib.get_close_matches(name, [n for n in named if n], n=5, cutoff=0.5)
    found = f"; did you mean {', '.join(close)}?" if close else ""
    raise LayerNotFoundError(f"no layer named {name!r} in the model{found}", hint=_LIST_HINT)


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
        elif n in chosen and n.lower() in KEYWORDS:  # passed back, it stays the module
            out[EveryCall(n)] = m
        elif n in chosen:
            out[n] = m
        for key in after.get(n, []):
            out.setdefault(key, m)
    return out


def select_layers(model: nn.Module, layers: LayerSpec = "all", example_input: torch.Tensor | None = None,
                  *, modules: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """Resolve a layer selection to modules, by qualified name, before anything runs.

    Args:
        model: the model.
        layers: see `LayerSpec`. `stages` needs `example_input` (one dummy forward).
        example_input: an input batch, only used for `stages`.
        modules: `dict(model.named_modules())`, when the caller has it (one walk, not three).

    Returns:
        Selected modules in the model's definition order, by selection name: a module's
        qualified name (every record of it), an exact record name (`layer1.0.relu:2`,
        `backbone[out]`: that record only) or the torch.fx name of a functional operation
        (`layer1.0.add`, mapped to the module it runs in). Passing these names back selects
        the same records (`fgscope.names.plan_records` splits them for `capture`).

    Raises:
        LayerNotFoundError: a name or pattern matches no module; close matches are listed.
        UnsupportedModelError: a video or quantized model (`fgscope.wrappers.check_supported`).
    """
    check_supported(model, modules := dict(model.named_modules()) if modules is None else modules)
    named = _hookable(modules)
    chosen: set[str] = set()
    patterns: dict[str, list[str]] = {}  # glob and regex items -> their hits (see _check_limit)
    records: dict[str, str] = {}  # record and FX names -> the module they belong to
    wide: set[str] = set()  # modules chosen whole (every call): `all`, `blocks`, patterns
    for raw in _split_spec(layers):
        item, low = _keyword(raw, named, model)
        if isinstance(item, EveryCall) and item in named:  # passed back from a selection
            wide.add(item)
        elif low == "all":
            wide.update(leaf_modules(model, named))
        elif low == "blocks":
            wide.update(block_modules(model))
        elif low == "stages":
            found_stages = _stage_names(model, example_input)
            if not found_stages:
                raise LayerNotFoundError(
                    "`stages` found no spatial map among the model's blocks (a TorchScript "
                    "model records only its output)", hint="use --layers blocks or all")
            for key, module in found_stages.items():
                if key == module:
                    wide.add(module)
                else:
                    records[key] = module
        elif low == "features":
            wide.update(feature_layers(model, named, example_input))
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
        elif low == "name" and item in named:  # `name:X`: the module X, never a pattern
            chosen.add(item)
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


# --- how many layers globs may select (the globs themselves: fgscope.globs) -----------------

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
