"""The CLI, in-process with typer's CliRunner: summary, layers, and every kind of bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_one_line_error, run
from PIL import Image


def test_help_lists_commands_and_is_lazy():
    result = run("--help")
    assert result.exit_code == 0
    assert "summary" in result.output and "layers" in result.output
    assert run("--version").output.startswith("fgscope ")
    # the CLI module itself does not import torch (start-up stays fast)
    code = "import sys, fgscope.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "fgscope", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fgscope ")


def test_summary_default_model_json_and_csv(tmp_path):
    result = run("summary", "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv")
    assert result.exit_code == 0, result.output
    assert "features.18.2" in result.output and "3,504,872" in result.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["total_params"] == 3_504_872  # MobileNetV2, as torchvision documents
    rows = data["layers"]
    for key in ("name", "type", "shape", "stride", "rf", "params"):
        assert key in rows[0]
    assert rows[0]["shape"] == [32, 112, 112] and rows[0]["stride"] == 2 and rows[0]["rf"] == 3
    last_map = [r for r in rows if len(r["shape"]) == 3][-1]
    assert last_map["stride"] == 32 and last_map["rf"] == 491
    with open(tmp_path / "s.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table] == [r["name"] for r in rows]


def test_summary_random_init_any_architecture_and_stages(tmp_path):
    result = run("summary", "resnet18", "--weights", "none", "--layers", "stages", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert [r["name"] for r in rows] == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert [r["stride"] for r in rows] == [2, 4, 8, 16, 32]


def test_unknown_model_and_layer(tmp_path):
    assert_one_line_error(run("summary", "resnet5", "--weights", "none"), 3, "resnet5", "resnet50")
    assert_one_line_error(
        run("summary", "resnet18", "--weights", "none", "--layers", "layer1.0.relux"),
        6, "layer1.0.relux", "layer1.0.relu", "fgscope summary",
    )
    assert_one_line_error(run("summary", tmp_path / "missing.pt"), 3, "missing.pt")


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(weights=None), path)
    assert_one_line_error(run("summary", path), 4, "--trust")
    assert run("summary", path, "--trust").exit_code == 0


def test_state_dict_mismatch_is_named(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    assert_one_line_error(run("summary", path, "--arch", "resnet34"), 3, "missing")
    assert_one_line_error(run("summary", path), 3, "--arch")
    assert run("summary", path, "--arch", "resnet18", "--layers", "fc").exit_code == 0


def test_device_errors():
    if not torch.cuda.is_available():
        assert_one_line_error(run("summary", "--device", "cuda"), 7, "CUDA")
    assert_one_line_error(run("summary", "--device", "tpu"), 7, "tpu")


# --- layers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layers_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers") / "run"
    result = run("layers", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.slow
def test_layers_default_writes_valid_files_that_agree(layers_run):
    out, result = layers_run
    for name in ("layers.csv", "layers.json", "layers.md", "manifest.json", "hierarchy.png", "geometry.png"):
        assert (out / name).is_file(), name
    table = json.loads((out / "layers.json").read_text())["layers"]
    with open(out / "layers.csv") as fh:
        rows = list(csv.DictReader(fh))
    md = (out / "layers.md").read_text().strip().splitlines()
    assert len(rows) == len(table) == len(md) - 2 == 21  # MobileNetV2 blocks: 19 + classifier
    for r, t in zip(rows, table):
        assert r["name"] == t["name"] and r["stage"] == t["stage"]
        assert float(r["sparsity"]) == pytest.approx(t["sparsity"])
        assert (r["rf"] == "") == (t["rf"] is None)
    assert md[0].startswith("| index | name |")
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("versions", "argv", "model", "images", "device", "dtype", "timings_s", "predictions"):
        assert key in manifest, key
    assert manifest["model"]["sha256"].startswith("b0353104")
    top5 = [p["label"] for p in manifest["predictions"][0]["top5"]]
    assert "military uniform" in top5, top5
    assert set(top5) <= {"military uniform", "bow tie", "Windsor tie", "suit", "mortarboard",
                         "academic gown", "pickelhaube", "bulletproof vest", "cornet", "lab coat"}
    assert "military uniform" in result.output
    for rel in manifest["files"]:
        path = out / rel
        assert path.is_file(), rel
        if path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
    grids = sorted((out / "grids" / "grace_hopper").glob("*.png"))
    assert len(grids) == 19  # every block with a spatial map
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_layers_files_agree_with_python_api(layers_run):
    import fgscope
    from fgscope.layers.compute import inspect

    out, _ = layers_run
    table = json.loads((out / "layers.json").read_text())["layers"]
    api = inspect(fgscope.load_model(), None, "blocks")
    assert [r.name for r in api.rows] == [t["name"] for t in table]
    for r, t in zip(api.rows, table):
        for key in ("stride", "rf", "stage", "params", "shape"):
            assert getattr(r, key) == t[key], key
        assert r.sparsity == pytest.approx(t["sparsity"], rel=1e-5)
        assert (r.eff_dim is None) == (t["eff_dim"] is None)
        if r.eff_dim is not None:
            assert r.eff_dim == pytest.approx(t["eff_dim"], rel=1e-4)


def test_existing_out_is_not_overwritten(tmp_path, tiny_state_dict):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["layers", tiny_state_dict, _image(tmp_path), "--arch", "resnet18", "--size", "64",
            "--no-grids", "--out", out, "--device", "cpu"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert (tmp_path / "run-2" / "layers.json").is_file()
    # --overwrite removes only what fgscope wrote: a folder holding a user's file is refused
    assert_one_line_error(run(*args, "--overwrite"), 8, "keep.txt", "nothing was removed")
    assert (out / "keep.txt").read_text() == "mine"
    again = [a if a != out else tmp_path / "run-2" for a in args]
    result = run(*again, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run-2" / "layers.json").is_file() and not (tmp_path / "run-3").exists()


@pytest.fixture(scope="module")
def tiny_state_dict(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "r18.pth"
    torch.manual_seed(0)
    torch.save({"state_dict": torchvision.models.resnet18(weights=None).state_dict()}, path)
    return path


def _image(folder: Path, name: str = "a.png", seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    path = folder / name
    Image.fromarray(arr).save(path)
    return path


def test_layers_bad_images_skipped_and_listed(tmp_path, tiny_state_dict):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        _image(imgs, f"ok{i}.png", seed=i)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (imgs / "empty.png").write_bytes(b"")
    out = tmp_path / "o"
    result = run("layers", tiny_state_dict, imgs, "--arch", "resnet18", "--size", "64",
                 "--out", out, "--device", "cpu", "--layers", "stages")
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and "empty.png" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(Path(f["path"]).name for f in manifest["failures"]) == ["broken.jpg", "empty.png"]
    assert len(manifest["images"]) == 3
    table = json.loads((out / "layers.json").read_text())["layers"]
    # three images: the CKA columns are filled
    assert all(t["cka_input"] is not None and t["abstraction"] is not None for t in table)
    assert len(list((out / "grids").iterdir())) == 3


def test_layers_all_images_bad_or_missing(tmp_path, tiny_state_dict):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    common = ["--arch", "resnet18", "--size", "64", "--out", tmp_path / "o", "--device", "cpu"]
    assert_one_line_error(run("layers", tiny_state_dict, bad, *common), 5, "bad.png")
    assert_one_line_error(run("layers", tiny_state_dict, tmp_path / "nope.jpg", *common), 5, "nope.jpg")
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are known good


def test_layers_option_errors(tmp_path, tiny_state_dict):
    common = [tiny_state_dict, _image(tmp_path), "--arch", "resnet18", "--size", "64", "--device", "cpu"]
    assert_one_line_error(run("layers", *common, "--rank", "loudest"), 2, "--rank")
    assert_one_line_error(run("layers", *common, "--normalize", "global"), 2, "--normalize")
    assert_one_line_error(run("layers", *common, "--cmap", "nocolour"), 2, "nocolour")
    assert_one_line_error(run("layers", *common, "--layers", "layer9"), 6, "layer9")


def test_layers_overlay_and_layer_normalisation(tmp_path, tiny_state_dict):
    out = tmp_path / "o"
    result = run("layers", tiny_state_dict, _image(tmp_path), "--arch", "resnet18", "--size", "64",
                 "--out", out, "--device", "cpu", "--layers", "layer1.0,layer4.1", "--overlay",
                 "--normalize", "layer", "--top-k", "4", "--rank", "max")
    assert result.exit_code == 0, result.output
    grids = sorted((out / "grids" / "a").glob("*.png"))
    assert [g.name for g in grids] == ["000_layer1.0.png", "001_layer4.1.png"]
