"""Statistics accumulated while the batches flow equal the all-in-memory ones (computed here
by brute force from capture's full records); memory does not grow with the number of
images; --max-images bounds every figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

from fgscope import metrics
from fgscope.capture import capture
from fgscope.layers.abstraction import cka_cells, images_pr_cell, pooled
from fgscope.layers.compute import inspect
from fgscope.layers.stream import CkaStream, PooledCovariance, hsic_deletions
from fgscope.similarity.cka import CkaAccumulator, centered_gram


def _images(folder: Path, n: int, size: int = 48, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"im{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _brute(model, inputs: torch.Tensor, names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every record of every image, kept (the old, all-in-memory way), and the output."""
    with capture(model, names, to="cpu") as rec:
        out = model(inputs)
    return {k: v.float() for k, v in rec.stacked().items()}, out.float()


def _inputs(lm, paths: list[str]) -> torch.Tensor:
    from fgscope.images import load_image

    return torch.stack([lm.preprocess(load_image(p)) for p in paths])


@pytest.fixture
def tiny_lm(tiny):
    from fgscope.models import load_model

    return load_model(tiny, size=32)


def test_streamed_statistics_equal_the_all_in_memory_ones(tiny_lm, tmp_path):
    paths = _images(tmp_path / "im", 23)
    res = inspect(tiny_lm, paths, "all", batch_size=6, max_images=3, views=0)
    assert res.batches == 4 and res.n_images == 23  # 6 + 6 + 6 + 5
    acts, out = _brute(tiny_lm.module, _inputs(tiny_lm, paths), [r.name for r in res.rows])
    for r in res.rows:
        x = acts[r.name]
        assert r.per_image["mean"] == pytest.approx(metrics.mean_activation(x).tolist(), rel=1e-6)
        assert r.per_image["max"] == pytest.approx(metrics.max_activation(x).tolist(), rel=1e-6)
        assert r.negative_frac == pytest.approx(float(metrics.negative_fraction(x).mean()), rel=1e-6)
        assert r.signed == bool((x < 0).any())
        if not r.signed:
            assert r.sparsity == pytest.approx(float(metrics.sparsity(x).mean()), rel=1e-6)
        if x.dim() == 4 and x.shape[2] * x.shape[3] > 1:
            ref = metrics.participation_ratio(x)
            assert r.pr_spatial == pytest.approx(float(ref.mean()), rel=1e-6)
            assert r.concentration == pytest.approx(float(metrics.spatial_concentration(x).mean()), rel=1e-6)
        pr, why = images_pr_cell(x)  # the old cell, on all pooled features at once
        assert (r.pr_images is None) == (pr is None), (r.name, why, r.empty.get("pr_images"))
        if pr is not None:
            assert r.pr_images == pytest.approx(pr, rel=1e-9)
        assert torch.equal(res.activations[r.name], x[:3])  # only the first --max-images kept
    assert res.inputs.shape[0] == 3 and len(res.display) == 3 and res.output.shape[0] == 3
    assert torch.allclose(res.output, out[:3], atol=1e-6)


def test_one_batch_gives_the_full_batch_cka_and_interval(tiny_lm, tmp_path):
    paths = _images(tmp_path / "im", 12)
    res = inspect(tiny_lm, paths, "stages", batch_size=16, views=0)
    assert res.batches == 1
    inputs = _inputs(tiny_lm, paths)
    acts, out = _brute(tiny_lm.module, inputs, [r.name for r in res.rows])
    grams = (metrics.gram_linear(inputs.double()), metrics.gram_linear(out.double()))
    for r in res.rows:
        vals, why = cka_cells(acts[r.name], *grams)  # the old full-batch cells
        for k, v in vals.items():
            assert (getattr(r, k) is None) == (v is None), (r.name, k)
            if v is not None:
                assert getattr(r, k) == pytest.approx(v, rel=1e-9, abs=1e-12)
        assert {k: r.empty[k] for k in why} == why


def test_minibatch_cka_and_its_jackknife_by_brute_force(tiny_lm, tmp_path):
    paths = _images(tmp_path / "im", 17)
    res = inspect(tiny_lm, paths, "all", batch_size=5, views=0)  # batches 5, 5, 7 (2 joins)
    assert res.batches == 3
    inputs = _inputs(tiny_lm, paths)
    names = [r.name for r in res.rows]
    acts, out = _brute(tiny_lm.module, inputs, names)
    bounds = [(0, 5), (5, 10), (10, 17)]
    groups = 20  # max(JACKKNIFE_GROUPS, step + 5); 17 images: 17 groups used

    def cka_without(drop: set[int]) -> dict[str, tuple[float, float]]:
        acc = CkaAccumulator(len(names), 2)
        for a, b in bounds:
            keep = [i for i in range(a, b) if i not in drop]
            acc.update([centered_gram(acts[n][keep]) for n in names],
                       [centered_gram(inputs[keep]), centered_gram(out[keep])])
        d = acc.compute()[1]
        return {n: (float(d[i, 0]), float(d[i, 1])) for i, n in enumerate(names)}

    full = cka_without(set())
    reps = [cka_without({i for i in range(17) if i % groups == g}) for g in range(min(groups, 17))]
    for r in res.rows:
        for side, key in ((0, "dcka_input"), (1, "dcka_output")):
            est = metrics.jackknife(full[r.name][side], [rep[r.name][side] for rep in reps])
            shown = getattr(r, key)
            if shown is None:  # blanked: the same estimate says why
                assert r.empty[key].startswith(("too uncertain", "undefined")), r.empty[key]
                if not math.isnan(est.value):
                    assert f"{est.value:.2f} [{est.lo:.2f}, {est.hi:.2f}]" in r.empty[key]
            else:
                assert shown == pytest.approx(est.value, rel=1e-9)
                assert (getattr(r, f"{key}_lo"), getattr(r, f"{key}_hi")) == pytest.approx((est.lo, est.hi), rel=1e-8)


def test_hsic_deletions_match_recomputed_hsic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = x[:, :2] @ torch.randn(2, 3, generator=g, dtype=torch.float64) + torch.randn(7, 3, generator=g)
    k, l = metrics.gram_linear(x), metrics.gram_linear(y)  # noqa: E741
    full, dele = hsic_deletions(k, l)
    assert float(full) == pytest.approx(float(metrics.hsic_unbiased(k, l)), rel=1e-12)
    for i in range(7):
        keep = [j for j in range(7) if j != i]
        ref = metrics.hsic_unbiased(k[keep][:, keep], l[keep][:, keep])
        assert float(dele[i]) == pytest.approx(float(ref), rel=1e-10)
    stream = CkaStream(1, 20)
    stream.add([centered_gram(x[:4])], centered_gram(y[:4]), None)  # 4 images: too few
    assert stream.skipped == 4 and stream.estimates() == [(None, None)]


def test_pooled_covariance_switches_to_the_scatter_exactly():
    g = torch.Generator().manual_seed(3)
    f = 5.0 + torch.randn(40, 6, generator=g) @ torch.randn(6, 6, generator=g)  # a large mean
    cov = PooledCovariance()
    for a in range(0, 40, 7):
        cov.add(f[a : a + 7])
    assert cov.scatter is not None and not cov.rows  # 40 > 2 x 6 rows: folded
    assert cov.value() == pytest.approx(float(metrics.participation_ratio(f)), rel=1e-9)
    flat = PooledCovariance()
    for a in range(0, 40, 7):
        flat.add(torch.ones(7, 3)[: len(f[a : a + 7])])
    assert math.isnan(flat.value())
    assert pooled(torch.ones(2, 3, 4, 4)).shape == (2, 3)


def test_max_images_bounds_every_layers_figure(tmp_path, tiny_state_dict):
    folder = tmp_path / "im"
    _images(folder, 7, size=64)
    out = tmp_path / "run"
    result = run("layers", tiny_state_dict, folder, "--arch", "resnet18", "--size", "64", "--layers",
                 "stages", "--max-images", "3", "--views", "0", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["im000", "im001", "im002"]
    data = json.loads((out / "layers.json").read_text())
    assert len(data["images"]) == 7 and len(data["layers"][0]["per_image"]["mean"]) == 7
    assert "show the first 3 of 7 images" in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["max_images"] == 3 and manifest["options"]["views"] == 0
    # hierarchy.png: 3 image rows; each row of square panels adds 2 in + a 0.06 in gap at 150 dpi
    one = tmp_path / "one"
    assert run("layers", tiny_state_dict, folder, "--arch", "resnet18", "--size", "64", "--layers",
               "stages", "--max-images", "1", "--views", "0", "--no-grids", "--out", one,
               "--device", "cpu").exit_code == 0
    h3, h1 = (Image.open(d / "hierarchy.png").size[1] for d in (out, one))
    assert h3 - h1 == pytest.approx(2 * 2.06 * 150, abs=3)


@pytest.fixture(scope="module")
def tiny_state_dict(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("sd") / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return str(path)


_RSS = """
import resource, sys
from typer.testing import CliRunner
from fgscope.cli import app
r = CliRunner().invoke(app, sys.argv[1:], catch_exceptions=False)
assert r.exit_code == 0, r.output
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path, tiny_state_dict):
    """`layers --no-grids` over 40 and over 400 images of a small CNN: peak RSS within 20%."""
    _images(tmp_path / "small", 40, size=64, seed=1)
    _images(tmp_path / "large", 400, size=64, seed=2)
    peaks = {}
    for name in ("small", "large"):
        args = ["layers", tiny_state_dict, str(tmp_path / name), "--arch", "resnet18", "--size", "64",
                "--layers", "all", "--no-grids", "--out", str(tmp_path / f"out-{name}"), "--device", "cpu"]
        done = subprocess.run([sys.executable, "-c", _RSS, *args], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[name] = int(done.stdout.strip().splitlines()[-1])  # KiB
    print(f"peak RSS: 40 images {peaks['small'] / 1024:.0f} MiB, 400 images {peaks['large'] / 1024:.0f} MiB")
    assert peaks["large"] < 1.2 * peaks["small"], peaks


# --- the hierarchy figure with many layers ---------------------------------------------------


@pytest.mark.parametrize("n_layers", [30, 120])
def test_hierarchy_figure_wraps_and_caps_its_columns(n_layers, tmp_path):
    from fgscope.layers.figures import MAX_COLUMNS, MAX_COLUMNS_PER_ROW, hierarchy_figure
    from fgscope.render import save_figure

    images = [Image.new("RGB", (64, 64), (90, 120, 150)) for _ in range(2)]
    rng = np.random.default_rng(0)
    cols = [(f"layer{i}.block.conv\nstride 8 · rf 99 px\nlate", rng.random((2, 8, 8))) for i in range(n_layers)]
    fig = hierarchy_figure(images, cols, row_labels=["a_long_image_file_name_0001.jpg", "b.jpg"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    shown = [t for t in titles if t != "input"]
    assert len(shown) == min(n_layers, MAX_COLUMNS)
    assert shown[0].startswith("layer0.") and shown[-1].startswith(f"layer{n_layers - 1}.")
    blocks = -(-len(shown) // MAX_COLUMNS_PER_ROW)
    assert titles.count("input") == blocks  # every row block starts with the images again
    texts = " ".join(t.get_text() for t in fig.texts)
    assert (f"{MAX_COLUMNS} of {n_layers} layers shown" in texts) == (n_layers > MAX_COLUMNS)
    labels = [ax.get_ylabel() for ax in fig.axes if "jpg" in ax.get_ylabel()]
    assert labels.count("b.jpg") == blocks and all(len(s) <= 24 for s in labels)
    (path,) = save_figure(fig, tmp_path / "h.png")
    w, h = Image.open(path).size
    assert w <= 16 * 150 and h <= 7000, (w, h)  # 16 in wide at most; 3 blocks of 2 rows
    panel_px = (w - 150 * 1.6) / (MAX_COLUMNS_PER_ROW + 1)
    assert panel_px >= 200  # panels stay ~2 in wide: readable however many layers there are


# --- issue 13 leftovers: layout, rf_note and the missed functional operations -----------------


class FuncNet(torch.nn.Module):
    """conv -> F.relu -> conv -> pool -> fc: the ReLU is a functional operation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.nn.functional.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_layers_table_has_layout_and_rf_note_and_names_missed_functional_ops_once(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "func.pt"
    torch.save(FuncNet().eval(), path)
    img = _images(tmp_path / "im", 1, size=32)[0]
    out = tmp_path / "run"
    result = run("layers", path, img, "--trust", "--size", "32", "--layers", "conv1,conv2,fc",
                 "--views", "0", "--no-grids", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("functional operations that change the representation are not recorded") == 1
    assert "`relu`" in text
    header = (out / "layers.csv").read_text().splitlines()[0].split(",")
    assert {"layout", "rf_note"} <= set(header)
    data = json.loads((out / "layers.json").read_text())
    rows = {r["name"]: r for r in data["layers"]}
    assert rows["conv1"]["layout"] == "NCHW" and rows["conv1"]["rf_note"] is None
    assert rows["fc"]["layout"] == "vector"
    md_header = (out / "layers.md").read_text().splitlines()[0]
    assert "| layout |" in md_header and "| rf_note |" in md_header
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("functional operations" in n for n in manifest["notes"])
