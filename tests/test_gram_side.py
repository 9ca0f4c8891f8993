"""launch/benchmarks/gram_side.py: its bounds and its Monte Carlo truth on synthetic populations
with known answers."""

from __future__ import annotations

import math

import numpy as np
import torch

from launch.benchmarks import gram_side


def _truth(population: torch.Tensor, size: int, draws: int, seed: int) -> tuple[float, float]:
    deviations = population - population.mean(0)
    rng = np.random.default_rng(seed)
    weights = gram_side.draw_weights(len(population), size, draws, rng)
    return gram_side.truth(gram_side.deviation_norms(deviations, weights), size)


def test_draw_weights_are_means_of_draws_with_replacement() -> None:
    weights = gram_side.draw_weights(5, 4, 300, np.random.default_rng(0))
    assert weights.shape == (300, 5)
    torch.testing.assert_close(weights.sum(1), torch.ones(300, dtype=torch.float64))
    counts = weights * 4
    assert torch.equal(counts, counts.round())
    assert bool((counts > 1).any())  # an example drawn twice: with replacement


def test_rank_one_signs_known_answer() -> None:
    """Examples +-u v^T, half each: both Grams are u u^T and v v^T, tr^{1/2} = 1, and
    sqrt(B) E||g_B - G||_* = sqrt(B) E|mean of B signs| = 0.75 at B = 4 (E|S_4| = 24/16)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, generator=gen, dtype=torch.float64)
    v = torch.randn(3, generator=gen, dtype=torch.float64)
    one = torch.outer(u / u.norm(), v / v.norm())
    population = torch.stack([one, -one])
    row, col = gram_side.gram_bounds(population - population.mean(0))
    assert math.isclose(row, 1.0, rel_tol=1e-9) and math.isclose(col, 1.0, rel_tol=1e-9)
    mean, se = _truth(population, 4, 20000, seed=1)
    assert abs(mean - 0.75) < 4 * se and se < 0.01


def test_gaussian_population_both_grams_bound_the_truth() -> None:
    """g = diag(a) Z diag(b), Z Gaussian: C_row = diag(a^2) ||b||^2, so tr C_row^{1/2} =
    sum(a) ||b|| and tr C_col^{1/2} = sum(b) ||a||, which differ for a square matrix; both lie
    above the truth at large B (E||Z||_* of the Gaussian limit), the smaller one closer."""
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 1.0, 0.2, 0.1, 0.05, 0.02], dtype=torch.float64)
    b = torch.tensor([1.0, 0.8, 0.6, 0.5, 0.4, 0.3], dtype=torch.float64)
    z = torch.randn(4000, 6, 6, generator=gen, dtype=torch.float64)
    population = a[:, None] * z * b[None, :]
    row, col = gram_side.gram_bounds(population - population.mean(0))
    assert math.isclose(row, float(a.sum() * b.norm()), rel_tol=0.03)
    assert math.isclose(col, float(b.sum() * a.norm()), rel_tol=0.03)
    assert col > 1.2 * row
    truth, se = _truth(population, 64, 2000, seed=2)
    assert se < 0.01 * truth
    assert truth < row < col


def test_muon_group_sum_takes_col_and_min_on_square_matrices_only() -> None:
    """In the Muon group's sum, col is the companion code's choice (columns of a square matrix,
    the smaller side otherwise) and min the smaller Gram of each square matrix."""
    norms = {4: torch.ones(3, dtype=torch.float64)}
    square = gram_side.MatrixResult("layers.0.wq.weight", (2, 2), 3.0, 2.0, norms)
    wide = gram_side.MatrixResult("layers.0.w2.weight", (2, 5), 1.0, 4.0, norms)
    group = gram_side.Group("sum", [square, wide], square_only=True)
    assert (group.row(), group.col(), group.min()) == (4.0, 3.0, 3.0)
    plain = gram_side.Group("each", [square, wide])
    assert (plain.col(), plain.min()) == (6.0, 3.0)
    assert square.role == "wq" and group.truth(4) == (4.0, 0.0)
