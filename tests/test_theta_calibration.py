"""launch/benchmarks/theta_calibration.py: its ratio r on a population with a known answer."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from launch.benchmarks.estimator_tracking import Plan, plan_noise
from launch.benchmarks.theta_calibration import paper_ratio, plan_signal
from nongns_dist.norms import c4_dof


def test_paper_ratio_reads_c4_squared_for_gaussian_gradients():
    """Gaussian per-example gradients: the paper's l1 estimate (no c4) from n samples reads
    c4(n - 1)^2 of the population (0.9313 at n = 8), the bias theta is calibrated for. The
    population's own sum of standard deviations has 4000 examples: its bias is negligible, and
    the tolerance is 4 standard errors of the 400 draws' mean."""
    gen = torch.Generator().manual_seed(0)
    sigma = torch.rand(64, generator=gen) + 0.5
    grads = torch.randn(4000, 64, generator=gen) * sigma + 0.1
    columns, shapes = {"w": slice(0, 64)}, {"w": torch.Size([64])}
    plan = Plan(l1=("w",), nuclear=(), left_out=())
    population = plan_noise(grads, columns, shapes, plan)
    args = argparse.Namespace(ranks=8, local_batch=8, draws=400)
    mean, sem = paper_ratio(
        grads, columns, shapes, {"w": "l1"}, population, args, np.random.default_rng(1)
    )
    assert mean == pytest.approx(c4_dof(7) ** 2, abs=4 * sem)
    assert sem < 0.01
    # the signal is the squared l1 norm of the population's mean gradient
    assert plan_signal(grads, columns, shapes, plan) == pytest.approx(
        float(grads.double().mean(0).abs().sum()) ** 2, rel=1e-12
    )
