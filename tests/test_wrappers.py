"""Wrapped models (timm, Hugging Face, torchvision segmentation/detection): `blocks`, `stages`
and `features` find the spatial hierarchy; the model's real output; unsupported kinds refused
in one line."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import assert_one_line_error, run
from torch import nn

from fgscope.capture import capture
from fgscope.errors import ConfigError, LayerNotFoundError, UnsupportedModelError
from fgscope.outputs import first_tensor, model_output
from fgscope.selection import block_modules, select_layers

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TIMM = ["resnet50", "convnext_tiny", "efficientnet_b0", "regnety_008", "hrnet_w18_small",
        "cspdarknet53"]
SIZE = 64


@pytest.fixture(scope="module")
def timm_models():
    torch.manual_seed(0)
    return {n: timm.create_model(n, pretrained=False).eval() for n in TIMM}


def _maps(model, names, x):
    """{selection name: (C, stride)} of each selected record (4-D maps only)."""
    out = {}
    with capture(model, names) as rec:
        model(x)
    for r in rec.records:
        if r.tensor.dim() == 4:
            out[r.name] = (int(r.tensor.shape[1]), SIZE / int(r.tensor.shape[-2]))
    return out


def _levels(model, x):
    """The distinct spatial sizes (> 1x1) of the model's blocks' maps."""
    sizes = set()
    with capture(model, "kw:blocks") as rec:
        model(x)
    for r in rec.records:
        t = r.tensor
        if t.dim() == 4 and t.shape[-2] * t.shape[-1] > 1:
            sizes.add(tuple(t.shape[-2:]))
    return sizes


@pytest.mark.parametrize("name", TIMM)
@pytest.mark.parametrize("features_only", [False, True])
def test_timm_features_match_feature_info(timm_models, name, features_only):
    model = (timm.create_model(name, pretrained=False, features_only=True).eval()
             if features_only else timm_models[name])
    x = torch.randn(1, 3, SIZE, SIZE)
    info = model.feature_info
    chans = info.channels() if features_only else [d["num_chs"] for d in info]
    reds = info.reduction() if features_only else [d["reduction"] for d in info]
    names = list(select_layers(model, "features", x))
    got = _maps(model, names, x)
    assert [got[n] for n in names] == [(c, float(r)) for c, r in zip(chans, reds)]


@pytest.mark.parametrize("name", TIMM)
def test_timm_stages_one_row_per_resolution_and_blocks_run(timm_models, name):
    model = timm_models[name]
    x = torch.randn(1, 3, SIZE, SIZE)
    stages = list(select_layers(model, "stages", x))
    sizes = [hw for hw in _levels(model, x)]
    assert len(stages) == len(sizes)
    assert len(block_modules(model)) > len(stages)  # blocks are finer than stages
    with capture(model, "blocks") as rec:  # the default of `fgscope layers`
        model(x)
    assert len(rec.names()) >= len(stages)


def test_clashing_module_names_have_escapes(timm_models):
    model = timm_models["convnext_tiny"]  # has a submodule named `stages`
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.warns(UserWarning, match="name:stages"):
        kw = list(select_layers(model, "stages", x))
    assert len(kw) == 4 and "stages" not in kw
    assert list(select_layers(model, "name:stages", x)) == ["stages"]
    assert list(select_layers(model, "kw:stages", x)) == kw
    effnet = timm_models["efficientnet_b0"]  # has a submodule named `blocks`
    assert list(select_layers(effnet, "name:blocks")) == ["blocks"]
    assert len(select_layers(effnet, "kw:blocks")) > 10
    tv = torchvision.models.mobilenet_v2(weights=None).eval()  # torchvision `features`
    assert list(select_layers(tv, "features")) == ["features"]
    with pytest.raises(ConfigError, match="feature_info"):
        select_layers(tv, "kw:features", x)
    with pytest.raises(LayerNotFoundError):
        select_layers(tv, "name:nothing")
    with pytest.raises(ConfigError, match="unknown selection keyword"):
        select_layers(tv, "kw:layers")


class Down(nn.Module):
    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(i, o, 3, 2, 1), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Staged(nn.Module):
    """A model with submodules named like the keywords (as timm's ConvNeXt and CSPDarkNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(Down(3, 4), Down(4, 8), Down(8, 8))
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())

    def forward(self, x):
        return self.blocks(self.stages(x))


@pytest.mark.parametrize("layers,rows", [("stages", ["stages.0", "stages.1", "blocks.1"]),
                                         ("name:stages", ["stages"]),
                                         ("blocks", ["stages.0", "stages.1", "stages.2",
                                                     "blocks.0", "blocks.1"])])
def test_cli_keywords_on_a_model_with_clashing_names(tmp_path, layers, rows):
    path = tmp_path / "staged.pt"
    torch.save(Staged(), path)
    r = run("summary", path, "--trust", "--size", 32, "--layers", layers, "--json",
            tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    import json

    got = [row["name"] for row in json.loads((tmp_path / "s.json").read_text())["layers"]]
    assert got[: len(rows)] == rows
    if layers != "name:stages":
        assert "note:" in r.stdout and f"name:{layers}" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "cspdarknet53"])
def test_timm_stage_receptive_fields_equal_gradient_support(name):
    from test_geometry import _averaging_copy, _predicted, _support

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():  # timm zero-inits the last BatchNorm of a block: no residual branch
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
    model = _averaging_copy(model)
    size = 96
    checked = 0
    for layer in select_layers(model, "stages", torch.zeros(1, 3, size, size, dtype=torch.float64)):
        g, lo, hi, unit = _support(model, layer, size)
        if not g.exact:
            continue
        assert (lo, hi) == _predicted(g, unit, size), layer
        checked += 1
    assert checked >= 3


# --- Hugging Face -------------------------------------------------------------------------


def _hf(kind):
    torch.manual_seed(0)
    sizes = dict(hidden_sizes=[8, 16, 32, 64], num_labels=5)
    if kind == "convnext":
        cfg = transformers.ConvNextConfig(num_channels=3, depths=[1, 1, 2, 1], **sizes)
        return transformers.ConvNextForImageClassification(cfg).eval()
    cfg = transformers.ResNetConfig(embedding_size=8, depths=[1, 1, 1, 1], **sizes)
    return transformers.ResNetForImageClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["convnext", "resnet"])
def test_hf_stages_one_row_per_encoder_stage(kind):
    model = _hf(kind)
    x = torch.randn(1, 3, SIZE, SIZE)
    stages = list(select_layers(model, "stages", x))
    assert len(stages) == 4
    assert [s.split(".")[3] for s in stages] == ["0", "1", "2", "3"]  # *.encoder.stages.N...
    assert any(b.endswith(".encoder.stages.0.layers.0") for b in block_modules(model))
    out = model(x)
    assert model_output(out) is out.logits


def test_hf_layers_through_the_api():
    import fgscope

    res = fgscope.inspect(_hf("resnet"), None, layers="stages")
    assert len(res.rows) == 4 and res.output.shape[1] == 5  # the logits, not a feature map


# --- torchvision segmentation and detection ------------------------------------------------


@pytest.fixture(scope="module")
def seg_det():
    from torchvision.models import detection, segmentation

    torch.manual_seed(0)
    return {
        "fcn": segmentation.fcn_resnet50(weights=None, weights_backbone=None).eval(),
        "deeplab": segmentation.deeplabv3_mobilenet_v3_large(weights=None,
                                                             weights_backbone=None).eval(),
        "frcnn": detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None,
                                                             weights_backbone=None).eval(),
    }


@pytest.mark.parametrize("name,n", [("fcn", 3), ("deeplab", 4), ("frcnn", 6)])
def test_segmentation_and_detection_stages_list_the_backbone(seg_det, name, n):
    model = seg_det[name]
    x = torch.randn(1, 3, SIZE, SIZE)
    stages = list(select_layers(model, "stages", x))
    assert len(stages) == n and all(s.startswith("backbone.") for s in stages)
    if name == "frcnn":
        assert stages[-1] == "backbone.fpn[pool]"
        assert all(b.startswith("backbone.") for b in block_modules(model))
    else:
        assert len(block_modules(model)) > 10


def test_real_outputs_not_the_first_map(seg_det):
    x = torch.randn(1, 3, SIZE, SIZE)
    seg = seg_det["fcn"](x)
    assert first_tensor(seg) is seg["out"]
    with pytest.warns(UserWarning, match="detector"):
        assert model_output(seg_det["frcnn"](x)) is None
    pyramid = [torch.zeros(1, 4, 16, 16), torch.zeros(1, 8, 8, 8), torch.zeros(1, 16, 4, 4)]
    with pytest.warns(UserWarning, match="coarsest"):
        assert model_output(pyramid) is pyramid[2]
    assert model_output((torch.zeros(2, 5), torch.zeros(2, 3))).shape == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fcn", "frcnn"])
def test_cli_layers_on_segmentation_and_detection(tmp_path, seg_det, name):
    import copy

    path = tmp_path / f"{name}.pt"
    model = copy.deepcopy(seg_det[name])
    if name == "frcnn":  # its transform resizes to 800 px by default: keep the test small
        model.transform.min_size, model.transform.max_size = (SIZE,), SIZE
    torch.save(model, path)
    r = run("layers", path, "--trust", "--size", SIZE, "--layers", "stages", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "backbone." in r.stdout
    heads = run("layers", path, "--trust", "--size", SIZE, "--layers", "roi_heads",
                "--out", tmp_path / "o2")
    if name == "frcnn":  # random weights: no boxes, empty head outputs
        assert_one_line_error(heads, 3, "empty tensor", "backbone")


# --- unsupported kinds: one line each ------------------------------------------------------


class _NeverCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return nn.functional.conv2d(x, self.w).mean((2, 3))


def _unsupported():
    video = torchvision.models.video.r3d_18(weights=None).eval()
    quant = torchvision.models.quantization.mobilenet_v2(quantize=True, weights=None).eval()
    return {"video": (video, "video model"), "quantized": (quant, "quantized model")}


@pytest.mark.parametrize("kind", ["video", "quantized"])
def test_unsupported_kinds_are_refused_by_name(kind):
    from fgscope.forward import forward

    model, words = _unsupported()[kind]
    with pytest.raises(UnsupportedModelError, match=words):
        select_layers(model, "blocks")  # a quantized model: at once
        forward(model, torch.randn(1, 3, 32, 32))  # a video model: when it fails on images


def test_a_pickled_quantized_model_is_one_line(tmp_path):
    # torch's quantized modules lose their submodules when pickled: loading one with --trust
    # must say so in one line instead of failing later with an AttributeError
    path = tmp_path / "q.pt"
    torch.save(_unsupported()["quantized"][0], path)
    assert_one_line_error(run("summary", str(path), "--trust"), 3, "quantized modules do not survive pickling")


def test_nothing_recorded_is_one_error():
    model = _NeverCalled()
    with pytest.raises(LayerNotFoundError, match="nothing was recorded.*did not run"):
        with capture(model, "head"):
            model(torch.randn(1, 3, 8, 8))


@pytest.fixture(scope="module")
def video_and_images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("video")
    images = root / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 90, 10)).save(images / cls / f"{i}.png")
    video = root / "video.pt"
    torch.save(torchvision.models.video.r3d_18(weights=None).eval(), video)
    return video, images


@pytest.mark.parametrize("cmd", ["summary", "layers", "cam", "similarity", "probe", "dump"])
def test_cli_unsupported_kinds_one_line(tmp_path, video_and_images, cmd):
    video, images = video_and_images
    args = {"summary": [], "cam": [images / "a" / "0.png"],
            "probe": [images, "--folds", 2]}.get(cmd, [images])
    extra = ["--out", tmp_path / cmd] if cmd != "summary" else []
    r = run(cmd, video, *args, "--trust", "--size", 32, *extra)
    assert_one_line_error(r, 3, "video model")


@pytest.mark.parametrize("name,kind", [("r3d_18", "video"), ("raft_small", "optical flow"),
                                       ("quantized_mobilenet_v2", "quantization")])
def test_torchvision_builders_fgscope_does_not_inspect_are_named(name, kind):
    assert_one_line_error(run("summary", name, "--weights", "none"), 3, f"torchvision {kind} model")
