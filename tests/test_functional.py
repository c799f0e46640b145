"""functional: F.relu, +, torch.cat, flatten, functional pooling as records, by their FX names."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TupleNet
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from fgscope.capture import capture
from fgscope.errors import ConfigError, LayerNotFoundError
from fgscope.functional import op_names
from fgscope.geometry import trace
from fgscope.selection import select_layers
from fgscope.summary.compute import summarize


class Functional(nn.Module):
    """A conv followed by F.relu, an `x + y`, a torch.cat, functional pooling, a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x), inplace=True)  # in place on the stem's output
        y = self.b(x)
        z = x + y
        w = F.max_pool2d(torch.cat([z, y], 1), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(w, 1), 1))


def _reference(model, x, nodes):
    """What create_feature_extractor returns, on a copy without in-place ops (FX graphs
    run them in place too, so the reference would show later values)."""
    ref = _FunctionalNoInplace(model) if isinstance(model, Functional) else copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    with torch.no_grad():
        return create_feature_extractor(ref, return_nodes=nodes)(x)


class _FunctionalNoInplace(Functional):
    def __init__(self, src: Functional) -> None:
        super().__init__()
        self.load_state_dict(src.state_dict())

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.b(x)
        z = x + y
        w = F.max_pool2d(torch.cat([z, y], 1), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(w, 1), 1))


@pytest.mark.parametrize(
    "make,size",
    [(Functional, 16), (lambda: torchvision.models.resnet18(weights=None), 64),
     (lambda: torchvision.models.mobilenet_v2(weights=None), 64)],
)
def test_fx_names_select_what_create_feature_extractor_returns(make, size):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, size, size)
    nodes = [n for n in get_graph_node_names(model)[1] if n != "x"]  # x: the input itself
    ref = _reference(model, x, nodes)
    nodes = [n for n in nodes if torch.is_tensor(ref[n])]
    with capture(model, nodes, example_input=x[:1]) as rec:
        model(x)
    got = {r.name: r.tensor for r in rec.records}
    for n in nodes:
        (name,) = select_layers(model, n, x[:1])  # `relu_1` is the record `relu:2`
        assert name in got, n
        assert torch.equal(got[name], ref[n]), n


def test_functional_records_are_exact_like_module_records():
    model = Functional().eval()
    x = torch.randn(1, 3, 16, 16)
    with capture(model, "stem,relu,add,cat,max_pool2d,flatten", example_input=x) as rec:
        model(x)
    by = {r.name: r for r in rec.records}
    assert list(by) == ["stem", "relu", "add", "cat", "max_pool2d", "flatten"]
    stem = model.stem(x)
    assert torch.equal(by["stem"].tensor, stem)  # before the in-place F.relu
    assert torch.equal(by["relu"].tensor, stem.relu())
    assert by["add"].op == "add" and by["add"].module_type == "add()" and by["add"].module_name == ""
    assert by["cat"].shape == (8, 16, 16) and by["max_pool2d"].shape == (8, 8, 8)


def test_every_summary_name_selects_exactly_its_record():
    for model, size, spec in [
        (torchvision.models.resnet18(weights=None), 64, "all"),
        (torchvision.models.mobilenet_v2(weights=None), 64, "all"),
        (Functional(), 16, "all,ops"),
        (TupleNet(), 8, "all,multi,split"),
    ]:
        model.eval()
        x = torch.randn(1, 3, size, size)
        rows = summarize(model, (size, size), spec).rows
        assert len({r.name for r in rows}) == len(rows)
        for r in rows:
            with capture(model, r.name, example_input=x) as rec:
                model(x)
            assert rec.names() == [r.name], r.name


def test_record_names_parse_back():
    model = TupleNet().eval()
    x = torch.randn(1, 3, 8, 8)
    with capture(model, "multi[1][mean], split[left]") as rec:
        model(x)
    assert rec.names() == ["multi[1][mean]", "split[left]"]
    with capture(model, "multi[1]") as rec:  # an element and what is inside it
        model(x)
    assert rec.names() == ["multi[1][mean]", "multi[1][max]"]


def test_missed_functional_ops_are_reported_once():
    model = Functional().eval()
    x = torch.zeros(1, 3, 16, 16)
    t = trace(model, x, "all", report_ops=True)
    assert [(m.name, m.why) for m in t.missed] == [
        ("relu", "activates a recorded output"), ("add", "merges branches"),
        ("cat", "merges branches"), ("max_pool2d", "makes stride-2 maps"),
    ]
    note = t.missed_note()
    assert note.count("\n") == 0 and "`max_pool2d`" in note and "ops" in note
    assert trace(model, x, "all,ops", report_ops=True).missed == []
    stages = trace(model, x, "stages", report_ops=True).missed  # a level made by F.max_pool2d
    assert ("max_pool2d", "makes stride-2 maps") in [(m.name, m.why) for m in stages]
    resnet = torchvision.models.resnet18(weights=None).eval()
    assert trace(resnet, torch.zeros(1, 3, 64, 64), "stages", report_ops=True).missed == []
    assert summarize(model, (16, 16)).notes == [note]


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; names come from eager."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return torch.relu(y) + y


def test_untraceable_models_are_named_from_the_eager_forward():
    model = Dynamic().eval()
    x = torch.ones(1, 3, 8, 8)
    with torch.no_grad():
        model.conv.bias.fill_(1.0)
    names = op_names(model, x)
    assert not names.traced
    assert [n for n in names.order if n in ("mul", "relu", "add")] == ["mul", "relu", "add"]
    with capture(model, "relu,add", example_input=x) as rec:
        out = model(x)
    assert torch.equal(rec.records[1].tensor, out)
    with pytest.raises(LayerNotFoundError):
        select_layers(model, "nothing_here", x)


def test_functional_names_need_an_example_input():
    model = Functional().eval()
    with pytest.raises(ConfigError, match="example input"):
        select_layers(model, "add")
    with pytest.raises(ConfigError, match="example input"):
        select_layers(model, "all,ops")
