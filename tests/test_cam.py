"""cam: Grad-CAM against its definition on hand-built models, classes by name, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_one_line_error, run
from PIL import Image
from torch import nn

from fgscope.cam.compute import ClassRef, compute_cams, grad_cam, resolve_class
from fgscope.errors import ConfigError, LayerNotFoundError
from fgscope.models import load_model

LABELS = ("Siamese cat", "Persian cat", "tabby", "tiger cat", "lynx")






def _image(size: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _gap_net(relu: bool = False, seed: int = 0) -> nn.Sequential:
    """conv (3 -> 4) [-> ReLU(inplace)] -> global average pool -> linear (4 -> 5)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)]
    return nn.Sequential(*layers).eval()


def _conv_out(lm, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        return lm.module[0](lm.preprocess(image)[None])  # (1, 4, H, W)


# --- the definition ------------------------------------------------------------------------


def test_grad_cam_pure_function():
    a = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    g = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, 0.0], [-2.0, 0.0]]]])
    a0, g0 = a.clone(), g.clone()
    maps, w = grad_cam(a, g)
    assert torch.equal(w, torch.tensor([[1.0, -1.0]]))  # spatial means of the gradient
    # 1 * A_0 - 1 * A_1 = [[1, 1], [-1, -1]] -> ReLU
    assert torch.equal(maps, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]))
    assert torch.equal(a, a0) and torch.equal(g, g0)
    assert grad_cam(a.double(), g)[0].dtype == torch.float64
    with pytest.raises(ValueError, match="same shape"):
        grad_cam(a, g[:, :1])


def test_grad_cam_equals_hand_computed_weights_of_a_gap_classifier():
    """score_c = b_c + sum_k W_ck mean(A_k), so d score / d A_k = W_ck / (H W) everywhere."""
    lm = load_model(_gap_net(), size=16)
    img = _image()
    res = compute_cams(lm, img, ["0"], target=3)
    (lay,) = res.layers
    a = _conv_out(lm, img)[0]  # (4, 16, 16)
    w = lm.module[3].weight.detach()[3]  # (4,)
    alpha = w / (16 * 16)
    assert torch.allclose(lay.weights, alpha, atol=1e-9)
    expected = torch.relu((alpha[:, None, None] * a).sum(0))
    assert torch.allclose(lay.cam, expected, atol=1e-7)
    assert res.target == ClassRef(3, None) and lay.shape == [4, 16, 16]
    with torch.no_grad():
        logit = lm.module(lm.preprocess(img)[None])[0, 3]
    assert res.score == pytest.approx(float(logit), abs=1e-6)
    assert lay.stride == 1 and lay.rf == 3
    if lay.peak is not None:
        assert lay.peak_unit == list(divmod(int(expected.argmax()), 16))


def test_gradient_is_taken_at_the_value_before_an_inplace_relu():
    """With ReLU(inplace=True) after the conv, the conv's recorded output is overwritten;
    the gradient must still be d score / d conv-output = W_ck / (H W) * 1[A > 0]."""
    lm = load_model(_gap_net(relu=True), size=16)
    img = _image(seed=1)
    (lay,) = compute_cams(lm, img, ["0"], target=1).layers
    a = _conv_out(lm, img)[0]
    w = lm.module[4].weight.detach()[1]
    alpha = w / (16 * 16) * (a > 0).float().mean((1, 2))  # mean of W_ck / (HW) * 1[A > 0]
    assert torch.allclose(lay.weights, alpha, atol=1e-9)
    assert (a < 0).any()  # the in-place ReLU did change the recorded tensor's storage
    assert torch.allclose(lay.cam, torch.relu((alpha[:, None, None] * a).sum(0)), atol=1e-7)


def test_contrast_is_the_difference_of_the_single_class_weights():
    lm = load_model(_gap_net(), size=16)
    img = _image(seed=2)
    wa = compute_cams(lm, img, ["0"], target=0).layers[0].weights
    wb = compute_cams(lm, img, ["0"], target=4).layers[0].weights
    res = compute_cams(lm, img, ["0"], contrast=(0, 4))
    (lay,) = res.layers
    assert torch.allclose(lay.weights, wa - wb, atol=1e-9)
    a = _conv_out(lm, img)[0]
    assert torch.allclose(lay.cam, torch.relu(((wa - wb)[:, None, None] * a).sum(0)), atol=1e-7)
    with torch.no_grad():
        logits = lm.module(lm.preprocess(img)[None])[0]
    assert res.score == pytest.approx(float(logits[0] - logits[4]), abs=1e-6)
    assert res.contrast == (ClassRef(0, None), ClassRef(4, None)) and res.target.index == 0


def test_model_is_not_changed(tiny):
    lm = load_model(tiny, size=32)
    tiny.train()  # a model in training mode stays so; cam runs it in eval mode
    tiny.block.conv1.weight.requires_grad_(False)
    hooks_before = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in tiny.named_modules()}
    params = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    buffers = {n: b.clone() for n, b in tiny.named_buffers()}
    res = compute_cams(lm, _image(32), "all")
    assert len(res.layers) >= 8 and res.target.index in range(5)
    assert all(m.training for m in tiny.modules())
    assert not tiny.block.conv1.weight.requires_grad and tiny.block.conv2.weight.requires_grad
    assert {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in tiny.named_modules()} == hooks_before
    for n, p in tiny.named_parameters():
        assert p.grad is None and torch.equal(p.detach(), params[n])
    for n, b in tiny.named_buffers():  # eval mode: BatchNorm statistics untouched
        assert torch.equal(b, buffers[n])
    # vectors (pool, fc) are skipped with a note; every map has a CAM
    assert {lay.name for lay in res.layers}.isdisjoint({"pool", "fc"})
    assert any("fc" in n and "not a spatial feature map" in n for n in res.notes)


def test_frozen_model_still_explains():
    net = _gap_net()
    net.requires_grad_(False)
    res = compute_cams(load_model(net, size=16), _image(), ["0"], target=2)
    assert res.layers[0].weights.abs().sum() > 0
    assert not any(p.requires_grad for p in net.parameters())


def test_default_target_is_top1_and_layers_are_checked(tiny):
    lm = load_model(tiny, size=32, labels=list(LABELS))
    res = compute_cams(lm, _image(32), "stages")
    with torch.no_grad():
        top = int(tiny.eval()(lm.preprocess(_image(32))[None]).argmax())
    assert res.target == ClassRef(top, LABELS[top])
    assert [lay.name for lay in res.layers] == ["block", "act"]
    assert [lay.stage for lay in res.layers] == ["early", "middle"]  # strides 2, 4
    assert res.top5 is not None and len(res.top5) == 5
    assert sum(p for _, p in res.top5) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(LayerNotFoundError, match="blok"):
        compute_cams(lm, _image(32), "blok")
    with pytest.raises(ConfigError, match="spatial feature map"):
        compute_cams(lm, _image(32), "fc")
    with pytest.raises(ConfigError, match="either --class or --contrast"):
        compute_cams(lm, _image(32), target=1, contrast=(1, 2))


# --- classes -------------------------------------------------------------------------------


def test_resolve_class():
    assert resolve_class("2", LABELS, 5) == ClassRef(2, "tabby")
    assert resolve_class(4, None, 5) == ClassRef(4, None)
    assert resolve_class("persian CAT", LABELS, 5) == ClassRef(1, "Persian cat")
    with pytest.raises(ConfigError, match=r"did you mean 'Siamese cat' \(0\)"):
        resolve_class("siames cat", LABELS, 5)
    with pytest.raises(ConfigError, match="out of range.*0..4"):
        resolve_class("5", LABELS, 5)
    with pytest.raises(ConfigError, match="no class names"):
        resolve_class("tabby", None, 5)
    with pytest.raises(ConfigError, match="shared by classes 0, 2"):
        resolve_class("crane", ("crane", "x", "Crane"), 3)
    with pytest.raises(ConfigError) as info:
        resolve_class("zebra", LABELS, 5)
    assert "did you mean" not in str(info.value) and "0..4" in str(info.value)


# --- the command ---------------------------------------------------------------------------


@pytest.fixture
def labelled_ckpt(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    path = tmp_path / "cats.pt"
    torch.save({"state_dict": model.state_dict(), "classes": list(LABELS)}, path)
    img = tmp_path / "cat.png"
    _image(48, seed=3).save(img)
    return path, img


def test_cli_writes_the_contract(labelled_ckpt, tmp_path):
    ckpt, img = labelled_ckpt
    out = tmp_path / "out"
    result = run(
        "cam", ckpt, img, "--arch", "resnet18", "--size", "64", "--contrast", "siamese CAT",
        "Persian cat", "--out", out, "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "cam.json").read_text())
    for key in ("image", "target", "contrast", "score", "layers", "top5"):
        assert key in data, key
    assert data["image"] == str(img)
    assert data["target"] == {"index": 0, "label": "Siamese cat"}
    assert data["contrast"] == {
        "a": {"index": 0, "label": "Siamese cat"}, "b": {"index": 1, "label": "Persian cat"}
    }
    assert isinstance(data["score"], float) and len(data["top5"]) == 5
    names = [lay["name"] for lay in data["layers"]]
    assert names == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    for i, lay in enumerate(data["layers"]):
        assert {"name", "stride", "rf", "stage", "shape", "peak", "file"} <= set(lay)
        assert lay["file"] == f"cam_{i:02d}_{lay['name']}.png" and (out / lay["file"]).exists()
        assert lay["peak"] is None or (0 <= lay["peak"][0] < 64 and 0 <= lay["peak"][1] < 64)
    assert [lay["stride"] for lay in data["layers"]] == [2, 4, 8, 16, 32]
    raw = np.load(out / "cam_raw.npz")
    assert raw["04_layer4.1/cam"].shape == (2, 2) and raw["04_layer4.1/weights"].shape == (512,)
    assert (out / "cam.png").stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "cam" and "cam.json" in manifest["files"]


def test_cli_class_errors(labelled_ckpt, tmp_path):
    ckpt, img = labelled_ckpt
    common = ["--arch", "resnet18", "--size", "32", "--out", tmp_path / "e", "--device", "cpu"]
    assert_one_line_error(
        run("cam", ckpt, img, "--class", "siames", *common), 2, "unknown class 'siames'",
        "'Siamese cat' (0)",
    )
    assert_one_line_error(run("cam", ckpt, img, "--class", "9", *common), 2, "out of range")
    assert_one_line_error(
        run("cam", ckpt, img, "--layers", "layer9", *common), 6, "layer9"
    )
    assert_one_line_error(
        run("cam", "resnet18", img, "--weights", "none", "--size", "32", "--class", "tabby"),
        2, "no class names", "0..999",
    )
    assert not (tmp_path / "e").exists()  # nothing written on error


@pytest.mark.slow
def test_cli_default_mobilenet(tmp_path):
    out = tmp_path / "cam"
    result = run("cam", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "cam.json").read_text())
    assert data["target"] == {"index": 457, "label": "bow tie"}  # the top-1 of the sample photo
    assert [lay["name"] for lay in data["layers"]][-1] == "features.18"
    assert [lay["stage"] for lay in data["layers"]] == ["early", "early", "middle", "middle", "late"]
    res = compute_cams("mobilenet_v2", None, "features.13", contrast=("Siamese cat", "persian cat"))
    assert res.contrast == (ClassRef(284, "Siamese cat"), ClassRef(283, "Persian cat"))
    assert [lay.name for lay in res.layers] == ["features.13"] and res.layers[0].shape == [96, 14, 14]


# --- the figure: rows of at most six panels, at most 23 layers --------------------------------


def _fake_result(n_layers: int):
    from fgscope.cam.compute import CamLayer, CamResult

    rng = np.random.default_rng(0)
    layers = [
        CamLayer(f"layer{i // 4}.{i % 4}", 2.0 ** (1 + i // 24), 7.0 + 8 * i, "early", [4, 4, 4],
                 torch.from_numpy(rng.random((4, 4), dtype=np.float32)), torch.ones(4), [3, 5], [1, 1])
        for i in range(n_layers)
    ]
    return CamResult("x.png", _image(32), ClassRef(0, "tabby"), None, 1.0, layers, None, None, "cpu")


def _panels_per_row(fig) -> list[int]:
    """Image panels (not the colorbar) grouped by their bottom edge, top row first."""
    rows: dict[float, int] = {}
    for ax in fig.axes:
        if ax.images:
            y = round(ax.get_position().y0, 4)
            rows[y] = rows.get(y, 0) + 1
    return [rows[y] for y in sorted(rows, reverse=True)]


@pytest.mark.parametrize("n_layers,rows", [(5, [6]), (9, [5, 5]), (96, [6, 6, 6, 6])])
def test_cam_figure_wraps_into_rows_and_caps_its_panels(n_layers, rows):
    from fgscope.cam.figure import cam_figure

    fig = _fake_result(n_layers)
    figure = cam_figure(fig)
    assert _panels_per_row(figure) == rows
    texts = [t.get_text() for t in figure.texts]
    left_out = [t for t in texts if "layers shown" in t]
    if n_layers > 23:  # 23 layers spread over depth, the first and the last kept, and a note
        assert left_out == [f"23 of {n_layers} layers shown, spread over depth; every layer's map "
                            "is in cam_NN_<layer>.png and cam_raw.npz"]
        titles = [ax.get_title().split("\n")[0] for ax in figure.axes if ax.images][1:]
        assert titles[0] == "layer0.0" and titles[-1] == f"layer{(n_layers - 1) // 4}.{(n_layers - 1) % 4}"
    else:
        assert left_out == []
    width_in = figure.get_size_inches()[0]
    assert width_in <= 16


def test_panel_rows_and_shown_layers():
    from fgscope.cam.figure import panel_rows, shown_layers

    assert panel_rows(6) == [6] and panel_rows(7) == [4, 3] and panel_rows(13) == [5, 4, 4]
    assert shown_layers(5) == [0, 1, 2, 3, 4]
    picked = shown_layers(96, 23)
    assert len(picked) == 23 and picked[0] == 0 and picked[-1] == 95 and picked == sorted(set(picked))


def test_several_images_run_one_at_a_time_and_max_images_bounds_the_figures(labelled_ckpt, tmp_path):
    ckpt, img = labelled_ckpt
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        _image(48, seed=10 + k).save(folder / f"p{k}.png")
    out = tmp_path / "out"
    result = run("cam", ckpt, folder, "--arch", "resnet18", "--size", "64", "--class", "Persian cat",
                 "--max-images", "2", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "cam.json").read_text())
    assert [Path(e["image"]).name for e in data["images"]] == ["p0.png", "p1.png", "p2.png"]
    assert all(e["target"] == {"index": 1, "label": "Persian cat"} for e in data["images"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["p0", "p1"]  # figures: first 2
    assert all((out / s / "cam.png").is_file() for s in ("p0", "p1"))
    assert all(lay["file"] is None for lay in data["images"][2]["layers"])
    for e in data["images"][:2]:
        assert all((out / lay["file"]).is_file() for lay in e["layers"])
    summary = {s["name"]: s for s in data["summary"]}
    maxes = [e["layers"][-1]["raw_max"] for e in data["images"]]
    assert summary["layer4.1"]["raw_max_mean"] == pytest.approx(sum(maxes) / 3)
    assert summary["layer4.1"]["images"] == 3
    raw = np.load(out / "cam_raw.npz")
    assert {k.split("/")[0] for k in raw.files} == {"p0", "p1"}
    assert "first 2 of 3 images" in " ".join(result.output.split())
