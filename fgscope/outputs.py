"""A module's output as record elements: tensors, tuples, lists, dicts and namedtuples.

`elements` names each tensor of a (nested) output the way records are named (`name[0]`,
`name[out]`, `name[1][mean]`); `replace_tensors` rebuilds an output with some tensors
swapped (what `capture(grad=True)` hands on to the model).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["elements", "first_tensor", "replace_tensors"]


def elements(output: Any, key: str | None = None) -> Iterator[tuple[str | None, torch.Tensor]]:
    """(key, tensor) for each tensor in a (nested) module output, in record order; other
    values are skipped. Keys nest as record names do: `1][mean` for `out[1]["mean"]`."""
    if isinstance(output, torch.Tensor):
        yield key, output
        return

    def sub(k: object) -> str:
        return f"{key}][{k}" if key is not None else str(k)

    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        for fname in output._fields:
            yield from elements(getattr(output, fname), sub(fname))
    elif isinstance(output, (tuple, list)):
        for i, v in enumerate(output):
            yield from elements(v, sub(i))
    elif isinstance(output, dict):
        for k, v in output.items():
            yield from elements(v, sub(k))


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of a (nested) module output, in record order; None if there is none."""
    return next((t for _, t in elements(output)), None)


def replace_tensors(output: Any, new: dict[int, torch.Tensor]) -> Any:
    """`output` with the tensors in `new` (by id) replaced, its structure kept."""
    if isinstance(output, torch.Tensor):
        return new.get(id(output), output)
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(replace_tensors(v, new) for v in output))
    if isinstance(output, (tuple, list)):
        return type(output)(replace_tensors(v, new) for v in output)
    if isinstance(output, dict):
        out = copy.copy(output)
        for k, v in output.items():
            out[k] = replace_tensors(v, new)
        return out
    return output
