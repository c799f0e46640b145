"""`fgscope units`: streaming accumulators against brute force, receptive-field crops, part
scores against their definitions, the synthetic set's masks, the CLI's errors, memory."""

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
from torch import nn

from fgscope.units.crops import PAD, RFBox, crop
from fgscope.units.parts import iou, pointing_game
from fgscope.units.topk import ClassMeans, QuantileSketch, RunningTopK, selectivity_index


def test_running_topk_and_quantiles_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 3, 4, 6, generator=g) * (1 + i) + i for i in range(6)]  # range grows
    top = RunningTopK(3, 4)
    sk = QuantileSketch(3)
    for b, x in enumerate(batches):
        before = x.clone()
        top.update(x, torch.arange(b * 5, b * 5 + 5))
        sk.update(x)
        assert torch.equal(x, before)  # inputs are not modified
    allx = torch.cat(batches)  # (30, 3, 4, 6)
    peak, pos = allx.flatten(2).max(2)  # (30, 3)
    for c in range(3):
        order = torch.argsort(peak[:, c], descending=True)[:4]
        assert top.images[c].tolist() == order.tolist()
        assert torch.equal(top.values[c], peak[order, c].double())
        assert top.positions[c].tolist() == pos[order, c].tolist()
    q = sk.quantiles((0.1, 0.5, 0.9, 0.995))
    vals = allx.transpose(0, 1).reshape(3, -1).double().numpy()
    for c in range(3):
        exact = np.quantile(vals[c], [0.1, 0.5, 0.9, 0.995], method="inverted_cdf")
        assert np.all(np.abs(q[c] - exact) <= sk.error_bound()[c] + 1e-9)
        assert sk.error_bound()[c] < 2 * (vals[c].max() - vals[c].min()) / sk.bins * 2
    assert sk.counts.sum(1).tolist() == [vals.shape[1]] * 3


def test_selectivity_index_matches_its_definition():
    means = np.array([[1.0, 0.0, 2.0, -1.0], [3.0, 0.0, 2.0, 1.0], [2.0, 0.0, 2.0, 1.0]])  # (K=3, C=4)
    si, best = selectivity_index(means)
    assert si[0] == pytest.approx((3 - 1.5) / (3 + 1.5))  # mu_max 3, mu_-max (1 + 2) / 2
    assert np.isnan(si[1])  # all zero: undefined
    assert si[2] == pytest.approx(0.0)  # the same for every class
    assert np.isnan(si[3])  # a negative class mean
    assert best[0] == 1
    cm = ClassMeans(2, 1)
    cm.update(torch.tensor([1.0, 3.0, 5.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2), torch.tensor([0, 0, 1]))
    assert cm.means()[:, 0].tolist() == [2.0, 5.0]


def test_crop_pads_outside_the_image_and_never_shifts():
    img = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = crop(img, RFBox(-2, 4, 4, 4))
    assert out.shape == (4, 4, 3)
    assert (out[:2] == PAD).all() and (out[:, 2:] == PAD).all()
    assert np.array_equal(out[2:, :2], img[0:2, 4:6])


class _Bright(nn.Module):
    """Two stride-1 convolutions with peaked positive kernels: the unit at a bright pixel wins."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 1, 5, padding=2, bias=False)
        self.b = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            k5 = torch.exp(-torch.tensor([[(i - 2) ** 2 + (j - 2) ** 2 for j in range(5)] for i in range(5)]) / 2.0)
            self.a.weight.copy_(k5.expand(1, 3, 5, 5))
            k3 = torch.exp(-torch.tensor([[(i - 1) ** 2 + (j - 1) ** 2 for j in range(3)] for i in range(3)]) / 2.0)
            self.b.weight.copy_(k3.view(1, 1, 3, 3))

    def forward(self, x):
        return self.b(self.a(x)).flatten(1).mean(1, keepdim=True)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_crop_is_centred_on_the_pixel_that_drives_the_unit(tmp_path):
    from fgscope import load_model
    from fgscope.units.compute import compute_units
    from fgscope.units.figures import example_patches

    where = [(20, 30), (1, 1), (62, 40)]  # inside, top-left border, bottom border
    paths = []
    for i, (y, x) in enumerate(where):
        a = np.zeros((64, 64, 3))
        a[y, x] = 255
        _write(tmp_path / f"im{i}.png", a)
        paths.append(str(tmp_path / f"im{i}.png"))
    lm = load_model(_Bright(), size=64, mean=(0, 0, 0), std=(1, 1, 1))  # black = 0, as the zero padding
    res = compute_units(lm, paths, layers="b", top_k=3, device="cpu")
    layer = res.layer("b")
    assert layer.geometry.rf == (7, 7) and layer.geometry.padding == (3, 3)
    patches = example_patches(lm, res, layer, [0], 3, "cpu")[0]
    for p in patches:
        y, x = where[p.image]
        assert layer.top_rows[0, [q.image for q in patches].index(p.image)] == y
        assert p.rgb.shape == (7, 7, 3)
        brightest = np.unravel_index(p.rgb.sum(2).argmax(), (7, 7))
        assert brightest == (3, 3)  # centred on the pixel, also at the border
        if (y, x) == (1, 1):
            assert (p.rgb[:2] == PAD).all() and (p.rgb[:, :2] == PAD).all()  # padded, not shifted
        if y == 62:
            assert (p.rgb[5:] == PAD).all()


def test_iou_and_pointing_game_equal_their_definitions():
    act = torch.zeros(2, 2, 3, 3, dtype=torch.bool)  # (N, C, H, W)
    act[0, 0, 0, :] = True  # 3 px
    act[1, 0, 1, 1] = True  # 1 px
    act[:, 1] = True  # everything
    part = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    part[0, 0, 0, :2] = True
    part[1, 0, 2, 2] = True
    inter, union = iou(act.flatten(2), part.flatten(2))
    # unit 0: |A ∩ M| = 2 + 0, |A ∪ M| = 3 + (1 + 1)
    assert inter[0, 0] / union[0, 0] == pytest.approx(2 / 5)
    assert inter[1, 0] / union[1, 0] == pytest.approx(3 / 18)
    peak = torch.tensor([[1, 0], [8, 4]])  # (N, C) flat pixel index
    hits, trials = pointing_game(peak, part.flatten(2))
    assert trials.tolist() == [2.0]
    assert hits[:, 0].tolist() == [1.0 + 1.0, 1.0 + 0.0]


class _SpotNet(nn.Module):
    """Fires (saturated at 1) where near-black and near-white pixels meet within 3x3 pixels:
    the synthetic set's spot (dark 0-50, light 205-255 in every channel); a closing fills
    the texture's gaps. Inputs in [0, 1] (mean 0, std 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.spot = nn.Identity()

    def forward(self, x):
        dark = ((60 / 255 - x.amax(1, keepdim=True)) * 1000).clamp(0, 1)
        light = ((x.amin(1, keepdim=True) - 195 / 255) * 1000).clamp(0, 1)
        hot = nn.functional.max_pool2d(dark, 3, 1, 1) * nn.functional.max_pool2d(light, 3, 1, 1)
        hot = nn.functional.max_pool2d(hot, 3, 1, 1)
        hot = -nn.functional.max_pool2d(-hot, 3, 1, 1)
        return self.spot(hot).flatten(1).mean(1, keepdim=True)


def test_spot_unit_matches_the_spot_mask_not_the_shape(tmp_path):
    from fgscope.synthetic import generate, masks_dir
    from fgscope.units import units

    ds = generate(tmp_path / "syn", per_class=1, size=96, seed=2)
    legend = json.loads((masks_dir(ds.root) / "legend.json").read_text())
    assert legend == {"1": "shape", "2": "spot"}
    res = units(_SpotNet(), ds.root, "spot", masks=masks_dir(ds.root), device="cpu", size=96,
                mean=(0, 0, 0), std=(1, 1, 1))
    layer = res.layer("spot")
    assert res.parts == ["shape", "spot"] and res.annotated == 12
    assert layer.iou[0, 1] > 0.75  # spot (0.83 measured: the detector's halo and gaps)
    assert layer.iou[0, 0] < 0.05  # shape


def test_keypoints_become_discs(tmp_path):
    from fgscope.units.parts import KEYPOINT_RADIUS, load_keypoints

    _write(tmp_path / "d" / "a" / "x.png", np.zeros((50, 100, 3)))
    kp = tmp_path / "kp.txt"
    kp.write_text("image part x y visible\nx beak 10 20 1\nx wing 60 25 0\n")
    ann = load_keypoints(kp, [str(tmp_path / "d" / "a" / "x.png")], tmp_path / "d")
    assert ann.parts == ["beak"]
    m = ann.mask(0, (100, 50))
    assert m.shape == (50, 100) and m[20, 10] == 1 and m[20, 60] == 0
    r = KEYPOINT_RADIUS * 50
    assert m[20, int(10 + r) + 1] == 0 and m[20, int(10 + r) - 1] == 1


def test_cli_writes_the_atlas_and_one_line_errors(tmp_path, tiny):
    from fgscope.synthetic import generate, masks_dir

    ds = generate(tmp_path / "syn", per_class=1, size=48)
    model = tmp_path / "tiny.pt"
    torch.save(tiny, model)
    base = ["units", str(model), str(ds.root), "--trust", "--size", "48", "--device", "cpu"]
    r = run(*base, "-o", str(tmp_path / "out"), "--masks", str(masks_dir(ds.root)), "--top", "3", "--units", "2")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    data = json.loads((out / "units.json").read_text())
    assert data["parts"] == ["shape", "spot"] and data["n_images"] == 12
    assert (out / "parts.md").is_file() and (out / "parts.png").is_file() and (out / "overview.png").is_file()
    assert (out / "filters.png").is_file() and list((out / "examples").glob("*.png"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "units.json" in manifest["files"]
    assert_one_line_error(run(*base, "--masks", str(tmp_path / "nope")), 2, "--masks", "not a folder")
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    assert_one_line_error(run(*base, "--masks", str(empty)), 2, "no mask for any")
    assert_one_line_error(run(*base, "--keypoints", str(tmp_path / "kp.txt")), 2, "--keypoints")
    bad = tmp_path / "kp.txt"
    bad.write_text("a b c d\nx y z w\n")
    assert_one_line_error(run(*base, "--keypoints", str(bad)), 2, "--keypoints", "line 2")
    assert_one_line_error(run(*base, "--units", "a,b"), 2, "--units")
    first = sorted(ds.root.glob("*/*.png"))[0]
    _write(empty / first.parent.name / first.name, np.ones((48, 48)))
    (empty / "legend.json").write_text("[1, 2]")
    assert_one_line_error(run(*base, "--masks", str(empty)), 2, "legend", "label value -> part name")


def test_api_is_callable_after_the_package_is_imported(tmp_path, tiny):
    import fgscope
    import fgscope.units  # noqa: F401  (sets the attribute to the package)
    from fgscope.synthetic import generate

    ds = generate(tmp_path / "syn", per_class=1, size=40)
    res = fgscope.units(tiny, ds.root, "stem.2", top=2, device="cpu", size=40)
    assert res.kept == 12 and res.layers[0].top_images.shape == (8, 2)
    assert np.isfinite(res.layers[0].selectivity).any()


@pytest.mark.slow
def test_memory_grows_little_from_50_to_500_images(tmp_path):
    for n in (50, 500):
        d = tmp_path / f"d{n}" / "c"
        d.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            _write(d / f"{i}.png", rng.integers(0, 255, (32, 32, 3)))
    script = textwrap.dedent("""
        import resource, sys, torch
        sys.path.insert(0, sys.argv[2])
        from conftest import TinyNet
        import fgscope
        torch.manual_seed(0)
        fgscope.units(TinyNet(), sys.argv[1], "all", device="cpu", size=32, batch_size=16)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    tests = str(__import__("pathlib").Path(__file__).parent)
    rss = [int(subprocess.run([sys.executable, "-c", script, str(tmp_path / f"d{n}"), tests], check=True,
                              capture_output=True, text=True).stdout.split()[-1]) for n in (50, 500)]
    assert rss[1] < 1.2 * rss[0], rss


def test_report_atlas_section_reads_a_units_run(tmp_path, tiny):
    from fgscope.errors import ConfigError
    from fgscope.report.atlas import atlas_section
    from fgscope.synthetic import generate, masks_dir

    ds = generate(tmp_path / "syn", per_class=1, size=40)
    model = tmp_path / "tiny.pt"
    torch.save(tiny, model)
    r = run("units", str(model), str(ds.root), "--trust", "--size", "40", "--device", "cpu", "--top", "2",
            "--units", "2", "--masks", str(masks_dir(ds.root)), "-o", str(tmp_path / "u"))
    assert r.exit_code == 0, r.output
    sec = atlas_section(tmp_path / "u")
    assert sec.id == "atlas" and "spot: best unit" in sec.body and sec.body.count("<img") >= 3
    with pytest.raises(ConfigError, match="not the output folder of `fgscope units`"):
        atlas_section(ds.root)
