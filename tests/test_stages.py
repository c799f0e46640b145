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


# --- stages belong to the model, not to the selection -------------------------------------------


def test_reference_layers_define_the_levels_by_hand():
    # blocks at strides 2, 4, 8, 16, 32 (+ a vector); two leaves inside them at 2 and 16
    strides = [2, 2, 4, 8, 16, 16, 32, None]
    spatial = [True] * 7 + [False]
    ref = [False, True, True, True, False, True, True, True]
    assert assign_stages(strides, spatial, ref) == [
        "early", "early", "early", "middle", "middle", "middle", "late", "late"]
    # the rule on a selection's own strides (the old way) gets stride 16 and 32 wrong
    assert assign_stages([16, 32], [True, True]) == ["early", "middle"]
    # a leaf's stride between two levels takes the level of the block it belongs to (the next)
    assert resolution_levels([3, 2, 4], [True] * 3, [False, True, True]) == [1, 0, 1]
    # no downsampling: thirds of the reference layers, a leaf counts as its block
    assert assign_stages([1] * 4, [True] * 4, [True, False, True, True]) == [
        "early", "middle", "middle", "late"]
    with pytest.raises(ValueError, match="one entry per layer"):
        assign_stages([2, 4], [True, True], [True])


_SUBSETS = {
    "mobilenet_v2": ["features.6,features.13,features.18", "features.13,features.18",
                     "features.0,features.17.conv.0,classifier.1"],
    "resnet50": ["layer*", "layer2,layer4.2,fc", "conv1,layer1.0.conv2,layer3.5.relu"],
}


@pytest.mark.parametrize("arch", list(_SUBSETS))
def test_every_selection_gives_a_layer_the_same_stage(arch):
    """Stage of every block (and every record) identical under blocks, stages, all and
    hand-picked subsets: the levels come from the whole model, not from what is selected."""
    from fgscope.places import locate_layers
    from fgscope.selection import select_layers

    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.zeros(1, 3, 224, 224)
    seen: dict[str, str] = {}
    for spec in ["blocks", "stages", "all", *_SUBSETS[arch]]:
        places = locate_layers(model, x, list(select_layers(model, spec, x)))
        assert places, spec
        for name, p in places.items():
            assert seen.setdefault(name, p.stage) == p.stage, (spec, name)
    blocks = locate_layers(model, x, list(select_layers(model, "blocks", x)))
    if arch == "mobilenet_v2":
        assert seen["features.6"] == seen["features.13"] == "middle" and seen["features.18"] == "late"
        assert seen["features.17.conv.0"] == "late" and seen["features.1"] == "early"
    else:
        assert seen["layer2"] == seen["layer3"] == "middle" and seen["layer1"] == "early"
        assert seen["layer4"] == seen["fc"] == "late" and seen["layer1.0.conv2"] == "early"
    assert set(blocks) <= set(seen)


def test_every_command_takes_the_model_wide_stage(tmp_path):
    """layers (inspect), probe (features), cam and similarity's places agree on a subset."""
    from PIL import Image

    from fgscope.cam.compute import compute_cams
    from fgscope.layers.compute import inspect
    from fgscope.models import load_model
    from fgscope.places import locate_layers
    from fgscope.probe.features import extract_features
    from fgscope.selection import select_layers

    torch.manual_seed(0)
    lm = load_model("mobilenet_v2", weights="none")
    x = torch.zeros(1, 3, 224, 224)
    truth = {n: p.stage for n, p in locate_layers(lm.module, x, list(select_layers(lm.module, "blocks"))).items()}
    img = tmp_path / "a.png"
    Image.fromarray((torch.rand(224, 224, 3) * 255).to(torch.uint8).numpy()).save(img)
    subset = "features.13,features.18"  # alone, its strides 16 and 32 used to read early, middle
    table = inspect(lm, [img], subset, views=0)
    assert {r.name: r.stage for r in table.rows} == {"features.13": "middle", "features.18": "late"}
    feats = extract_features(lm, [img], subset, ("avg",), device="cpu")
    assert {layer.name: layer.stage for layer in feats.layers} == {n: truth[n] for n in subset.split(",")}
    cams = compute_cams(lm, img, subset, device="cpu")
    assert {layer.name: layer.stage for layer in cams.layers} == {n: truth[n] for n in subset.split(",")}
