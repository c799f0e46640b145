"""Sliding-window operations of the geometry trace: convolutions, pooling, padding, resizing.

Each rule is chosen by what the operation is (`conv2d`, `max_pool2d`, `lp_pool2d`,
`max_unpool2d`, ...), never by a word in its name, and reads its kernel, stride, padding and
dilation from the operation's own signature. A window slides along the last 1, 2 or 3 dims;
each is a map axis (the field grows: `r <- r + (k' - 1) j`, `u <- u - p j`, `j <- j s`) or a
dim without map positions (a 3-D convolution's depth over stacked frames, a 1-D convolution
over channels), which changes nothing. Upsampling by an integer factor with `nearest` (and
`max_unpool`, `pixel_shuffle`, adaptive pooling to a multiple) is followed exactly: each
input unit becomes a group of output units that share its field (`fgscope.dims`). Resizing
by other factors or modes, transposed convolutions and sampling at data-dependent places
(`roi_align`, `grid_sample`) are approximate, flagged with the operation's name.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from fgscope.dims import Dim, Factor, plain_dims
from fgscope.fields import Axis, Field, kinds_in, lost
from fgscope.views import Call, other_dim

__all__ = ["RULES", "unfold_rule"]


def _tuple(v: Any, n: int) -> tuple:
    if isinstance(v, (tuple, list, torch.Size)):
        v = tuple(v)
        return v if len(v) == n else (v * n)[:n]
    return (v,) * n


def _status(d: Dim) -> tuple[str, str | None]:
    """How a window can slide along dim `d`: `none` (no map positions there), `plain` (one
    moving map factor), `shared` (one axis whose units all share a field) or `split`."""
    kinds = kinds_in(d)
    if not kinds:
        return "none", None
    if len(kinds) > 1 or d.atomic:
        return "tokens", None
    kind = next(iter(kinds))
    fs = d.factors
    if len(fs) == 1 and fs[0].step == 1 and (fs[0].moves or fs[0].size == 1):
        return "plain", kind
    if all(not f.moves for f in fs if f.kind == kind):
        return "shared", kind
    return "split", kind


def slide(f: Field, x: torch.Tensor, out: Any, k, s, p, d, op: str, mix_channels: bool = False) -> Field:
    """`f` after a window `k` (stride `s`, padding `p`, dilation `d`) slides over the last
    `len(k)` dims of `x`, giving `out` (a tensor or a shape); `mix_channels`: the dim before
    them is summed over (a convolution)."""
    out = SimpleNamespace(shape=tuple(out)) if not hasattr(out, "shape") else out
    nd = len(k)
    dims = list(f.dims)
    first = x.dim() - nd
    if mix_channels and first >= 1:
        f = f.mix_dims({first - 1})
        dims = list(f.dims)
        dims[first - 1] = other_dim(out.shape[first - 1])
    for a in range(nd):
        i = first + a
        n_out = int(out.shape[i])
        status, kind = _status(dims[i])
        if status == "none":
            dims[i] = other_dim(n_out)
        elif status == "plain":
            f = f.with_axis(kind, f.axis(kind).conv(int(k[a]), int(s[a]), float(p[a]), int(d[a])))
            dims[i] = Dim((Factor(kind, n_out),))
        elif status == "shared":  # every unit sees the same field: so does every window
            dims[i] = Dim((Factor(kind, n_out, 1, False),))
        elif status == "split":
            f = f.with_axis(kind, f.axis(kind).conv(int(k[a]), int(s[a]), float(p[a]), int(d[a])))
            f = f.flag(f"`{op}` slides over units that share fields (after upsampling or "
                       "window attention): field approximate")
            dims[i] = Dim((Factor(kind, n_out),))
        else:
            f = f.mix_dims({i}).flag(f"`{op}` slides along flattened map positions: field approximate")
            dims[i] = other_dim(n_out)
    return replace(f, dims=tuple(dims))


def _nd(name: str) -> int:
    m = re.search(r"(\d)d", name)
    return int(m.group(1)) if m else 2


def _padding(p: Any, k: tuple, d: tuple, nd: int) -> tuple:
    if p == "valid":
        return (0,) * nd
    if p == "same":
        return tuple((di * (ki - 1)) // 2 for ki, di in zip(k, d))
    return _tuple(p, nd)


def conv_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    w = c.arg(1, "weight")
    if not isinstance(w, torch.Tensor) or f is None:
        return None
    nd = w.dim() - 2
    k = tuple(int(v) for v in w.shape[2:])
    s = _tuple(c.arg(3, "stride", 1), nd)
    d = _tuple(c.arg(5, "dilation", 1), nd)
    p = _padding(c.arg(4, "padding", 0), k, d, nd)
    return slide(f, x, c.outs[0], k, s, p, d, c.name, mix_channels=True)


def conv_transpose_rule(c: Call) -> Field | None:
    # Zero insertion (upsampling by s) then a stride-1 convolution: approximate.
    x = c.args[0]
    f = c.field(x)
    w = c.arg(1, "weight")
    nd = w.dim() - 2
    k = tuple(int(v) for v in w.shape[2:])
    s = _tuple(c.arg(3, "stride", 1), nd)
    p = _tuple(c.arg(4, "padding", 0), nd)
    d = _tuple(c.arg(6, "dilation", 1), nd)
    f = f.mix_dims({x.dim() - nd - 1}) if x.dim() > nd else f
    dims = list(f.dims)
    out = c.outs[0]
    if x.dim() > nd:
        dims[x.dim() - nd - 1] = other_dim(out.shape[x.dim() - nd - 1])
    for a in range(nd):
        i = x.dim() - nd + a
        status, kind = _status(dims[i])
        if kind is None:
            dims[i] = other_dim(out.shape[i])
            continue
        ax = f.axis(kind)
        up = Axis(ax.stride / s[a], ax.rf, ax.start)
        f = f.with_axis(kind, up.conv(k[a], 1, d[a] * (k[a] - 1) - p[a], d[a]))
        dims[i] = Dim((Factor(kind, int(out.shape[i])),))
    return replace(f, dims=tuple(dims)).flag(f"`{c.name}` (transposed convolution): field approximate")


def pool_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    nd = _nd(c.name)
    if c.name.startswith("lp_pool"):  # (input, norm_type, kernel_size, stride, ceil_mode)
        k = _tuple(c.arg(2, "kernel_size"), nd)
        s = c.arg(3, "stride")
        p, d = (0,) * nd, (1,) * nd
    else:  # max: (input, kernel, stride, padding, dilation, ...); avg: (..., padding, ceil_mode)
        k = _tuple(c.arg(1, "kernel_size"), nd)
        s = c.arg(2, "stride")
        p = _tuple(c.arg(3, "padding", 0), nd)
        d = _tuple(c.arg(4, "dilation", 1), nd) if c.name.startswith("max") else (1,) * nd
    s = k if s is None or s == () or s == [] else _tuple(s, nd)
    return slide(f, x, c.outs[0], k, s, p, d, c.name)


def repeat_units(f: Field, dims: list, i: int, kind: str, n: int, factor: int) -> Field:
    """Each of the `n` units along dim `i` becomes `factor` units that share its field."""
    ax = f.axis(kind)
    dims[i] = Dim((Factor(kind, n, factor, True), Factor(kind, factor, 1, False)))
    return f.with_axis(kind, Axis(ax.stride / factor, ax.rf, ax.start))


def _resize(f: Field, x, out, nd: int, op: str, how: str, taps: int = 1) -> Field:
    """`how`: `nearest` (integer factors exact), `adaptive` (adaptive pooling), `linear`
    (interpolation over `taps` neighbours, approximate)."""
    dims = list(f.dims)
    for a in range(nd):
        i = x.dim() - nd + a
        n_in, n_out = int(x.shape[i]), int(out.shape[i])
        status, kind = _status(dims[i])
        if status == "none" or kind is None:
            dims[i] = other_dim(n_out)
            if status != "none":
                f = f.mix_dims({i}).flag(f"`{op}` resizes flattened map positions: field approximate")
            continue
        if n_in == n_out:
            continue
        ax = f.axis(kind)
        if status != "plain":
            f = f.flag(f"`{op}` resizes units that share fields: field approximate")
        if how == "adaptive" and n_out == 1:
            f = f.mix_dims({i})
            dims[i] = Dim((Factor(kind, 1, 1, False),))
            continue
        if how in ("nearest", "adaptive") and n_out % n_in == 0:
            f = repeat_units(f, dims, i, kind, n_in, n_out // n_in)
            continue
        if how in ("nearest", "adaptive") and n_in % n_out == 0:
            m = n_in // n_out
            new = ax.conv(m, m, 0) if how == "adaptive" else Axis(ax.stride * m, ax.rf, ax.start)
            f = f.with_axis(kind, new)
            dims[i] = Dim((Factor(kind, n_out),))
            continue
        r = n_in / n_out
        extra = math.ceil(r) if how == "adaptive" else max(taps - 1, 0) + (math.ceil(r) - 1 if r > 1 else 0)
        f = f.with_axis(kind, Axis(ax.stride * r, ax.rf + extra * ax.stride, ax.start))
        f = f.flag(f"`{op}` resizes by {n_out}/{n_in} ({how}): field approximate")
        dims[i] = Dim((Factor(kind, n_out),))
    return replace(f, dims=tuple(dims))


def adaptive_rule(c: Call) -> Field | None:
    x = c.args[0]
    return _resize(c.field(x), x, c.outs[0], _nd(c.name), c.name, "adaptive")


def interpolate_rule(c: Call) -> Field | None:
    x = c.args[0]
    nd = max(x.dim() - 2, 1)
    if c.name == "upsample_bilinear":
        mode = "bilinear"
    elif c.name == "upsample_nearest":
        mode = "nearest"
    else:
        mode = c.arg(3, "mode", "nearest")
    if mode == "area":
        return _resize(c.field(x), x, c.outs[0], nd, c.name, "adaptive")
    if mode in ("nearest", "nearest-exact"):
        return _resize(c.field(x), x, c.outs[0], nd, c.name, "nearest")
    return _resize(c.field(x), x, c.outs[0], nd, f"{c.name} ({mode})", "linear", 4 if "cubic" in mode else 2)


def unpool_rule(c: Call) -> Field | None:
    # (input, indices, kernel_size, stride, padding, output_size): each pooled unit's value
    # goes back to one place of its window, so an output unit sees its window's pooled unit.
    x = c.args[0]
    f = c.field(x)
    nd = _nd(c.name)
    k = _tuple(c.arg(2, "kernel_size"), nd)
    s = c.arg(3, "stride")
    s = k if s is None else _tuple(s, nd)
    p = _tuple(c.arg(4, "padding", 0), nd)
    out = c.outs[0]
    dims = list(f.dims)
    for a in range(nd):
        i = x.dim() - nd + a
        status, kind = _status(dims[i])
        if kind is None:
            dims[i] = other_dim(out.shape[i])
            continue
        n_in, n_out = int(x.shape[i]), int(out.shape[i])
        f = repeat_units(f, dims, i, kind, n_in, int(s[a]))
        if n_out != n_in * s[a]:
            dims[i] = Dim((Factor(kind, n_out),))
        if k[a] != s[a] or p[a] or n_out != n_in * s[a] or status != "plain":
            f = f.flag(f"`{c.name}` with overlapping or padded windows: field approximate")
    return replace(f, dims=tuple(dims))


def pad_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    pad = list(c.arg(1, "pad", ()))
    out = c.outs[0]
    dims = list(f.dims)
    for k in range(len(pad) // 2):
        i = x.dim() - 1 - k
        left, right = int(pad[2 * k]), int(pad[2 * k + 1])
        if not left and not right:
            continue
        status, kind = _status(dims[i])
        if kind is None:
            dims[i] = other_dim(out.shape[i], batch=dims[i].has("n"))
            if status != "none":
                f = f.mix_dims({i}).flag("`pad` of flattened map positions: field approximate")
            continue
        if status != "plain":
            f = f.flag("`pad` of units that share fields: field approximate")
        f = f.with_axis(kind, f.axis(kind).shift(-left))
        dims[i] = Dim((Factor(kind, int(out.shape[i])),))
    return replace(f, dims=tuple(dims))


def pixel_shuffle_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x)
    out = c.outs[0]
    dims = list(f.dims)
    if c.name == "pixel_shuffle":
        r = int(c.arg(1, "upscale_factor"))
        dims[-3] = other_dim(out.shape[-3])
        for i in (-2, -1):
            status, kind = _status(dims[i])
            if kind is None:
                dims[i] = other_dim(out.shape[i])
            else:
                f = repeat_units(f, dims, len(dims) + i, kind, int(x.shape[i]), r)
        return replace(f, dims=tuple(dims))
    r = int(c.arg(1, "downscale_factor"))
    return slide(replace(f, dims=tuple(dims)), x, out, (r, r), (r, r), (0, 0), (1, 1), c.name,
                 mix_channels=True)


def unfold_rule(c: Call) -> Field | None:
    """`F.unfold` (im2col): `(N, C, H, W) -> (N, C * kh * kw, L)`, one token per window."""
    x = c.args[0]
    f = c.field(x)
    k = _tuple(c.arg(1, "kernel_size"), 2)
    d = _tuple(c.arg(2, "dilation", 1), 2)
    p = _tuple(c.arg(3, "padding", 0), 2)
    s = _tuple(c.arg(4, "stride", 1), 2)
    out = c.outs[0]
    windows = [(x.shape[-2 + a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(2)]
    g = slide(f, x, (*x.shape[:-3], 1, *windows), k, s, p, d, "unfold", mix_channels=True)
    hd, wd = g.dims[-2].factors, g.dims[-1].factors
    tokens = Dim(hd + wd)
    return replace(g, dims=(*g.dims[:-3], other_dim(out.shape[-2]), tokens))


def sampled_rule(c: Call) -> Field | None:
    x = c.args[0]
    f = c.field(x) if isinstance(x, torch.Tensor) else None
    if f is None:
        return None
    return lost(f, plain_dims(c.outs[0].shape), f"`{c.name}` samples the map at data-dependent places")


RULES = {
    **dict.fromkeys(["conv1d", "conv2d", "conv3d", "_convolution", "convolution"], conv_rule),
    **dict.fromkeys(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], conv_transpose_rule),
    **dict.fromkeys(
        [f"{kind}_pool{n}d{suffix}" for kind in ("max", "avg", "lp") for n in (1, 2, 3)
         for suffix in ("", "_with_indices")], pool_rule),
    **dict.fromkeys(
        [f"adaptive_{kind}_pool{n}d{suffix}" for kind in ("max", "avg") for n in (1, 2, 3)
         for suffix in ("", "_with_indices")], adaptive_rule),
    **dict.fromkeys([f"max_unpool{n}d" for n in (1, 2, 3)], unpool_rule),
    **dict.fromkeys(["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"], interpolate_rule),
    "pad": pad_rule,
    **dict.fromkeys(["pixel_shuffle", "pixel_unshuffle"], pixel_shuffle_rule),
    **dict.fromkeys(
        ["roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "grid_sample", "deform_conv2d",
         "fractional_max_pool2d", "fractional_max_pool3d", "fold"], sampled_rule),
}
