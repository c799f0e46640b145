"""Abstraction, measured two ways with intervals: the view-invariance index (within an image)
and debiased CKA with a jackknife interval (across images); the signed / inactive split and
the participation ratio across images. Golden values on hand-built tensors, then the noise
baseline on a random network and the rise with depth on the real MobileNetV2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fgscope.layers.abstraction import (
    CKA_MAX_WIDTH,
    MIN_IMAGES_FOR_PR,
    cka_cells,
    images_pr_cell,
    invariance_cells,
    run_views,
    view_images,
)
from fgscope.metrics import (
    Estimate,
    ViewSpec,
    cka_from_grams,
    gram_linear,
    jackknife,
    jackknife_cka,
    linear_cka,
    nuisance_views,
    shuffle_tiles,
    t_quantile,
    view_invariance,
    view_invariance_estimate,
    view_pairs,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spearman(values: list[float]) -> float:
    """Spearman's rho of `values` against their order (no ties expected)."""
    ranks = np.argsort(np.argsort(values)).astype(float)
    order = np.arange(len(values), dtype=float)
    return float(np.corrcoef(ranks, order)[0, 1])


# --- intervals -----------------------------------------------------------------------------


def test_t_quantiles_and_the_jackknife_of_a_mean():
    assert t_quantile(1) == 12.706 and t_quantile(4) == 2.776 and t_quantile(30) == 2.042
    assert t_quantile(60) == pytest.approx(2.000, abs=1e-3)  # Cornish-Fisher beyond the table
    assert t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile(0)
    # for the mean, the jackknife standard error is exactly s / sqrt(n)
    x = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0], dtype=torch.float64)
    reps = [float(torch.cat([x[:i], x[i + 1 :]]).mean()) for i in range(5)]
    est = jackknife(float(x.mean()), reps)
    se = float(x.std() / math.sqrt(5))
    assert est.se == pytest.approx(se) and est.groups == 5
    assert (est.lo, est.hi) == pytest.approx((4.0 - 2.776 * se, 4.0 + 2.776 * se))
    assert est.width == pytest.approx(2 * 2.776 * se)
    assert math.isnan(jackknife(math.nan, [1.0, 2.0]).lo)
    with pytest.raises(ValueError, match="at least 2"):
        jackknife(1.0, [1.0])


# --- debiased CKA from Grams, with a jackknife interval -------------------------------------------


def _correlated(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x = z @ torch.randn(4, 12, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 12, generator=g)
    y = z[:, :2] @ torch.randn(2, 9, generator=g, dtype=torch.float64) + torch.randn(n, 9, generator=g)
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_from_grams_equals_linear_cka(debiased):
    x, y = _correlated(11)
    k, l = gram_linear(x), gram_linear(y)  # noqa: E741
    assert cka_from_grams(k, l, debiased) == pytest.approx(linear_cka(x, y, debiased), rel=1e-10)
    assert math.isnan(cka_from_grams(gram_linear(torch.ones(6, 3)), l[:6, :6]))
    with pytest.raises(ValueError, match="n >= 4"):
        cka_from_grams(k[:3, :3], l[:3, :3])


def test_jackknife_cka_leaves_out_images_and_never_pairs_one_with_itself():
    x, y = _correlated(9)
    k, l = gram_linear(x), gram_linear(y)  # noqa: E741
    before = (k.clone(), l.clone())
    est = jackknife_cka(k, l)
    assert torch.equal(k, before[0]) and torch.equal(l, before[1])  # inputs not mutated
    assert est.value == pytest.approx(linear_cka(x, y, debiased=True), rel=1e-10)
    reps = [linear_cka(torch.cat([x[:i], x[i + 1 :]]), torch.cat([y[:i], y[i + 1 :]]), debiased=True)
            for i in range(9)]
    ref = jackknife(est.value, reps)  # replicate i = the data without image i
    assert (est.lo, est.hi, est.se) == pytest.approx((ref.lo, ref.hi, ref.se), rel=1e-9)
    assert est.groups == 9 and est.lo < est.value < est.hi
    grouped = jackknife_cka(gram_linear(_correlated(60)[0]), gram_linear(_correlated(60)[1]), groups=10)
    assert grouped.groups == 10
    with pytest.raises(ValueError, match="5 or more"):
        jackknife_cka(k[:4, :4], l[:4, :4])


def test_debiased_cka_of_independent_noise_is_near_zero_with_an_interval_that_says_so():
    g = _gen(4)
    x, y = torch.randn(40, 300, generator=g), torch.randn(40, 300, generator=g)
    assert linear_cka(x, y) > 0.5  # biased: inflated with few examples and many features
    est = jackknife_cka(gram_linear(x), gram_linear(y))
    assert est.lo <= 0 <= est.hi and abs(est.value) < 0.05


def test_cka_cells_empty_with_the_reason():
    x, y = _correlated(40)
    inp = gram_linear(y)
    vals, why = cka_cells(x[:9], inp[:9, :9], None)
    assert vals["dcka_input"] is None and why["dcka_input"] == "needs >= 10 images (got 9)"
    g = _gen(0)
    noise, other = torch.randn(10, 30, generator=g), torch.randn(10, 20, generator=g)
    vals, why = cka_cells(noise, gram_linear(other), None)  # unrelated, 10 images: too wide
    assert vals["dcka_input"] is None and vals["dcka_input_lo"] is None
    assert why["dcka_input"].startswith(f"too uncertain with 10 images: the 95% interval is wider than {CKA_MAX_WIDTH} — ")
    assert why["dcka_output"] == "the model's output is not a tensor"
    vals, why = cka_cells(x, inp, gram_linear(x))  # 40 images; the output is x itself
    assert "dcka_input" not in why and vals["dcka_input_lo"] <= vals["dcka_input"] <= vals["dcka_input_hi"]
    assert vals["dcka_output"] == pytest.approx(1.0) and vals["dcka_output_hi"] - vals["dcka_output_lo"] < 1e-6


def test_participation_ratio_across_images_cell():
    feats = torch.randn(MIN_IMAGES_FOR_PR - 1, 8, 3, 3, generator=_gen())
    assert images_pr_cell(feats) == (None, "needs >= 10 images (got 9)")
    two_dims = torch.zeros(40, 16, 2, 2)
    two_dims[:, :2] = torch.randn(40, 2, 1, 1, generator=_gen(1)).expand(40, 2, 2, 2)
    pr, why = images_pr_cell(two_dims)
    assert why is None and 1.0 < pr <= 2.0
    pr, why = images_pr_cell(torch.randn(12, 64, generator=_gen(2)))  # near its cap of 11
    assert pr is None and why.startswith("saturated")
    assert images_pr_cell(torch.ones(12, 4))[1] == "the pooled features do not vary over the images"


# --- views and the invariance index --------------------------------------------------------------


def test_shuffle_tiles_is_a_seeded_derangement_of_tiles():
    x = torch.arange(2 * 8 * 9, dtype=torch.float32).reshape(2, 8, 9)  # 9 % 4: a column left over
    before = x.clone()
    y = shuffle_tiles(x, 4, seed=0)
    assert torch.equal(x, before)  # input not mutated
    assert torch.equal(y, shuffle_tiles(x, 4, seed=0)) and not torch.equal(y, shuffle_tiles(x, 4, seed=1))
    assert torch.equal(y[:, :, 8], x[:, :, 8])  # the leftover column stays
    tiles = lambda t: sorted(t[:, i : i + 2, j : j + 2].flatten().tolist()  # noqa: E731
                             for i in range(0, 8, 2) for j in range(0, 8, 2))
    assert tiles(x) == tiles(y)  # the same tiles...
    assert all(not torch.equal(x[:, i : i + 2, j : j + 2], y[:, i : i + 2, j : j + 2])
               for i in range(0, 8, 2) for j in range(0, 8, 2))  # ...none where it was
    with pytest.raises(ValueError, match="cannot be cut"):
        shuffle_tiles(torch.zeros(3, 3, 3), 4, 0)


def test_views_are_seeded_and_the_same_transformations_apply_to_both_images():
    spec = ViewSpec(views=4)
    x = torch.rand(3, 32, 40, generator=_gen())
    before = x.clone()
    v = nuisance_views(x, spec, seed=7)
    assert v.shape == (4, 3, 32, 40) and 0 <= v.min() and v.max() <= 1 and torch.equal(x, before)
    assert torch.equal(v, nuisance_views(x, spec, seed=7)) and not torch.equal(v, nuisance_views(x, spec, seed=8))
    a, b = view_pairs(x, spec, seed=7)
    assert torch.equal(a, v) and torch.equal(b, nuisance_views(shuffle_tiles(x, 4, 7), spec, 7))
    grey = torch.full((3, 32, 40), 0.5)  # a flat image: every transformation leaves it flat
    flat = nuisance_views(grey, spec, 3)  # brightness moves the grey level, nothing else changes
    assert torch.allclose(flat, flat.mean((2, 3), keepdim=True).expand(4, 3, 32, 40), atol=1e-6)
    with pytest.raises(ValueError, match="at least 3 views"):
        ViewSpec(views=2)


def test_view_invariance_golden_values():
    # 1-D features of K = 3 views: a = 0, 1, 2 and b = 10, 11, 12 (the same views, new content)
    a = torch.tensor([[[0.0], [1.0], [2.0]]])  # (M=1, K=3, F=1)
    b = a + 10
    # D_same = (1 + 4 + 1) / 3 = 2 for each image; D_cross = mean of (10 + j - k)^2 over k != j
    d_cross = (121 + 144 + 81 + 121 + 64 + 81) / 6
    assert view_invariance(a, b).item() == pytest.approx(1 - 2 / d_cross)
    assert view_invariance(a, a).item() == pytest.approx(0.0)  # the copy is the same content: chance
    assert view_invariance(a, a.flip(1)).item() == pytest.approx(-2.0)  # b_j may be a_k: below chance
    constant = torch.ones(2, 5, 3)
    assert view_invariance(constant, constant + torch.tensor([1.0, 0, 0])).tolist() == [1.0, 1.0]
    assert torch.isnan(view_invariance(constant, constant)).all()  # nothing varies
    maps = torch.randn(2, 4, 3, 5, 5, generator=_gen())  # (M, K, C, H, W) maps: pooled first
    assert torch.allclose(view_invariance(maps, maps.flip(0)), view_invariance(maps.mean((3, 4)), maps.flip(0).mean((3, 4))))


def test_view_invariance_estimate_jackknifes_over_views():
    g = _gen(2)
    content = torch.randn(3, 1, 6, generator=g)  # per image: what the views share
    views = 0.5 * torch.randn(3, 5, 6, generator=g)  # per view: the nuisance
    a, b = content + views, -content + views  # same views, other content
    before = (a.clone(), b.clone())
    est = view_invariance_estimate(a, b)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert est.value == pytest.approx(view_invariance(a, b).mean().item())
    keep = [0, 1, 2, 4]  # replicate 3: view 3 deleted from every image
    rep3 = view_invariance(a[:, keep], b[:, keep]).mean().item()
    reps = [view_invariance(a[:, [j for j in range(5) if j != i]], b[:, [j for j in range(5) if j != i]]).mean().item()
            for i in range(5)]
    ref = jackknife(est.value, reps)
    assert reps[3] == pytest.approx(rep3) and (est.lo, est.hi) == pytest.approx((ref.lo, ref.hi))
    assert 0 < est.lo < est.value < est.hi <= 1.5 and est.groups == 5
    noise = torch.randn(3, 5, 6, generator=g)
    null = view_invariance_estimate(noise, noise.clone())  # the shuffled copy changed nothing
    assert (null.value, null.lo, null.hi) == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)


def test_invariance_cells_say_why_they_are_empty():
    vals, why, per = invariance_cells(None, "x", 3)
    assert why == {"abstraction": "views were not run"} and per == [None] * 3
    assert vals == dict.fromkeys(("abstraction", "abstraction_lo", "abstraction_hi"))
    assert view_images(3) == [0, 1, 2] and view_images(48) == [0, 16, 31, 47] and view_images(10, 1) == [0]


# --- on models ------------------------------------------------------------------------------------


def _noise_images(n: int, size: int = 224, seed: int = 0) -> list[Image.Image]:
    g = _gen(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in range(n)]


def test_run_views_removes_its_hooks_and_keeps_the_model(tiny):
    from fgscope.models import Preprocess

    pre = Preprocess((32, 32), None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    inputs = torch.randn(3, 3, 32, 32, generator=_gen())
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    feats = run_views(tiny, pre, inputs, ["stem", "block", "fc"], torch.device("cpu"), torch.float32,
                      spec=ViewSpec(views=3), max_images=2)
    assert feats.images == [0, 2] and feats.a["stem"].shape == (2, 3, 8) and feats.b["fc"].shape == (2, 3, 5)
    assert all(not m._forward_hooks for m in tiny.modules()) and not tiny.training
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


def test_noise_on_a_random_network_gives_abstraction_zero_at_every_depth():
    """Pure noise through a random-init MobileNetV2: a noise image and its tile-shuffled copy
    are the same noise, so views are no more alike than chance, at every depth."""
    from fgscope.layers.compute import inspect
    from fgscope.models import load_model

    torch.manual_seed(0)
    res = inspect(load_model("mobilenet_v2", weights="none"), _noise_images(2), "blocks")
    assert len(res.rows) == 21
    for r in res.rows:
        assert r.abstraction is not None, r.name
        assert abs(r.abstraction) < 0.05, (r.name, r.abstraction)
        assert r.abstraction_lo - 1e-3 <= 0.0 <= r.abstraction_hi + 1e-3, (r.name, r.abstraction_lo, r.abstraction_hi)
        assert r.dcka_input is None and "needs >= 10 images (got 2)" in r.empty["dcka_input"]


def test_signed_layers_are_reported_as_such(tiny, tmp_path):
    from fgscope.layers.compute import inspect
    from fgscope.layers.run import TABLE_COLUMNS, table_csv, table_markdown

    res = inspect(tiny, _noise_images(2, size=32), "all", views=3)
    rows = {r.name: r for r in res.rows}
    bn, relu = rows["stem.1"], rows["stem.2"]  # BatchNorm output is signed; ReLU's is not
    assert bn.signed and bn.sparsity is None and 0.2 < bn.negative_frac < 0.8
    assert bn.empty["sparsity"].startswith("signed output")
    assert not relu.signed and relu.negative_frac == 0.0 and 0 < relu.sparsity < 1
    x = res.activations["stem.2"]
    assert relu.sparsity == pytest.approx((x == 0).float().mean().item())
    assert rows["fc"].signed and rows["fc"].pr_spatial is None and rows["fc"].empty["pr_spatial"] == "no spatial map"
    csv_text = table_csv(res.rows)
    assert csv_text.splitlines()[0] == ",".join(TABLE_COLUMNS)
    md = table_markdown(res.rows)
    assert "Empty cells (–):" in md and "signed output" in md and "abstraction_lo" not in md
    assert "needs >= 10 images (got 2)" in md


@pytest.mark.slow
def test_invariance_rises_with_depth_on_the_real_mobilenet_v2():
    """The embedded ImageNet MobileNetV2 and the sample photo: the abstraction (view
    invariance) rises from the first to the last stage."""
    from fgscope.layers.compute import inspect

    res = inspect("mobilenet_v2", None, "stages")
    values = [r.abstraction for r in res.rows]
    assert [r.name for r in res.rows] == ["features.1", "features.3", "features.6", "features.13", "features.18"]
    assert _spearman(values) > 0.7, values
    assert values[-1] > values[0] + 0.2 and res.rows[-1].abstraction_lo > res.rows[0].abstraction
    blocks = inspect("mobilenet_v2", None, "blocks")
    assert _spearman([r.abstraction for r in blocks.rows]) > 0.7
    assert isinstance(Estimate, type)
