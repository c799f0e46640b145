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
    md = [ln for ln in (out / "layers.md").read_text().splitlines() if ln.startswith("|")]
    assert len(rows) == len(table) == len(md) - 2 == 21  # MobileNetV2 blocks: 19 + classifier
    for r, t in zip(rows, table):
        assert r["name"] == t["name"] and r["stage"] == t["stage"]
        assert (r["sparsity"] == "") == (t["sparsity"] is None)
        if t["sparsity"] is not None:
            assert float(r["sparsity"]) == pytest.approx(t["sparsity"])
        assert (r["rf"] == "") == (t["rf"] is None)
        assert r["grid"] == t["grid"]  # the grid's file name, or why there is none
    assert md[0].startswith("| index | name |")
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("versions", "argv", "model", "images", "device", "dtype", "timings_s", "predictions"):
        assert key in manifest, key
    import resource  # the run's peak memory, read before the process exits: this process's
    assert 0 < manifest["peak_rss_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    from fgscope.layers.compute import STAT_KEYS, inspect

    out, _ = layers_run
    table = json.loads((out / "layers.json").read_text())["layers"]
    api = inspect(fgscope.load_model(), None, "blocks")
    assert [r.name for r in api.rows] == [t["name"] for t in table]
    for r, t in zip(api.rows, table):
        for key in ("stride", "rf", "stage", "params", "shape"):
            assert getattr(r, key) == t[key], key
        for key in STAT_KEYS:  # every statistic, or why it is empty, the same
            v = getattr(r, key)
            assert (v is None) == (t[key] is None), key
            if v is not None:
                assert v == pytest.approx(t[key], rel=1e-4, abs=1e-6), key


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
    # three images: every statistic has one value per readable image
    assert all(len(t["per_image"]["mean"]) == 3 for t in table)
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


# --- layer patterns: `*` within one name component, `**` across; the size guard ----------------


def test_glob_semantics_follow_path_globs():
    from fgscope.selection import glob_names, select_layers

    model = torchvision.models.resnet50(weights=None)
    names = [n for n, _ in model.named_modules() if n]

    def sel(spec):
        return list(select_layers(model, spec))

    assert sel("layer*") == ["layer1", "layer2", "layer3", "layer4"]  # not their 172 descendants
    assert sel("layer3.*,layer4.*") == [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]
    inside = sel("layer3.**")
    assert inside == [n for n in names if n.startswith("layer3.")] and len(inside) == 51
    assert sel("**.conv1") == ["conv1"] + [n for n in names if n.endswith(".conv1")]
    assert sel("layer1.**.conv1") == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]
    assert sel("layer?.0") == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert sel("layer[!12]") == ["layer3", "layer4"] and sel("layer[12].0.downsample") == ["layer1.0.downsample", "layer2.0.downsample"]
    assert sel("*") == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert glob_names(["a.b", "a.b.c", "ab"], "a.**") == ["a.b", "a.b.c"]  # inside a, not a itself
    assert glob_names(["a", "a.b", "x.a"], "**.a") == ["a", "x.a"]


def test_a_pattern_that_selects_too_many_layers_asks_for_all_or_max_layers(tmp_path):
    from fgscope.cli.options import MAX_LAYERS_DEFAULT
    from fgscope.errors import ConfigError
    from fgscope.selection import DEFAULT_MAX_LAYERS, layer_limit, select_layers

    assert MAX_LAYERS_DEFAULT == DEFAULT_MAX_LAYERS == 64
    model = torchvision.models.resnet50(weights=None)
    with pytest.raises(ConfigError, match=r"selects 150 layers, more than the 64"):
        select_layers(model, "**")
    with layer_limit(200):
        assert len(select_layers(model, "**")) == 150
    assert len(select_layers(model, "all")) > 64  # asked for by name: never limited
    result = run("summary", "resnet18", "--weights", "none", "--layers", "layer*.**,fc", "--max-layers", "40")
    assert_one_line_error(result, 2, "'layer*.**' selects 57 layers, more than the 40", "--layers all",
                          "--max-layers")
    result = run("summary", "resnet18", "--weights", "none", "--layers", "layer*.**", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output  # 57 <= 64
    assert len(json.loads((tmp_path / "s.json").read_text())["layers"]) >= 57


# --- --out that holds files: a warning naming the folder used --------------------------------


def test_out_holding_files_warns_with_the_folder_used(tmp_path, tiny_state_dict):
    out = tmp_path / "run"
    out.mkdir()
    (out / "layers.csv").write_text("stale")
    result = run("layers", tiny_state_dict, _image(tmp_path), "--arch", "resnet18", "--size", "64",
                 "--no-grids", "--out", out, "--device", "cpu", "--layers", "layer1")
    assert result.exit_code == 0, result.output
    warning = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert warning == [f"warning: --out {out} holds files: writing into {tmp_path / 'run-2'} instead "
                       f"(--overwrite reuses {out}, removing only an earlier fgscope run's files)"]
    assert (out / "layers.csv").read_text() == "stale" and (tmp_path / "run-2" / "layers.csv").is_file()
    assert str(tmp_path / "run-2") in result.stdout  # `wrote N files to ...` names it too


def test_new_run_dir_says_where_in_python(tmp_path):
    import warnings

    from fgscope.runs import OutputRedirected, choose_run_dir, new_run_dir

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("x")
    choice = choose_run_dir(tmp_path / "a", "layers")
    assert choice.redirected and choice.path == tmp_path / "a-2" and choice.requested == tmp_path / "a"
    assert not choose_run_dir(tmp_path / "b", "layers").redirected
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert new_run_dir(tmp_path / "a", "layers") == tmp_path / "a-3"
    assert [w.category for w in seen] == [OutputRedirected] and "a-3" in str(seen[0].message)


# --- the CLI surface ----------------------------------------------------------------------------


def test_comma_separated_triples_and_three_values(tmp_path, tiny_state_dict):
    from fgscope.cli._command import expand_number_lists

    img = _image(tmp_path)
    common = [tiny_state_dict, img, "--arch", "resnet18", "--size", "64", "--no-grids", "--device",
              "cpu", "--layers", "layer1"]
    for i, mean in enumerate((["--mean", "0.5,0.4,0.3"], ["--mean", "0.5", "0.4", "0.3"])):
        result = run("layers", *common, "--out", tmp_path / f"o{i}", *mean, "--std", "0.2,0.2,0.25")
        assert result.exit_code == 0, result.output
        pre = json.loads((tmp_path / f"o{i}" / "manifest.json").read_text())["model"]["preprocess"]
        assert pre["mean"] == [0.5, 0.4, 0.3] and pre["std"] == [0.2, 0.2, 0.25]
    result = run("layers", *common, "--mean", "0.5,0.5")
    assert result.exit_code == 2 and "takes 3 numbers" in result.output
    assert expand_number_lists([], ["--", "--mean", "1,2,3"]) == ["--", "--mean", "1,2,3"]
    from typer.main import get_command

    from fgscope.cli import app

    params = get_command(app).commands["layers"].params
    assert expand_number_lists(params, ["--mean=0.5,0.4,0.3", "x.png"]) == ["--mean", "0.5", "0.4", "0.3", "x.png"]
    assert expand_number_lists(params, ["--contrast", "a,b", "c"]) == ["--contrast", "a,b", "c"]  # words


def test_help_shows_no_value_for_flags_and_completion_is_offered():
    helps = {cmd: run(cmd, "--help").output for cmd in ("layers", "cam", "summary", "dump", "report")}
    for cmd, text in helps.items():
        assert "<bool>" not in text, cmd
        assert "<float,float,float>" not in text, cmd
    assert "R,G,B" in helps["layers"] and "0.5,0.5,0.5" in helps["layers"]
    top = run("--help").output
    assert "<bool>" not in top and "--install-completion" in top and "--show-completion" in top
    shown = run("--show-completion", "bash")
    assert shown.exit_code == 0 and "complete" in shown.output and "fgscope" in shown.output.lower()


def test_native_input_size_without_weights():
    import fgscope
    from fgscope.models.hub import _build, native_preprocess

    assert fgscope.load_model("efficientnet_b1", weights=None).input_size == (240, 240)
    assert fgscope.load_model("efficientnet_b1", weights=None, size=128).input_size == (128, 128)
    sizes = {name: native_preprocess(name, _build(name, device="meta")).crop_size
             for name in ("inception_v3", "resnet18", "vit_h_14")}  # meta: no memory, no init
    # from the default weights' transforms; a ViT keeps the image_size it was built for
    assert sizes == {"inception_v3": (299, 299), "resnet18": (224, 224), "vit_h_14": (224, 224)}


def test_dump_part_numbers_are_printed_as_given(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        _image(imgs, f"{i}.png", seed=i)
    result = run("dump", "resnet18", imgs, "--weights", "none", "--size", "32", "--layers", "layer4",
                 "--workers", "0", "--device", "cpu", "--shard", "0/2", "--out", tmp_path / "d")
    assert result.exit_code == 0, result.output
    assert "part 0/2:" in result.output and "part 1/2" not in result.output
