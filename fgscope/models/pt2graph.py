"""Make an unflattened torch.export program record what the original model produced.

`torch.export.unflatten` gives back the module hierarchy as `InterpreterModule`s running
ATen graphs. Three things differ from the eager model, and are fixed here on the graphs
(nothing from the file runs; only nodes already in the graph are retargeted):

- in-place ATen ops (`aten.relu_` after a BatchNorm, `aten.add_` of a residual) write into a
  submodule's output after its hook fired, and torch-function modes do not see ATen calls, so
  `fgscope.capture` cannot copy the record first and the BatchNorm's record would hold the
  post-ReLU values: each is called as the same in-place `torch.Tensor` method
  (`Tensor.relu_`: the same write, now seen), or, where there is no such method, becomes
  its out-of-place version (`aten.relu`) with the later uses of the overwritten value in
  that graph reading the new node;
- `aten.linear` is not `torch.nn.functional.linear`, which is what the geometry tracer counts
  multiply-adds of: it is called through the functional form;
- every module's type is `InterpreterModule`: where the export kept the original type (the
  `nn_module_stack` metadata of its nodes), the module's class is renamed after it (a subclass
  of `InterpreterModule` named `Conv2d`, `BatchNorm2d`, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__: list[str] = []

_NOT_INPLACE = frozenset({"copy_", "set_", "resize_", "resize_as_", "detach_", "requires_grad_"})


def _functional(target: Any) -> Any | None:
    """The out-of-place ATen overload of an in-place one (`aten.relu_.default` ->
    `aten.relu.default`), None when there is none or `target` is not in-place."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    ns, _, name = schema.name.partition("::")
    if ns != "aten" or not name.endswith("_") or name.startswith("_") or name in _NOT_INPLACE:
        return None
    args = schema.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    overload = getattr(packet, target._overloadname, None) if packet is not None else None
    if overload is None or len(overload._schema.arguments) != len(args):
        return None
    return overload


def _rewrite(graph: torch.fx.Graph) -> bool:
    """In-place ops out of place (later uses redirected) and `aten.linear` as F.linear, in
    one graph; True when something changed."""
    changed = False
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.linear.default:
            node.target = torch.nn.functional.linear
            changed = True
            continue
        functional = _functional(node.target)
        if functional is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        method = getattr(torch.Tensor, node.target._schema.name.partition("::")[2], None)
        if callable(method) and not node.kwargs:  # same op, same write, seen by capture
            node.target = method
            changed = True
            continue
        written = node.args[0]
        node.target = functional
        for user in list(written.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(written, node)
        changed = True
    if changed:
        graph.lint()
    return changed


def original_types(program: Any) -> dict[str, str]:
    """{module path: original class name} from the program's `nn_module_stack` metadata."""
    out: dict[str, str] = {}
    for node in program.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            if not isinstance(entry, tuple) or len(entry) != 2:
                continue
            path, kind = entry
            name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", "")
            name = str(name).rpartition(".")[2]
            if isinstance(path, str) and name.isidentifier():
                out.setdefault(path, name)
    return out


def restore(module: nn.Module, program: Any) -> None:
    """Apply the fixes of the module docstring to `module` (the unflattened `program`)."""
    types = original_types(program)
    classes: dict[tuple[type, str], type] = {}
    for name, m in module.named_modules():
        graph = getattr(m, "graph", None)
        if isinstance(graph, torch.fx.Graph) and _rewrite(graph):
            if getattr(m, "graph_module", None) is not None and hasattr(m, "finalize"):
                m.finalize()  # the code-generated forward follows the graph
            elif isinstance(m, torch.fx.GraphModule):
                m.recompile()
        kind = types.get(name)
        if name and kind and type(m).__name__ == "InterpreterModule":
            key = (type(m), kind)
            if key not in classes:
                classes[key] = type(kind, (type(m),), {
                    "__module__": "torch.export (unflattened)",
                    "_fgscope_unflattened": True,  # `blocks` walks into Sequential & co.
                })
            m.__class__ = classes[key]
