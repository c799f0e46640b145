"""Every name fgscope prints selects that record: exact record names and FX node names.

A record is named `module` (its first call), `module:k` (its k-th call in one forward),
`module:*` (every call: what `all`, `blocks`, `stages`, globs and regexes select),
`module[key]` (one element of a tuple, list, dict or namedtuple output, nested:
`module[1][mean]`), `module:k[key]`, or `output` for the model itself when it has no
submodules. Functional operations are named as torch.fx names them (`fgscope.functional`):
`add`, `layer1.0.add`, `relu_1`, and so are repeated module calls (`layer1.0.relu_1` is
`layer1.0.relu:2`). `resolve_name` turns one selection item into what to record;
`plan_records` turns a whole resolved selection into the hooks and functional operations
`fgscope.capture` needs.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RecordName", "RecordPlan", "EveryCall", "parse_record_name", "alias_of_call", "plan_records", "OPS",
]

OPS = "ops"
"""The selection keyword for every functional operation (`--layers all,ops`)."""

_NAME = re.compile(r"^(?P<base>.+?)(?::(?P<call>[1-9][0-9]*|\*))?(?P<keys>(?:\[[^\[\]]*\])*)$")


class EveryCall(str):
    """A module's name standing for every record of it (every call, every element): what
    `select_layers` returns for modules chosen by `all`, `blocks`, `stages`, a glob or a
    regex. A plain name typed by a user is one record: the module's first call, as torch.fx
    names it (`relu`; the second call is `relu:2`, FX's `relu_1`)."""

    __slots__ = ()
_FX_CALL = re.compile(r"^(?P<base>.+)_(?P<k>[1-9][0-9]*)$")


@dataclass(frozen=True)
class RecordName:
    """Some records of one module.

    Attributes:
        module: qualified module name (`""` for the model itself, printed `output`).
        call: only this call (1-based), None for every call.
        key: only this element (`out`, `1][mean` for `[1][mean]`) and what is inside it,
            None for every element.
    """

    module: str
    call: int | None = None
    key: str | None = None

    def matches(self, call: int, key: str | None) -> bool:
        if self.call is not None and call != self.call:
            return False
        if self.key is None:
            return True
        return key is not None and (key == self.key or key.startswith(self.key + "]["))

    def __str__(self) -> str:
        base = self.module or "output"
        base += ":*" if self.call is None else f":{self.call}" if self.call != 1 else ""
        return base + (f"[{self.key}]" if self.key is not None else "")


def parse_record_name(item: str, modules: Collection[str]) -> RecordName | None:
    """`module:k[key]` (with a call or a key: a plain module name is not parsed here) when
    `module` is one of `modules`; None otherwise."""
    m = _NAME.match(item)
    if m is None or not (m.group("call") or m.group("keys")):
        return None
    base = m.group("base")
    module = "" if base == "output" and "output" not in modules else base
    if module not in modules:
        return None
    keys = m.group("keys")
    call = m.group("call")  # none: the first call, as printed; `*`: every call
    return RecordName(module, None if call == "*" else int(call or 1), keys[1:-1] if keys else None)


def alias_of_call(item: str, modules: Collection[str]) -> RecordName | None:
    """torch.fx's name for a repeated module call: `relu_1` is the 2nd call of `relu`."""
    m = _FX_CALL.match(item)
    if m is None or m.group("base") not in modules or item in modules:
        return None
    return RecordName(m.group("base"), int(m.group("k")) + 1)


@dataclass
class RecordPlan:
    """What `capture` records for a resolved selection.

    Attributes:
        modules: module name -> None (every record) or the `RecordName`s wanted of it.
        ops: names of functional operations to record (`fgscope.functional`).
    """

    modules: dict[str, list[RecordName] | None] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)

    def wants(self, module: str, call: int, key: str | None) -> bool:
        """A call of a hooked module: is this element wanted?"""
        names = self.modules.get(module)
        return names is None or any(n.matches(call, key) for n in names)

    def wants_record(self, rec: Any) -> bool:
        """Is this `LayerRecord` one the selection asked for?"""
        if getattr(rec, "op", None) is not None:
            return rec.name.split("[", 1)[0] in self.ops
        return rec.module_name in self.modules and self.wants(rec.module_name, rec.call, rec.key)


def plan_records(keys: Iterable[str], modules: Collection[str]) -> RecordPlan:
    """Split resolved selection names (what `select_layers` returns) into module hooks, with
    the calls and elements wanted of each, and functional operations (everything else)."""
    plan = RecordPlan()
    for key in keys:
        if isinstance(key, EveryCall):
            plan.modules[str(key)] = None
            continue
        rec = RecordName(key, 1) if key in modules else parse_record_name(key, modules) or alias_of_call(key, modules)
        if rec is None:
            plan.ops.append(key)
        elif plan.modules.get(rec.module, []) is not None:
            plan.modules.setdefault(rec.module, []).append(rec)
    return plan
