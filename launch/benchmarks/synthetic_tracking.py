"""The acted-on (pooled) noise on synthetic gradients with a KNOWN population: how it follows a
10x change of the noise, and what it reads whatever the number of samples n.

Per measurement, n samples of b = 4 examples; per-example gradients of a 16 x 48 matrix whose
noise is rank one per example, u v^T with u ~ N(0, C) (C's spectrum 1/(1+i): few samples read
low), and of 300 coordinates with known sigma_i. The population's noise is (sum sqrt eig C)^2
for the nuclear norm and (sum sigma_i)^2 for l1. Printed (README "Pooled second moments"):

* a 10x change: the true noise (squared) changes by ``direction`` after 60 measurements; the
  pooled noise 20 measurements later over the new population (mean of 4 seeds), for the
  library's default (level and bias) and for pooling the moments themselves (level_beta=None);
* stationary: the mean pooled noise over the population past the pool's memory (measurements
  120-239), at n = 2 and 8, and the paper's estimator (each measurement's own noise, no c4) at
  n = 2.

    python launch/benchmarks/synthetic_tracking.py

``tests/test_estimators.py`` asserts on the same functions.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

import torch

from nongns_dist import GNSConfig, estimate_gns
from nongns_dist.estimators import MomentPool

Samples = list[dict[str, torch.Tensor]]


def synthetic_measurements(
    n: int, measurements: int, seed: int = 0, noise_scale: Callable[[int], float] = lambda j: 1.0
) -> tuple[dict[str, float], Iterator[Samples]]:
    """(population noise per norm, the measurements: n samples each). ``noise_scale(j)``: the
    noise's standard deviations at measurement j (its noise: squared)."""
    gen = torch.Generator().manual_seed(seed)
    m, k, b = 16, 48, 4
    eig = 1.0 / (1.0 + torch.arange(m, dtype=torch.float64))
    basis, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=gen))
    root = basis @ torch.diag(eig.sqrt())
    sigma = torch.rand(300, dtype=torch.float64, generator=gen) ** 3 + 0.01
    mean_w = 0.3 * torch.randn(m, k, dtype=torch.float64, generator=gen)
    mean_v = 0.1 * torch.randn(300, dtype=torch.float64, generator=gen)

    def sample(scale: float) -> dict[str, torch.Tensor]:
        u = root @ torch.randn(m, b, dtype=torch.float64, generator=gen)
        v = torch.randn(b, k, dtype=torch.float64, generator=gen) / k**0.5
        z = torch.randn(b, 300, dtype=torch.float64, generator=gen)
        return {"w": mean_w + scale * u @ v / b, "v": mean_v + scale * (sigma * z).mean(0)}

    population = {"nuclear": float(eig.sqrt().sum()) ** 2, "l1": float(sigma.sum()) ** 2}
    return population, ([sample(noise_scale(j)) for _ in range(n)] for j in range(measurements))


def _norms(norm: str) -> dict[str, str | None]:
    return {"w": "nuclear", "v": None} if norm == "nuclear" else {"w": None, "v": "l1"}


def mean_reading(n: int, norm: str, pooled: bool, measurements: int = 240) -> float:
    """Stationary: the mean pooled noise (or, not pooled, the paper's: each measurement's own,
    no c4) over the population, past the pool's memory."""
    population, draws = synthetic_measurements(n, measurements)
    pool = MomentPool.for_config(GNSConfig()) if pooled else None
    values = []
    for samples in draws:
        est = estimate_gns(samples, 4, _norms(norm), pool=pool, bias_correction=pooled)
        values.append(est.pooled_noise if pooled else est.noise)
    settled = [v for v in values[measurements // 2 :] if v is not None]
    return sum(settled) / len(settled) / population[norm]


def change_reading(norm: str, direction: float, config: GNSConfig, seeds: int = 4) -> float:
    """The pooled noise over the NEW population 20 measurements after the true noise changed by
    ``direction`` (after 60 at the old level), n = 2; the mean over ``seeds``."""
    change, after = 60, 20

    def scale(j: int) -> float:
        return 1.0 if j < change else direction**0.5

    values = []
    for seed in range(seeds):
        population, draws = synthetic_measurements(2, change + after + 1, seed, scale)
        pool = MomentPool.for_config(config)
        last = None
        for samples in draws:
            last = estimate_gns(samples, 4, _norms(norm), pool=pool).pooled_noise
        assert last is not None
        values.append(last / (population[norm] * direction))
    return sum(values) / len(values)


def main() -> None:
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, float64")
    print("| norm | 10x drop: level and bias | 10x rise | drop: moment pool | rise: moment pool |")
    print("|---|---|---|---|---|")
    for norm in ("nuclear", "l1"):
        ours = [change_reading(norm, d, GNSConfig()) for d in (0.1, 10.0)]
        moments = [change_reading(norm, d, GNSConfig(level_beta=None)) for d in (0.1, 10.0)]
        cells = " | ".join(f"{v:.3f}" for v in (*ours, *moments))
        print(f"| {norm} | {cells} |")
    print()
    print("| norm | pooled, n = 2 | pooled, n = 8 | the paper's, n = 2 |")
    print("|---|---|---|---|")
    for norm in ("nuclear", "l1"):
        values = (mean_reading(2, norm, True), mean_reading(8, norm, True))
        paper = mean_reading(2, norm, False)
        print(f"| {norm} | {values[0]:.3f} | {values[1]:.3f} | {paper:.3f} |")


if __name__ == "__main__":
    main()
