"""Exported (.pt2) and scripted models: static batches run image by image, records equal the
eager model's, Linear mult-adds and original types kept, Hugging Face programs load, notes
printed once."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyNet, run
from PIL import Image

from fgscope.capture import capture
from fgscope.models import load_model
from fgscope.places import trace_places

SIZE = 64


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    net = _tiny()
    pt2 = root / "tiny.pt2"  # a static batch of 1
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, SIZE, SIZE),)), pt2)
    ts = root / "tiny_ts.pt"
    torch.jit.save(torch.jit.script(net), ts)
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        px = (torch.rand(SIZE, SIZE, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(px, "RGB").save(images / f"{i}.png")
    return {"net": net, "pt2": pt2, "ts": ts, "images": images, "root": root}


def test_batchnorm_records_equal_eager(files):
    lm = load_model(str(files["pt2"]))
    x = torch.randn(1, 3, SIZE, SIZE)
    names = ["stem.1", "block.bn1", "block.bn2", "fc"]
    with capture(files["net"], names) as eager:
        files["net"](x)
    with capture(lm.module, names) as exported:
        lm.module(x)
    for a, b in zip(eager.records, exported.records):
        assert a.name == b.name
        assert float(a.tensor.min()) < 0  # before the ReLU that follows in place
        torch.testing.assert_close(b.tensor, a.tensor, rtol=1e-5, atol=1e-5)
    assert [r.module_type for r in exported.records] == ["BatchNorm2d", "BatchNorm2d",
                                                         "BatchNorm2d", "Linear"]


def test_linear_mult_adds_counted(files):
    lm = load_model(str(files["pt2"]))
    x = torch.zeros(1, 3, SIZE, SIZE)
    _, eager = trace_places(files["net"], x, ["fc"])
    _, exported = trace_places(lm.module, x, ["fc"])
    assert exported == eager  # the fc's 5 x 16 mult-adds included (aten.linear, seen as F.linear)


def test_static_batch_layers_and_dump_with_four_images(files, tmp_path):
    r = run("layers", files["pt2"], files["images"], "--layers", "all", "--batch-size", 4,
            "--out", tmp_path / "layers")
    assert r.exit_code == 0, r.output
    table = json.loads((tmp_path / "layers" / "layers.json").read_text())
    assert table and r.stdout.count("note: torch.export: loaded") == 1  # printed once
    d = run("dump", files["pt2"], files["images"], "--layers", "stages", "--batch-size", 4,
            "--out", tmp_path / "dump")
    assert d.exit_code == 0, d.output
    assert "dumped 4 images" in " ".join(d.stdout.split())


def test_torchscript_layers_records_the_output_and_says_why(files, tmp_path):
    r = run("layers", files["ts"], files["images"], "--out", tmp_path / "ts")
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "note: TorchScript" in out and "output" in out


def test_hugging_face_program_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64],
                                      depths=[1, 1, 2, 1], num_labels=5)
    hf = transformers.ConvNextForImageClassification(cfg).eval()
    path = tmp_path / "hf.pt2"
    torch.export.save(torch.export.export(hf, (torch.randn(1, 3, SIZE, SIZE),)), path)
    r = run("summary", path, "--layers", "stages", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "s.json").read_text())["layers"]
    assert [row["name"].split(".")[3] for row in rows] == ["0", "1", "2", "3"]
    assert all(row["type"] == "ConvNextLayer" for row in rows)
