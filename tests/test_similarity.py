"""similarity: CKA from Grams against its definitions, on TinyNet and through the CLI.

The closed form, invariances, debiased-vs-unbiased-HSIC and minibatch convergence of the
metric itself are tested in test_metrics.py; here: the Gram accumulator that the command uses,
the model runs (self-similarity, before/after a change, minibatch vs full) and the files.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_one_line_error, run
from PIL import Image, ImageDraw

from fgscope.errors import ConfigError, ImageError, LayerNotFoundError
from fgscope.metrics import MinibatchCKA, center_gram, linear_cka
from fgscope.models import load_model
from fgscope.similarity import CkaAccumulator, centered_gram, compute_similarity
from fgscope.similarity import cka as similarity_cka


def _correlated(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x = z @ torch.randn(5, 30, generator=g, dtype=torch.float64) + torch.randn(n, 30, generator=g) + 3
    y = (z[:, :2] @ torch.randn(2, 12, generator=g, dtype=torch.float64)).reshape(n, 3, 2, 2)
    y = y + 0.5 * torch.randn(n, 3, 2, 2, generator=g)
    w = z[:, 3:].square() @ torch.randn(2, 7, generator=g, dtype=torch.float64)
    return x, y, w


def _images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """Coloured shapes on coloured backgrounds: images that share structure."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
            r = int(rng.integers(4, size // 2))
            box = [x0, y0, x0 + r, y0 + r]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
        out.append(im)
    return out


# --- the Gram accumulator ------------------------------------------------------------------


def test_centered_gram_is_hkh_in_chunks(monkeypatch):
    x, _, _ = _correlated(9)
    k = x @ x.T
    h = torch.eye(9, dtype=torch.float64) - 1 / 9
    assert torch.allclose(centered_gram(x), h @ k @ h, atol=1e-10)
    monkeypatch.setattr(similarity_cka, "_GRAM_CHUNK_BYTES", 8 * 9 * 4)  # 4 columns per chunk
    x32 = x.float()
    before = x32.clone()
    assert torch.allclose(centered_gram(x32), h @ (x32.double() @ x32.double().T) @ h, atol=1e-8)
    assert torch.equal(x32, before)  # not modified
    assert centered_gram(x.reshape(9, 5, 6)).shape == (9, 9)
    wide = torch.randn(6, 3 * 4096 + 5, generator=torch.Generator().manual_seed(1)) + 2.0
    h6 = torch.eye(6, dtype=torch.float64) - 1 / 6
    ref = h6 @ (wide.double() @ wide.double().T) @ h6
    assert torch.allclose(centered_gram(wide), ref, rtol=1e-12, atol=1e-9)  # offsets


def test_accumulator_one_batch_equals_full_cka():
    x, y, w = _correlated(40)
    acc = CkaAccumulator(3)
    acc.update([centered_gram(t) for t in (x, y, w)])
    cka, cka_u = acc.compute()
    for i, a in enumerate((x, y, w)):
        for j, b in enumerate((x, y, w)):
            assert cka[i, j].item() == pytest.approx(linear_cka(a, b), rel=1e-9)
            assert cka_u[i, j].item() == pytest.approx(linear_cka(a, b, debiased=True), rel=1e-9)
    assert torch.equal(cka, cka.T) and torch.allclose(cka.diagonal(), torch.ones(3, dtype=torch.float64))


def test_accumulator_debiased_matches_minibatch_cka_and_u_centring_ignores_centring():
    x, y, w = _correlated(60, seed=1)
    acc, ref = CkaAccumulator(2, 1), MinibatchCKA(2, 1)
    for i in range(0, 60, 12):
        xs, ys = [x[i : i + 12], y[i : i + 12]], [w[i : i + 12]]
        # raw (uncentred) Grams are accepted too: U-centring removes row/column offsets
        acc.update([t @ t.T for t in (t.flatten(1) for t in xs)], [centered_gram(ys[0])])
        ref.update(xs, ys)
    assert acc.batches == 5 and acc.examples == 60
    assert torch.allclose(acc.compute()[1], ref.compute(), atol=1e-12)
    k = x @ x.T
    assert torch.allclose(center_gram(k, unbiased=True), center_gram(center_gram(k), unbiased=True))


def test_accumulator_constant_layer_is_nan_and_errors():
    acc = CkaAccumulator(2)
    const = torch.randn(1, 5000).expand(6, 5000) * 3 + 7  # identical rows, rounding in the sums
    assert torch.equal(centered_gram(const), torch.zeros(6, 6, dtype=torch.float64))
    acc.update([centered_gram(const), centered_gram(torch.randn(6, 3))])
    cka, cka_u = acc.compute()
    assert torch.isnan(cka[0, 1]) and torch.isnan(cka_u[0, 0])
    assert cka[1, 1].item() == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="before any update"):
        CkaAccumulator(1).compute()
    with pytest.raises(ValueError, match="b >= 4"):
        CkaAccumulator(1).update([torch.eye(3)])
    with pytest.raises(ValueError, match="expected 2 Grams"):
        CkaAccumulator(2).update([torch.eye(5)])
    with pytest.raises(ValueError, match="ky exactly"):
        CkaAccumulator(1).update([torch.eye(5)], [torch.eye(5)])


# --- models --------------------------------------------------------------------------------


def test_self_similarity_of_tinynet(tiny):
    lm = load_model(tiny, size=32)
    res = compute_similarity(lm, _images(12), "all", batch_size=8)
    assert res.method == "full" and res.n_batches == 1  # 12 images < 2 batches of 8
    assert res.notes and "fewer than two batches" in res.notes[0]
    n = len(res.layers_x)
    assert res.layers_x == res.layers_y and n >= 8
    for mat in (res.cka, res.cka_debiased):
        assert torch.allclose(mat.diagonal(), torch.ones(n, dtype=torch.float64), atol=1e-6)
        assert torch.equal(mat, mat.T)
    # the full method is exactly metrics.linear_cka on the recorded features
    from fgscope.capture import capture

    x = torch.stack([lm.preprocess(im) for im in _images(12)])
    with capture(tiny, "all") as rec:
        tiny(x)
    acts = rec.stacked()
    i, j = res.layers_x.index("block.bn2"), res.layers_x.index("fc")
    a, b = acts["block.bn2"], acts["fc"]
    assert res.cka[i, j].item() == pytest.approx(linear_cka(a, b), rel=1e-6)
    assert res.cka_debiased[i, j].item() == pytest.approx(linear_cka(a, b, debiased=True), rel=1e-6)
    assert res.diagonal() == []
    assert [p.stage for p in res.places_x][0] == "early" and res.places_x[-1].stage == "late"


def test_vs_identical_copy_is_one_and_perturbed_layer_drops_most(tiny):
    lm = load_model(tiny, size=32)
    same = compute_similarity(lm, _images(10), "all", vs=load_model(copy.deepcopy(tiny), size=32))
    assert same.vs_preprocess == "shared"
    for row in same.diagonal():
        assert row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert row["cka_debiased"] == pytest.approx(1.0, abs=1e-6)

    changed = copy.deepcopy(tiny)
    torch.manual_seed(5)
    with torch.no_grad():  # `down` now reads one of its 8 input channels only
        changed.down.weight[:, 1:] = 0
    res = compute_similarity(lm, _images(24), "all", vs=load_model(changed, size=32), batch_size=8)
    assert res.method == "minibatch" and res.n_batches == 3
    diag = {r["layer"]: r for r in res.diagonal()}
    assert res.diagonal()[0]["layer"] in ("down", "act", "pool", "fc")  # largest drop first
    assert diag["down"]["cka_debiased"] < 0.99
    for before in ("stem.0", "block.conv1", "block.bn2"):  # upstream of the change: untouched
        assert diag[before]["cka_debiased"] == pytest.approx(1.0, abs=1e-6)
    drops = [r["cka_debiased"] for r in res.diagonal()]
    assert drops == sorted(drops)


def test_rectangular_between_architectures(tiny):
    other = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    res = compute_similarity(
        load_model(tiny, size=64), _images(8), "stages", vs=load_model(other, size=64), batch_size=4
    )
    assert res.cka.shape == (2, 5)  # TinyNet: block, act; resnet18: relu, layer1..4
    assert res.layers_y == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert res.vs_preprocess == "shared"  # a module brings no preprocessing: MODEL's inputs
    assert res.diagonal() == []  # no layer names in common


def test_minibatch_approaches_full_with_many_images(tiny):
    """The debiased minibatch estimate does not depend on the batch size, the biased one
    does: with many images the debiased minibatch matrix sits near the full one."""
    lm = load_model(tiny, size=32)
    imgs = _images(160, seed=3)
    full = compute_similarity(lm, imgs, "stages", minibatch=False, batch_size=40)
    mini = compute_similarity(lm, imgs, "stages", batch_size=10)
    assert full.method == "full" and mini.method == "minibatch" and mini.n_batches == 16
    off = ~torch.eye(len(full.layers_x), dtype=torch.bool)
    err_u = (mini.cka_debiased - full.cka_debiased)[off].abs().max().item()
    err_b = (mini.cka - full.cka)[off].abs().max().item()
    assert err_u < err_b
    assert err_u < 0.15


def test_too_few_images_and_bad_batch(tiny):
    lm = load_model(tiny, size=32)
    with pytest.raises(ImageError, match="at least 4 images, got 3"):
        compute_similarity(lm, _images(3))
    with pytest.raises(ConfigError, match="at least 4"):
        compute_similarity(lm, _images(8), batch_size=3)
    with pytest.raises(LayerNotFoundError, match="--vs model: no layer named 'block'"):
        compute_similarity(lm, _images(4), "block", vs=torchvision.models.resnet18(weights=None))


def test_files_are_decoded_batch_by_batch_and_failures_leave_minibatches_valid(tiny, tmp_path):
    """Paths stream (no decoded image is kept); the numbers equal those of the same images
    without the bad file when the batches come out the same; a minibatch that failures leave
    with fewer than 4 images waits for the next one."""
    lm = load_model(tiny, size=32)
    good = tmp_path / "good"
    good.mkdir()
    for i, im in enumerate(_images(16, size=32)):
        im.save(good / f"im{i:02d}.png")
    ref = compute_similarity(lm, [good], "all", batch_size=4)
    assert ref.method == "minibatch" and ref.n_batches == 4 and ref.n_images == 16
    assert not hasattr(ref.images[0], "image") and ref.images[0].size == (32, 32)
    pil = compute_similarity(lm, _images(16, size=32), "all", batch_size=4)
    assert torch.allclose(ref.cka_debiased, pil.cka_debiased, atol=1e-6, equal_nan=True)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "im01.png").write_bytes(b"not an image")  # batch 1 keeps 3 images: waits for batch 2
    res = compute_similarity(lm, [bad], "all", batch_size=4)
    assert res.n_images == 15 and len(res.failures) == 1 and res.n_batches == 3
    assert [str(p.path.name) for p in res.images][:4] == ["im00.png", "im02.png", "im03.png", "im04.png"]


# --- the command ---------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(_images(12, size=40)):
        im.save(folder / f"im{i:02d}.png")
    return folder


@pytest.fixture
def resnet_files(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    base, tuned = tmp_path / "base.pt", tmp_path / "tuned.pt"
    torch.save(model.state_dict(), base)
    with torch.no_grad():
        model.layer4[1].conv2.weight.mul_(-1.0).add_(0.05 * torch.randn_like(model.layer4[1].conv2.weight))
    torch.save(model.state_dict(), tuned)
    return base, tuned


def test_cli_writes_the_contract(image_dir, tmp_path):
    out = tmp_path / "out"
    result = run(
        "similarity", "resnet18", image_dir, "--weights", "none", "--size", "64", "--out", out,
        "--batch-size", "4", "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "similarity.json").read_text())
    for key in ("model", "vs", "layers_x", "layers_y", "stages_x", "stages_y", "n_images",
                "cka", "cka_debiased", "method", "batch_size"):
        assert key in data, key
    assert data["vs"] is None and "diagonal" not in data
    assert data["layers_x"] == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert data["stages_x"] == ["early", "early", "middle", "middle", "late"]
    assert data["n_images"] == 12 and data["method"] == "minibatch" and data["batch_size"] == 4
    assert len(data["cka"]) == 5 and all(len(r) == 5 for r in data["cka"])
    with open(out / "similarity.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["layer", *data["layers_y"]] and [r[0] for r in rows[1:]] == data["layers_x"]
    assert float(rows[2][3]) == pytest.approx(data["cka"][1][2])
    assert (out / "similarity_debiased.csv").exists() and (out / "similarity.png").stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "similarity" and len(manifest["images"]) == 12
    assert {"similarity.json", "similarity.csv", "similarity.png"} <= set(manifest["files"])


def test_cli_vs_ranks_the_changed_layer_first(image_dir, resnet_files, tmp_path):
    base, tuned = resnet_files
    out = tmp_path / "vs"
    result = run(
        "similarity", base, image_dir, "--arch", "resnet18", "--vs", tuned, "--vs-arch",
        "resnet18", "--size", "32", "--layers", "blocks", "--out", out, "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "similarity.json").read_text())
    diag = data["diagonal"]
    # the changed block and what it feeds come first; everything before it is unchanged
    assert {r["layer"] for r in diag[:3]} == {"layer4.1", "avgpool", "fc"}
    assert {"layer", "cka", "cka_debiased"} <= set(diag[0])
    assert diag[2]["cka_debiased"] < 1 - 1e-4
    for r in diag[3:]:
        assert r["cka"] == pytest.approx(1.0, abs=1e-6)
    assert data["vs_preprocess"] == "shared" and "largest change" in result.output


def test_cli_errors(image_dir, tmp_path):
    assert_one_line_error(
        run("similarity", "resnet18", "--weights", "none"), 5, "at least 4 images"
    )
    few = tmp_path / "few"
    few.mkdir()
    for i, im in enumerate(_images(3)):
        im.save(few / f"{i}.png")
    assert_one_line_error(
        run("similarity", "resnet18", few, "--weights", "none", "--size", "32"), 5, "got 3"
    )
    assert_one_line_error(
        run("similarity", "resnet18", image_dir, "--weights", "none", "--layers", "layer9"),
        6, "layer9",
    )


@pytest.mark.slow
def test_cli_real_mobilenet(image_dir, tmp_path):
    out = tmp_path / "mnv2"
    result = run("similarity", "mobilenet_v2", image_dir, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "similarity.json").read_text())
    assert data["layers_x"][-1] == "features.18" and data["method"] == "full"
    cka = np.array(data["cka"])
    assert np.allclose(np.diag(cka), 1.0, atol=1e-6)
    # neighbouring stages are more alike than the first and the last
    assert cka[0, 1] > cka[0, -1]
