"""How closely the noise a LIVE run acts on tracks the population's, checkpoint by checkpoint.

estimator_accuracy.py measures estimators at one frozen checkpoint, where a pool that averages
over past measurements cannot lag. This script runs the main job itself (launch/train.py under
torchrun on 2 ranks, --batch-mode constant, micro-batch 4: a global batch of 8, so every
measurement has n = 2 samples of b = 4 examples), keeps its checkpoints at 25, 50, 75 and 100%
of the sample budget, and at each one computes the POPULATION noise of that checkpoint's model:
the gradients of --population training windows, one example each, measured exactly as the run
measures (the library's plan for the run's optimizer and --norm: the same parameters, the same
norm per parameter, l1 and nuclear parts added before squaring) with the single-example
(b = 1) variance that every estimate of the library is normalised to. Reported, as ratios to
that population, from the run's metrics.jsonl:

    paper     the paper's estimator: an EMA (beta 0.9, bias-corrected by 1 - 0.9^k) of each
              measurement's noise without the l1 c4 correction, at the checkpoint. A pure l1
              plan: noise_raw x c4(n - 1)^2; a pure nuclear plan (Muon under --norm auto, whose
              auxiliary group is not measured): noise_raw, which has no c4; a plan that mixes
              them (or --paper-run): noise_raw of a second run with --estimator paper
    raw       noise_raw (each measurement's own estimate), mean over the last min(8, available)
              measurements up to the checkpoint's step
    acted-on  noise_pooled (what the controller acts on), at the checkpoint's step (its latest
              measurement) and its mean over the same measurements as raw

A measurement at step s reads the gradients of the weights before step s's update, the
population those after it: one step apart at interval 1.

plus the trajectory over the run in 8 blocks of steps (raw, acted-on and their ratio). In
constant mode the measurement does not change the training, so runs that differ only in
--interval reach the same checkpoints; each distinct checkpoint's population is computed once.

The population's normalisation is checked on one checkpoint (the first run's 50%): the means
of simulated measurements estimate_gns(n samples of b = 4 drawn from the population, no pool)
over the population's noise, every parameter in l1 (n = 8 and 32, with and without c4) and in
l2 (n = 8; unbiased whatever the distribution): a population of another normalisation than the
single-example variance would read b = 4 times off.

    python launch/benchmarks/estimator_tracking.py                # Signum l1, Muon; interval 1, 10
    python launch/benchmarks/estimator_tracking.py --reuse        # the tables again from --out
    python launch/benchmarks/estimator_tracking.py --estimator moments   # another estimator
    python launch/benchmarks/estimator_tracking.py -- --dim 64    # flags after -- go to train.py

CPU. The runs write to --out (one directory per optimizer, norm and interval, and a log beside
each); the population needs population x parameters x 4 bytes of memory (2.7 GB for the default
model and 768 windows) and one backward pass per window and distinct checkpoint (20-40 s per
checkpoint for 768 windows of the default model on one core of a shared 2-core machine; the
default command took about 9 minutes there). --reuse also reads the populations back from
--out/populations.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from launch import checkpoints
from launch.benchmarks.estimator_accuracy import (
    Geometry,
    load_file,
    load_model,
    per_example_gradients,
)
from launch.data import load_corpus, sample_windows
from launch.llama import Llama
from launch.runtimes import build_optimizer
from nongns_dist import estimate_gns
from nongns_dist.capture.plan import module_plan_entries
from nongns_dist.norms import c4_dof, sqrt_trace

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
RANKS, MICRO_BATCH = 2, 4
BATCH = RANKS * MICRO_BATCH
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
LAST = 8  # measurements averaged for "raw" and "acted-on (last 8)"
BLOCKS = 8  # trajectory blocks
PAPER_BETA = 0.9
CHECK_N, CHECK_B = 8, 4  # the normalisation check's simulated measurement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--geometries",
        nargs="+",
        default=["signum:l1", "muon:auto"],
        help="optimizer:norm of each run (train.py's --optimizer and --norm)",
    )
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 10], help="train.py --interval")
    p.add_argument(
        "--budget", type=int, default=2048, help="sample budget (a multiple of 32: batch 8 x 4)"
    )
    p.add_argument("--population", type=int, default=768, help="training windows (examples)")
    p.add_argument("--check-draws", type=int, default=400, help="normalisation check; 0: off")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the population (one window per backward pass: more threads "
        "gain little and lose much on a busy machine)",
    )
    p.add_argument(
        "--estimator",
        default="pooled",
        help="train.py --estimator of the runs measured (pooled: the library's default; see "
        "python launch/train.py --help for the others)",
    )
    p.add_argument("--seed", type=int, default=0, help="train.py --seed; population windows too")
    p.add_argument("--out", default="runs/estimator_tracking", help="directory of the runs")
    p.add_argument("--reuse", action="store_true", help="skip runs whose outputs exist")
    p.add_argument(
        "--paper-run",
        action="store_true",
        help="read 'paper' from a second run with --estimator paper, also for pure plans",
    )
    args = p.parse_args(own)
    args.train_flags = extra
    args.command = own + (["--", *extra] if extra else [])
    if args.budget <= 0 or args.budget % (BATCH * len(FRACTIONS)):
        p.error(f"--budget must be a positive multiple of {BATCH * len(FRACTIONS)}")
    for spec in args.geometries:
        if spec.count(":") != 1:
            p.error(f"--geometries: {spec!r} is not optimizer:norm")
    if args.population < 2 or min(args.intervals) < 1:
        p.error("--population must be >= 2 and every --intervals >= 1")
    return args


# -- the runs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    optimizer: str
    norm: str
    interval: int
    estimator: str  # train.py's --estimator: --estimator here, or paper for the paper run

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.norm}-{self.estimator}-i{self.interval}"

    @property
    def label(self) -> str:
        return (
            f"{self.optimizer}, --norm {self.norm}, --estimator {self.estimator}, "
            f"interval {self.interval}"
        )


def train_command(run: Run, args: argparse.Namespace) -> list[str]:
    """train.py's flags (after the launcher) for ``run``."""
    steps = args.budget // BATCH
    flags = ["--optimizer", run.optimizer, "--norm", run.norm, "--estimator", run.estimator]
    flags += ["--batch-mode", "constant", "--micro-batch", str(MICRO_BATCH)]
    flags += ["--initial-batch", str(BATCH), "--interval", str(run.interval)]
    flags += ["--sample-budget", str(args.budget), "--seed", str(args.seed)]
    flags += ["--checkpoint-every", str(steps // len(FRACTIONS)), "--keep-checkpoints", "0"]
    flags += ["--eval-every", "0", "--out", str(Path(args.out) / run.name)]
    return flags + args.train_flags


def shown_command(flags: list[str]) -> str:
    train = os.path.relpath(TRAIN)
    return shlex.join(["torchrun", "--standalone", "--nproc-per-node", str(RANKS), train, *flags])


def checkpoint_dirs(directory: Path) -> dict[int, Path]:
    """step -> committed checkpoint directory of a run."""
    found = {}
    for path in checkpoints.complete_checkpoints(directory / "checkpoints"):
        found[int(checkpoints.read_meta(path)["step"])] = path
    return found


def checkpoint_steps(budget: int) -> list[int]:
    return [round(f * budget / BATCH) for f in FRACTIONS]


def complete(directory: Path, budget: int) -> bool:
    have = checkpoint_dirs(directory) if (directory / "summary.json").is_file() else {}
    return all(step in have for step in checkpoint_steps(budget))


def train(run: Run, args: argparse.Namespace) -> tuple[str, float, bool]:
    """Runs train.py for ``run`` (unless --reuse finds it done): command, wall seconds, reused."""
    flags = train_command(run, args)
    directory = Path(args.out) / run.name
    if args.reuse and complete(directory, args.budget):
        wall = json.loads((directory / "summary.json").read_text())["wall_s"]
        return shown_command(flags), float(wall), True
    if directory.exists():
        raise SystemExit(
            f"{directory} exists and is {'incomplete' if args.reuse else 'not reused'}: "
            "pass --reuse to use a complete run, or move it away"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, "--nproc-per-node", str(RANKS), str(TRAIN), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (directory.parent / f"{run.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0 or not complete(directory, args.budget):
        raise SystemExit(
            f"train.py failed ({run.label}, exit {result.returncode}):\n"
            + (result.stdout[-2000:] + result.stderr[-4000:])
        )
    return shown_command(flags), wall, False


def measurements(directory: Path) -> list[dict[str, Any]]:
    """The measuring steps' records of metrics.jsonl, checked to be n = 2 samples of b = 4."""
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if (r["batch_size"], r["accumulation"]) != (BATCH, 1):
            raise SystemExit(
                f"{directory}: step {r['step']} ran batch {r['batch_size']} in "
                f"{r['accumulation']} micro-steps; this script assumes {BATCH} in 1 (n = {RANKS} "
                f"samples of b = {MICRO_BATCH}); do not override --micro-batch after --"
            )
    return [r for r in records if "noise_raw" in r and r["noise_raw"] is not None]


# -- the population --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which parameters the run measures, in which norm (the library's own plan)."""

    l1: tuple[str, ...]
    nuclear: tuple[str, ...]
    left_out: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "mixed" if self.l1 and self.nuclear else "l1" if self.l1 else "nuclear"

    def describe(self, shapes: dict[str, torch.Size]) -> str:
        def count(names: tuple[str, ...]) -> str:
            return f"{len(names)} tensors, {sum(shapes[n].numel() for n in names):,} elements"

        return (
            f"l1 {count(self.l1)}; nuclear {count(self.nuclear)}; "
            f"not measured {count(self.left_out)} ({', '.join(self.left_out) or '-'})"
        )


def measured_plan(model: Llama, train_args: dict[str, Any]) -> Plan:
    """The plan ``nongns_dist.attach`` builds for the run: its optimizer (train.py's own,
    launch/runtimes.py's build_optimizer) and --norm through the library's module_plan_entries."""
    optimizer = build_optimizer(argparse.Namespace(**train_args), model)
    entries = module_plan_entries(model, train_args["norm"], optimizer)
    if any(kind == "l2" for _, _, kind in entries):
        raise SystemExit("l2 noise has no l1/nuclear parts to compare; pick another --norm")
    by_kind: dict[str | None, tuple[str, ...]] = {
        kind: tuple(name for name, _, k in entries if k == kind) for kind in ("l1", "nuclear", None)
    }
    return Plan(by_kind["l1"], by_kind["nuclear"], by_kind[None])


def check_plan(plan: Plan, checkpoint: Path) -> str:
    """The plan's measured parameters against the names the run's own pool state lists (rank 0's
    file of the checkpoint; a run without pooled moments has none): what was checked."""
    state = load_file(checkpoint / "rank00000.pt", "checkpoint").get("monitor") or {}
    names = (state.get("pool") or {}).get("params")
    if not isinstance(names, list):
        return "not checked (no pool state in the checkpoint)"
    if set(names) != set(plan.l1 + plan.nuclear):
        raise SystemExit(
            f"{checkpoint}: the run measured {sorted(names)}, the plan rebuilt here "
            f"{sorted(plan.l1 + plan.nuclear)}: the population would not be the run's"
        )
    return f"the same {len(names)} parameters as the run's pool state"


def column_sums(block: torch.Tensor) -> tuple[float, float]:
    """(sum_i sigma_i, sum_i sigma_i^2) over the columns of (examples x coordinates) gradients:
    the single-example standard deviations and variances, float64."""
    roots = squares = 0.0
    for lo in range(0, block.shape[1], 1 << 16):
        var = block[:, lo : lo + (1 << 16)].to(torch.float64).var(0, correction=1)
        roots += float(var.sqrt().sum())
        squares += float(var.sum())
    return roots, squares


def raw_has_c4(checkpoint: Path) -> bool:
    """Whether the run's noise_raw carries the l1 c4 correction: its GNSConfig.bias_correction,
    from rank 0's monitor state in ``checkpoint`` (the library's default, True, when absent)."""
    state = load_file(checkpoint / "rank00000.pt", "checkpoint").get("monitor") or {}
    return bool((state.get("config") or {}).get("bias_correction", True))


def l1_part(block: torch.Tensor) -> float:
    """sum_i sigma_i over the columns of (examples x coordinates) gradients, float64."""
    return column_sums(block)[0]


def nuclear_part(block: torch.Tensor, shape: torch.Size) -> float:
    """tr C^{1/2} of the per-example gradients of one matrix (the library's matrix view)."""
    mats = Geometry.matrix(block.to(torch.float64), shape)
    dev = mats - mats.mean(0)
    cov = torch.einsum("sik,sjk->ij", dev, dev) / (mats.shape[0] - 1)
    return float(sqrt_trace(cov, floor=1e-16 * float(torch.linalg.matrix_norm(cov))))


def plan_noise(
    grads: torch.Tensor, columns: dict[str, slice], shapes: dict[str, torch.Size], plan: Plan
) -> float:
    """The population noise as the run combines it: (l1 part + nuclear part)^2."""
    l1 = sum(l1_part(grads[:, columns[name]]) for name in plan.l1)
    nuclear = sum(nuclear_part(grads[:, columns[name]], shapes[name]) for name in plan.nuclear)
    return (l1 + nuclear) ** 2


def draw_samples(grads: torch.Tensor, n: int, b: int, rng: np.random.Generator) -> torch.Tensor:
    """n sample means of b examples each, drawn with replacement, float64 (n x coordinates)."""
    picks = torch.from_numpy(rng.integers(0, grads.shape[0], size=(n, b)))
    return torch.stack([grads.index_select(0, row).to(torch.float64).mean(0) for row in picks])


def check_normalisation(
    grads: torch.Tensor, draws: int, rng: np.random.Generator
) -> dict[str, float]:
    """Means of simulated measurements (estimate_gns of n samples of b = 4 examples drawn with
    replacement, no pool) over the population's noise, every parameter in one norm:

        l1 n=8, l1 n=8 no c4   ``draws`` measurements; about 1 with c4 for Gaussian gradients,
                               lower for heavy-tailed ones (a square root of 7 dof)
        l2 n=8                 the same draws: unbiased for ANY distribution ((P-1)/P exactly:
                               the population's variances are taken with correction 1)
        l1 n=32                draws / 4 measurements: the l1 bias shrinks with n

    A population of the wrong normalisation (not the single-example variance) reads b = 4
    times off in every one."""
    l1, l2 = column_sums(grads)
    population = {"l1": l1**2, "l2": l2}
    values: dict[str, list[float]] = {}
    cases = [(CHECK_N, draws), (4 * CHECK_N, max(draws // 4, 2))]
    for n, count in cases:
        for _ in range(count):
            samples = draw_samples(grads, n, CHECK_B, rng)
            kinds = [("l1", True, "")]
            if n == CHECK_N:
                kinds += [("l1", False, " no c4"), ("l2", True, "")]
            for norm, correct, suffix in kinds:
                est = estimate_gns(samples, CHECK_B, norm, bias_correction=correct, pool=None)
                key = f"{norm} n={n}{suffix}"
                values.setdefault(key, []).append(float(est.noise) / population[norm])
    out = {"population l1": population["l1"], "population l2": population["l2"]}
    for key, v in values.items():
        out[key] = float(np.mean(v))
        out[f"{key} sem"] = float(np.std(v, ddof=1) / math.sqrt(len(v)))
        out[f"{key} draws"] = float(len(v))
    return out


def model_hash(model: Llama) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Population:
    noise: float
    seconds: float
    key: str
    plan: Plan
    shapes: dict[str, torch.Size]
    plan_check: str
    check: dict[str, float] | None = None


class Populations:
    """Population noise per (checkpoint weights, plan); cached in --out/populations.json."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.file = Path(args.out) / "populations.json"
        self.cache: dict[str, Any] = (
            json.loads(self.file.read_text()) if args.reuse and self.file.is_file() else {}
        )
        self.windows: dict[tuple[str, int], torch.Tensor] = {}

    def training_windows(self, train_args: dict[str, Any]) -> torch.Tensor:
        key = (f"{train_args['data']}|{train_args['corpus_mb']}", train_args["seq_len"])
        if key not in self.windows:
            corpus = load_corpus(
                train_args["data"],
                cache_dir=train_args["corpus_dir"],
                corpus_mb=train_args["corpus_mb"],
            )
            rng = np.random.default_rng(self.args.seed)
            windows = sample_windows(corpus.train, key[1], self.args.population, rng)
            self.windows[key] = windows
        return self.windows[key]

    def get(self, checkpoint: Path, check: bool) -> Population:
        model, train_args = load_model(str(checkpoint))
        plan = measured_plan(model, train_args)
        plan_check = check_plan(plan, checkpoint)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        key = f"{model_hash(model)} {plan.kind} {len(plan.l1)}/{len(plan.nuclear)}"
        key += f" population {self.args.population} seed {self.args.seed}"
        if plan.nuclear:  # square matrices' covariances over their columns (norms.as_matrix)
            key += " square-columns"
        cached = self.cache.get(key)
        if cached is not None and (not check or "l2 n=8" in (cached.get("check") or {})):
            checked = cached.get("check") if check else None  # printed once, where asked
            return Population(cached["noise"], 0.0, key, plan, shapes, plan_check, checked)
        started = time.perf_counter()
        grads, columns, _ = per_example_gradients(model, self.training_windows(train_args))
        noise = plan_noise(grads, columns, shapes, plan)
        seconds = time.perf_counter() - started
        result = Population(noise, seconds, key, plan, shapes, plan_check)
        if check:
            rng = np.random.default_rng(self.args.seed + 1)
            result.check = check_normalisation(grads, self.args.check_draws, rng)
        del grads
        self.cache[key] = {"noise": noise, "seconds": seconds, "check": result.check}
        self.file.write_text(json.dumps(self.cache, indent=1))
        return result


# -- the tables ------------------------------------------------------------------------------------


def paper_series(records: list[dict[str, Any]], c4_squared: float) -> list[float]:
    """The paper's noise after each measurement: EMA(beta 0.9) of noise_raw x c4_squared,
    divided by 1 - 0.9^k."""
    ema, out = 0.0, []
    for k, r in enumerate(records, start=1):
        ema = PAPER_BETA * ema + (1 - PAPER_BETA) * r["noise_raw"] * c4_squared
        out.append(ema / (1 - PAPER_BETA**k))
    return out


def mean_of(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else math.nan


def checkpoint_table(
    records: list[dict[str, Any]],
    paper: list[float],
    populations: dict[int, float],
    budget: int,
) -> list[str]:
    lines = [
        "| checkpoint | step | population | paper | raw (last 8) | acted-on (at step) "
        "| acted-on (last 8) |",
        "|---|---|---|---|---|---|---|",
    ]
    for fraction, step in zip(FRACTIONS, checkpoint_steps(budget), strict=True):
        upto = [i for i, r in enumerate(records) if r["step"] <= step]
        last = [records[i] for i in upto[-LAST:]]
        pop = populations[step]
        cells = [
            paper[upto[-1]] / pop,
            mean_of([r["noise_raw"] for r in last]) / pop,
            (last[-1]["noise_pooled"] or math.nan) / pop,
            mean_of([r["noise_pooled"] for r in last]) / pop,
        ]
        shown = " | ".join(f"{c:.3f}" for c in cells)
        lines.append(f"| {fraction:.0%} | {step} | {pop:.4g} | {shown} |")
    return lines


def trajectory_table(
    records: list[dict[str, Any]],
    paper: list[float],
    populations: dict[int, float],
    budget: int,
) -> list[str]:
    steps = budget // BATCH
    lines = [
        "| steps | measurements | raw | acted-on | acted-on / raw | paper / raw "
        "| population at block end |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in range(BLOCKS):
        lo, hi = round(j * steps / BLOCKS), round((j + 1) * steps / BLOCKS)
        inside = [i for i, r in enumerate(records) if lo < r["step"] <= hi]
        raw = mean_of([records[i]["noise_raw"] for i in inside])
        acted = mean_of([records[i]["noise_pooled"] for i in inside])
        pap = mean_of([paper[i] for i in inside])
        pop = f"{populations[hi]:.4g}" if hi in populations else ""
        lines.append(
            f"| {lo + 1}-{hi} | {len(inside)} | {raw:.4g} | {acted:.4g} | {acted / raw:.3f} "
            f"| {pap / raw:.3f} | {pop} |"
        )
    return lines


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_run(
    run: Run,
    paper_run: Run | None,
    args: argparse.Namespace,
    populations: Populations,
    check: bool,
) -> list[str]:
    """The tables of one (geometry, interval); ``check``: the normalisation check on its 50%
    checkpoint."""
    directory = Path(args.out) / run.name
    records = measurements(directory)
    found = checkpoint_dirs(directory)
    steps = checkpoint_steps(args.budget)
    pops = {step: populations.get(found[step], check and step == steps[1]) for step in steps}
    first = pops[steps[0]]
    noise = {step: p.noise for step, p in pops.items()}
    last = found[steps[-1]]
    if paper_run is None:
        c4_squared = c4_dof(RANKS - 1) ** 2 if first.plan.kind == "l1" and raw_has_c4(last) else 1.0
        paper = paper_series(records, c4_squared)
        how = (
            f"noise_raw x c4({RANKS - 1})^2 = x{c4_squared:.4f} (pure l1 plan)"
            if c4_squared != 1.0
            else f"noise_raw as logged (pure {first.plan.kind} plan, no c4 in it)"
        )
    else:
        paper_directory = Path(args.out) / paper_run.name
        paper_records = measurements(paper_directory)
        if [r["step"] for r in paper_records] != [r["step"] for r in records]:
            raise SystemExit(f"{paper_run.name} measured at other steps than {run.name}")
        if raw_has_c4(checkpoint_dirs(paper_directory)[steps[-1]]):
            raise SystemExit(f"{paper_run.name}: its noise_raw has the c4 correction")
        paper = paper_series(paper_records, 1.0)
        how = f"noise_raw of the --estimator paper run {paper_run.name} (no c4)"
    lines = [
        f"### {run.label}",
        "",
        f"{len(records)} measurements of n = {RANKS} samples of b = {MICRO_BATCH}; plan: "
        + first.plan.describe(first.shapes)
        + f"; {first.plan_check}",
        f"paper: EMA(0.9, bias-corrected) of {how}",
        "population: "
        + ", ".join(
            f"step {s} {'(cached)' if p.seconds == 0 else f'{p.seconds:.0f} s'} [{p.key[:16]}]"
            for s, p in pops.items()
        ),
        "",
        "estimate / population at each checkpoint. paper: the EMA after the last measurement "
        "up to the checkpoint's step; raw: noise_raw averaged over the last min(8, available) "
        "measurements up to it; acted-on (at step): noise_pooled of the last one, what the "
        "controller acts on at that step; acted-on (last 8): noise_pooled averaged like raw",
        "",
        *checkpoint_table(records, paper, noise, args.budget),
        "",
        f"trajectory in {BLOCKS} blocks of steps (noise; means over the block's measurements)",
        "",
        *trajectory_table(records, paper, noise, args.budget),
        "",
    ]
    mid = pops[steps[1]]
    if mid.check is not None:
        c = mid.check
        lines += [
            f"normalisation check (checkpoint step {steps[1]}, every parameter in one norm; "
            f"population l1 noise {c['population l1']:.4g}, l2 {c['population l2']:.4g}): mean "
            f"of simulated estimate_gns(n samples of b = {CHECK_B}, pool=None) / population, "
            f"+- its standard error (c4({CHECK_N - 1})^2 = {c4_dof(CHECK_N - 1) ** 2:.4f}; l2 "
            f"expects (P-1)/P = {1 - 1 / args.population:.4f})",
            "",
            "| norm | n | draws | mean / population |",
            "|---|---|---|---|",
        ]
        means = [k for k in c if k.startswith(("l1 ", "l2 ")) and not k.endswith((" sem", "draws"))]
        for key in means:
            norm, rest = key.split(" n=")
            n, _, suffix = rest.partition(" ")
            label = f"{norm} ({suffix})" if suffix else f"{norm} (c4)" if norm == "l1" else norm
            lines.append(
                f"| {label} | {n} | {int(c[key + ' draws'])} | {c[key]:.4f} +- "
                f"{c[key + ' sem']:.4f} |"
            )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(
        f"device: CPU ({cpu_name()}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads for the population\n"
        f"command: {shlex.join(['python', os.path.relpath(__file__), *args.command])}\n"
        f"budget {args.budget} samples at a constant batch of {BATCH} ({RANKS} ranks x "
        f"micro-batch {MICRO_BATCH}) = {args.budget // BATCH} steps; checkpoints at steps "
        f"{checkpoint_steps(args.budget)}; population {args.population} training windows",
        flush=True,
    )
    populations = Populations(args)
    checked = args.check_draws <= 0
    for spec in args.geometries:
        optimizer, norm = spec.split(":")
        for interval in args.intervals:
            run = Run(optimizer, norm, interval, args.estimator)
            command, wall, reused = train(run, args)
            print(f"\n{command}\n  {'reused, ' if reused else ''}{wall:.0f} s", flush=True)
            last = checkpoint_dirs(Path(args.out) / run.name)[args.budget // BATCH]
            plan = measured_plan(*load_model(str(last)))
            paper_run = None
            if args.paper_run or plan.kind == "mixed":
                paper_run = Run(optimizer, norm, interval, "paper")
                command, wall, reused = train(paper_run, args)
                print(f"{command}\n  {'reused, ' if reused else ''}{wall:.0f} s", flush=True)
            lines = report_run(run, paper_run, args, populations, check=not checked)
            checked = True
            print("\n" + "\n".join(lines), flush=True)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
