"""Effective stride, receptive field and effective padding of every layer, for any graph.

Method (Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural Networks",
Distill 2019): per spatial axis, a feature map carries three numbers relative to the input
image: the effective stride `j` (input pixels between neighbouring units), the receptive
field size `r` (input pixels that can influence one unit) and the start `u` (input coordinate
of the first pixel of unit 0's receptive field; `-u` is the effective padding). A layer with
kernel `k`, stride `s`, padding `p` and dilation `d` maps them to

    k' = d (k - 1) + 1,   r <- r + (k' - 1) j,   u <- u - p j,   j <- j s.

Instead of assuming a plain chain, fgscope follows the tensors themselves: a
`TorchFunctionMode` (`fgscope.tracer`) sees every operation of one forward (modules and
functional calls alike), so branches and skip connections are handled where they meet. Where
tensors of the same size merge (`+`, `*`, `torch.cat` along channels) the receptive field is
the union of the branches' fields (Araujo et al., "Handling multiple paths"). Pointwise
operations keep the geometry. The trace also follows where the map's rows and columns are in
every tensor (`fgscope.dims`): reshapes and views that keep them (a channel shuffle, grouped
channels, `stack(...).sum(1)`, flattening channels, Swin's windows, ViT's patch tokens) keep
the geometry exact, and each record says its layout (`fgscope.layouts`: NCHW, NHWC, tokens).

Documented choices:
- global context: an operand with a 1x1 (or no) spatial size that is broadcast over a larger
  map (squeeze-and-excitation gates) is not counted in the receptive field; the layer is
  flagged `global_context` instead. Counting it would make every later unit see the whole
  image and hide the local structure the receptive field is meant to show.
- reductions over space (global pooling, flatten before a linear layer) give the union of all
  units: the whole input that the map covers. Attention mixes the same way: within Swin's
  windows every unit sees its window, in a ViT every token sees the whole map.
- units that share one field (a group of a window after window attention, the copies of a
  unit after nearest upsampling by an integer factor, every token after global attention)
  cannot be described by one stride and padding for every unit: their geometry says the
  group's field and is flagged `exact=False`, with a note saying so.
- resizing by other factors or modes, transposed convolutions, sampling at data-dependent
  places (`roi_align`) and anything fgscope cannot follow (a reshape that cuts a map axis
  unevenly, an unknown operation that changes a map's shape) are approximations, flagged
  `exact=False` with the reason in `notes`. Nothing unknown is ever reported as exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fgscope.capture import LayerRecord, capture
from fgscope.dims import factors_of
from fgscope.fields import Axis, Field
from fgscope.forward import forward
from fgscope.functional import OpScope, op_names
from fgscope.layouts import Layout, layout_of
from fgscope.names import RecordPlan, plan_records
from fgscope.selection import LayerSpec, select_layers
from fgscope.tracer import Tracer, tensors_in

__all__ = [
    "Axis", "LayerGeometry", "MissedOp", "Trace", "trace", "trace_geometry", "count_macs",
    "public_geometry",
]


@dataclass(frozen=True)
class LayerGeometry:
    """Where one recorded layer's units look in the input image.

    Attributes:
        stride: effective stride (H, W) in input pixels (between neighbouring map units).
        rf: theoretical receptive field size (H, W) in input pixels (may exceed the input).
        padding: effective padding (H, W): how far unit 0's field starts before pixel 0.
        exact: False when an approximation was involved; `notes` says which.
        global_context: True when a broadcast global gate (e.g. squeeze-excitation) or a
            normalisation over the whole map feeds in.
        spatial: False for outputs without map positions (after global pooling or flatten).
        notes: why the geometry is approximate, each once (empty when exact).
        layout: where the map is in the output (`fgscope.layouts`: NCHW, NHWC, tokens, ...).
    """

    stride: tuple[float, float]
    rf: tuple[float, float]
    padding: tuple[float, float]
    exact: bool = True
    global_context: bool = False
    spatial: bool = True
    notes: tuple[str, ...] = ()
    layout: Layout | None = None

    @property
    def note(self) -> str | None:
        """The first reason for `exact=False` (and how many more there are), None without."""
        if not self.notes:
            return None
        more = len(self.notes) - 1
        return self.notes[0] + (f" (+{more} more)" if more else "")


def _num(v: float) -> float:
    return int(v) if float(v).is_integer() else round(v, 3)


def public_geometry(f: Field) -> LayerGeometry:
    """What a traced tensor's field means for one layer's output (see module docstring)."""
    layout = layout_of(f.dims)
    vector = not layout.is_map
    if vector and f.spatial:
        f = f.mix_all()  # a flattened map: the rf is the union of its units
    notes = list(f.notes)
    stride, groups = [], []
    same = True
    for kind in ("h", "w"):
        fs = [fa for _, _, fa in factors_of(f.dims, kind)]
        stride.append(f.axis(kind).stride * min((fa.step for fa in fs), default=1))
        shared = 1
        for fa in fs:
            shared *= 1 if fa.moves else fa.size
        total = 1
        for fa in fs:
            total *= fa.size
        groups.append(shared)
        same = same and shared == total
    exact = f.exact
    if not vector and max(groups) > 1:
        if same:
            notes.append("every unit sees the same field (attention or pooling over all positions)")
        else:
            notes.append(f"units share fields in groups of {groups[0]}x{groups[1]} (windows, nearest "
                         "upsampling): rf is each group's, padding the first group's")
        exact = False
    grid = layout.grid or (1, 1)
    return LayerGeometry(
        stride=(_num(stride[0]), _num(stride[1])),
        rf=(_num(f.h.rf), _num(f.w.rf)),
        padding=(_num(-f.h.start), _num(-f.w.start)),
        exact=exact,
        global_context=f.global_context,
        spatial=not vector and (f.spatial or grid[0] * grid[1] > 1),
        notes=tuple(notes),
        layout=layout,
    )


@dataclass(frozen=True)
class MissedOp:
    """A functional operation that changes the representation and that no record shows.

    Attributes:
        name: its torch.fx name, which `--layers` accepts (`maxpool_1`, `layer1.0.add`).
        op: the operation (`max_pool2d`, `add`, `relu`).
        why: what it changes: `makes stride-8 maps` (a resolution no record has), `merges
            branches` (one of them a record, the result not recorded nor fed to a recorded
            module), `activates a recorded output`.
    """

    name: str
    op: str
    why: str


@dataclass(frozen=True)
class Trace:
    """What one traced forward found.

    Attributes:
        geometry: per record name, its geometry (None where none was traced).
        macs: multiply-accumulates per input sample.
        missed: functional operations that change the representation and that the
            selection does not record (only with `report_ops=True`).
    """

    geometry: dict[str, LayerGeometry | None]
    macs: int
    missed: list[MissedOp]

    def missed_note(self) -> str | None:
        """One line for a terminal, None when nothing was missed."""
        if not self.missed:
            return None
        shown = ", ".join(f"`{m.name}` ({m.op}: {m.why})" for m in self.missed[:4])
        more = f" and {len(self.missed) - 4} more" if len(self.missed) > 4 else ""
        return (f"functional operations that change the representation are not recorded: {shown}{more}; "
                "select them by name or add `ops` to --layers")


_ACTIVATIONS = frozenset(
    "relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid leaky_relu elu selu celu mish "
    "softplus hardtanh prelu".split()
)
_MERGES = frozenset("add sub mul truediv div cat concat concatenate stack maximum minimum where".split())


def _key(t: torch.Tensor) -> tuple:
    try:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)
    except (RuntimeError, NotImplementedError):
        return id(t), 0, ()


class _OpReport:
    """Listens to the functional operations of a traced forward (see `Trace.missed`)."""

    def __init__(self, tracer: Tracer, names: dict[tuple[str, str, int], list], plan: RecordPlan) -> None:
        self.tracer, self.names, self.plan_ops = tracer, names, set(plan.ops)
        self.inside = list(plan.modules)  # recorded modules: what runs inside is theirs
        self.recorded: set[tuple] = set()
        self.consumed: set[tuple] = set()  # inputs of selected modules
        self.strides: set[tuple] = set()
        self.pending: list[tuple[MissedOp, tuple | None, tuple | None]] = []  # op, stride, out key
        self.scope: OpScope | None = None

    def on_op(self, scope: str, op: str, k: int, func: object, out: object) -> None:
        if any(scope == m or scope.startswith(m + ".") or m == "" for m in self.inside):
            return  # part of a recorded module's computation
        refs = self.names.get((scope, op, k))
        if not refs or any(n in self.plan_ops for n, _ in refs):
            return
        outs = tensors_in(out)
        f = self.tracer.get(outs[0]) if outs else None
        if f is None:
            return
        name = refs[0][0]
        args, kwargs = self.scope.last_args
        ins = [t for t in tensors_in(args) + tensors_in(kwargs) if self.tracer.get(t) is not None]
        before = {(g.h.stride, g.w.stride) for g in map(self.tracer.get, ins) if g.spatial}
        if f.spatial and before and (f.h.stride, f.w.stride) not in before:
            g = public_geometry(f)
            self.pending.append((MissedOp(name, op, f"makes stride-{_num(max(g.stride))} maps"), g.stride, None))
        elif not any(m.startswith(scope + ".") or not scope for m in self.inside):
            return  # a module with nothing recorded inside: the selection skips it whole
        elif op in _MERGES and len({id(t) for t in ins}) >= 2 and any(_key(t) in self.recorded for t in ins):
            self.pending.append((MissedOp(name, op, "merges branches"), None, _key(outs[0])))
        elif op in _ACTIVATIONS and ins and _key(ins[0]) in self.recorded:
            self.pending.append((MissedOp(name, op, "activates a recorded output"), None, None))

    def missed(self) -> list[MissedOp]:
        consumed = self.consumed
        out = []
        for m, stride, key in self.pending:
            if stride is not None and stride in self.strides:
                continue
            if key is not None and (key in self.recorded or key in consumed):
                continue
            out.append(m)
        return out


def trace(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: LayerSpec = "all",
    on_record: Callable[[LayerRecord, LayerGeometry | None], None] | None = None,
    report_ops: bool = False,
) -> Trace:
    """Run one forward of `example_input`: the geometry of every selected record, the
    multiply-accumulates and (with `report_ops`) the functional operations it misses.

    Args:
        model: the model (not changed).
        example_input: `(N, C, H, W)`; only its spatial size matters.
        layers: selection as in `fgscope.selection`.
        on_record: also called with each record (streamed, not kept) and its geometry.
        report_ops: find the functional operations (by torch.fx name) that change the
            representation (a new resolution, a merge of branches, an activation applied
            to a recorded output) and that no selected record shows.
    """
    tracer = Tracer()
    result: dict[str, LayerGeometry | None] = {}
    x = example_input.detach().clone()
    selected = list(select_layers(model, layers, x))
    report = None
    if report_ops:
        names = op_names(model, x)
        report = _OpReport(tracer, names.by_event(), plan_records(selected, dict(model.named_modules())))

    def on_rec(rec: LayerRecord) -> None:
        f = tracer.get(rec.tensor)
        pub = public_geometry(f) if f is not None else None
        result[rec.name] = pub
        if report is not None:
            report.recorded.add(_key(rec.tensor))
            if pub is not None and pub.spatial:
                report.strides.add(pub.stride)
        if on_record is not None:
            on_record(rec, pub)

    with contextlib.ExitStack() as stack:
        stack.callback(tracer.clear)
        tracer.seed(x)
        stack.enter_context(tracer)
        stack.enter_context(capture(model, selected, on_record=on_rec, to=None, example_input=x))
        if report is not None:
            report.scope = OpScope(report.on_op)
            modules = dict(model.named_modules())
            for name in plan_records(selected, modules).modules:
                h = modules[name].register_forward_pre_hook(
                    lambda m, a: report.consumed.update(_key(t) for t in tensors_in(a)))
                stack.callback(h.remove)
            stack.enter_context(report.scope.hooked(model))
            stack.enter_context(report.scope)
        forward(model, x)
        missed = report.missed() if report is not None else []
    return Trace(result, tracer.macs // max(int(x.shape[0]), 1), missed)


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
         multiply-accumulate operations of the forward per input sample). `trace` also
         reports the functional operations a selection misses.
    """
    t = trace(model, example_input, layers, on_record)
    return t.geometry, t.macs


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward per sample (convolutions and linear layers)."""
    tracer = Tracer()
    x = example_input.detach().clone()
    tracer.seed(x)
    try:
        with torch.inference_mode(), tracer:
            forward(model, x)
    finally:
        tracer.clear()
    return tracer.macs // max(int(x.shape[0]), 1)
