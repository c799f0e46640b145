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

__all__ = ["elements", "first_tensor", "model_output", "replace_tensors"]


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


_OUTPUT_KEYS = ("logits", "out", "pooler_output")


def model_output(output: Any) -> torch.Tensor | None:
    """The tensor that stands for a model's output (CKA to the output, predictions, Grad-CAM).

    - a tensor: itself;
    - a dict or Hugging Face `ModelOutput`: `logits` (a classifier), else `out` (torchvision
      segmentation: the main head, not `aux`), else `pooler_output` (a Hugging Face base
      model: the pooled last stage);
    - a detector's list of per-image dicts (`boxes`, `labels`, `scores`): None — boxes differ
      in number per image and are not one (N, ...) tensor; the run says the output was not used;
    - a feature pyramid (a list, tuple or dict of maps of several sizes: timm's
      `features_only`, an FPN): the coarsest map (the deepest level, last of equal ones), not
      the first (finest) one;
    - anything else: its first tensor in record order (None if it has none).
    A choice other than the plain tensor is a `fgscope.notes.Note`, shown once per command.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for key in _OUTPUT_KEYS:
            if isinstance(output.get(key), torch.Tensor):
                if key != "logits":
                    _note(f"the model returns a dict; its {key!r} tensor is used as its output")
                return output[key]
    if isinstance(output, (list, tuple)) and output and all(
        isinstance(o, dict) and "boxes" in o for o in output
    ):
        _note("the model is a detector (per-image boxes): its output is not one tensor, so "
              "columns measured against the output stay empty")
        return None
    found = list(elements(output))
    maps = [(i, t) for i, (_, t) in enumerate(found) if t.dim() == 4]
    if len(maps) >= 2 and len(maps) == len(found) and len({t.shape[-2:] for _, t in maps}) > 1:
        i = min(range(len(maps)), key=lambda j: (maps[j][1].shape[-2] * maps[j][1].shape[-1], -j))
        key = found[maps[i][0]][0]
        _note(f"the model returns {len(maps)} feature maps; the coarsest ([{key}], "
              f"{tuple(maps[i][1].shape[1:])}) is used as its output")
        return maps[i][1]
    return found[0][1] if found else None


def first_tensor(output: Any) -> torch.Tensor | None:
    """The model's output tensor: `model_output` (kept under this name for its callers)."""
    return model_output(output)


def _note(text: str) -> None:
    from fgscope.notes import note

    note(text)


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
