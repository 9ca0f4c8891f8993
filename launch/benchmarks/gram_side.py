"""Row or column Gram for a square matrix: which bound on the nuclear-norm noise is closer, on
REAL per-example gradients of the main job.

For a matrix viewed with m <= n (the smaller side's rows; a square one as (out, in)) and the
per-example gradients g of a population (one training window = one example; mean G), both

    row  tr C_row^{1/2},  C_row = E[(g - G)(g - G)^T]  (m x m; what the library took for a
                                                        square matrix before this measurement)
    col  tr C_col^{1/2},  C_col = E[(g - G)^T (g - G)]  (n x n; what the authors' companion
                                                        code takes for a square matrix, and the
                                                        library since: ``norms.as_matrix``)

bound the truth sqrt(B) E||g_B - G||_* from above at every B (||Y||_* = tr (Y Y^T)^{1/2} is
concave in Y Y^T, and E[(g_B - G)(g_B - G)^T] = C_row / B; the same with columns). So of the
two, the SMALLER is always the closer one; this script measures by how much, per matrix and
summed over the Muon group's matrices (the parts are added before squaring, as the library
does), at the checkpoints given:

    row/truth, col/truth, min/truth   per B, with min the smaller of the two per matrix

Non-square matrices are the control (row: the smaller side's Gram, which both the library and
the companion code take; col: the larger side's). In the Muon group's sum, col is the companion
code's choice (the columns of a square matrix, the smaller side otherwise) and min takes the
smaller Gram of each square matrix.

g_B is the mean of B examples drawn WITH replacement from the population, and C its covariance
with divisor N: then E[(g_B - G)(g_B - G)^T] = C_row / B holds exactly and the ratios compare
the bounds with the very quantity they bound. (Without replacement the covariance of g_B is
smaller by (N - B)/(N - 1), 0.88 at B = 64 of 512, which would read as a gap that is not the
bound's.) The same draws serve every matrix, so the sums' standard errors are those of the sum.

    python launch/benchmarks/gram_side.py --checkpoints runs/<run>/checkpoints/step_00000064 ...

CPU, one process, one thread by default. Memory: population x parameters x 4 bytes of float32
gradients (1.8 GB for the default model and 512 windows) plus one matrix at a time in float64.
Time: one backward pass per window, then per draw population x Muon-group elements
multiply-adds and one m x m eigvalsh per matrix (about 14 s per 256 draws for the default model
on one core); B = 4 needs the most draws (its norms vary the most).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from launch import checkpoints
from launch.benchmarks.estimator_accuracy import Geometry, load_model, per_example_gradients
from launch.benchmarks.estimator_tracking import Populations, cpu_name
from nongns_dist.norms import sqrt_trace

RUNS = "runs/estimator_tracking"  # estimator_tracking.py's default --out
DEFAULT_CHECKPOINTS = [
    f"{RUNS}/muon-auto-pooled-i1/checkpoints/step_00000064",
    f"{RUNS}/muon-auto-pooled-i1/checkpoints/step_00000256",
    f"{RUNS}/signum-l1-pooled-i1/checkpoints/step_00000256",
]
TARGET_SE = 0.01  # relative standard error of every truth; above it the report says so


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoints",
        nargs="+",
        default=DEFAULT_CHECKPOINTS,
        help="checkpoints (or run directories: their latest) of launch/train.py; the default: "
        "25%% and 100%% of estimator_tracking.py's Muon run, 100%% of its Signum run",
    )
    p.add_argument("--population", type=int, default=512, help="training windows (examples)")
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64], help="B of the truth")
    p.add_argument(
        "--draws",
        type=int,
        default=256,
        help="Monte Carlo draws of g_B per B and round; rounds go on until the truth of every "
        f"row has a standard error <= {TARGET_SE:.0%}% or --max-draws",
    )
    p.add_argument("--max-draws", type=int, default=2048, help="per B")
    p.add_argument("--seed", type=int, default=0, help="population windows; draws use seed + 1")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--per-matrix", action="store_true", help="also a row per matrix")
    args = p.parse_args(argv)
    if args.population < 2 or args.draws < 2 or min(args.sizes) < 1:
        p.error("--population and --draws must be >= 2, every --sizes >= 1")
    if args.max_draws < args.draws:
        p.error("--max-draws must be >= --draws")
    args.command = sys.argv[1:] if argv is None else argv
    return args


# -- the quantities ----------------------------------------------------------------------------


def gram_bounds(deviations: torch.Tensor) -> tuple[float, float]:
    """(tr C_row^{1/2}, tr C_col^{1/2}) of (N, m, n) per-example deviations from their mean,
    C with divisor N: the covariance of one example drawn from the population."""
    count = deviations.shape[0]
    c_row = torch.einsum("sik,sjk->ij", deviations, deviations) / count
    c_col = torch.einsum("ski,skj->ij", deviations, deviations) / count

    def root(c: torch.Tensor) -> float:
        # eigenvalues below float64 rounding of C count as zero (see sqrt_trace_eigh)
        return float(sqrt_trace(c, floor=1e-16 * float(torch.linalg.matrix_norm(c))))

    return root(c_row), root(c_col)


def nuclear_norms(matrices: torch.Tensor) -> torch.Tensor:
    """||Y||_* of each (k, m, n) matrix, m <= n: sum of sqrt(eig(Y Y^T)), float64."""
    eig = torch.linalg.eigvalsh(matrices @ matrices.mT)
    return eig.clamp_min(0).sqrt().sum(-1)


def draw_weights(population: int, size: int, draws: int, rng: np.random.Generator) -> torch.Tensor:
    """(draws, population) float64: row d puts 1/size on each of ``size`` examples drawn with
    replacement (an example drawn twice gets 2/size), so row d @ g is that draw's g_B."""
    picks = rng.integers(0, population, size=(draws, size))
    weights = np.zeros((draws, population))
    np.add.at(weights, (np.arange(draws)[:, None], picks), 1.0 / size)
    return torch.from_numpy(weights)


def deviation_norms(
    deviations: torch.Tensor, weights: torch.Tensor, chunk: int = 128
) -> torch.Tensor:
    """||g_B - G||_* for each row of ``weights`` (rows summing to 1, so row @ (g - G) = g_B - G)
    over (N, m, n) deviations: (draws,) float64."""
    flat = deviations.reshape(deviations.shape[0], -1)
    out = []
    for lo in range(0, weights.shape[0], chunk):
        batch = (weights[lo : lo + chunk] @ flat).reshape(-1, *deviations.shape[1:])
        out.append(nuclear_norms(batch))
    return torch.cat(out)


def truth(norms: torch.Tensor, size: int) -> tuple[float, float]:
    """sqrt(B) E||g_B - G||_* from per-draw norms: (mean, its standard error)."""
    scale = math.sqrt(size)
    return scale * float(norms.mean()), scale * float(norms.std()) / math.sqrt(len(norms))


# -- one checkpoint ----------------------------------------------------------------------------


@dataclass
class MatrixResult:
    name: str
    shape: tuple[int, int]  # the library's view: m <= n
    row: float
    col: float
    norms: dict[int, torch.Tensor]  # B -> ||g_B - G||_* per draw

    @property
    def square(self) -> bool:
        return self.shape[0] == self.shape[1]

    @property
    def role(self) -> str:
        """The name without its layer index: matrices of one role share a row of the table."""
        return re.sub(r"^(.*\.)?\d+\.", "", self.name).removesuffix(".weight")


@dataclass
class Group:
    """Matrices whose parts are added: row, col and min bounds, and the summed norms per draw."""

    label: str
    members: list[MatrixResult]
    # True: only square members take their col Gram (in col) or the smaller Gram (in min); the
    # others keep the smaller side's, as both the library and the companion code do
    square_only: bool = False

    @property
    def shapes(self) -> str:
        return ", ".join(f"{m}x{n}" for m, n in sorted({m.shape for m in self.members}))

    def row(self) -> float:
        return sum(m.row for m in self.members)

    def col(self) -> float:
        return sum(m.row if self.square_only and not m.square else m.col for m in self.members)

    def min(self) -> float:
        return sum(
            m.row if self.square_only and not m.square else min(m.row, m.col) for m in self.members
        )

    def truth(self, size: int) -> tuple[float, float]:
        return truth(torch.stack([m.norms[size] for m in self.members]).sum(0), size)


@dataclass
class CheckpointResult:
    path: str
    step: int
    fraction: float
    optimizer: str
    matrices: list[MatrixResult]
    seconds_gradients: float
    seconds_truth: float


def measure(path: str, args: argparse.Namespace, populations: Populations) -> CheckpointResult:
    model, train_args = load_model(path)
    directory = checkpoints.resolve(path, Path(path))
    assert directory is not None  # load_model has resolved it
    meta = checkpoints.read_meta(directory)
    started = time.perf_counter()
    grads, columns, shapes = per_example_gradients(model, populations.training_windows(train_args))
    seconds_gradients = time.perf_counter() - started
    views = Geometry(model, columns, shapes).matrices

    def deviations(cols: slice, shape: torch.Size) -> torch.Tensor:
        mats = grads[:, cols].to(torch.float64).reshape(len(grads), shape[0], -1)
        if mats.shape[1] > mats.shape[2]:  # the smaller side's rows; a square one keeps its own
            mats = mats.mT
        return mats - mats.mean(0)

    matrices = []
    for name, cols, shape in views:
        dev = deviations(cols, shape)
        matrices.append(MatrixResult(name, (dev.shape[1], dev.shape[2]), *gram_bounds(dev), {}))
    # rounds of --draws draws per B until every row of the table has its standard error
    rng = np.random.default_rng(args.seed + 1)
    pending = list(args.sizes)
    while pending:
        weights = {size: draw_weights(len(grads), size, args.draws, rng) for size in pending}
        for matrix, (_, cols, shape) in zip(matrices, views, strict=True):
            dev = deviations(cols, shape)
            for size, w in weights.items():
                new = deviation_norms(dev, w)
                old = matrix.norms.get(size)
                matrix.norms[size] = new if old is None else torch.cat([old, new])
        rows = groups(matrices, args.per_matrix)
        pending = [
            size
            for size in pending
            if len(matrices[0].norms[size]) < args.max_draws
            and max(se / t for t, se in (g.truth(size) for g in rows)) > TARGET_SE
        ]
    return CheckpointResult(
        path=path,
        step=int(meta["step"]),
        fraction=float(meta["samples"]) / float(train_args["sample_budget"]),
        optimizer=str(train_args["optimizer"]),
        matrices=matrices,
        seconds_gradients=seconds_gradients,
        seconds_truth=time.perf_counter() - started - seconds_gradients,
    )


# -- the report --------------------------------------------------------------------------------


def groups(matrices: list[MatrixResult], per_matrix: bool) -> list[Group]:
    """Rows of the table: each role (summed over layers) or each matrix, then the sums."""
    rows: list[Group] = []
    if per_matrix:
        rows += [Group(m.name, [m]) for m in matrices]
    else:
        roles: dict[str, list[MatrixResult]] = {}
        for m in matrices:
            roles.setdefault(m.role, []).append(m)
        rows += [Group(f"{role} (x{len(ms)})", ms) for role, ms in roles.items()]
    square = [m for m in matrices if m.square]
    other = [m for m in matrices if not m.square]
    if square:
        rows.append(Group(f"**square, sum ({len(square)})**", square))
    if other:
        rows.append(Group(f"non-square, sum ({len(other)})", other))
    rows.append(
        Group(
            f"**Muon group, sum ({len(matrices)})**",
            matrices,
            square_only=True,
        )
    )
    return rows


def report(result: CheckpointResult, args: argparse.Namespace) -> list[str]:
    sizes = args.sizes
    rows = groups(result.matrices, args.per_matrix)
    head = "| matrices | m x n | col/row | "
    head += " | ".join(f"row/t B={b} | col/t B={b} | min/t B={b}" for b in sizes)
    head += " | truth SE (max) |"
    lines = [
        f"### {result.optimizer}, step {result.step} ({result.fraction:.0%} of the run)",
        "",
        f"checkpoint: {result.path}; per-example gradients {result.seconds_gradients:.0f} s, "
        f"bounds and truth {result.seconds_truth:.0f} s",
        "",
        head,
        "|" + "---|" * (4 + 3 * len(sizes)),
    ]
    worst = 0.0
    for g in rows:
        cells = [g.label, g.shapes, f"{g.col() / g.row():.3f}"]
        se_max = 0.0
        for b in sizes:
            t, se = g.truth(b)
            se_max = max(se_max, se / t)
            cells += [f"{g.row() / t:.3f}", f"{g.col() / t:.3f}", f"{g.min() / t:.3f}"]
        worst = max(worst, se_max)
        lines.append("| " + " | ".join([*cells, f"{se_max:.2%}"]) + " |")
    total = rows[-1]
    every = Group("every matrix's smaller Gram", result.matrices)
    square = [m for m in result.matrices if m.square]
    ratios = sorted(m.col / m.row for m in square)
    truths = {b: total.truth(b) for b in sizes}
    draws = ", ".join(f"B={b} {len(result.matrices[0].norms[b])}" for b in sizes)
    lines += [
        "",
        f"t = truth = sqrt(B) E||g_B - G||_* (draws: {draws}); Muon group sum: "
        + ", ".join(f"B={b} {t:.4g} +- {se / t:.2%}" for b, (t, se) in truths.items()),
    ]
    if square:
        smaller = sum(m.col < m.row for m in square)
        lines.append(
            f"square matrices: col/row min {ratios[0]:.3f}, median "
            f"{ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f}; col smaller in {smaller} "
            f"of {len(square)}"
        )
    lines += [
        "Muon group sum: (row - min)/t "
        + ", ".join(f"B={b} {(total.row() - total.min()) / t:.3f}" for b, (t, _) in truths.items())
        + f"; row/min {total.row() / total.min():.3f}, squared (the noise) "
        f"{(total.row() / total.min()) ** 2:.3f}",
        "control, the smaller Gram of every matrix (non-square too): min/t "
        + ", ".join(f"B={b} {every.min() / t:.3f}" for b, (t, _) in truths.items()),
    ]
    if worst > TARGET_SE:
        lines.append(
            f"NOTE: a truth's standard error is {worst:.2%} > {TARGET_SE:.0%}: raise --max-draws"
        )
    return [*lines, ""]


def header(args: argparse.Namespace) -> str:
    return (
        f"device: CPU ({cpu_name()}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
        f"command: {shlex.join(['python', os.path.relpath(__file__), *args.command])}\n"
        f"population {args.population} training windows (seed {args.seed}); truth at B in "
        f"{tuple(args.sizes)}, draws with replacement in rounds of {args.draws} per B until "
        f"every row's standard error is <= {TARGET_SE:.0%} (at most {args.max_draws}); bounds "
        "and truths in float64 from float32 per-example gradients"
    )


def shapes_line(result: CheckpointResult) -> str:
    count: dict[tuple[int, int], int] = {}
    for m in result.matrices:
        count[m.shape] = count.get(m.shape, 0) + 1
    return (
        f"Muon group: {len(result.matrices)} matrices, "
        + ", ".join(f"{c} x ({m} x {n})" for (m, n), c in count.items())
        + " in the library's view (m <= n)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(None if argv is None else list(argv))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(header(args), flush=True)
    # estimator_tracking.py's windows: the same population for the same --population and --seed
    populations = Populations(
        argparse.Namespace(population=args.population, seed=args.seed, out=".", reuse=False)
    )
    for i, path in enumerate(args.checkpoints):
        result = measure(path, args, populations)
        if i == 0:
            print(shapes_line(result))
        print("\n" + "\n".join(report(result, args)), flush=True)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
