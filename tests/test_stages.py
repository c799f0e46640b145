"""The early/middle/late rule: from the model's own downsampling, on several architectures."""

from __future__ import annotations

import pytest
import torch
import torchvision

from fgscope.geometry import trace_geometry
from fgscope.stages import assign_stages, resolution_levels


def test_levels_and_stages_by_hand():
    strides = [2, 2, 4, 8, 16, 32, None]
    spatial = [True] * 6 + [False]
    assert resolution_levels(strides, spatial) == [0, 0, 1, 2, 3, 4, 5]
    assert assign_stages(strides, spatial) == [
        "early", "early", "early", "middle", "middle", "late", "late",
    ]
    # unknown geometry inherits the previous level
    assert resolution_levels([2, None, 4], [True, True, True]) == [0, 0, 1]
    # three levels: one each
    assert assign_stages([1, 2, 4], [True] * 3) == ["early", "middle", "late"]
    # no downsampling: thirds of depth
    assert assign_stages([1] * 6, [True] * 6) == ["early"] * 2 + ["middle"] * 2 + ["late"] * 2


def _stages_of(arch: str, layers: list[str], size: int = 224) -> dict[str, str]:
    kw = {"aux_logits": False, "init_weights": False} if arch in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(arch, weights=None, **kw).eval()
    geo, _ = trace_geometry(model, torch.zeros(1, 3, size, size), "blocks")
    names = list(geo)
    stages = assign_stages(
        [max(g.stride) if g and g.spatial else None for g in geo.values()],
        [g is None or g.spatial for g in geo.values()],
    )
    table = dict(zip(names, stages))
    return {n: table[n] for n in layers}


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet18", {"conv1": "early", "layer1.1": "early", "layer2.0": "middle",
                      "layer3.1": "middle", "layer4.0": "late", "fc": "late"}),
        ("mobilenet_v2", {"features.0": "early", "features.3": "early", "features.4": "middle",
                          "features.13": "middle", "features.14": "late", "classifier.1": "late"}),
        # six levels (1..32): conv1-2 early, conv3-4 middle, conv5 (stride 16) and pool5 late
        ("vgg11", {"features.0": "early", "features.4": "early", "features.5": "middle",
                   "features.14": "middle", "features.15": "late", "classifier.6": "late"}),
        ("efficientnet_b0", {"features.0": "early", "features.2.1": "early",
                             "features.3.0": "middle", "features.5.2": "middle",
                             "features.6.0": "late", "classifier.1": "late"}),
        # four levels (4..32, patchify stem): 4-8 early, 16 middle, 32 late
        ("convnext_tiny", {"features.0": "early", "features.3.0": "early",
                           "features.5.0": "middle", "features.7.2": "late"}),
    ],
)
def test_stage_rule_on_torchvision(arch, expected):
    assert _stages_of(arch, list(expected)) == expected


def test_stages_are_monotonic_with_depth():
    order = {"early": 0, "middle": 1, "late": 2}
    for arch in ("resnet50", "densenet121", "shufflenet_v2_x1_0"):
        model = torchvision.models.get_model(arch, weights=None).eval()
        geo, _ = trace_geometry(model, torch.zeros(1, 3, 224, 224), "blocks")
        st = assign_stages(
            [max(g.stride) if g and g.spatial else None for g in geo.values()],
            [g is None or g.spatial for g in geo.values()],
        )
        ranks = [order[s] for s in st]
        assert ranks == sorted(ranks), arch
        assert set(st) == {"early", "middle", "late"}, arch


def test_last_at_each_resolution():
    from fgscope.stages import last_at_each_resolution

    sizes = [(112, 112), (112, 112), None, (56, 56), (1, 1), (56, 56), (7, 7), (1, 1), None]
    assert last_at_each_resolution(sizes) == [1, 5, 6]
    assert last_at_each_resolution([None, (1, 1)]) == []
