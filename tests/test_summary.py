"""summary: one dummy forward gives shapes, strides, receptive fields, params; vs torchinfo."""

from __future__ import annotations

import pytest
import torchvision
from conftest import TinyNet

from fgscope.summary.compute import summarize


def test_tiny_summary_by_hand():
    s = summarize(TinyNet().eval(), (32, 32))
    by = {r.name: r for r in s.rows}
    assert by["stem.0"].shape == [8, 16, 16] and by["stem.0"].stride == 2 and by["stem.0"].rf == 3
    assert by["block.relu:2"].shape == [8, 16, 16]
    # block: two 3x3 convs at stride 2 on top of rf 3: 3 + 2*2 + 2*2 = 11 (skip is narrower)
    assert by["block.relu:2"].rf == 11
    assert by["down"].stride == 4 and by["down"].rf == 15
    assert by["fc"].shape == [5] and by["fc"].stride is None and by["fc"].params == 16 * 5 + 5
    assert by["fc"].rf == 15 + 7 * 4  # the union of the 8x8 units of `down`
    assert s.total_params == sum(p.numel() for p in TinyNet().parameters())
    # conv MACs: stem 8*16*16*27, block 2 * 8*16*16*72, down 16*8*8*72, fc 80
    assert s.macs == 8 * 256 * 27 + 2 * 8 * 256 * 72 + 16 * 64 * 72 + 80


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_shapes_and_params_agree_with_torchinfo(arch):
    torchinfo = pytest.importorskip("torchinfo")
    model = torchvision.models.get_model(arch, weights=None).eval()
    ours = summarize(model, (224, 224), "all")
    info = torchinfo.summary(model, input_size=(1, 3, 224, 224), verbose=0, depth=20)
    assert ours.total_params == info.total_params
    # torchinfo lists leaf calls in execution order, as we do: same count, same shapes, types
    theirs = [
        (type(layer.module).__name__, list(layer.output_size[1:]))
        for layer in info.summary_list
        if layer.is_leaf_layer and layer.executed
    ]
    assert [(r.type, r.shape) for r in ours.rows] == theirs
