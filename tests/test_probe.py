"""Linear probes: the machinery against its definitions, pooled features, the command and its
files, `layers --probe-data`, and the direction of the result on the synthetic set."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_one_line_error, run
from PIL import Image

from fgscope import metrics
from fgscope.capture import capture
from fgscope.errors import ConfigError
from fgscope.models import load_model
from fgscope.probe import (
    Features,
    ProbeLayer,
    bilinear_features,
    chance_level,
    cross_validate,
    extract_features,
    hypercolumn_features,
    load_coarse_map,
)
from fgscope.synthetic import generate

ROW_KEYS = {"layer", "index", "stage", "stride", "rf", "pool", "granularity", "acc_mean", "acc_std",
            "chance", "dim"}






# --- the probe itself, on hand-built features --------------------------------------------------


def test_separable_features_give_accuracy_one():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 15)
    x = rng.normal(size=(60, 6))
    x[np.arange(60), y] += 10.0  # class k lights up feature k
    mean, std, folds, _ = cross_validate(x, y, folds=5, seed=0)
    assert mean == 1.0 and std == 0.0 and folds == (1.0,) * 5


def test_random_features_are_near_chance():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 100)
    x = rng.normal(size=(400, 10))
    mean, _, _, _ = cross_validate(x, y, folds=5, seed=0)
    assert abs(mean - chance_level(y)) < 0.1


def test_cross_validate_matches_its_definition():
    """StratifiedKFold(shuffle, seed); scaler fit on the training fold only; L2 multinomial LR."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 12)
    x = rng.normal(size=(36, 5)) * [1, 10, 100, 0.1, 1] + y[:, None] * 0.7
    expected = []
    for train, test in StratifiedKFold(4, shuffle=True, random_state=3).split(x, y):
        mu, sd = x[train].mean(0), x[train].std(0)
        clf = LogisticRegression(C=0.5, max_iter=1000).fit((x[train] - mu) / sd, y[train])
        expected.append(clf.score((x[test] - mu) / sd, y[test]))
    mean, std, folds, _ = cross_validate(x, y, folds=4, seed=3, c=0.5)
    assert folds == pytest.approx(tuple(expected))
    assert mean == pytest.approx(np.mean(expected)) and std == pytest.approx(np.std(expected))


def test_chance_level_is_the_majority_class():
    assert chance_level(np.array([0, 0, 0, 1, 2, 2])) == 0.5


def test_cross_validate_errors_are_one_line():
    y = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ConfigError, match="fewer than --folds 3"):
        cross_validate(np.zeros((5, 2)), y, folds=3)
    x = np.zeros((6, 2))
    x[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN") as info:
        cross_validate(x, np.array([0, 0, 0, 1, 1, 1]), folds=3)
    assert "\n" not in str(info.value)


# --- pooled features against their definitions -------------------------------------------------


def test_bilinear_features_are_the_upper_triangle_of_bcnn():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    got = bilinear_features(x, channels=8)
    full = metrics.bilinear_pool(x).reshape(2, 3, 3)
    assert got.shape == (2, 6)  # 3 (3 + 1) / 2
    iu = torch.triu_indices(3, 3)
    assert torch.allclose(got, full[:, iu[0], iu[1]])
    # by hand for one sample: z = mean_l x_l x_l^T, signed sqrt, L2 norm (over the full matrix)
    f = x[0].reshape(3, -1)
    z = f @ f.T / f.shape[1]
    z = z.sign() * z.abs().sqrt()
    z = z / z.norm()
    assert torch.allclose(got[0], z[iu[0], iu[1]], atol=1e-6)


def test_bilinear_projection_for_many_channels():
    torch.manual_seed(1)
    x = torch.randn(2, 10, 3, 3)
    p = torch.randn(4, 10)
    got = bilinear_features(x, channels=4, projection=p)
    assert got.shape == (2, 10)  # 4 (4 + 1) / 2
    ref = bilinear_features(torch.einsum("kc,nchw->nkhw", p, x), channels=4)
    assert torch.allclose(got, ref, atol=1e-6)
    with pytest.raises(ValueError, match="projection"):
        bilinear_features(x, channels=4)


def test_hypercolumn_features_against_the_definition():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    b = torch.arange(32.0).reshape(1, 2, 4, 4)
    got = hypercolumn_features([a, b], (4, 4))
    assert got.shape == (1, 3)
    ref = metrics.hypercolumns([a, b], size=(4, 4)).mean((2, 3))
    assert torch.allclose(got, ref)
    # bilinear 2x upsampling (align_corners=False) keeps the mean: 2.5; b is on the grid already
    assert got[0, 0].item() == pytest.approx(2.5)
    assert got[0, 1:].tolist() == pytest.approx([7.5, 23.5])
    # a map larger than the grid is area-averaged down to it, which keeps its mean
    big = torch.randn(2, 3, 8, 8)
    assert torch.allclose(hypercolumn_features([big], (4, 4)), big.mean((2, 3)), atol=1e-6)
    # fusing then pooling = pooling each map then concatenating (cumulative hypercolumns)
    parts = torch.cat([hypercolumn_features([a], (4, 4)), hypercolumn_features([b], (4, 4))], 1)
    assert torch.allclose(got, parts)


def test_cumulative_hypercolumn_concatenates_maps_only():
    layers = [ProbeLayer("a", 0, "early", 2, 3, (2, 4, 4)), ProbeLayer("v", 1, "late", None, 9, (5,)),
              ProbeLayer("b", 2, "late", 4, 7, (3, 2, 2))]
    vals = {("a", "hypercolumn"): np.ones((4, 2)), ("b", "hypercolumn"): np.zeros((4, 3))}
    feats = Features(layers, vals, list(range(4)), ["h"] * 4, [], (4, 4))
    x, names = feats.hypercolumn(2)
    assert names == ("a", "b") and x.shape == (4, 5)
    assert feats.hypercolumn(0)[1] == ("a",)


# --- coarse maps ---------------------------------------------------------------------------------


def test_coarse_map_validation(tmp_path):
    classes = ["beagle", "persian", "siamese"]
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"beagle": "dog", "persian": "cat", "siamese": "cat", "extra": "x"}))
    assert load_coarse_map(good, classes) == {"beagle": "dog", "persian": "cat", "siamese": "cat"}
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"beagle": "dog"}))
    with pytest.raises(ConfigError, match="2 fine class") as info:
        load_coarse_map(missing, classes)
    assert "persian" in str(info.value) and "siamese" in str(info.value)
    for text, needle in [("[1, 2]", "object of strings"), ("{oops", "not valid JSON"),
                         ('{"beagle": "a", "persian": "a", "siamese": "a"}', "one coarse class")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_coarse_map(bad, classes)
    with pytest.raises(ConfigError, match="does not exist"):
        load_coarse_map(tmp_path / "nope.json", classes)


# --- streaming extraction ------------------------------------------------------------------------


def test_streamed_features_equal_pooling_the_kept_records(tmp_path, tiny):
    paths = []
    for i in range(5):
        arr = (np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    (tmp_path / "bad.png").write_text("not an image")
    paths.insert(2, tmp_path / "bad.png")
    lm = load_model(tiny, size=32)
    feats = extract_features(lm, paths, "stem.2,block,down,fc", ("avg", "max", "bilinear", "hypercolumn"),
                             device="cpu", batch_size=2, bilinear_channels=8)
    assert feats.kept == [0, 1, 3, 4, 5] and len(feats.failures) == 1
    assert [layer.name for layer in feats.layers] == ["stem.2", "block", "down", "fc"]
    assert [layer.stride for layer in feats.layers] == [2, 2, 4, None]
    x = torch.stack([lm.preprocess(Image.open(p).convert("RGB")) for p in paths if p.name != "bad.png"])
    with capture(lm.module, ["stem.2", "block", "down", "fc"]) as rec:
        lm.module(x)
    kept = rec.stacked()
    for name in ("stem.2", "block", "down"):
        t = kept[name]
        assert np.allclose(feats.values[(name, "avg")], t.mean((2, 3)).numpy(), atol=1e-5)
        assert np.allclose(feats.values[(name, "max")], t.amax((2, 3)).numpy(), atol=1e-5)
        assert np.allclose(feats.values[(name, "hypercolumn")],
                           hypercolumn_features([t], feats.grid).numpy(), atol=1e-5)
    assert feats.grid == (16, 16)
    assert feats.values[("stem.2", "bilinear")].shape == (5, 36)  # 8 channels: 8 * 9 / 2
    assert feats.values[("down", "bilinear")].shape == (5, 36)  # 16 channels projected to 8
    assert np.allclose(feats.values[("fc", "avg")], kept["fc"].numpy(), atol=1e-5)  # vectors pass
    assert ("fc", "bilinear") not in feats.values and ("fc", "hypercolumn") not in feats.values


# --- the command, on the synthetic set ---------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "data", per_class=12, size=64, seed=0)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, synthetic, r18):
    out = tmp_path_factory.mktemp("probe") / "run"
    result = run("probe", r18, synthetic.root, "--arch", "resnet18", "--size", "64", "--device", "cpu",
                 "--pool", "avg,bilinear", "--pool", "hypercolumn", "--coarse-map",
                 synthetic.coarse_map_path, "--folds", "4", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_probe_files_follow_the_contract(probe_run, synthetic):
    out, result = probe_run
    data = json.loads((out / "probe.json").read_text())
    for key in ("model", "data", "n_images", "classes", "coarse_classes", "folds", "seed", "rows"):
        assert key in data, key
    assert data["n_images"] == 144 and data["folds"] == 4 and data["seed"] == 0
    assert data["classes"] == list(synthetic.classes)
    assert data["coarse_classes"] == ["circle", "square", "triangle"]
    rows = data["rows"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    layers = ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # resnet18 stages
    assert [layer["name"] for layer in data["layers"]] == layers
    assert len(rows) == 5 * 3 * 2
    for r in rows:
        assert 0 <= r["acc_mean"] <= 1 and r["acc_std"] >= 0
        assert r["chance"] == pytest.approx(1 / 12 if r["granularity"] == "fine" else 1 / 3)
    dims = {(r["layer"], r["pool"]): r["dim"] for r in rows}
    assert dims[("relu", "avg")] == 64 and dims[("layer4.1", "avg")] == 512
    assert dims[("layer4.1", "bilinear")] == 64 * 65 // 2  # projected to 64 channels, triangle
    assert dims[("layer4.1", "hypercolumn")] == 64 + 64 + 128 + 256 + 512  # all maps fused
    hc = [r for r in rows if r["pool"] == "hypercolumn" and r["layer"] == "layer2.1"][0]
    assert hc["fused"] == ["relu", "layer1.1", "layer2.1"]
    with open(out / "probe.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    assert float(table[0]["acc_mean"]) == pytest.approx(rows[0]["acc_mean"], abs=1e-4)
    md = (out / "probe.md").read_text()
    assert md.startswith("| # | layer |") and "avg fine" in md and "bilinear coarse" in md
    with Image.open(out / "probe.png") as im:
        im.verify()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["probe.csv", "probe.json", "probe.md", "probe.png"]
    assert manifest["model"]["arch"] == "resnet18" and manifest["n_images"] == 144
    assert len(manifest["images"]) == 144 and manifest["device"] == "cpu"
    assert manifest["images"][0]["class"] == synthetic.classes[0] and len(manifest["images"][0]["sha256"]) == 64
    assert manifest["timings_s"]["total"] >= manifest["timings_s"]["features_and_probes"]
    assert "probe accuracy" in result.output or "linear probe accuracy" in result.output


def test_probe_direction_on_the_synthetic_set(probe_run):
    """A random-init ResNet-18 reads the global shape (coarse) above chance and the fine part a
    little; fine accuracy grows from the first stage to the last. Directions with margins,
    not tuned numbers (random features are weak: a pretrained model is tested below)."""
    rows = json.loads((probe_run[0] / "probe.json").read_text())["rows"]

    def acc(layer, pool, gran):
        return next(r["acc_mean"] for r in rows if (r["layer"], r["pool"], r["granularity"]) == (layer, pool, gran))

    assert max(r["acc_mean"] for r in rows if r["granularity"] == "coarse") > 1 / 3 + 0.08
    assert max(r["acc_mean"] for r in rows if r["granularity"] == "fine") > 1 / 12 + 0.04
    assert acc("layer4.1", "avg", "fine") > acc("relu", "avg", "fine")
    for layer in ("relu", "layer2.1", "layer4.1"):  # 3 coarse classes are easier than 12 fine ones
        assert acc(layer, "avg", "coarse") > acc(layer, "avg", "fine")


def test_layers_probe_data_fills_the_transfer_column(tmp_path, probe_run, synthetic, r18):
    out = tmp_path / "lay"
    img = next(synthetic.root.rglob("*.png"))
    result = run("layers", r18, img, "--arch", "resnet18", "--size", "64", "--device", "cpu",
                 "--layers", "stages", "--no-grids", "--probe-data", synthetic.root, "--probe-folds", "4",
                 "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "layers.json").read_text())
    assert data["columns"][-1] == "transfer" and data["probe"]["n_images"] == 144
    probe_rows = json.loads((probe_run[0] / "probe.json").read_text())["rows"]
    avg_fine = {r["layer"]: r["acc_mean"] for r in probe_rows if r["pool"] == "avg" and r["granularity"] == "fine"}
    for row in data["layers"]:
        assert row["transfer"] == pytest.approx(avg_fine[row["name"]], abs=1e-9)  # same seed, same numbers
    with open(out / "layers.csv") as fh:
        assert "transfer" in next(csv.reader(fh))
    assert "transfer" in (out / "layers.md").read_text().splitlines()[0]


def test_layers_without_probe_data_has_no_transfer_column(tmp_path, synthetic, r18):
    out = tmp_path / "lay"
    img = next(synthetic.root.rglob("*.png"))
    result = run("layers", r18, img, "--arch", "resnet18", "--size", "64", "--device", "cpu",
                 "--layers", "stages", "--no-grids", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "layers.json").read_text())
    assert "transfer" not in data["columns"] and "probe" not in data
    assert all(r["transfer"] is None for r in data["layers"])


def test_probe_bad_inputs_are_one_line_errors(tmp_path, synthetic, r18):
    common = ["--arch", "resnet18", "--size", "64", "--device", "cpu", "--out", tmp_path / "o"]
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({"circle-dots-topleft": "circle"}))
    assert_one_line_error(run("probe", r18, synthetic.root, "--coarse-map", bad_map, *common), 2,
                          "11 fine class", "circle-stripes-topleft")
    assert_one_line_error(run("probe", r18, synthetic.root, "--pool", "mean", *common), 2, "mean", "bilinear")
    assert_one_line_error(run("probe", r18, synthetic.root, "--folds", "13", *common), 2, "--folds 13")
    assert_one_line_error(run("probe", r18, tmp_path / "nope", *common), 5, "nope")
    assert_one_line_error(run("probe", r18, synthetic.root, "--layers", "layer9", *common), 6, "layer9")
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    assert_one_line_error(run("probe", r18, tmp_path / "one", *common), 5, "one class")
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are known good


@pytest.mark.slow
def test_mobilenet_v2_on_the_synthetic_set(tmp_path):
    """The embedded ImageNet MobileNetV2: coarse shape is read early, the fine part late."""
    ds = generate(tmp_path / "syn", per_class=8, size=224, seed=1)
    out = tmp_path / "p"
    result = run("probe", "mobilenet_v2", ds.root, "--coarse-map", ds.coarse_map_path, "--device", "cpu",
                 "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "probe.json").read_text())["rows"]
    fine = [r["acc_mean"] for r in rows if r["granularity"] == "fine"]
    coarse = [r["acc_mean"] for r in rows if r["granularity"] == "coarse"]
    assert [r["layer"] for r in rows[:5]] == ["features.1", "features.3", "features.6", "features.13",
                                              "features.18"]
    assert fine[-1] > fine[0] + 0.3  # the fine part becomes readable with depth
    assert max(coarse) > 0.9 and coarse[-1] > fine[-1] - 0.05
