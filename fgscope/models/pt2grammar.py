"""What a torch.export program's JSON may say: the grammar `pt2scan` checks it against.

torch turns some of the program's strings into Python code when it loads it: fx node and
argument names and attribute paths go verbatim into generated source, pytree specs' dict keys
between quotes, shape expressions through `sympy.sympify` (which calls `eval`) and guards through
`exec`. Names must be plain identifiers or dotted paths; expressions must parse (with `ast`,
nothing evaluated) to arithmetic, comparisons and calls of sympy's classes and torch's sympy
functions over shape symbols; guards may in addition index `L[...]` and call `.size()`-like
methods.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

__all__: list[str] = []

# JSON keys whose strings torch pastes into generated Python source (fx node and argument
# names, attribute paths) or resolves as dotted names.
_NAME_KEYS = frozenset({"name", "as_name", "user_input_name"})
_NAME_LIST_KEYS = frozenset({"forward_arg_names", "field_names"})
_NAMED_DICTS = frozenset(
    {"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"}
)
_PATH_KEYS = frozenset(
    {
        "target",
        "parameter_name",
        "buffer_name",
        "tensor_constant_name",
        "custom_obj_name",
        "fqn",
        "class_fqn",
        "as_operator",
    }
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PATH = re.compile(r"[A-Za-z0-9_#:]*(\.[A-Za-z0-9_#:]+)*\Z")  # 'block.0.weight', '#ns:op'
_SAFE_STR = re.compile(r"[A-Za-z0-9_.+\-]*\Z")  # string literals inside expressions
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")  # s0, s77, u3: torch's shape symbols


def _strings(obj: Any, key: str = "") -> Iterator[tuple[str, str, Callable[[str], bool]]]:
    """(key, string, checker) for every checked string of a program's JSON."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if key in _NAMED_DICTS:
                yield "name", str(k), _is_ident
            elif key == "range_constraints":
                yield "shape expression", str(k), _is_sym_expr
            if k == "metadata" and isinstance(v, dict):
                yield from _metadata(v)
            else:
                yield from _strings(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v, key)
    elif isinstance(obj, str):
        if key in _NAME_KEYS or key in _NAME_LIST_KEYS:
            yield key, obj, _is_ident
        elif key in _PATH_KEYS:
            yield key, obj, _is_path
        elif key == "expr_str":
            yield "shape expression", obj, _is_sym_expr
        elif key == "guards_code":
            yield "guard", obj, _is_guard
        elif key in ("in_spec", "out_spec"):
            yield "input/output spec", obj, _is_spec


def _metadata(meta: dict) -> Iterator[tuple[str, str, Callable[[str], bool]]]:
    # nn_module_stack is 'key,path,type;...': the paths become submodule attributes that
    # unflatten calls by name in generated code. Other entries are kept as text.
    stack = meta.get("nn_module_stack")
    if isinstance(stack, str):
        for item in stack.split(";"):
            parts = item.split(",")
            path = parts[1] if len(parts) >= 3 else item
            yield "module path", path, _is_path
    for k, v in meta.items():
        if k != "nn_module_stack" and not isinstance(v, str):
            yield from _strings(v, k)


def _is_ident(s: str) -> bool:
    return bool(_IDENT.match(s))


def _is_path(s: str) -> bool:
    return bool(_PATH.match(s))


def _is_text(s: str) -> bool:
    """No character that ends or escapes a quoted string literal."""
    return not any(c in s for c in "'\"\\") and s.isprintable()


def _is_spec(s: str) -> bool:
    """A pytree spec (JSON whose `context`s are JSON again): torch pastes its dict keys between
    quotes into generated code, so no string in it may end or escape a string literal."""

    def texts(obj: Any) -> Iterator[str]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield str(k)
                if k == "context" and isinstance(v, str):
                    v = json.loads(v)
                yield from texts(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from texts(v)
        elif isinstance(obj, str):
            yield obj

    try:
        return all(_is_text(t) for t in texts(json.loads(s)))
    except (ValueError, RecursionError):
        return False


def _is_sym_expr(s: str) -> bool:
    """A sympy expression over shape symbols: what torch's serializer writes, nothing else."""
    return _check_ast(s, _sym_names(), attrs=frozenset(), subscripts=False)


def _is_guard(s: str) -> bool:
    """A shape guard like `L['x'].size()[0] <= 64` (torch puts it inside generated code, in a
    double-quoted string too, so quotes and backslashes are refused outright)."""
    if any(c in s for c in '"\\\n\r'):
        return False
    attrs = frozenset(
        {
            "size",
            "stride",
            "storage_offset",
            "dim",
            "numel",
            "shape",
            "floor",
            "ceil",
            "trunc",
            "sqrt",
        }
    )
    return _check_ast(s, _sym_names() | {"L", "math"}, attrs=attrs, subscripts=True)


_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Call,
    ast.keyword,
    ast.Name,
    ast.Constant,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
    ast.Tuple,
)


def _check_ast(
    text: str, names: frozenset[str], *, attrs: frozenset[str], subscripts: bool
) -> bool:
    if len(text) > 10_000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            ok = not node.id.startswith("_") and (node.id in names or bool(_SYMBOL.match(node.id)))
        elif isinstance(node, ast.Constant):
            v = node.value
            ok = (
                v is None
                or isinstance(v, (bool, int, float))
                or (isinstance(v, str) and bool(_SAFE_STR.match(v)) and "__" not in v)
            )
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, (ast.Name, ast.Attribute))
        elif isinstance(node, ast.keyword):
            ok = node.arg is not None and not node.arg.startswith("_")
        elif isinstance(node, ast.Attribute):
            ok = node.attr in attrs
        elif isinstance(node, ast.Subscript):
            ok = subscripts and isinstance(node.slice, ast.Constant)
        else:
            ok = isinstance(node, _NODES)
        if not ok:
            return False
    return True


@lru_cache(maxsize=1)
def _sym_names() -> frozenset[str]:
    """Names a shape expression may call: sympy's classes and torch's sympy functions (the
    namespace torch's deserializer and guards evaluate them in), and a few constants."""
    import sympy
    import torch.utils._sympy.functions as torch_sympy

    def classes(mod: Any) -> set[str]:
        return {
            n
            for n in dir(mod)
            if not n.startswith("_")
            and isinstance(getattr(mod, n), type)
            and issubclass(getattr(mod, n), sympy.Basic)
        }

    return frozenset(
        classes(sympy)
        | classes(torch_sympy)
        | {
            "oo",
            "zoo",
            "nan",
            "pi",
            "E",
            "I",
            "true",
            "false",
            "int_oo",
            "sqrt",
            "floor",
            "ceiling",
        }
    )
