"""Calibrate theta for the library's estimator against the paper's.

The paper tuned theta = 0.6 with ITS estimator: each measurement's noise from n = 8 ranks
(no c4 correction, no pooled moments), EMA-ed. A square root of n - 1 = 7 degrees of freedom
reads low, so the paper's noise N_paper is a fraction r of the population noise N, and its
target batch N_paper / (0.6^2 M) = r N / (0.6^2 M). The library's acted-on noise tracks N itself
(BENCHMARKS.md "Estimator tracking"), so the same decisions need

    theta = 0.6 / sqrt(r)

This script measures r on the main job's own checkpoints (those of estimator_tracking.py, 25 to
100% of the run): for each, the per-example population (the same training windows as that
script), then ``--draws`` simulated measurements of the paper at n = ``--ranks`` samples of
b = ``--local-batch`` examples each (drawn with replacement), estimate_gns(bias_correction=False,
pool=None) / the population noise, with the run's own plan (Signum: l1 on every parameter;
Muon under --norm auto: nuclear on the Muon group). Printed: r +- its standard error per
checkpoint and geometry, and 0.6 / sqrt(r); beside them the population's noise scale (its noise
over its signal, in examples: the critical batch the controller aims at, theta^2 x its target).

    python launch/benchmarks/theta_calibration.py                  # after estimator_tracking.py
    python launch/benchmarks/theta_calibration.py --runs DIR ...   # other runs' directories

CPU; one backward pass per window and checkpoint (about 30 s per checkpoint for 768 windows of
the default model on one core).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from launch.benchmarks.estimator_accuracy import Geometry, load_model, per_example_gradients
from launch.benchmarks.estimator_tracking import (
    Plan,
    Populations,
    checkpoint_dirs,
    cpu_name,
    draw_samples,
    measured_plan,
    plan_noise,
)
from nongns_dist import estimate_gns

PAPER_THETA = 0.6
DEFAULT_RUNS = [
    "runs/estimator_tracking/signum-l1-pooled-i1",
    "runs/estimator_tracking/muon-auto-pooled-i1",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="main-job run directories")
    p.add_argument("--ranks", type=int, default=8, help="n of the paper's measurement (its ranks)")
    p.add_argument(
        "--local-batch", type=int, default=8, help="b: examples per sample (the paper's 64 / 8)"
    )
    p.add_argument("--draws", type=int, default=200, help="simulated measurements per checkpoint")
    p.add_argument("--population", type=int, default=768, help="training windows (examples)")
    p.add_argument("--seed", type=int, default=0, help="population windows (as estimator_tracking)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.ranks < 2 or args.local_batch < 1 or args.draws < 2 or args.population < 2:
        p.error("--ranks >= 2, --local-batch >= 1, --draws >= 2 and --population >= 2")
    return args


def plan_signal(
    grads: torch.Tensor, columns: dict[str, slice], shapes: dict[str, torch.Size], plan: Plan
) -> float:
    """The population signal as the run combines it: (sum ||G||_1 + sum ||G||_*)^2 of the mean
    G of the population's per-example gradients (float64; its own noise / population is left
    in it, as in every signal of the library)."""
    total = 0.0
    for name in plan.l1:
        total += float(grads[:, columns[name]].to(torch.float64).mean(0).abs().sum())
    for name in plan.nuclear:
        mean = grads[:, columns[name]].to(torch.float64).mean(0, keepdim=True)
        total += float(torch.linalg.svdvals(Geometry.matrix(mean, shapes[name])[0]).sum())
    return total**2


def paper_ratio(
    grads: torch.Tensor,
    columns: dict[str, slice],
    shapes: dict[str, torch.Size],
    norms: dict[str, str],
    population: float,
    args: argparse.Namespace,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Mean and standard error of the paper's estimate / the population noise."""
    names = list(norms)
    measured = torch.cat([grads[:, columns[n]] for n in names], dim=1)
    sizes = [shapes[n].numel() for n in names]
    ratios = []
    for _ in range(args.draws):
        flat = draw_samples(measured, args.ranks, args.local_batch, rng)
        samples = [
            {n: part.reshape(shapes[n]) for n, part in zip(names, row.split(sizes), strict=True)}
            for row in flat
        ]
        est = estimate_gns(samples, args.local_batch, norms, bias_correction=False, pool=None)
        ratios.append(est.noise / population)
    return float(np.mean(ratios)), float(np.std(ratios, ddof=1) / math.sqrt(len(ratios)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(
        f"device: CPU ({cpu_name()}), {os.cpu_count()} cores, torch {torch.__version__}\n"
        f"command: {shlex.join(['python', os.path.relpath(__file__), *sys.argv[1:]])}\n"
        f"paper's measurement: n = {args.ranks} samples of b = {args.local_batch} examples, "
        f"no c4, no pool; {args.draws} draws per checkpoint; population {args.population} "
        "training windows\n"
    )
    windows = Populations(argparse.Namespace(seed=args.seed, population=args.population,
                                             out=".", reuse=False))  # fmt: skip
    print(
        "| run | step | plan | population noise | noise scale (population noise / signal) "
        "| r = paper / population | 0.6 / sqrt(r) |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        found = checkpoint_dirs(Path(run))
        if not found:
            raise SystemExit(f"{run}: no checkpoints (run launch/benchmarks/estimator_tracking.py)")
        for step, directory in sorted(found.items()):
            model, train_args = load_model(str(directory))
            plan = measured_plan(model, train_args)
            grads, columns, shapes = per_example_gradients(
                model, windows.training_windows(train_args)
            )
            population = plan_noise(grads, columns, shapes, plan)
            scale = population / plan_signal(grads, columns, shapes, plan)
            norms = {n: "l1" for n in plan.l1} | {n: "nuclear" for n in plan.nuclear}
            rng = np.random.default_rng(args.seed + step)
            mean, sem = paper_ratio(grads, columns, shapes, norms, population, args, rng)
            del grads
            print(
                f"| {Path(run).name} | {step} | {plan.kind} | {population:.4g} | {scale:.1f} "
                f"| {mean:.3f} +- {sem:.3f} | {PAPER_THETA / math.sqrt(mean):.3f} |",
                flush=True,
            )
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
