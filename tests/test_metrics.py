"""metrics: golden values from definitions on tiny hand-built tensors, no models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fgscope.metrics import (
    MinibatchCKA,
    avg_pool,
    bilinear_pool,
    center_gram,
    channel_ranking,
    gram_linear,
    hsic_unbiased,
    hypercolumns,
    linear_cka,
    max_activation,
    max_pool,
    mean_activation,
    negative_fraction,
    participation_ratio,
    pool,
    sparsity,
    spatial_concentration,
    spatial_energy,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hadamard(k: int) -> torch.Tensor:
    """(k, k) Sylvester Hadamard matrix (k a power of two): orthogonal +-1 columns."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _eig_pr(x: torch.Tensor) -> torch.Tensor:
    """Reference PR from the eigenvalues of each sample's channel covariance."""
    obs = x.double().flatten(2)  # (N, C, HW)
    out = []
    for o in obs:
        lam = torch.linalg.eigvalsh(torch.cov(o))
        out.append(lam.sum() ** 2 / lam.square().sum())
    return torch.stack(out)


def _correlated(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x = z @ torch.randn(6, 20, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, 20, generator=g
    )
    y = z[:, :3] @ torch.randn(3, 15, generator=g, dtype=torch.float64) + torch.randn(
        n, 15, generator=g
    )
    return x, y


# --- per-sample statistics -------------------------------------------------------------------


def test_simple_stats_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [-2.0, 3.0]]], [[[5.0, 5.0], [5.0, -1.0]]]])  # (2, 1, 2, 2)
    assert sparsity(x).tolist() == [0.25, 0.0]  # exact zeros only: a negative is not inactive
    assert negative_fraction(x).tolist() == [0.25, 0.25]
    assert mean_activation(x).tolist() == [0.5, 3.5]
    assert max_activation(x).tolist() == [3.0, 5.0]


def test_sparsity_of_a_post_relu_map_with_known_zeros_is_exact():
    g = _gen(3)
    pre = torch.randn(3, 8, 5, 7, generator=g)  # continuous: no exact zeros before the ReLU
    x = torch.relu(pre)
    zeros = (pre <= 0).flatten(1).sum(1)  # (N,) the units ReLU switched off
    assert torch.equal(sparsity(x) * 280, zeros.float())  # counts exactly the switched-off units
    assert negative_fraction(x).tolist() == [0.0, 0.0, 0.0]
    # a signed map (before the ReLU) has no exact zeros but about half negative values
    assert sparsity(pre).tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(negative_fraction(pre) * 280, zeros.float())
    hand = torch.relu(torch.tensor([[-1.0, 0.5, -0.0, 2.0, -3.0]]))  # (1, 5): three zeros
    assert sparsity(hand).item() == torch.tensor(3 / 5).item()  # 3 of 5, in float32
    assert negative_fraction(hand).item() == 0.0


def test_spatial_energy_is_channel_mean_of_squares():
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    assert spatial_energy(x).tolist() == [[[5.0, 2.0]]]


def test_spatial_concentration_golden_values():
    one_hot = torch.zeros(1, 3, 4, 4)
    one_hot[0, 1, 2, 3] = 7.0
    constant = torch.full((1, 3, 4, 4), -2.0)
    two_peaks = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]]])  # equal energy at 2 of 4 locations
    got = spatial_concentration(torch.cat([one_hot, constant]))
    assert got.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    assert spatial_concentration(two_peaks).item() == pytest.approx(1 - math.log(2) / math.log(4))
    assert spatial_concentration(two_peaks).item() == pytest.approx(0.5)


def test_spatial_concentration_undefined_is_nan():
    assert torch.isnan(spatial_concentration(torch.ones(2, 3, 1, 1))).all()
    out = spatial_concentration(torch.stack([torch.zeros(2, 3, 3), torch.ones(2, 3, 3)]))
    assert math.isnan(out[0].item()) and out[1].item() == pytest.approx(0.0, abs=1e-12)


# --- participation ratio ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_participation_ratio_of_k_equal_orthogonal_channels(k):
    hw, c = 16, 8
    cols = _hadamard(hw)[:, 1 : k + 1]  # (HW, k): orthogonal, zero-mean (column 0 is all ones)
    feats = torch.zeros(hw, c, dtype=torch.float64)
    feats[:, :k] = 3.0 * cols
    x = feats.T.reshape(1, c, 4, 4) + 10.0  # an offset is removed by the centring
    assert participation_ratio(x).item() == pytest.approx(k)


def test_participation_ratio_single_channel_and_rotation():
    x = torch.randn(2, 1, 5, 5, generator=_gen())
    assert participation_ratio(x).tolist() == pytest.approx([1.0, 1.0])
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=_gen(1), dtype=torch.float64))
    y = torch.randn(3, 6, 4, 4, generator=_gen(2), dtype=torch.float64)
    rotated = torch.einsum("dc,nchw->ndhw", q, y)  # PR depends on the spectrum only
    assert torch.allclose(participation_ratio(rotated), participation_ratio(y))


@pytest.mark.parametrize("shape", [(3, 12, 2, 3), (3, 4, 5, 5), (2, 6, 2, 3)])
def test_participation_ratio_both_gram_routes_match_eigenvalues(shape):
    """C > HW uses the (HW x HW) Gram, C <= HW the (C x C) one; both equal the spectrum's PR."""
    x = torch.randn(*shape, generator=_gen()) * torch.linspace(0.2, 3.0, shape[1])[:, None, None]
    assert torch.allclose(participation_ratio(x), _eig_pr(x), rtol=1e-9)


def test_participation_ratio_undefined_and_2d():
    assert torch.isnan(participation_ratio(torch.randn(2, 4, 1, 1))).all()
    assert torch.isnan(participation_ratio(torch.ones(2, 4, 3, 3))).all()
    assert torch.isnan(participation_ratio(torch.full((1, 3, 7, 7), 0.7))).all()
    feats = torch.randn(50, 7, generator=_gen(), dtype=torch.float64)  # (N, F)
    pr = participation_ratio(feats)
    assert pr.ndim == 0
    lam = torch.linalg.eigvalsh(torch.cov(feats.T))
    assert pr.item() == pytest.approx((lam.sum() ** 2 / lam.square().sum()).item())


# --- channel ranking -------------------------------------------------------------------------


def test_channel_ranking_orders():
    x = torch.zeros(2, 4, 2, 2)
    x[:, 0] = 1.0  # mean 1, std 0
    x[:, 1] = torch.tensor([[0.0, 0.0], [0.0, 8.0]])  # mean 2, max 8
    x[:, 2] = torch.tensor([[-3.0, 3.0], [-3.0, 3.0]])  # mean 0, std 3, energy 9
    x[:, 3] = -1.0
    assert channel_ranking(x, "mean").tolist() == [1, 0, 2, 3]
    assert channel_ranking(x, "max").tolist() == [1, 2, 0, 3]
    assert channel_ranking(x, "std").tolist() == [1, 2, 0, 3]  # std 3.46 > 3 > 0 = 0
    assert channel_ranking(x, "energy").tolist() == [1, 2, 0, 3]  # 16 > 9 > 1 = 1 (tie: index)
    assert channel_ranking(x[0], "mean").tolist() == [1, 0, 2, 3]  # (C, H, W)
    with pytest.raises(ValueError, match="mean, max, std, energy"):
        channel_ranking(x, "median")


# --- CKA -------------------------------------------------------------------------------------


def test_gram_and_centring():
    x = torch.randn(6, 3, generator=_gen(), dtype=torch.float64)
    assert torch.allclose(gram_linear(x), x @ x.T)
    h = torch.eye(6, dtype=torch.float64) - 1 / 6
    k = gram_linear(x)
    assert torch.allclose(center_gram(k), h @ k @ h)
    ku = center_gram(k, unbiased=True)
    assert torch.equal(ku.diagonal(), torch.zeros(6, dtype=torch.float64))
    assert torch.allclose(ku.sum(0), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="symmetric"):
        center_gram(torch.arange(4.0).reshape(2, 2))


def test_cka_self_and_closed_form():
    x, y = _correlated(40)
    assert linear_cka(x, x) == pytest.approx(1.0)
    xc, yc = x - x.mean(0), y - y.mean(0)
    closed = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(closed.item(), rel=1e-12)


def test_cka_invariances():
    x, y = _correlated(30)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=_gen(3), dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(7.5 * x, y) == pytest.approx(base, rel=1e-10)
    a = torch.randn(20, 20, generator=_gen(4), dtype=torch.float64) + torch.diag(torch.arange(20.0))
    assert abs(linear_cka(x @ a.double(), y) - base) > 1e-3  # not invariant to general maps


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_gram_route_equals_feature_route(debiased):
    """n < p + q takes the Gram route; appending copies of the rows (n > p + q) must not."""
    x, y = _correlated(12)
    gram = linear_cka(x, y, debiased)  # n = 12 < 35
    kx, ky = center_gram(gram_linear(x), debiased), center_gram(gram_linear(y), debiased)
    assert gram == pytest.approx(((kx * ky).sum() / (kx.norm() * ky.norm())).item(), rel=1e-10)
    xb, yb = _correlated(100)  # n = 100 > 35: feature route, compared with the Gram formula
    kx, ky = center_gram(gram_linear(xb), debiased), center_gram(gram_linear(yb), debiased)
    expected = ((kx * ky).sum() / (kx.norm() * ky.norm())).item()
    assert linear_cka(xb, yb, debiased) == pytest.approx(expected, rel=1e-10)


def test_hsic_unbiased_matches_debiased_cka():
    x, y = _correlated(15)
    k, l = gram_linear(x), gram_linear(y)  # noqa: E741
    ratio = hsic_unbiased(k, l) / (hsic_unbiased(k, k) * hsic_unbiased(l, l)).sqrt()
    assert linear_cka(x, y, debiased=True) == pytest.approx(ratio.item(), rel=1e-10)
    # the U-centred inner product is n(n-3) times the same estimator
    ku, lu = center_gram(k, unbiased=True), center_gram(l, unbiased=True)
    assert ((ku * lu).sum() / (15 * 12)).item() == pytest.approx(hsic_unbiased(k, l).item())


def test_debiased_cka_removes_bias_of_independent_features():
    g = _gen(5)
    x, y = torch.randn(20, 500, generator=g), torch.randn(20, 500, generator=g)
    assert linear_cka(x, y) > 0.5  # biased: large for few examples and many features
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


def test_cka_input_errors():
    with pytest.raises(ValueError, match="same number"):
        linear_cka(torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="n >= 4"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)
    with pytest.raises(ValueError, match="n >= 2"):
        linear_cka(torch.randn(1, 2), torch.randn(1, 2))


def test_cka_accepts_numpy_and_float16_and_extra_dims():
    x, y = _correlated(25)
    base = linear_cka(x, y)
    assert linear_cka(x.numpy(), y.numpy()) == pytest.approx(base, rel=1e-12)
    assert linear_cka(x.numpy()[::-1].copy(), y.numpy()[::-1]) == pytest.approx(base, rel=1e-12)
    assert linear_cka(x.half(), y.half()) == pytest.approx(base, abs=1e-2)
    assert linear_cka(x.reshape(25, 4, 5), y) == pytest.approx(base, rel=1e-12)


# --- minibatch CKA ---------------------------------------------------------------------------


def test_minibatch_cka_one_batch_equals_debiased_cka():
    x, y = _correlated(60)
    m = MinibatchCKA(2)
    m.update([x, y])
    got = m.compute()
    assert got[0, 1].item() == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-6)
    assert torch.equal(got, got.T)
    assert torch.allclose(got.diagonal(), torch.ones(2, dtype=torch.float64))


def test_minibatch_cka_converges_with_batch_size():
    """Both estimates use all n examples, so compare mean errors over a few shuffles: one
    split's error is noisy (at b=500 it is only ~5x smaller on average than at b=20)."""
    x, y = _correlated(1000, seed=7)
    full = linear_cka(x, y, debiased=True)
    g = _gen(7)
    errors: dict[int, float] = {20: 0.0, 500: 0.0}
    for _ in range(6):
        perm = torch.randperm(1000, generator=g)
        for b in errors:
            m = MinibatchCKA(1, 1)
            for i in range(0, 1000, b):
                m.update([x[perm[i : i + b]]], [y[perm[i : i + b]]])
            errors[b] += abs(m.compute().item() - full) / 6
    assert errors[500] < errors[20]


def test_minibatch_cka_rectangular_matches_symmetric():
    x, y = _correlated(40)
    z = x[:, :5] ** 2
    sym, rect = MinibatchCKA(3), MinibatchCKA(2, 1)
    for i in range(0, 40, 10):
        sym.update([x[i : i + 10], y[i : i + 10], z[i : i + 10]])
        rect.update([x[i : i + 10], y[i : i + 10]], [z[i : i + 10]])
    assert rect.compute().shape == (2, 1)
    assert torch.allclose(rect.compute()[:, 0], sym.compute()[:2, 2])


def test_minibatch_cka_errors():
    m = MinibatchCKA(2)
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="b >= 4"):
        m.update([torch.randn(3, 2), torch.randn(3, 2)])
    with pytest.raises(ValueError, match="expected 2 tensors"):
        m.update([torch.randn(8, 2)])
    with pytest.raises(ValueError, match="ys exactly"):
        m.update([torch.randn(8, 2)] * 2, [torch.randn(8, 2)])


# --- pooling ---------------------------------------------------------------------------------


def _bilinear_reference(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.zeros(n, c * c, dtype=torch.float64)
    for s in range(n):
        z = torch.zeros(c, c, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                v = x[s, :, i, j].double()
                z += torch.outer(v, v)
        z = (z / (h * w)).flatten()
        z = torch.sign(z) * torch.sqrt(torch.abs(z))
        out[s] = z / z.norm()
    return out


def test_bilinear_pool_matches_loop_reference():
    x = torch.randn(3, 4, 3, 2, generator=_gen())
    got = bilinear_pool(x)
    assert got.shape == (3, 16)
    assert torch.allclose(got.double(), _bilinear_reference(x), atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(3))
    raw = bilinear_pool(x, signed_sqrt=False, normalize=False)
    feats = x[0].flatten(1)  # (C, HW)
    assert torch.allclose(raw[0].reshape(4, 4), feats @ feats.T / 6)  # the average, unsquashed


def test_hypercolumns_shapes_and_copy():
    a = torch.randn(2, 3, 8, 6, generator=_gen())
    b = torch.randn(2, 5, 4, 3, generator=_gen(1))
    c = torch.randn(2, 1, 2, 8, generator=_gen(2))
    out = hypercolumns([a, b, c])
    assert out.shape == (2, 9, 8, 8)
    assert hypercolumns([a, b]).shape == (2, 8, 8, 6)
    assert torch.equal(hypercolumns([a, b])[:, :3], a)  # already at size: copied unchanged
    assert hypercolumns([a, b], size=(16, 12), mode="nearest").shape == (2, 8, 16, 12)
    const = torch.full((2, 2, 2, 2), 3.0)
    assert torch.allclose(hypercolumns([const], size=(5, 7)), torch.full((2, 2, 5, 7), 3.0))
    with pytest.raises(ValueError, match="same N"):
        hypercolumns([a, b[:1]])


def test_pool_dispatch():
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert pool(x, "avg").tolist() == [[5.5, 17.5]]
    assert pool(x, "max").tolist() == [[11.0, 23.0]]
    assert torch.equal(pool(x, "bilinear"), bilinear_pool(x))
    assert pool(x, "none").shape == (1, 24)
    flat = torch.randn(3, 5)
    assert torch.equal(avg_pool(flat), flat) and torch.equal(max_pool(flat), flat)
    with pytest.raises(ValueError, match="avg, max, bilinear, none"):
        pool(x, "sum")


# --- purity and dtypes -----------------------------------------------------------------------


def _minibatch(xs):
    m = MinibatchCKA(len(xs))
    m.update(xs)
    return m.compute()


def _minibatch_rect(xs):
    m = MinibatchCKA(1, 1)
    m.update(xs[:1], xs[1:2])
    return m.compute()


_FEATURE_MAP_FUNCS = {
    "sparsity": lambda xs: sparsity(xs[0]),
    "negative_fraction": lambda xs: negative_fraction(xs[0]),
    "mean_activation": lambda xs: mean_activation(xs[0]),
    "max_activation": lambda xs: max_activation(xs[0]),
    "spatial_energy": lambda xs: spatial_energy(xs[0]),
    "spatial_concentration": lambda xs: spatial_concentration(xs[0]),
    "participation_ratio": lambda xs: participation_ratio(xs[0]),
    "participation_ratio_2d": lambda xs: participation_ratio(xs[0].flatten(1)),
    "channel_ranking": lambda xs: channel_ranking(xs[0], "std"),
    "gram_linear": lambda xs: gram_linear(xs[0].flatten(1)),
    "center_gram": lambda xs: center_gram(xs[2]),
    "center_gram_unbiased": lambda xs: center_gram(xs[2], unbiased=True),
    "hsic_unbiased": lambda xs: hsic_unbiased(xs[2], xs[2]),
    "linear_cka": lambda xs: linear_cka(xs[0], xs[1]),
    "linear_cka_debiased": lambda xs: linear_cka(xs[0], xs[1], debiased=True),
    "MinibatchCKA": lambda xs: _minibatch(xs[:2]),
    "MinibatchCKA_rect": _minibatch_rect,
    "bilinear_pool": lambda xs: bilinear_pool(xs[0]),
    "hypercolumns": lambda xs: hypercolumns([xs[0], xs[1]]),
    "avg_pool": lambda xs: avg_pool(xs[0]),
    "max_pool": lambda xs: max_pool(xs[0]),
    "pool_none": lambda xs: pool(xs[0], "none"),
}


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    g = _gen(9)
    a = torch.randn(6, 4, 3, 3, generator=g)
    b = torch.relu(torch.randn(6, 2, 2, 2, generator=g))
    k = a.flatten(1) @ a.flatten(1).T  # (6, 6) symmetric
    return [a.to(dtype), b.to(dtype), k.to(torch.float64)]


@pytest.mark.parametrize("name", list(_FEATURE_MAP_FUNCS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inputs_are_not_mutated(name, dtype):
    xs = _inputs(dtype)
    before = [x.clone() for x in xs]
    _FEATURE_MAP_FUNCS[name](xs)
    assert all(torch.equal(x, y) for x, y in zip(xs, before, strict=True))


def test_numpy_input_not_mutated():
    x, y = np.random.default_rng(0).normal(size=(2, 10, 3))
    before = (x.copy(), y.copy())
    linear_cka(x, y, debiased=True)
    assert np.array_equal(x, before[0]) and np.array_equal(y, before[1])


@pytest.mark.parametrize("name", list(_FEATURE_MAP_FUNCS))
def test_float16_input_gives_finite_results(name):
    xs = _inputs(torch.float16)
    out = _FEATURE_MAP_FUNCS[name](xs)
    out = torch.as_tensor(out)
    assert out.dtype != torch.float16 or name in (
        "hypercolumns",
        "avg_pool",
        "max_pool",
        "pool_none",
    )
    assert torch.isfinite(out.double()).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(_FEATURE_MAP_FUNCS))
def test_cuda_results_stay_on_device_and_match_cpu(name):
    cpu = torch.as_tensor(_FEATURE_MAP_FUNCS[name](_inputs(torch.float32)))
    out = torch.as_tensor(_FEATURE_MAP_FUNCS[name]([x.cuda() for x in _inputs(torch.float32)]))
    assert out.device.type == ("cpu" if name.startswith("linear_cka") else "cuda")
    assert torch.allclose(out.cpu().double(), cpu.double(), rtol=1e-4, atol=1e-5, equal_nan=True)
