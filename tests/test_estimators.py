"""The pure estimators against population values and float64 numpy brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from launch.benchmarks import synthetic_tracking as synthetic
from nongns_dist import GNSConfig, estimate_gns
from nongns_dist.estimators import (
    MomentPool,
    coordinate_parts,
    matrix_parts,
    noise_and_signal,
    pooled_noise_part,
)
from nongns_dist.norms import c4


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _anisotropic_sigma(d: int, rng: np.random.Generator) -> np.ndarray:
    # four decades of per-coordinate scale, shuffled
    return rng.permutation(np.logspace(0, -2, d))


def _paper_l1_l2(samples: np.ndarray, b: int) -> dict[str, float]:
    """PAPER.md with R = n samples: sigma^2 = B/(R-1) (mean_j g_j^2 - g^2), B = n b."""
    n = samples.shape[0]
    g = samples.mean(0)
    var = np.clip(n * b / (n - 1) * ((samples**2).mean(0) - g**2), 0, None)
    return {
        "l1": np.sqrt(var).sum() ** 2 / np.abs(g).sum() ** 2,
        "l2": var.sum() / (g**2).sum(),
    }


# -- convergence to the population noise scale -------------------------------------------------


@pytest.mark.parametrize("noise", ["gaussian", "student_t"])
def test_l1_l2_converge_to_population(noise):
    rng = _rng(1)
    d, n, b = 300, 20000, 1
    sigma = _anisotropic_sigma(d, rng)
    # gns ~ 25, so the signal's own noise (bias ~ gns / n) stays far below the 3% tolerance
    mean = rng.normal(0, 0.06, d)
    if noise == "gaussian":
        eps = rng.standard_normal((n, d))
    else:  # heavy tails: Student t with 5 degrees of freedom, rescaled to unit variance
        eps = rng.standard_t(5, (n, d)) / math.sqrt(5 / 3)
    samples = mean + sigma * eps  # per-example gradients (b = 1)
    population = {
        "l1": sigma.sum() ** 2 / np.abs(mean).sum() ** 2,
        "l2": (sigma**2).sum() / (mean**2).sum(),
    }
    brute = _paper_l1_l2(samples, b)
    for norm in ("l1", "l2"):
        est = estimate_gns(torch.from_numpy(samples), b, norm, bias_correction=False)
        assert est.gns == pytest.approx(brute[norm], rel=1e-10)
        assert est.gns == pytest.approx(population[norm], rel=0.03)
        assert est.num_samples == n and est.sample_size == b


def test_l2_with_multi_example_samples():
    rng = _rng(2)
    d, n, b = 400, 4000, 8
    sigma = _anisotropic_sigma(d, rng)
    mean = rng.normal(0, 0.05, d)
    # the mean of b examples with per-example sd sigma has sd sigma / sqrt(b)
    samples = mean + sigma * rng.standard_normal((n, d)) / math.sqrt(b)
    est = estimate_gns(torch.from_numpy(samples), b, "l2")
    assert est.gns == pytest.approx((sigma**2).sum() / (mean**2).sum(), rel=0.03)


def _population_nuclear(mean: np.ndarray, cov: np.ndarray) -> float:
    sqrt_trace = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 0, None)).sum()
    return sqrt_trace**2 / np.linalg.svd(mean, compute_uv=False).sum() ** 2


@pytest.mark.parametrize("transposed", [False, True])
def test_nuclear_converges_to_population(transposed):
    rng = _rng(3)
    m, k, n, b = 12, 40, 400, 4
    # per-example gradient G + L Z, Z iid N(0, 1) (m x k): row covariance C = k L L^T
    lower = np.tril(rng.normal(0, 0.3, (m, m))) + np.diag(np.logspace(0, -1.5, m))
    cov = k * lower @ lower.T
    mean = rng.normal(0, 0.4, (m, k))
    z = rng.standard_normal((n, m, k)) / math.sqrt(b)
    samples = mean + np.einsum("ij,sjk->sik", lower, z)
    population = _population_nuclear(mean, cov)
    # brute force C_hat from the samples, independent of the package's Gram path
    dev = samples - samples.mean(0)
    c_hat = b * np.einsum("sik,sjk->ij", dev, dev) / (n - 1)
    brute = _population_nuclear(samples.mean(0), c_hat)
    tensor = torch.from_numpy(samples)
    if transposed:  # the package must take the smaller dimension (m) as rows itself
        tensor = tensor.transpose(1, 2).contiguous()
    for method in ("eigh", "newton_schulz"):
        est = estimate_gns(tensor, b, "nuclear", sqrt_trace_method=method)
        tol = 1e-9 if method == "eigh" else 3e-3
        assert est.gns == pytest.approx(brute, rel=tol)
        assert est.gns == pytest.approx(population, rel=0.03)


def test_nuclear_flattens_conv_weights():
    rng = _rng(4)
    samples = rng.normal(size=(5, 6, 2, 3, 3))  # 5 samples of a (out=6, in=2, 3x3) conv grad
    flat = samples.reshape(5, 6, 18)
    dev = flat - flat.mean(0)
    c_hat = 2 * np.einsum("sik,sjk->ij", dev, dev) / 4
    est = estimate_gns(torch.from_numpy(samples), 2, "nuclear")
    assert est.gns == pytest.approx(_population_nuclear(flat.mean(0), c_hat), rel=1e-9)


# -- the c4 bias correction ---------------------------------------------------------------------


def test_l1_bias_correction_removes_dependence_on_num_samples():
    """Same global batch B = 64 split into n = 2, 4, 8 samples (ranks): the corrected l1 noise
    matches the large-n value; uncorrected it is c4(n) of it (0.80, 0.92, 0.97)."""
    rng = _rng(5)
    d, big_b, trials = 20000, 64, 4
    sigma = _anisotropic_sigma(d, rng)
    mean = rng.normal(0, 0.01, d)
    population = sigma.sum()  # ||sigma||_1, the large-n limit of sqrt(noise)
    for n in (2, 4, 8):
        b = big_b // n
        ratios = {True: [], False: []}
        for _ in range(trials):
            samples = mean + sigma * rng.standard_normal((n, d)) / math.sqrt(b)
            for corrected in (True, False):
                est = estimate_gns(torch.from_numpy(samples), b, "l1", bias_correction=corrected)
                ratios[corrected].append(math.sqrt(est.noise) / population)
        assert np.mean(ratios[True]) == pytest.approx(1.0, abs=0.03)
        assert np.mean(ratios[False]) == pytest.approx(c4(n), abs=0.01)
    assert [round(c4(n), 2) for n in (2, 4, 8)] == [0.80, 0.92, 0.97]


def test_paper_exact_mode_equals_paper_formulas():
    rng = _rng(6)
    n, b = 8, 16
    samples = rng.normal(0.1, 1.0, (n, 50))
    paper = _paper_l1_l2(samples, b)
    tensor = torch.from_numpy(samples)
    assert estimate_gns(tensor, b, "l1", bias_correction=False).gns == pytest.approx(
        paper["l1"], rel=1e-12
    )
    corrected = estimate_gns(tensor, b, "l1", bias_correction=True).gns
    assert corrected == pytest.approx(paper["l1"] / c4(n) ** 2, rel=1e-12)
    # l2 has nothing to correct: the variance estimate is already unbiased
    for flag in (True, False):
        assert estimate_gns(tensor, b, "l2", bias_correction=flag).gns == pytest.approx(
            paper["l2"], rel=1e-12
        )


# -- mixing, breakdown, partial sums ----------------------------------------------------------


def _dict_samples(rng, n):
    return [
        {
            "w": torch.from_numpy(rng.normal(0.05, 1, (4, 9))),
            "b": torch.from_numpy(rng.normal(0.05, 1, (4,))),
            "emb": torch.from_numpy(rng.normal(0, 1, (10, 3))),
        }
        for _ in range(n)
    ]


def test_mixed_l1_and_nuclear_sum_dual_norms_before_squaring():
    rng = _rng(7)
    n, b = 6, 3
    samples = _dict_samples(rng, n)
    norms = {"w": "nuclear", "b": "l1", "emb": None}
    est = estimate_gns(samples, b, norms, layer_breakdown=True)
    w = np.stack([s["w"].numpy() for s in samples])
    bias = np.stack([s["b"].numpy() for s in samples])
    dev = w - w.mean(0)
    c_hat = b * np.einsum("sik,sjk->ij", dev, dev) / (n - 1)
    w_noise = np.sqrt(np.clip(np.linalg.eigvalsh(c_hat), 0, None)).sum()
    w_signal = np.linalg.svd(w.mean(0), compute_uv=False).sum()
    b_var = b * bias.var(0, ddof=1)
    b_noise, b_signal = np.sqrt(b_var).sum() / c4(n), np.abs(bias.mean(0)).sum()
    assert est.norm == "l1+nuclear"
    assert est.noise == pytest.approx((w_noise + b_noise) ** 2, rel=1e-10)
    assert est.signal == pytest.approx((w_signal + b_signal) ** 2, rel=1e-10)
    assert est.layers is not None and set(est.layers) == {"w", "b"}
    assert est.layers["w"].noise == pytest.approx(w_noise**2, rel=1e-10)
    assert est.layers["b"].gns == pytest.approx((b_noise / b_signal) ** 2, rel=1e-10)


def test_nuclear_string_skips_vectors_and_l2_cannot_mix():
    rng = _rng(8)
    samples = _dict_samples(rng, 4)
    only_matrices = estimate_gns(samples, 2, {"w": "nuclear", "emb": "nuclear"})
    assert estimate_gns(samples, 2, "nuclear").gns == pytest.approx(only_matrices.gns)
    with pytest.raises(ValueError, match="l2 cannot be mixed"):
        estimate_gns(samples, 2, {"w": "l2", "b": "l1"})


def test_partial_sums_add_across_slices():
    """Splitting coordinates across ranks and adding the parts gives the whole (the contract the
    distributed reduce-scatter path relies on)."""
    rng = _rng(9)
    samples = torch.from_numpy(rng.normal(0.02, 1, (4, 1000)))
    mean, sq = samples.mean(0), samples.square().sum(0)
    for norm in ("l1", "l2"):
        whole = coordinate_parts(mean, sq, 4, 8, norm)
        parts = [
            coordinate_parts(mean[s], sq[s], 4, 8, norm) for s in (slice(0, 333), slice(333, None))
        ]
        noise = sum(float(p[0]) for p in parts)
        signal = sum(float(p[1]) for p in parts)
        assert noise_and_signal(noise, signal, norm) == pytest.approx(
            noise_and_signal(float(whole[0]), float(whole[1]), norm), rel=1e-12
        )
        assert estimate_gns(samples, 8, norm).noise == pytest.approx(
            noise_and_signal(noise, signal, norm)[0], rel=1e-12
        )


def test_matrix_parts_float32_inputs_accumulate_in_float64():
    rng = _rng(10)
    g = torch.from_numpy(rng.normal(0, 1, (3, 5, 20))).float()
    grams = [torch.einsum("sik,sjk->ij", g, g), g.mean(0) @ g.mean(0).T]
    noise, signal, _, _ = matrix_parts(grams, 3, 2)
    assert noise.dtype == signal.dtype == torch.float64
    assert grams == []  # taken out: the caller holds no m x m temporary


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": torch.zeros(1, 5), "sample_size": 4, "norm": "l1"}, "num_samples >= 2"),
        ({"samples": torch.zeros(3, 5), "sample_size": 0, "norm": "l1"}, "sample_size"),
        ({"samples": torch.zeros(3, 5), "sample_size": 2, "norm": "auto"}, "optimizer"),
        ({"samples": torch.zeros(3, 5), "sample_size": 2, "norm": "linf"}, "norm must be"),
        ({"samples": torch.zeros(3, 5), "sample_size": 2, "norm": "nuclear"}, ">= 2 dims"),
        ({"samples": torch.zeros(3), "sample_size": 2, "norm": "l1"}, r"\(n, ...\)"),
        ({"samples": [], "sample_size": 2, "norm": "l1"}, "empty"),
        (
            {
                "samples": [{"a": torch.zeros(2)}, {"b": torch.zeros(2)}],
                "sample_size": 2,
                "norm": "l1",
            },
            "sample 1",
        ),
        (
            {"samples": [{"a": torch.zeros(2)}] * 2, "sample_size": 2, "norm": {"c": "l1"}},
            "not in samples",
        ),
        (
            {"samples": [{"a": torch.zeros(2)}] * 2, "sample_size": 2, "norm": {"a": "nuclear"}},
            ">= 2 dims",
        ),
        (
            {"samples": [{"a": torch.zeros(2)}] * 2, "sample_size": 2, "norm": {"a": None}},
            "no parameter",
        ),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_gns(**kwargs)


@pytest.mark.parametrize("norm", ["l1", "l2", "nuclear"])
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)])
def test_empty_parameters_are_left_out(norm, shape):
    torch.manual_seed(0)
    full = [
        {"w": torch.randn(3, 4), "b": torch.randn(4), "e": torch.zeros(shape)} for _ in range(4)
    ]
    without = [{k: v for k, v in s.items() if k != "e"} for s in full]
    got = estimate_gns(full, 2, norm, layer_breakdown=True)
    want = estimate_gns(without, 2, norm, layer_breakdown=True)
    assert (got.noise, got.signal) == (want.noise, want.signal)
    assert "e" not in got.layers
    # named explicitly, even as nuclear: left out all the same (the plan does the same)
    other = "nuclear" if len(shape) == 2 else "l2" if norm == "l2" else "l1"  # 1-D: no nuclear
    mapped = estimate_gns(full, 2, {"w": norm, "e": other})
    alone = estimate_gns(without, 2, {"w": norm})
    assert (mapped.noise, mapped.signal) == (alone.noise, alone.signal)
    nothing = ">= 2 dims" if norm == "nuclear" and len(shape) == 1 else r"no non-empty.*\['e'\]"
    with pytest.raises(ValueError, match=nothing):
        estimate_gns([{"e": s["e"]} for s in full], 2, norm)


def test_sparse_and_complex_samples_are_refused():
    with pytest.raises(ValueError, match=r"sample 0, parameter 'a': a torch.sparse_coo gradient"):
        estimate_gns([{"a": torch.randn(3, 4).to_sparse()}] * 2, 2, "l1")
    with pytest.raises(ValueError, match=r"samples: dtype torch.complex64 is complex"):
        estimate_gns(torch.randn(2, 3, 4, dtype=torch.complex64), 2, "l2")


def test_zero_signal_gives_infinite_gns_not_an_exception():
    samples = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    est = estimate_gns(samples, 1, "l1")
    assert est.signal == 0 and math.isinf(est.gns)


# -- pooled second moments ------------------------------------------------------------------------


def test_moment_pool_is_the_bias_corrected_weighted_mean_of_its_moments():
    beta = 0.8
    pool = MomentPool(beta)
    moments = [torch.rand(5, dtype=torch.float64) for _ in range(4)]
    dofs = [1, 3, 1, 7]
    for k, (moment, dof) in enumerate(zip(moments, dofs, strict=True), start=1):
        pooled, eff_dof, _ = pool.update("x", moment, dof)
        weights = [beta ** (k - 1 - j) for j in range(k)]  # newest weighs 1
        total = sum(weights)
        want = sum(w * m for w, m in zip(weights, moments, strict=False)) / total
        torch.testing.assert_close(pooled, want)
        # Satterthwaite: var of the pooled chi-square mean = sum (w/total)^2 * 2/dof
        want_dof = 1 / sum((w / total) ** 2 / d for w, d in zip(weights, dofs, strict=False))
        assert eff_dof == pytest.approx(want_dof)
    fresh = MomentPool(target_dof=10)  # nothing finite entered yet: NaN, not an error
    value, dof, floor = fresh.update("y", torch.full((2, 2), math.inf), 1)
    assert math.isnan(dof) and math.isnan(float(pooled_noise_part(value, "nuclear", dof, floor)))
    bad = torch.tensor([1.0, float("nan"), 1, 1, 1], dtype=torch.float64)
    before = pool.value("x").clone()
    pool.update("x", bad, 1)
    torch.testing.assert_close(pool.value("x"), before)  # a non-finite moment does not enter
    copy = MomentPool(beta)
    copy.load_state_dict(pool.state_dict())
    torch.testing.assert_close(
        copy.update("x", moments[0], 1)[0], pool.update("x", moments[0], 1)[0]
    )


def test_moment_pool_by_target_dof_settles_there_whatever_the_sample_count():
    for dof in (1, 3, 7, 15):
        pool = MomentPool(target_dof=40)
        for _ in range(400):
            _, eff_dof, _ = pool.update("x", torch.ones(3), dof)
        assert eff_dof == pytest.approx(40, rel=1e-6)  # weight 2 dof / (40 + dof)
    pool = MomentPool(target_dof=40)
    assert pool.update("x", torch.ones(3), 63)[1] == 63  # enough alone: weight 1, no pooling
    with pytest.raises(ValueError, match="either beta or target_dof"):
        MomentPool(0.9, target_dof=40)


@pytest.mark.parametrize("direction", [0.1, 10.0])
@pytest.mark.parametrize("norm", ["nuclear", "l1"])
def test_pooled_noise_follows_a_tenfold_change_within_twenty_measurements(norm, direction):
    """In a live run the noise moves (a fresh model's is ~40x the later level): 20
    measurements after the true noise changes 10x, the pooled noise reads the new level within
    20% (the level's EMA, 0.8^20 of the old level left). Pooling the moments themselves
    (level_beta=None) still reads the old level then: ~50 measurements of memory at n = 2.
    (launch/benchmarks/synthetic_tracking.py prints these numbers for README.)"""
    shape = synthetic.change_reading(norm, direction, GNSConfig())
    moments = synthetic.change_reading(norm, direction, GNSConfig(level_beta=None))
    assert shape == pytest.approx(1.0, abs=0.2), (shape, moments)
    assert abs(moments - 1.0) > 0.3, (shape, moments)  # what the change fixes


@pytest.mark.parametrize("norm", ["nuclear", "l1"])
def test_pooled_noise_reads_the_population_whatever_the_sample_count(norm):
    pooled = {n: synthetic.mean_reading(n, norm, pooled=True) for n in (2, 8)}
    paper = synthetic.mean_reading(2, norm, pooled=False)
    assert pooled[2] == pytest.approx(1.0, abs=0.05) and pooled[8] == pytest.approx(1.0, abs=0.05)
    assert pooled[2] / pooled[8] == pytest.approx(1.0, abs=0.05)  # n changes, the value does not
    assert paper < 0.7  # what the paper's estimator reads from 2 samples here
