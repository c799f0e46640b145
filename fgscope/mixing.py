"""Operations that mix entries along dims: reductions, softmax, normalisation, contractions.

Rules of the geometry trace (`fgscope.tracer`). Mixing along a dim that holds map positions
grows the field by what the dim covers and makes it stop moving along it (`Field.mix`):
global pooling (`mean` over H and W) gives the union of all units; attention within Swin's
windows gives each unit its window; attention over all of ViT's tokens gives every token the
whole map. Contractions (`matmul`, `einsum`, `linear`, `scaled_dot_product_attention`,
`multi_head_attention_forward`) are read as einsum equations: a contracted letter mixes its
dims, and where two operands hold the same map axis on different letters (queries and keys)
the later one is mixed over it, which is what the attention that follows does.

Normalisations whose statistics run over the map (`group_norm`, `instance_norm`,
`layer_norm` over C, H, W, `batch_norm` in training) feed every unit a little of the whole
map, like a squeeze-excitation gate: flagged `global_context`, not counted in the field.
"""

from __future__ import annotations

import string
from dataclasses import replace
from typing import Any

import torch

from fgscope.dims import SPATIAL, Dim, moving, plain_dims
from fgscope.fields import Field, has_spatial, placeholder, same_layout, union_all
from fgscope.views import Call, other_dim

__all__ = ["RULES"]


def _dims_arg(v: Any, nd: int) -> list[int] | None:
    if v is None:
        return None
    if isinstance(v, (tuple, list, torch.Size)):
        return [int(d) % nd for d in v]
    return [int(v) % nd]


def reduce_rule(c: Call) -> Field | list[Field] | None:
    x = c.args[0]
    f = c.field(x)
    nd = x.dim()
    if c.name in ("max", "min") and isinstance(c.arg(1, "other"), torch.Tensor):
        return None  # elementwise max/min: the caller's elementwise rule
    pos, key = (2, "dim") if c.name == "norm" else (1, "dim")
    dims = _dims_arg(c.arg(pos, key), nd) if nd else []
    if dims is None or not nd:
        dims = list(range(nd))
    g = f.mix_dims(set(dims))
    out = c.outs[0]
    keep = out.dim() == nd
    new = tuple(Dim() if i in dims else d for i, d in enumerate(g.dims)) if keep else tuple(
        d for i, d in enumerate(g.dims) if i not in dims
    )
    if tuple(int(s) for s in out.shape) != tuple(d.size for d in new):
        new = plain_dims(out.shape)
    return replace(g, dims=new)


def along_rule(c: Call) -> Field | None:
    """Same shape out, every entry mixed with the others along one dim (softmax, sort)."""
    x = c.args[0]
    f = c.field(x)
    nd = x.dim()
    if c.name == "normalize":
        dim = c.arg(2, "dim", 1)
    elif c.name in ("sort", "argsort"):
        dim = c.arg(1, "dim", -1)
    elif c.name == "topk":
        dim = c.arg(2, "dim", -1)
    elif c.name == "local_response_norm":
        dim = 1
    else:
        dim = c.arg(1, "dim")
    if dim is None or not nd:
        g = f.mix_all()
    else:
        dim = int(dim) % nd
        g = f.mix_dims({dim})
        if c.name.startswith("cum") or c.name == "logcumsumexp":
            if has_spatial((f.dims[dim],)):
                g = g.flag(f"`{c.name}` accumulates along the map: field approximate")
        if c.name == "topk":
            g = replace(g, dims=(*g.dims[:dim], other_dim(c.outs[0].shape[dim]), *g.dims[dim + 1 :]))
    return g


def norm_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    nd = x.dim()
    if c.name in ("layer_norm", "rms_norm"):
        shape = c.arg(1, "normalized_shape")
        n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
        over = set(range(nd - n, nd))
    elif c.name == "batch_norm":
        training = c.arg(5, "training", False)
        if not training and c.arg(1, "running_mean") is not None:
            return f  # eval: a per-channel affine map
        over = set(range(nd)) - {1}
    else:  # group_norm, instance_norm: statistics over (groups of) channels and the map
        over = set(range(1, nd))
    if any(has_spatial((f.dims[i],)) for i in over):
        return replace(f, global_context=True)
    return f


# --- contractions ----------------------------------------------------------------------------


def _letters(n: int, offset: int = 0) -> str:
    return string.ascii_letters[offset : offset + n]


def contract(c: Call, operands: list[tuple[Any, str]], out_letters: str, out_shape: Any) -> Field | None:
    """The field of an einsum `operands -> out_letters` (letters per operand dim)."""
    traced = [(c.field(t), letters) for t, letters in operands if c.field(t) is not None]
    if not traced:
        return None
    shape = [int(s) for s in out_shape]
    # Each output letter's dim: from the first operand with map positions there (full size).
    chosen: list[Dim] = []
    for oi, letter in enumerate(out_letters):
        pick = None
        for f, letters in traced:
            if letter in letters:
                d = f.dims[letters.index(letter)]
                if d.size == shape[oi] and (pick is None or (has_spatial((d,)) and not has_spatial((pick,)))):
                    pick = d
        chosen.append(pick if pick is not None else other_dim(shape[oi]))
    claimed: dict[str, set[int]] = {}
    mapped: list[Field] = []
    for f, letters in traced:
        f = f.mix_dims({i for i, ch in enumerate(letters) if ch not in out_letters})
        for kind in SPATIAL:  # positions already held by an earlier operand on other letters
            mine = {out_letters.index(letters[i]) for i, _, _ in moving(f.dims, kind) if letters[i] in out_letters}
            if kind in claimed:
                f = f.mix(lambda i, j, fa, k=kind, ls=letters: fa.kind == k and ls[i] in out_letters
                          and out_letters.index(ls[i]) not in claimed[k])
            elif mine:
                claimed[kind] = mine
        dims = []
        for oi, letter in enumerate(out_letters):
            d = f.dims[letters.index(letter)] if letter in letters else None
            dims.append(d if d is not None and d.size == shape[oi] and same_layout(d, chosen[oi])
                        else placeholder(chosen[oi]))
        mapped.append(replace(f, dims=tuple(dims)))
    return union_all(mapped)


def _matmul_letters(a: torch.Tensor, b: torch.Tensor) -> tuple[str, str, str]:
    na, nb = a.dim(), b.dim()
    batch = max(na, nb) - 2
    bl = _letters(max(batch, 0))
    i, j, k = "XYZ"
    la = (bl[len(bl) - (na - 2):] if na > 2 else "") + (i + j if na >= 2 else j)
    lb = (bl[len(bl) - (nb - 2):] if nb > 2 else "") + (j + k if nb >= 2 else j)
    out = bl + (i if na >= 2 else "") + (k if nb >= 2 else "")
    return la, lb, out


def matmul_rule(c: Call) -> Field | None:
    if c.name in ("addmm", "baddbmm", "addbmm"):
        a, b = c.args[1], c.args[2]
    elif c.name == "__rmatmul__":
        b, a = c.args[0], c.args[1]
    else:
        a, b = c.args[0], c.arg(1, "other", c.arg(1, "mat2"))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    la, lb, lo = _matmul_letters(a, b)
    return contract(c, [(a, la), (b, lb)], lo, c.outs[0].shape)


def linear_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    if f is None or x.dim() == 0:
        return None
    g = f.mix_dims({x.dim() - 1})
    return replace(g, dims=(*g.dims[:-1], other_dim(c.outs[0].shape[-1])))


def einsum_rule(c: Call) -> Field | None:
    eq = c.args[0].replace(" ", "")
    ops = list(c.args[1]) if len(c.args) == 2 and isinstance(c.args[1], (tuple, list)) else list(c.args[1:])
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return None
    free = [ch for ch in string.ascii_letters if ch not in eq]
    ell = max((t.dim() - len(term.replace("...", "")) for t, term in zip(ops, terms) if "..." in term), default=0)
    ell_letters = "".join(free[:ell])
    spec = []
    for t, term in zip(ops, terms):
        n = t.dim() - len(term.replace("...", ""))
        spec.append((t, term.replace("...", ell_letters[ell - n:] if n else "")))
    if not arrow:
        seen = "".join(term for _, term in spec)
        rhs = ell_letters + "".join(sorted(ch for ch in set(seen) if seen.count(ch) == 1 and ch not in ell_letters))
    else:
        rhs = rhs.replace("...", ell_letters)
    out = c.outs[0]
    return contract(c, spec, rhs, out.shape)


def attention_rule(c: Call) -> Field | list[Field | None] | None:
    if c.name == "scaled_dot_product_attention":
        q, k, v = c.args[0], c.arg(1, "key"), c.arg(2, "value")
        n = q.dim() - 2
        bl = _letters(n)
        return contract(c, [(q, bl + "XD"), (k, bl + "YD"), (v, bl + "YE")], bl + "XE", c.outs[0].shape)
    q, k, v = c.args[0], c.arg(1, "key"), c.arg(2, "value")
    lq = "LNE" if q.dim() == 3 else "LE"
    lk = "SNE" if q.dim() == 3 else "SE"
    main = c.outs[0]
    g = contract(c, [(q, lq), (k, lk), (v, lk)], lq, main.shape)
    if g is None:
        return None
    rest = [replace(g.mix_all(), dims=plain_dims(t.shape)) for t in c.outs[1:]]
    return [g, *rest]


RULES = {
    **dict.fromkeys(
        ["sum", "mean", "nansum", "nanmean", "amax", "amin", "max", "min", "prod", "std", "var",
         "std_mean", "var_mean", "norm", "logsumexp", "median", "nanmedian", "mode", "any", "all",
         "argmax", "argmin", "count_nonzero", "aminmax"], reduce_rule),
    **dict.fromkeys(
        ["softmax", "log_softmax", "softmin", "cumsum", "cumprod", "cummax", "cummin",
         "logcumsumexp", "sort", "argsort", "topk", "normalize", "local_response_norm"], along_rule),
    **dict.fromkeys(["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"], norm_rule),
    **dict.fromkeys(["matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm"],
                    matmul_rule),
    "linear": linear_rule,
    "einsum": einsum_rule,
    **dict.fromkeys(["scaled_dot_product_attention", "multi_head_attention_forward"], attention_rule),
}
