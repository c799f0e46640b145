"""timm models: `timm:NAME`, state_dicts with `--arch timm:NAME`, pickled timm models, the
offline hub cache, timm's own preprocessing, and the core without timm installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run
from PIL import Image

from fgscope import models
from fgscope.errors import ConfigError, ModelLoadError
from fgscope.models import load_model

timm = pytest.importorskip("timm")
pytest.importorskip("timm.data")

# The seven architectures issue 12 names; 64 px inputs keep each run short. The big ones
# (several seconds each to build) run with the slow tests.
_slow = pytest.mark.slow
ARCHS = [
    pytest.param("resnet50", marks=_slow),
    pytest.param("convnext_tiny", marks=_slow),
    "efficientnet_b0",
    "regnety_008",
    pytest.param("hrnet_w18_small", marks=_slow),
    pytest.param("cspdarknet53", marks=_slow),
    "vit_tiny_patch16_224",
]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def effnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("efficientnet_b0", pretrained=False).eval()


def _fill(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict of `model` with every float tensor redrawn (so a load is visible)."""
    g = torch.Generator().manual_seed(3)
    return {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("name", ARCHS)
def test_timm_name_in_summary_counts_every_parameter(tmp_path, name):
    size = 64
    res = run("summary", f"timm:{name}", "--weights", "none", "--size", size,
              "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "s.json").read_text())
    kwargs = {"img_size": size} if name.startswith("vit") else {}
    ref = timm.create_model(name, pretrained=False, **kwargs)
    assert table["total_params"] == sum(p.numel() for p in ref.parameters())
    assert table["input_size"] == [size, size]
    assert len(table["layers"]) > 10


def test_api_timm_name_is_random_init_with_timm_preprocessing():
    lm = load_model("timm:regnety_008", weights="none")
    assert lm.source.kind == "timm" and lm.source.arch == "regnety_008"
    assert lm.source.weights is None and lm.labels is None and not lm.module.training
    assert type(lm.module).__module__.startswith("timm.")
    cfg = timm.data.resolve_model_data_config(lm.module)
    assert lm.input_size == cfg["input_size"][1:]
    assert lm.preprocess.interpolation == cfg["interpolation"]
    again = load_model("timm:regnety_008.pycls_in1k", weights="none")
    assert again.source.arch == "regnety_008.pycls_in1k"


@pytest.mark.parametrize(
    "spec",
    [
        "resnet50",  # crop_pct 0.95, bicubic
        "resnet50.tv_in1k",  # 0.875, bilinear
        "cspdarknet53",  # 256 px, 0.887, bilinear
        "vit_tiny_patch16_224",  # mean/std 0.5
    ],
)
def test_preprocess_equals_timm_transform(photo, spec):
    lm = load_model(f"timm:{spec}", weights="none")
    cfg = timm.data.resolve_data_config(model=lm.module)
    ref = timm.data.create_transform(**cfg)(photo)
    assert lm.preprocess(photo).shape == ref.shape
    assert torch.allclose(lm.preprocess(photo), ref, atol=1e-5)


def test_squash_crop_mode_equals_timm_transform(photo):
    cfg = {"input_size": (3, 96, 96), "crop_pct": 0.9, "crop_mode": "squash",
           "interpolation": "bilinear", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4)}
    pre, notes = models.timmzoo.timm_preprocess(cfg)
    assert pre.squash and pre.resize_size == 106 and not notes
    ref = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))(photo)
    assert torch.allclose(pre(photo), ref, atol=1e-5)


def test_state_dict_with_timm_arch(tmp_path, effnet):
    torch.save(_fill(effnet), tmp_path / "effnet_sd.pth")
    res = run("summary", tmp_path / "effnet_sd.pth", "--arch", "timm:efficientnet_b0",
              "--size", 64)
    assert res.exit_code == 0, res.output
    lm = load_model(str(tmp_path / "effnet_sd.pth"), arch="timm:efficientnet_b0")
    assert lm.source.kind == "state_dict" and lm.source.arch == "timm:efficientnet_b0"
    for k, v in _fill(effnet).items():
        assert torch.equal(lm.module.state_dict()[k], v), k
    assert lm.preprocess.interpolation == "bicubic"  # timm's pretrained_cfg, not torchvision's


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_tiny", "cspdarknet53"])
def test_issue_examples_load_from_state_dict(tmp_path, name):
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False).eval()
    torch.save(net.state_dict(), tmp_path / f"{name}_sd.pth")
    res = run("summary", tmp_path / f"{name}_sd.pth", "--arch", f"timm:{name}", "--size", 64)
    assert res.exit_code == 0, res.output


def test_training_checkpoint_with_fine_tuned_head(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("regnety_008", pretrained=False, num_classes=7).eval()
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3, "classes": list("abcdefg")}, tmp_path / "ck.pth")
    lm = load_model(str(tmp_path / "ck.pth"), arch="timm:regnety_008")
    assert lm.labels == tuple("abcdefg")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(lm.module(x), net(x))
    headless = timm.create_model("regnety_008", pretrained=False, num_classes=0)
    torch.save(headless.state_dict(), tmp_path / "features.pth")
    assert load_model(str(tmp_path / "features.pth"), arch="timm:regnety_008").module.num_classes == 0


def test_state_dict_of_another_timm_arch_is_one_line_error(tmp_path, effnet):
    torch.save(effnet.state_dict(), tmp_path / "sd.pth")
    res = run("summary", tmp_path / "sd.pth", "--arch", "timm:regnety_008")
    assert_one_line_error(res, 3, "does not fit --arch timm:regnety_008", "missing keys")


def test_pickled_timm_model_with_trust(tmp_path, effnet):
    torch.save(effnet, tmp_path / "whole.pt")
    res = run("summary", tmp_path / "whole.pt", "--trust", "--size", 64)
    assert res.exit_code == 0, res.output
    lm = load_model(str(tmp_path / "whole.pt"), trust=True)
    assert lm.source.kind == "pickled_module"
    assert lm.preprocess.interpolation == "bicubic" and lm.preprocess.resize_size == 256


def test_timm_module_passed_to_the_api_gets_timm_preprocessing(effnet):
    lm = load_model(effnet)
    assert lm.module is effnet and lm.preprocess.crop_size == (224, 224)
    assert lm.preprocess.resize_size == 256 and lm.preprocess.interpolation == "bicubic"


def _snapshot(root, repo: str, rev: str = "0123abcd") -> object:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(rev)
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    return snap


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_pretrained_weights_from_the_offline_hub_cache(tmp_path, monkeypatch, effnet, fmt):
    from safetensors.torch import save_file

    state = _fill(effnet)
    snap = _snapshot(tmp_path / "hub", "timm/efficientnet_b0.ra_in1k")
    if fmt == "safetensors":
        save_file(state, str(snap / "model.safetensors"))
    else:
        torch.save(state, snap / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("timm:efficientnet_b0")
    for k, v in state.items():
        assert torch.equal(lm.module.state_dict()[k], v), k
    assert lm.source.weights == "timm:efficientnet_b0.ra_in1k"
    assert lm.source.path == str((snap / next(p.name for p in snap.iterdir())).resolve())
    assert len(lm.labels) == 1000 and lm.labels[:2] == ("tench", "goldfish")
    cfg = timm.data.resolve_model_data_config(lm.module)
    assert lm.preprocess.resize_size == int(224 / cfg["crop_pct"])


def test_weights_path_and_hf_home(tmp_path, monkeypatch, effnet):
    from safetensors.torch import save_file

    state = _fill(effnet)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    (tmp_path / "w").mkdir()
    save_file(state, str(tmp_path / "w" / "efficientnet_b0.ra_in1k.safetensors"))
    monkeypatch.setenv("FGSCOPE_WEIGHTS_PATH", str(tmp_path / "w"))
    lm = load_model("timm:efficientnet_b0.ra_in1k")
    assert lm.source.path.endswith("efficientnet_b0.ra_in1k.safetensors")
    snap = _snapshot(tmp_path / "empty" / "hub", "timm/efficientnet_b0.ra_in1k")
    save_file(state, str(snap / "model.safetensors"))
    assert load_model("timm:efficientnet_b0").source.path.startswith(str(tmp_path / "empty"))


def test_missing_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("FGSCOPE_WEIGHTS_PATH", raising=False)
    res = run("summary", "timm:resnet50")
    assert_one_line_error(
        res, 3, "no offline weights for timm:resnet50.a1_in1k",
        str(tmp_path / "hub" / "models--timm--resnet50.a1_in1k"), "--weights none", "hf download",
    )
    assert not (tmp_path / "hub").exists()  # nothing was downloaded


def test_unknown_names_and_tags(monkeypatch):
    text = str(pytest.raises(ModelLoadError, load_model, "timm:resnet5x", weights="none").value)
    assert "timm:resnet50" in text or "timm:resnet51q" in text
    text = str(pytest.raises(ModelLoadError, load_model, "cspdarknet53").value)
    assert "did you mean" in text and "timm:cspdarknet53" in text and "hf:" in text
    text = str(pytest.raises(ModelLoadError, load_model, "timm:resnet50.nope").value)
    assert "no weights tag 'nope'" in text and "a1_in1k" in text
    with pytest.raises(ConfigError, match="--arch does not apply"):
        load_model("timm:resnet50", weights="none", arch="resnet50")


def test_missing_timm_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    monkeypatch.setitem(sys.modules, "timm.data", None)
    res = run("summary", "timm:resnet50", "--weights", "none")
    assert_one_line_error(res, 3, "timm:resnet50 needs the optional extra",
                          "pip install 'fgscope[timm]'")


def test_core_runs_without_timm_and_transformers(tmp_path):
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("timm", "transformers"):
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        import fgscope
        from fgscope.models import load_model
        lm = load_model("resnet18", weights="none")
        try:
            load_model("resnet5")
        except Exception as e:
            assert "did you mean" in str(e), e
        for spec, extra in (("timm:resnet50", "timm"), ("hf:" + sys.argv[1], "hf")):
            try:
                load_model(spec, weights="none")
            except Exception as e:
                assert f"pip install 'fgscope[{extra}]'" in str(e), e
        assert "timm" not in sys.modules and "transformers" not in sys.modules
        print("ok")
    """)
    (tmp_path / "config.json").write_text('{"model_type": "resnet"}')
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
