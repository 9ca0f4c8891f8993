from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nongns_dist.norms import as_matrix, c4, sqrt_trace, sqrt_trace_newton_schulz


def _numpy_sqrt_trace(a: np.ndarray) -> float:
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(a), 0, None)).sum())


def _sample_covariance(m, k, n, decay, seed):
    """Covariance of n samples of (m x k) gradient noise with row scales decaying 10^-decay."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.logspace(0, -decay, m, dtype=torch.float64)
    samples = rows[None, :, None] * torch.randn(n, m, k, generator=g, dtype=torch.float64)
    dev = samples - samples.mean(0)
    return torch.einsum("sik,sjk->ij", dev, dev) / (n - 1)


def test_c4_known_values():
    assert c4(2) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert c4(3) == pytest.approx(math.sqrt(math.pi) / 2, rel=1e-12)
    assert [round(c4(n), 2) for n in (2, 4, 8)] == [0.80, 0.92, 0.97]
    with pytest.raises(ValueError, match="n >= 2"):
        c4(1)


def test_as_matrix_takes_smaller_dimension_as_rows_and_flattens_conv():
    assert as_matrix(torch.zeros(5, 3)).shape == (3, 5)
    assert as_matrix(torch.zeros(3, 5)).shape == (3, 5)
    assert as_matrix(torch.zeros(16, 3, 3, 3)).shape == (16, 27)
    assert as_matrix(torch.zeros(64, 2, 3, 3)).shape == (18, 64)
    with pytest.raises(ValueError, match=">= 2 dims"):
        as_matrix(torch.zeros(4))


@pytest.mark.parametrize(
    ("m", "k", "n", "decay"),
    [(64, 64, 2, 0.0), (64, 64, 2, 2.0), (96, 24, 8, 0.0), (64, 64, 4, 3.0), (64, 8, 2, 1.0)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_newton_schulz_within_tolerance_of_float64_eigh(m, k, n, decay, dtype):
    cov = _sample_covariance(m, k, n, decay, seed=m + k + n)
    ref = _numpy_sqrt_trace(cov.numpy())
    full_rank = (n - 1) * k >= m
    for tol in (1e-2, 1e-3):
        value, info = sqrt_trace_newton_schulz(cov.to(dtype), tol=tol, return_info=True)
        assert abs(float(value) / ref - 1) <= tol
        if full_rank or dtype == torch.float64:
            assert info["fallback"] == 0.0, "the iteration itself must reach tol"
    # rank-deficient: rounding of the zero eigenvalues differs between LAPACK builds by ~1e-15,
    # and their square roots add up to ~1e-8 of the trace
    assert float(sqrt_trace(cov, "eigh")) == pytest.approx(ref, rel=1e-7)


def test_nuclear_norm_via_gram():
    g = torch.randn(7, 30, dtype=torch.float64)
    nuc = float(torch.linalg.matrix_norm(g, "nuc"))
    assert float(sqrt_trace(g @ g.T, "eigh")) == pytest.approx(nuc, rel=1e-10)
    assert float(sqrt_trace(g @ g.T, "newton_schulz", tol=1e-4)) == pytest.approx(nuc, rel=1e-4)


def test_newton_schulz_degenerate_inputs():
    assert float(sqrt_trace(torch.zeros(5, 5), "newton_schulz")) == 0.0
    eye = torch.eye(10, dtype=torch.float64) * 4.0
    assert float(sqrt_trace(eye, "newton_schulz", tol=1e-6)) == pytest.approx(20.0, rel=1e-6)
    # a genuinely indefinite matrix cannot be handled by the iteration: eigh answers instead
    indefinite = torch.diag(torch.tensor([4.0, 1.0, -0.5], dtype=torch.float64))
    value, info = sqrt_trace_newton_schulz(indefinite, return_info=True)
    assert float(value) == pytest.approx(3.0, rel=1e-12)
    assert info["fallback"] == 1.0
    with pytest.raises(ValueError, match="square"):
        sqrt_trace(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="method"):
        sqrt_trace(torch.eye(2), "svd")  # type: ignore[arg-type]


def test_a_registered_norm_equals_its_name():
    from nongns_dist.norms import L1, NORMS, NUCLEAR

    assert NUCLEAR == "nuclear" and L1 == "l1" and NUCLEAR != "l1" and NUCLEAR != L1
    assert {NUCLEAR: 1}["nuclear"] == 1 and NORMS["l2"] == "l2"
