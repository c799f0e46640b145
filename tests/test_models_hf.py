"""Hugging Face transformers image models from a `save_pretrained` folder (`hf:PATH`)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run
from PIL import Image

from fgscope.errors import ConfigError, ModelLoadError
from fgscope.models import load_model
from fgscope.models.hfzoo import HFImageModel

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

_LABELS = {0: "sparrow", 1: "finch", 2: "wren"}


def _save(folder, config, model_cls, processor) -> None:
    torch.manual_seed(0)
    model_cls(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "convnext"
    cfg = transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=3, id2label=_LABELS,
        label2id={v: k for k, v in _LABELS.items()},
    )
    proc = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    _save(folder, cfg, transformers.ConvNextForImageClassification, proc)
    return folder


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "resnet"
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
        layer_type="basic", num_labels=3, id2label=_LABELS,
        label2id={v: k for k, v in _LABELS.items()},
    )
    proc = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875,
                                               image_mean=[0.485, 0.456, 0.406],
                                               image_std=[0.229, 0.224, 0.225])
    _save(folder, cfg, transformers.ResNetForImageClassification, proc)
    return folder


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("which", ["convnext", "resnet"])
def test_loads_with_processor_preprocessing_and_labels(request, photo, which):
    folder = request.getfixturevalue(which)
    lm = load_model(f"hf:{folder}")
    assert lm.source.kind == "hf" and lm.source.path == str(folder)
    assert lm.labels == ("sparrow", "finch", "wren") and not lm.module.training
    assert isinstance(lm.module, HFImageModel)
    assert lm.preprocess.crop_size == (64, 64) and lm.preprocess.resize_size == int(64 / 0.875)
    assert lm.preprocess.interpolation == "bicubic"
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder))
    ref = proc(photo, return_tensors="pt")["pixel_values"][0]
    ours = lm.preprocess(photo)
    # transformers resizes tensors, torchvision PIL images: at most a level or two apart.
    assert ours.shape == ref.shape and (ours - ref).abs().mean() < 1e-3
    assert (ours - ref).abs().max() <= 4 / 255 / min(proc.image_std)
    # The module returns the logits of the transformers model, under its own module names.
    x = torch.randn(2, 3, 64, 64)
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(lm.module(x), hf(pixel_values=x).logits)
    names = dict(lm.module.named_modules())
    body = "model.convnext.encoder.stages.3" if which == "convnext" else "model.resnet.encoder.stages.3"
    assert body in names
    assert sum(p.numel() for p in lm.module.parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("which", ["convnext", "resnet"])
def test_summary_and_layers_run(request, tmp_path, which):
    folder = request.getfixturevalue(which)
    res = run("summary", f"hf:{folder}", "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "s.json").read_text())
    assert table["input_size"] == [64, 64]
    assert any(r["name"].startswith(f"model.{which}.encoder.stages.") for r in table["layers"])
    res = run("layers", f"hf:{folder}", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "hf" and manifest["model"]["path"] == str(folder)
    assert manifest["model"]["preprocess"]["resize_size"] == int(64 / 0.875)


def test_probe_runs_on_a_synthetic_image_folder(tmp_path, convnext):
    res = run("synthetic", tmp_path / "data", "--per-class", 4, "--size", 64)
    assert res.exit_code == 0, res.output
    res = run("probe", f"hf:{convnext}", tmp_path / "data", "--layers", "stages", "--folds", 2,
              "--out", tmp_path / "probe")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "probe" / "manifest.json").is_file()


def test_random_init_and_other_weights(convnext):
    lm = load_model(f"hf:{convnext}", weights="none")
    assert lm.source.sha256 is None and lm.labels == ("sparrow", "finch", "wren")
    with pytest.raises(ConfigError, match="holds its own weights"):
        load_model(f"hf:{convnext}", weights="IMAGENET1K_V1")


def test_other_processors_and_backbones(tmp_path, photo):
    cfg = transformers.MobileNetV2Config(depth_multiplier=0.35, num_labels=2)
    proc = transformers.MobileNetV2ImageProcessor(size={"shortest_edge": 72},
                                                  crop_size={"height": 64, "width": 64})
    _save(tmp_path / "mnv2", cfg, transformers.MobileNetV2ForImageClassification, proc)
    lm = load_model(f"hf:{tmp_path / 'mnv2'}")
    assert lm.labels is None  # LABEL_0, LABEL_1 are transformers' placeholders
    assert (lm.preprocess.crop_size, lm.preprocess.resize_size) == ((64, 64), 72)
    assert lm.preprocess.interpolation == "bilinear"
    ref = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "mnv2"))(
        photo, return_tensors="pt")["pixel_values"][0]
    assert (lm.preprocess(photo) - ref).abs().mean() < 1e-3
    cfg = transformers.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32],
                                    depths=[1, 1, 1, 1], groups_width=8)
    torch.manual_seed(0)
    transformers.RegNetModel(cfg).save_pretrained(tmp_path / "regnet")
    lm = load_model(f"hf:{tmp_path / 'regnet'}")
    assert lm.preprocess is not None and lm.labels is None
    assert any("no classifier" in n for n in lm.source.notes)
    assert lm.module(torch.randn(2, 3, 64, 64)).shape == (2, 32)  # pooled features


def test_folder_errors_are_one_line(tmp_path, convnext):
    assert_one_line_error(run("summary", f"hf:{tmp_path / 'nope'}"), 3, "not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("summary", f"hf:{tmp_path / 'empty'}"), 3, "no config.json")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.Model"}}))
    (remote / "m.py").write_text("raise SystemExit('code ran')\n")
    assert_one_line_error(run("summary", f"hf:{remote}"), 3, "own Python code", "never runs")
    assert_one_line_error(run("summary", str(convnext)), 3, f"hf:{convnext}")


def test_missing_transformers_is_a_one_line_error(monkeypatch, convnext):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelLoadError, match=r"pip install 'fgscope\[hf\]'"):
        load_model(f"hf:{convnext}")
