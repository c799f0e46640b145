"""capture: exact records for every call, structured outputs, clean-up (selection: test_selection.py)."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torchvision
from conftest import TinyNet, TupleNet, reference_records
from torch import nn

from fgscope.capture import capture
from fgscope.errors import LayerNotFoundError
from fgscope.selection import leaf_modules


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def test_records_every_leaf_call_in_order(tiny, tiny_input):
    with capture(tiny) as rec:
        tiny(tiny_input)
    assert rec.names() == [
        "stem.0", "stem.1", "stem.2",
        "block.conv1", "block.bn1", "block.relu", "block.conv2", "block.bn2", "block.relu:2",
        "down", "act", "pool", "fc",
    ]
    relu2 = rec.records[8]
    assert (relu2.module_name, relu2.call, relu2.module_type) == ("block.relu", 2, "ReLU")
    assert [r.index for r in rec.records] == list(range(13))


def test_records_equal_a_clone_taken_in_the_hook(tiny, tiny_input):
    """In-place ReLU after BN and `out += x` after bn2 must not change earlier records."""
    expected = reference_records(tiny, tiny_input, list(leaf_modules(tiny)))
    with capture(tiny) as rec:
        tiny(tiny_input)
    assert [r.name for r in rec.records] == [n for n, _ in expected]
    for r, (_, t) in zip(rec.records, expected):
        assert torch.equal(r.tensor, t), r.name
    # the BN outputs really were overwritten in place by the model
    bn1 = rec.by_name()["stem.1"][0].tensor
    assert (bn1 < 0).any()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_match_reference(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = reference_records(model, x, list(leaf_modules(model)))
    with capture(model) as rec:
        model(x)
    assert len(rec.records) == len(expected)
    for r, (name, t) in zip(rec.records, expected):
        assert r.name == name
        assert torch.equal(r.tensor, t), name


def test_view_of_a_record_modified_in_place():
    class ViewThenInplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Identity()
            self.b = nn.Flatten(1)

        def forward(self, x):
            y = self.a(x * 1.0)
            z = self.b(y)  # a view of y's storage
            y.mul_(0)
            z.add_(5)
            return z

    m = ViewThenInplace()
    x = torch.ones(1, 2, 2, 2)
    with capture(m) as rec:
        out = m(x)
        # the model's output is the caller's: changing it leaves the record alone
        out.fill_(-1)
    assert torch.equal(rec.records[0].tensor, torch.ones(1, 2, 2, 2))
    assert torch.equal(rec.records[1].tensor, torch.ones(1, 8))


def test_setitem_and_out_kwarg_are_watched():
    class Writer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Identity()

        def forward(self, x):
            y = self.a(x.clone())
            y[0, 0] = 100.0
            torch.add(x, 1, out=y)
            return y

    m = Writer()
    x = torch.zeros(1, 3)
    with capture(m) as rec:
        m(x)
    assert torch.equal(rec.records[0].tensor, torch.zeros(1, 3))


def test_structured_outputs_are_recorded_per_element():
    m = TupleNet().eval()
    with capture(m, "multi,split") as rec:
        m(torch.randn(1, 3, 8, 8))
    names = rec.names()
    assert names == ["multi[0]", "multi[1][mean]", "multi[1][max]", "split[left]", "split[right]"]
    by = {r.name: r for r in rec.records}
    assert by["split[left]"].shape == (2, 8, 8)
    assert by["multi[1][mean]"].shape == (4,)
    assert by["split[right]"].key == "right"


def test_hooks_and_state_restored_after_exception(tiny):
    tiny.train()
    tiny.fc.weight.requires_grad_(False)

    class Boom(RuntimeError):
        pass

    def explode(m, a, o):
        raise Boom("forward failed")

    h = tiny.down.register_forward_hook(explode)
    with pytest.raises(Boom):
        with capture(tiny, "all"):
            assert not tiny.training  # eval during capture
            tiny(torch.randn(1, 3, 16, 16))
    h.remove()
    assert _no_hooks(tiny)
    assert tiny.training and all(m.training for m in tiny.modules())
    assert not tiny.fc.weight.requires_grad
    assert tiny.fc.bias.requires_grad


def test_hooks_removed_and_mixed_training_flags_restored(tiny):
    tiny.train()
    tiny.block.eval()
    with capture(tiny) as rec:
        tiny(torch.randn(1, 3, 16, 16))
    assert rec.records
    assert _no_hooks(tiny)
    assert tiny.training and not tiny.block.training and not tiny.block.bn1.training
    assert tiny.stem.training


def test_one_module_left_training_in_an_eval_model_runs_in_eval(tiny):
    """capture skips `eval()` only when no module trains: one training BatchNorm deep in an
    eval model still runs in eval (its running statistics untouched), and is restored."""
    tiny.eval()
    tiny.block.bn1.train()
    before = tiny.block.bn1.running_mean.clone()
    with capture(tiny):
        assert not any(m.training for m in tiny.modules())
        tiny(torch.randn(2, 3, 16, 16))
    assert torch.equal(tiny.block.bn1.running_mean, before)
    assert tiny.block.bn1.training and not tiny.training


def test_unknown_layer_fails_before_running(tiny):
    calls = []
    tiny.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(LayerNotFoundError) as exc:
        with capture(tiny, "block.conv3"):
            tiny(torch.randn(1, 3, 8, 8))
    msg = str(exc.value)
    assert "block.conv3" in msg and "block.conv1" in msg and "fgscope summary" in msg
    assert "\n" not in msg
    assert not calls


def test_streaming_keeps_nothing_and_sees_exact_values(tiny, tiny_input):
    expected = dict(reference_records(tiny, tiny_input, list(leaf_modules(tiny))))
    seen = {}

    def consume(rec):
        seen[rec.name] = rec.tensor.sum().item()

    with capture(tiny, on_record=consume) as rec:
        tiny(tiny_input)
    assert rec.records == []
    assert set(seen) == set(expected)
    for name, s in seen.items():
        assert s == pytest.approx(expected[name].sum().item(), rel=1e-6, abs=1e-5)


def test_several_forwards_count_steps(tiny):
    with capture(tiny, "block.relu:*") as rec:
        tiny(torch.randn(1, 3, 16, 16))
        tiny(torch.randn(3, 3, 16, 16))
    assert [(r.name, r.step) for r in rec.records] == [
        ("block.relu", 0), ("block.relu:2", 0), ("block.relu", 1), ("block.relu:2", 1),
    ]
    assert rec.steps == 2
    assert rec.stacked()["block.relu"].shape == (4, 8, 8, 8)


def test_grad_mode_keeps_the_graph(tiny):
    x = torch.randn(1, 3, 16, 16)
    with capture(tiny, "down", grad=True) as rec:
        y = tiny(x)
        (g,) = torch.autograd.grad(y[0, 1], rec.records[0].tensor)
    assert g.shape == rec.records[0].tensor.shape
    assert g.abs().sum() > 0


def test_inference_mode_by_default(tiny):
    with capture(tiny, "fc") as rec:
        tiny(torch.randn(1, 3, 16, 16))
    assert not rec.records[0].tensor.requires_grad


def test_model_unchanged_by_capture():
    model = TinyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with capture(model):
        model(torch.randn(2, 3, 16, 16))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_records_to_cpu_are_exact(tiny, tiny_input):
    expected = reference_records(tiny, tiny_input, list(leaf_modules(tiny)))
    model = tiny.cuda()
    with capture(model, to="cpu") as rec:
        model(tiny_input.cuda())
    for r, (_, t) in zip(rec.records, expected):
        assert r.tensor.device.type == "cpu"
        torch.testing.assert_close(r.tensor, t, rtol=1e-4, atol=1e-4)
    with capture(model, to=None) as rec:
        model(tiny_input.cuda())
    assert all(r.tensor.is_cuda for r in rec.records)
    for r, (_, t) in zip(rec.records, expected):
        torch.testing.assert_close(r.tensor.cpu(), t, rtol=1e-4, atol=1e-4)


def test_public_api_capture_is_callable_after_submodule_import(tiny):
    import fgscope
    import fgscope.capture  # binds the package attribute to the submodule
    import fgscope.geometry  # noqa: F401

    with fgscope.capture(tiny, "fc") as rec:
        tiny(torch.randn(1, 3, 16, 16))
    assert rec.names() == ["fc"]


def test_foreach_inplace_ops_are_copied_on_write():
    class Foreach(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Identity(), nn.Identity()

        def forward(self, x):
            y, z = self.a(x * 1.0), self.b(x * 2.0)
            torch._foreach_add_([y, z], 5.0)  # writes both records' storage
            torch._foreach_mul_([y, z], [y, z])
            return y + z

    m = Foreach()
    x = torch.randn(2, 3)
    expected = reference_records(m, x, ["a", "b"])
    with capture(m) as rec:
        m(x)
    for r, (name, t) in zip(rec.records, expected):
        assert r.name == name and torch.equal(r.tensor, t), name


def test_grad_records_stay_on_the_graph_when_overwritten_in_place(tiny):
    """stem.1 (BatchNorm) is overwritten by ReLU(inplace=True), block.bn2 by `out += x`."""
    x = torch.randn(1, 3, 16, 16)
    names = ["stem.1", "block.bn2", "block.relu:2"]
    expected = dict(reference_records(tiny, x, ["stem.1", "block.bn2", "block.relu"]))
    with capture(tiny, names, grad=True) as rec:
        y = tiny(x)
        grads = torch.autograd.grad(y[0, 1], [r.tensor for r in rec.records])
    assert [r.name for r in rec.records] == names
    for r in rec.records:
        assert torch.equal(r.tensor.detach(), expected[r.name]), r.name
    # the reference: a copy without in-place ops, gradients of the same values
    ref = copy.deepcopy(tiny)

    def no_inplace_forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)

    ref.stem[2].inplace = False
    ref.block.forward = types.MethodType(no_inplace_forward, ref.block)
    seen = {}
    ref.stem[1].register_forward_hook(lambda m, a, o: seen.setdefault("stem.1", o))
    ref.block.bn2.register_forward_hook(lambda m, a, o: seen.setdefault("block.bn2", o))
    ref.block.register_forward_hook(lambda m, a, o: seen.setdefault("block.relu:2", o))
    y_ref = ref(x)
    want = torch.autograd.grad(y_ref[0, 1], [seen[n] for n in names])
    for g, w, n in zip(grads, want, names):
        assert g is not None and torch.allclose(g, w, atol=1e-6), n
    assert _no_hooks(tiny)


def test_calls_and_elements_are_selected_by_record_name(tiny, tiny_input):
    with capture(tiny, "block.relu:2") as rec:
        tiny(tiny_input)
    assert rec.names() == ["block.relu:2"]
    with capture(tiny, "block.relu") as rec:  # a plain name is the first call (as in torch.fx)
        tiny(tiny_input)
    assert rec.names() == ["block.relu"]
    with capture(tiny, "block.relu_1") as rec:  # torch.fx's name of the second call
        tiny(tiny_input)
    assert rec.names() == ["block.relu:2"]
    with capture(tiny, "block.relu:*") as rec:
        tiny(tiny_input)
    assert rec.names() == ["block.relu", "block.relu:2"]


def test_functional_capture_removes_its_hooks(tiny, tiny_input):
    with capture(tiny, "flatten", example_input=tiny_input[:1]) as rec:
        tiny(tiny_input)
    assert rec.names() == ["flatten"] and rec.records[0].shape == (16,)
    assert _no_hooks(tiny)


class _Writes(nn.Module):
    """In-place writes of every kind into recorded outputs, and aliases the model relies on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.act = nn.ReLU6(inplace=True)  # F.hardtanh(x, 0, 6, inplace) with positional flag
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        same = y  # the same tensor object: in-place semantics must reach it
        y = self.relu(y)
        z = self.conv2(y)
        view = z[:, :2]  # an alias of z's storage: the write below must show through it
        z = self.act(z)
        w = self.conv2(z)
        w += 1.0  # __iadd__
        w.mul_(0.5)  # a Tensor method
        torch.relu_(w)  # a torch function
        return same + view.sum() + w


def test_inplace_writes_keep_records_and_the_models_semantics(monkeypatch):
    # Records are copy-on-write snapshots: every write below copies the writer's side, except
    # the in-place activation modules, which run out of place when nothing else aliases their
    # input (no copy) and point the model's tensor at the result. Either way the records
    # equal clones taken in the hooks, and the model's output is the same.
    import fgscope._inplace as ip

    flipped: list[str] = []
    real = ip.InplaceModules._after

    def spy(self, module, args, out):
        got = real(self, module, args, out)
        if got is not None:
            flipped.append(type(module).__name__)
        return got

    monkeypatch.setattr(ip.InplaceModules, "_after", spy)
    torch.manual_seed(0)
    model = _Writes().eval()
    model.bn.running_mean.normal_()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    want = reference_records(model, x, leaf_modules(model))
    with capture(model, "all") as rec:
        out = model(x)
    assert torch.equal(out, expected)
    got = {r.name: r.tensor for r in rec.records}
    assert [n for n, _ in want] == list(got)
    for name, t in want:
        assert torch.equal(got[name], t), name
    assert (got["bn"] < 0).any() and ((got["conv2"] > 6).any() or (got["conv2"] < 0).any())
    # relu (after bn) ran out of place; the ReLU6 write into z, which `view` aliases, was a
    # copy-on-write write, as were w += 1, w.mul_ and relu_
    assert flipped == ["ReLU"]
    assert model.relu.inplace and model.act.inplace


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_writes_no_python_hook_sees_leave_records_exact(grad):
    """A TorchScript submodule writes in place into a recorded output: no TorchFunctionMode
    sees that write (it runs in the TorchScript interpreter); copy-on-write snapshots keep
    the record exact all the same."""

    class Act(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.relu_()
            return x * 2

    class WithScript(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = torch.jit.script(Act())
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = WithScript().eval()
    x = torch.randn(2, 3, 8, 8)
    want = dict(reference_records(model, x, ["conv", "fc"]))
    assert (want["conv"] < 0).any()
    with capture(model, "conv,fc", grad=grad) as rec:
        model(x)
    got = {r.name: r.tensor.detach() for r in rec.records}
    # (grad mode hands the model a copy of each recorded output that requires grad)
    assert torch.equal(got["conv"], want["conv"]) and torch.equal(got["fc"], want["fc"])


def test_inplace_flags_restored_when_the_forward_raises(tiny):
    class Boom(RuntimeError):
        pass

    def explode(m, a, o):
        raise Boom("after the in-place ReLU ran out of place")

    h = tiny.stem[2].register_forward_hook(explode)  # runs before capture's own hooks
    with pytest.raises(Boom):
        with capture(tiny, "all"):
            tiny(torch.randn(1, 3, 16, 16))
    h.remove()
    assert _no_hooks(tiny)
    assert tiny.stem[2].inplace is True and tiny.block.relu.inplace is True


def test_snapshot_copies_what_copy_on_write_cannot_share():
    import numpy as np

    from fgscope._inplace import snapshot

    arr = np.arange(6, dtype=np.float32)
    t = torch.from_numpy(arr)  # memory owned by numpy: torch cannot make it copy-on-write
    s = snapshot(t)
    arr[:] = -1
    t.add_(1)
    assert torch.equal(s, torch.arange(6, dtype=torch.float32))
    with torch.inference_mode():
        u = torch.randn(4, 5)[:, 1:3]  # a view: the snapshot keeps its geometry
        v = snapshot(u)
        ref = u.clone()
        u.zero_()
    assert torch.equal(v, ref) and v.shape == (4, 2)
    w = torch.randn(3, requires_grad=True)
    assert not snapshot(w).requires_grad


class _Functional(nn.Module):
    """A recorded conv output written in place by a Python-level functional, the `inplace`
    flag passed as the call passes it."""

    def __init__(self, call) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.call = call

    def forward(self, x):
        y = self.conv(x)
        out = self.call(y)
        return self.conv2(y) + out.sum()


_F = torch.nn.functional


@pytest.mark.parametrize("call", [
    lambda y: _F.relu(y, True),
    lambda y: _F.relu(y, inplace=True),
    lambda y: _F.relu(y),  # default: out of place, nothing to watch
    lambda y: _F.hardtanh(y, -0.1, 0.1, True),
    lambda y: _F.hardtanh(y, min_val=-0.1, max_val=0.1, inplace=True),
    lambda y: _F.leaky_relu(y, 0.2, True),
    lambda y: _F.threshold(y, 0.05, -1.0, True),
    lambda y: _F.dropout(y, 0.5, False, True),  # eval: in place, a no-op on the values
    lambda y: _F.relu(input=y, inplace=True),
], ids=["relu-pos", "relu-kw", "relu-default", "hardtanh-pos", "hardtanh-kw", "leaky-pos",
        "threshold-pos", "dropout-pos", "relu-all-kw"])
def test_functional_inplace_flag_read_however_it_is_passed(call):
    torch.manual_seed(0)
    model = _Functional(call).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    want = reference_records(model, x, leaf_modules(model))
    with capture(model, "all") as rec:
        out = model(x)
    assert torch.equal(out, expected)
    got = {r.name: r.tensor for r in rec.records}
    for name, t in want:
        assert torch.equal(got[name], t), name
    assert (got["conv"] < 0).any()  # the write would have shown in the record


def test_capture_inside_another_torch_function_mode_lets_it_see_every_op(tiny, tiny_input):
    # Another active mode (a geometry tracer, a user's profiler) sees recording's own ops,
    # and the records stay exact.
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    want = reference_records(tiny, tiny_input, leaf_modules(tiny))
    counter = Count()
    with counter, capture(tiny, "all") as rec:
        tiny(tiny_input)
    assert len(rec.records) == len(want)
    for (name, t), r in zip(want, rec.records, strict=True):
        assert r.name == name and torch.equal(r.tensor, t), name
    assert counter.names.count("_lazy_clone") == len(want)  # one snapshot per record, seen


def test_inplace_targets_read_the_flag_positional_or_keyword():
    # torch's functionals hand `inplace` to the mode as a keyword; a user's function
    # overridable through torch function may pass it by position
    from fgscope._inplace import inplace_targets

    y = torch.randn(3)
    assert inplace_targets(_F.relu, (y, True), {}) == [y]
    assert inplace_targets(_F.relu, (y,), {"inplace": True}) == [y]
    assert inplace_targets(_F.relu, (), {"input": y, "inplace": True}) == [y]
    assert inplace_targets(_F.relu, (y, False), {}) == []
    assert inplace_targets(_F.relu, (y,), {}) == []
    assert inplace_targets(_F.hardtanh, (y, 0.0, 6.0, True), {}) == [y]
    assert inplace_targets(_F.hardtanh, (y, 0.0, 6.0), {"inplace": True}) == [y]
