"""selection: names, globs, regexes, `all` / `blocks` / `stages`, errors before anything runs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from fgscope.errors import ConfigError, LayerNotFoundError
from fgscope.selection import block_modules, leaf_modules, select_layers


@pytest.mark.parametrize("spec", ["nothing*", "re:^zzz", "/^zzz/"])
def test_patterns_that_match_nothing_fail(tiny, spec):
    with pytest.raises(LayerNotFoundError):
        select_layers(tiny, spec)


def test_bad_regex_and_empty_spec(tiny):
    with pytest.raises(ConfigError):
        select_layers(tiny, "re:(")
    with pytest.raises(ConfigError):
        select_layers(tiny, " , ")


def test_selection_kinds(tiny):
    assert list(select_layers(tiny, "block.*")) == [
        "block.conv1", "block.bn1", "block.relu", "block.conv2", "block.bn2",
    ]
    assert list(select_layers(tiny, "re:^(stem|down)$")) == ["stem", "down"]
    assert list(select_layers(tiny, ["fc", "stem.0"])) == ["stem.0", "fc"]
    assert list(select_layers(tiny, "block")) == ["block"]
    assert list(block_modules(tiny)) == ["stem.0", "stem.1", "stem.2", "block", "down", "act", "pool", "fc"]


def test_blocks_and_stages_on_torchvision():
    model = torchvision.models.resnet18(weights=None).eval()
    blocks = list(block_modules(model))
    assert blocks[:6] == ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1.1"]
    assert blocks[-2:] == ["avgpool", "fc"]
    x = torch.zeros(1, 3, 224, 224)
    assert list(select_layers(model, "stages", x)) == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    mnv2 = torchvision.models.mobilenet_v2(weights=None).eval()
    assert list(select_layers(mnv2, "stages", x)) == [
        "features.1", "features.3", "features.6", "features.13", "features.18",
    ]
    with pytest.raises(ConfigError):
        select_layers(model, "stages")


def test_capture_module_re_exports_the_selection():
    import fgscope
    import fgscope.capture
    from fgscope import selection

    for name in ("select_layers", "leaf_modules", "block_modules", "LayerSpec"):
        assert getattr(fgscope.capture, name) is getattr(selection, name)
    assert fgscope.select_layers is select_layers
    assert list(leaf_modules(torch.nn.Linear(2, 2))) == [""]  # a leaf-only model is its own leaf


def test_every_name_fgscope_prints_is_a_selection(tiny):
    from fgscope.names import EveryCall

    x = torch.zeros(1, 3, 16, 16)
    assert list(select_layers(tiny, "block.relu:2")) == ["block.relu:2"]
    assert list(select_layers(tiny, "block.relu_1")) == ["block.relu:2"]  # torch.fx's name
    assert list(select_layers(tiny, "block.relu:1")) == ["block.relu"]
    every = list(select_layers(tiny, "block.relu:*"))
    assert every == ["block.relu"] and isinstance(every[0], EveryCall)
    # what `all` and patterns select keeps meaning every call when passed back
    names = list(select_layers(tiny, "all"))
    assert all(isinstance(n, EveryCall) for n in names)
    assert list(select_layers(tiny, names)) == names
    assert list(select_layers(tiny, "flatten", x)) == ["flatten"]  # a functional op
    with pytest.raises(LayerNotFoundError):
        select_layers(tiny, "block.relu:3x")
    with pytest.raises(LayerNotFoundError):
        select_layers(tiny, "nothing[out]")


def test_keys_in_brackets_select_elements():
    from conftest import TupleNet

    model = TupleNet().eval()
    assert list(select_layers(model, "multi[1][mean],split[left]")) == ["multi[1][mean]", "split[left]"]
    assert list(select_layers(model, "multi:2[0]")) == ["multi:2[0]"]
