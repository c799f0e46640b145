"""Effective stride, receptive field and effective padding of every layer, for any graph.

Method (Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural Networks",
Distill 2019): per spatial axis, a feature map carries three numbers relative to the input
image: the effective stride `j` (input pixels between neighbouring units), the receptive
field size `r` (input pixels that can influence one unit) and the start `u` (input coordinate
of the first pixel of unit 0's receptive field; `-u` is the effective padding). A layer with
kernel `k`, stride `s`, padding `p` and dilation `d` maps them to

    k' = d (k - 1) + 1,   r <- r + (k' - 1) j,   u <- u - p j,   j <- j s.

Instead of assuming a plain chain, fgscope follows the tensors themselves: a
`TorchFunctionMode` sees every operation of one forward (modules and functional calls alike),
so branches and skip connections are handled where they meet. Where tensors of the same size
merge (`+`, `*`, `torch.cat` along channels) the receptive field is the union of the branches'
fields (Araujo et al., "Handling multiple paths"). Pointwise operations keep the geometry.

Documented choices:
- global context: an operand with a 1x1 (or no) spatial size that is broadcast over a larger
  map (squeeze-and-excitation gates) is not counted in the receptive field; the layer is
  flagged `global_context` instead. Counting it would make every later unit see the whole
  image and hide the local structure the receptive field is meant to show.
- reductions over space (global pooling, flatten before a linear layer) give the union of all
  units: the whole input that the map covers.
- upsampling, transposed convolutions and adaptive pooling to sizes that do not divide the
  input are approximations, flagged `exact=False`, as are operations fgscope does not know
  that change the spatial size (treated as pooling by the size ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fgscope.capture import LayerRecord, capture
from fgscope.forward import forward
from fgscope.selection import LayerSpec

__all__ = ["Axis", "LayerGeometry", "trace_geometry", "count_macs"]


@dataclass(frozen=True)
class Axis:
    """Geometry along one spatial axis, in input pixels.

    Attributes:
        stride: effective stride `j` (may be fractional after upsampling).
        rf: receptive field size `r` of one unit.
        start: input coordinate where unit 0's receptive field starts (`-start` = padding).
    """

    stride: float
    rf: float
    start: float

    def conv(self, k: int, s: int, p: float, d: int = 1) -> Axis:
        keff = d * (k - 1) + 1
        return Axis(self.stride * s, self.rf + (keff - 1) * self.stride, self.start - p * self.stride)

    def union(self, other: Axis) -> Axis:
        lo = min(self.start, other.start)
        hi = max(self.start + self.rf, other.start + other.rf)
        return Axis(max(self.stride, other.stride), hi - lo, lo)

    def reduce(self, n: int) -> Axis:
        """All `n` units of the axis merged into one (global pooling)."""
        return Axis(self.stride * n, self.rf + (n - 1) * self.stride, self.start)


@dataclass(frozen=True)
class LayerGeometry:
    """Where one recorded layer's units look in the input image.

    Attributes:
        stride: effective stride (H, W) in input pixels.
        rf: theoretical receptive field size (H, W) in input pixels (may exceed the input).
        padding: effective padding (H, W): how far unit 0's field starts before pixel 0.
        exact: False when an approximation was involved (see module docstring).
        global_context: True when a broadcast global gate (e.g. squeeze-excitation) feeds in.
        spatial: False for outputs without spatial axes (after global pooling or flatten).
    """

    stride: tuple[float, float]
    rf: tuple[float, float]
    padding: tuple[float, float]
    exact: bool = True
    global_context: bool = False
    spatial: bool = True


@dataclass(frozen=True)
class _Geo:
    h: Axis
    w: Axis
    exact: bool = True
    global_context: bool = False
    spatial: bool = True  # False once the spatial axes were reduced away
    hw: tuple[int, int] = (-2, -1)  # which tensor dims are H and W (channels-last blocks move them)

    def with_axes(self, h: Axis, w: Axis, exact: bool = True) -> _Geo:
        return replace(self, h=h, w=w, exact=self.exact and exact)

    def public(self) -> LayerGeometry:
        def num(v: float) -> float:
            return int(v) if float(v).is_integer() else round(v, 3)

        return LayerGeometry(
            stride=(num(self.h.stride), num(self.w.stride)),
            rf=(num(self.h.rf), num(self.w.rf)),
            padding=(num(-self.h.start), num(-self.w.start)),
            exact=self.exact,
            global_context=self.global_context,
            spatial=self.spatial,
        )


def _pair(v: Any, n: int = 2) -> tuple:
    if isinstance(v, (tuple, list)):
        v = tuple(v)
        return v if len(v) == n else (v * n)[:n]
    return (v,) * n


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


class _Tracker(TorchFunctionMode):
    """Follows every operation of one forward and attaches geometry to the tensors it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.geo: dict[int, tuple[Any, _Geo]] = {}  # id(tensor) -> (weakref-ish holder, geometry)
        self.macs = 0

    # -- bookkeeping --
    def get(self, t: Any) -> _Geo | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.geo.get(id(t))
        if entry is None or entry[0] is not t:
            return None
        return entry[1]

    def set(self, t: torch.Tensor, g: _Geo) -> None:
        # Holding the tensor keeps its id unique for the forward; cleared after the trace.
        self.geo[id(t)] = (t, g)

    def seed(self, x: torch.Tensor) -> None:
        one = Axis(1.0, 1.0, 0.0)
        self.set(x, _Geo(one, one, hw=(x.dim() - 2, x.dim() - 1)))

    # -- the mode --
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("__get__", "dim", "size", "numel", "data_ptr", "__len__"):
            return out
        inputs = [a for a in _tensors(args) + _tensors(kwargs) if self.get(a) is not None]
        if not inputs:
            return out
        outs = _tensors(out)
        if not outs:
            return out
        self._count_macs(name, args, kwargs, outs[0])
        # The main input: a spatial map of the output's rank when there is one (in `s * x`
        # of a squeeze-excitation gate, `x`, not the (N, C, 1, 1) scale `s`).
        spatial = [a for a in inputs if self.get(a).spatial and a.dim() == outs[0].dim()]
        if spatial:
            inputs = spatial[:1] + [a for a in inputs if a is not spatial[0]]
        g = self._rule(name, args, kwargs, inputs, outs[0])
        for o in outs:
            self.set(o, g)
        return out

    def _count_macs(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        if name.startswith("conv") and "transpose" not in name and len(args) > 1:
            w = args[1]
            if isinstance(w, torch.Tensor):
                self.macs += out.numel() * math.prod(w.shape[1:])
        elif name.startswith("conv_transpose") and len(args) > 1:
            w = args[1]
            x = args[0]
            if isinstance(w, torch.Tensor) and isinstance(x, torch.Tensor):
                self.macs += x.numel() * math.prod(w.shape[1:])
        elif name == "linear" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.macs += out.numel() * args[1].shape[-1]

    def _rule(self, name: str, args: tuple, kwargs: dict, inputs: list, out: torch.Tensor) -> _Geo:
        x = inputs[0]
        g = self.get(x)
        assert g is not None
        nd_in, nd_out = x.dim(), out.dim()
        if name in ("permute", "transpose", "swapaxes", "swapdims") and nd_out == nd_in:
            return self._permute(g, name, args, kwargs, nd_in)
        if name.startswith("conv_transpose"):
            return self._conv_transpose(g, args, kwargs, x, out)
        if name.startswith("conv") and nd_in >= 3:
            w = _arg(args, kwargs, 1, "weight", None)
            k = _pair(tuple(w.shape[2:]))
            s = _pair(_arg(args, kwargs, 3, "stride", 1))
            d = _pair(_arg(args, kwargs, 5, "dilation", 1))
            p = _arg(args, kwargs, 4, "padding", 0)
            if p == "valid":
                p = (0, 0)
            elif p == "same":
                p = tuple((di * (ki - 1)) // 2 for ki, di in zip(k, d))
            p = _pair(p)
            return self._conv2(g, k, s, p, d)
        if "pool" in name and not name.startswith("adaptive") and nd_in >= 3:
            k = _pair(_arg(args, kwargs, 1, "kernel_size", 1))
            s = _arg(args, kwargs, 2, "stride", None)
            s = k if s in (None, (), []) else _pair(s)
            p = _pair(_arg(args, kwargs, 3, "padding", 0))
            d = _pair(_arg(args, kwargs, 4, "dilation", 1)) if name.startswith("max") else (1, 1)
            return self._conv2(g, k, s, p, d)
        if name in ("pad",) and nd_in >= 3:
            pad = list(_arg(args, kwargs, 1, "pad", ()))
            left_w = pad[0] if len(pad) > 0 else 0
            left_h = pad[2] if len(pad) > 2 else 0
            return g.with_axes(
                Axis(g.h.stride, g.h.rf, g.h.start - left_h * g.h.stride),
                Axis(g.w.stride, g.w.rf, g.w.start - left_w * g.w.stride),
            )
        if name == "__getitem__" and nd_in >= 3 and nd_out == nd_in and g.hw == (nd_in - 2, nd_in - 1):
            return self._slice(g, args, x)
        if name in ("pixel_shuffle", "pixel_unshuffle"):
            f = _arg(args, kwargs, 1, "upscale_factor" if name == "pixel_shuffle" else "downscale_factor", 1)
            if name == "pixel_shuffle":
                return g.with_axes(*(Axis(a.stride / f, a.rf, a.start) for a in (g.h, g.w)), exact=True)
            return g.with_axes(*(a.conv(f, f, 0) for a in (g.h, g.w)))
        if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            in_sp, out_sp = _spatial(x, g), _spatial(out, g)
            if in_sp and out_sp and out.dim() == nd_in:
                mode = _arg(args, kwargs, 3, "mode", "nearest")
                axes = []
                exact = mode == "nearest"
                for a, n_in, n_out in zip((g.h, g.w), in_sp, out_sp):
                    f = n_out / n_in
                    exact = exact and float(f).is_integer()
                    axes.append(Axis(a.stride / f, a.rf + (0 if mode == "nearest" else a.stride), a.start))
                return g.with_axes(axes[0], axes[1], exact=exact)
        # Merges and pointwise operations: union over the spatial inputs of the output's size.
        return self._generic(g, inputs, x, out)

    def _permute(self, g: _Geo, name: str, args, kwargs, nd: int) -> _Geo:
        if name == "permute":
            dims = args[1:] if len(args) > 2 else _arg(args, kwargs, 1, "dims", ())
            dims = [d % nd for d in (dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims)]
            order = {old: new for new, old in enumerate(dims)}
        else:
            a, b = (_arg(args, kwargs, 1, "dim0", 0) % nd, _arg(args, kwargs, 2, "dim1", 1) % nd)
            order = {i: i for i in range(nd)} | {a: b, b: a}
        h, w = (d % nd for d in g.hw)
        return replace(g, hw=(order[h], order[w]))

    def _conv2(self, g: _Geo, k, s, p, d) -> _Geo:
        return g.with_axes(g.h.conv(k[0], s[0], p[0], d[0]), g.w.conv(k[1], s[1], p[1], d[1]))

    def _conv_transpose(self, g: _Geo, args, kwargs, x, out) -> _Geo:
        # Transposed conv = zero-insertion upsampling by s, then a stride-1 conv: approximate.
        w = _arg(args, kwargs, 1, "weight", None)
        k = _pair(tuple(w.shape[2:]))
        s = _pair(_arg(args, kwargs, 3, "stride", 1))
        p = _pair(_arg(args, kwargs, 4, "padding", 0))
        d = _pair(_arg(args, kwargs, 6, "dilation", 1))
        axes = []
        for a, ki, si, pi, di in zip((g.h, g.w), k, s, p, d):
            up = Axis(a.stride / si, a.rf, a.start)
            axes.append(up.conv(ki, 1, di * (ki - 1) - pi, di))
        return g.with_axes(axes[0], axes[1], exact=False)

    def _slice(self, g: _Geo, args, x) -> _Geo:
        idx = args[1] if len(args) > 1 else None
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis for i in idx):
            e = idx.index(Ellipsis)
            idx = idx[:e] + (slice(None),) * (x.dim() - len(idx) + 1) + idx[e + 1 :]
        idx = idx + (slice(None),) * (x.dim() - len(idx))
        axes = []
        for a, sl, n in zip((g.h, g.w), idx[-2:], x.shape[-2:]):
            if not isinstance(sl, slice):
                return g.with_axes(g.h, g.w, exact=False)
            start, _, step = sl.indices(int(n))
            axes.append(Axis(a.stride * step, a.rf, a.start + start * a.stride))
        return g.with_axes(axes[0], axes[1])

    def _generic(self, g: _Geo, inputs: list, x: torch.Tensor, out: torch.Tensor) -> _Geo:
        out_sp = _spatial(out, g) if out.dim() == x.dim() and g.spatial else None
        same = [
            t for t in inputs
            if out_sp is not None and t.dim() == out.dim() and _spatial(t, self.get(t)) == out_sp
        ]
        merged = None
        global_ctx = False
        for t in same:
            gt = self.get(t)
            merged = gt if merged is None else replace(
                merged,
                h=merged.h.union(gt.h),
                w=merged.w.union(gt.w),
                exact=merged.exact and gt.exact,
                global_context=merged.global_context or gt.global_context,
            )
        others = [t for t in inputs if all(t is not u for u in same)]
        if merged is not None:
            if any(_spatial(t, self.get(t)) in (None, (1, 1)) for t in others):
                global_ctx = True
            return replace(merged, global_context=merged.global_context or global_ctx)
        # The output's spatial size differs from every input's.
        in_sp = _spatial(x, g)
        if in_sp is None:
            return g  # vectors stay vectors (linear layers, softmax)
        out_sp = _spatial(out, g) if out.dim() == x.dim() else None
        if out_sp is None or out_sp == (1, 1):
            # Reduction over space (global pooling, flatten, mean over H, W): union of all units.
            return replace(g, h=g.h.reduce(in_sp[0]), w=g.w.reduce(in_sp[1]), spatial=False)
        axes = []
        exact = True
        for a, n_in, n_out in zip((g.h, g.w), in_sp, out_sp):
            if n_out == n_in:
                axes.append(a)
            elif n_out < n_in:  # unknown downsampling: pooling by the size ratio
                f = n_in / n_out
                k = math.ceil(f)
                exact = exact and float(f).is_integer()
                axes.append(Axis(a.stride * f, a.rf + (k - 1) * a.stride, a.start))
            else:  # upsampling: each output unit sees about one input unit and its neighbour
                f = n_out / n_in
                axes.append(Axis(a.stride / f, a.rf + a.stride, a.start))
                exact = False
        return g.with_axes(axes[0], axes[1], exact=exact)


def _spatial(t: torch.Tensor, g: _Geo | None) -> tuple[int, int] | None:
    """(H, W) of `t` according to its geometry's axis positions; None without spatial axes."""
    if g is None or not g.spatial or t.dim() < 3:
        return None
    h, w = g.hw
    try:
        return int(t.shape[h]), int(t.shape[w])
    except IndexError:
        return None


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def trace_geometry(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: LayerSpec = "all",
    on_record: Callable[[LayerRecord, LayerGeometry | None], None] | None = None,
) -> tuple[dict[str, LayerGeometry | None], int]:
    """Run one forward of `example_input` and return the geometry of every selected record.

    Args:
        model: the model (not changed).
        example_input: `(N, C, H, W)`; only its spatial size matters.
        layers: selection as in `fgscope.selection`.
        on_record: also called with each record (streamed, not kept) and its geometry.

    Returns:
        (geometry per record name, None where the output carries no traced geometry;
         multiply-accumulate operations of the forward per input sample).
    """
    tracker = _Tracker()
    result: dict[str, LayerGeometry | None] = {}

    def on_rec(rec: LayerRecord) -> None:
        g = tracker.get(rec.tensor)
        pub = g.public() if g is not None else None
        result[rec.name] = pub
        if on_record is not None:
            on_record(rec, pub)

    x = example_input.detach().clone()
    with capture(model, layers, on_record=on_rec, to=None, example_input=x):
        tracker.seed(x)
        with tracker:
            forward(model, x)
    macs = tracker.macs // max(int(x.shape[0]), 1)
    tracker.geo.clear()
    return result, macs


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward per sample (convolutions and linear layers)."""
    tracker = _Tracker()
    x = example_input.detach().clone()
    tracker.seed(x)
    with torch.inference_mode(), tracker:
        forward(model, x)
    tracker.geo.clear()
    return tracker.macs // max(int(x.shape[0]), 1)
