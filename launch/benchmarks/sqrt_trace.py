"""Benchmark: tr(C^{1/2}) by eigvalsh vs the matmul-only Newton-Schulz iteration.

C is built as the sample covariance of n samples of (m x 4m) gradient noise with row scales
decaying over `--decay` decades, the shape a nuclear-norm GNS measurement produces for an MLP
matrix (rows = smaller dimension) with n = ranks x micro-steps samples. Prints one markdown
row per (m, n): median times, their ratio, and the relative error against float64 eigvalsh.

    python launch/benchmarks/sqrt_trace.py                  # CPU
    python launch/benchmarks/sqrt_trace.py --device cuda    # one GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from nongns_dist.norms import sqrt_trace_eigh, sqrt_trace_newton_schulz


def sample_covariance(m: int, n: int, decay: float, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.logspace(0, -decay, m)
    k = 4 * m
    gram = torch.zeros(m, m, dtype=torch.float64)
    total = torch.zeros(m, k, dtype=torch.float64)
    for _ in range(n):
        sample = (rows[:, None] * torch.randn(m, k, generator=g)).double()
        gram += sample @ sample.T
        total += sample
    mean = total / n
    return ((gram - n * mean @ mean.T) / (n - 1)).to(device)


def timed(fn: Callable[[], object], reps: int, device: str) -> float:
    times = []
    for _ in range(reps + 1):  # first call warms up (allocations, cuSOLVER handles)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 768, 1024, 2048])
    parser.add_argument("--samples", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--decay", type=float, default=2.0)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    print(
        f"device={args.device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}, dtype=float32, tol={args.tol}, decay={args.decay}"
    )
    print("| m | n | eigvalsh s | Newton-Schulz s | speed-up | matmuls | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for m in args.sizes:
        for n in args.samples:
            cov64 = sample_covariance(m, n, args.decay, args.device, seed=m + n)
            ref = float(sqrt_trace_eigh(cov64))
            cov = cov64.float()
            t_eigh = timed(partial(sqrt_trace_eigh, cov), args.reps, args.device)
            t_ns = timed(
                partial(sqrt_trace_newton_schulz, cov, tol=args.tol), args.reps, args.device
            )
            value, info = sqrt_trace_newton_schulz(cov, tol=args.tol, return_info=True)
            err = abs(float(value) / ref - 1)
            flag = " (fell back)" if info["fallback"] else ""
            print(
                f"| {m} | {n} | {t_eigh:.4f} | {t_ns:.4f} | {t_eigh / t_ns:.2f}x | "
                f"{int(info['matmuls'])}{flag} | {err:.1e} |"
            )


if __name__ == "__main__":
    main()
