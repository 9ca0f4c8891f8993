"""The paper's Table 1 in small: constant small batch, constant 4x batch, Euclidean-GNS adaptive
and non-Euclidean adaptive, for Signum and Muon, the same sample budget, several seeds.

    python launch/compare.py                        # tune on seed 0, report seeds 1-3
    python launch/compare.py --optimizers signum --seeds 1 2 -- --sample-budget 2048

Every run is ``torchrun --standalone --nproc-per-node N launch/train.py ...`` in its own
directory under --out; a run whose summary.json exists with the same command is reused, so an
interrupted comparison resumes where it stopped. Flags after ``--`` go to every train.py run.

Tuning (on --tune-seed only, never on the reported seeds; all on validation loss):
1. lr: constant small batch at each multiple in --lr-grid of train.py's default lr; the lowest
   final validation loss wins. The 4x batch runs at sqrt(4) = 2x that lr (Muon: both groups),
   the square-root rule the adaptive runs apply as their batch grows.
2. theta: adaptive runs at each value of --theta-grid (non-Euclidean, norm auto) and
   --euclidean-theta-grid (l2); the winner reaches the tuning seed's constant-small-batch best
   validation loss in the fewest steps (ties and runs that never reach it: lowest final loss).

Reported per optimizer: final validation loss mean +- sd over seeds, steps, and the median over
seeds of the reduction of steps needed to reach the same seed's constant-small-batch best
validation loss (1 - steps / steps of the small batch; "not reached" counts as -inf). Outputs in
--out: table.md, results.json and, with matplotlib installed (``pip install -e ".[plots]"``),
<optimizer>.png with validation loss, global batch and noise scale against steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.cli import DEFAULT_LR
from launch.cli import build_parser as train_parser

TRAIN = Path(__file__).resolve().parent / "train.py"
MODES = ("small", "large", "euclidean", "non_euclidean")
LABELS = {
    "small": "B={b}",
    "large": "B={B}",
    "euclidean": "Euclidean GNS",
    "non_euclidean": "non-Euclidean GNS",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--optimizers", nargs="+", default=["signum", "muon"], choices=list(DEFAULT_LR))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="reported seeds")
    p.add_argument("--tune-seed", type=int, default=0, help="the seed all tuning runs use")
    p.add_argument(
        "--lr-grid",
        nargs="+",
        type=float,
        default=[0.5, 1.0, 2.0],
        help="multiples of train.py's default lr",
    )
    p.add_argument("--theta-grid", nargs="+", type=float, default=[0.6, 0.45, 0.3])
    p.add_argument("--euclidean-theta-grid", nargs="+", type=float, default=[0.3, 0.2, 0.15])
    p.add_argument("--small-batch", type=int, default=8, help="global batch B of the baseline")
    p.add_argument("--large-factor", type=int, default=4, help="the large baseline is factor x B")
    p.add_argument("--eval-every", type=int, default=8, help="optimizer steps between validations")
    p.add_argument("--eval-batches", type=int, default=8, help="validation micro-batches")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    p.add_argument("--out", default="runs/compare", help="directory of all runs and the report")
    p.add_argument("--report-only", action="store_true", help="table and plots from runs on disk")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- flags for every train.py")
    return p


# -- runs ------------------------------------------------------------------------------------------


@dataclass
class Run:
    directory: Path
    flags: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def evals(self) -> list[tuple[int, float]]:
        return [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]

    @property
    def best(self) -> float:
        return min(v for _, v in self.evals)

    @property
    def final(self) -> float:
        return float(self.summary["final_val_loss"])

    @property
    def steps(self) -> int:
        return int(self.summary["steps"])

    def steps_to(self, target: float) -> float:
        """First validated step with loss <= target; inf when the run never gets there."""
        return next((float(s) for s, v in self.evals if v <= target), math.inf)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.extra = [a for a in args.train_args if a != "--"]

    def run(self, name: str, flags: list[str], report_only: bool = False) -> Run:
        directory = self.out / name
        flags = [
            *flags,
            "--eval-every",
            str(self.args.eval_every),
            "--eval-batches",
            str(self.args.eval_batches),
            *self.extra,
            "--out",
            str(directory),
        ]
        command_file = directory / "command.json"
        done = (directory / "summary.json").is_file() and command_file.is_file()
        if not (done and json.loads(command_file.read_text()) == flags):
            if report_only:
                raise SystemExit(f"compare.py: error: run {directory} is missing or stale")
            command = [
                sys.executable,  # torchrun of this interpreter, not whichever is on PATH
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={self.args.nproc}",
                str(TRAIN),
                *flags,
            ]
            print(f"[{time.strftime('%H:%M:%S')}] run {name}: {' '.join(command)}", flush=True)
            directory.mkdir(parents=True, exist_ok=True)
            # a stale or interrupted run of this directory starts over (train.py refuses to
            # start a fresh run beside an earlier run's checkpoints)
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
            with (directory / "train.log").open("w") as log:
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            if code.returncode:
                raise SystemExit(f"compare.py: {name} failed; see {directory / 'train.log'}")
            command_file.write_text(json.dumps(flags))
        run = Run(directory, flags)
        run.summary = json.loads((directory / "summary.json").read_text())
        with (directory / "metrics.jsonl").open() as f:
            run.records = [json.loads(line) for line in f]
        return run


def optimizer_flags(optimizer: str, lr: float, aux_lr: float | None) -> list[str]:
    flags = ["--optimizer", optimizer, "--lr", f"{lr:.6g}"]
    return flags + (["--aux-lr", f"{aux_lr:.6g}"] if aux_lr is not None else [])


def mode_flags(mode: str, args: argparse.Namespace, theta: float | None) -> list[str]:
    b = args.small_batch
    if mode == "small":
        return ["--batch-mode", "constant", "--initial-batch", str(b)]
    if mode == "large":
        return ["--batch-mode", "constant", "--initial-batch", str(b * args.large_factor)]
    norm = "l2" if mode == "euclidean" else "auto"
    return [
        "--batch-mode",
        "adaptive",
        "--initial-batch",
        str(b),
        "--norm",
        norm,
        "--theta",
        f"{theta:g}",
    ]


@dataclass
class Tuned:
    lr: float
    aux_lr: float | None
    theta: dict[str, float]
    log: list[str]


def tune(runner: Runner, optimizer: str, report_only: bool) -> Tuned:
    args = runner.args
    seed = ["--seed", str(args.tune_seed)]
    hybrid = optimizer in ("muon", "specsgd")
    aux_default = train_parser().get_default("aux_lr") if hybrid else None
    log = [f"{optimizer}: tuned on seed {args.tune_seed}"]
    lr_runs = {}
    for mult in args.lr_grid:
        lr = DEFAULT_LR[optimizer] * mult
        aux = None if aux_default is None else aux_default * mult
        name = f"tune/{optimizer}/small-lr{lr:g}"
        lr_runs[(lr, aux)] = runner.run(
            name,
            optimizer_flags(optimizer, lr, aux) + mode_flags("small", args, None) + seed,
            report_only,
        )
        log.append(
            f"  constant B={args.small_batch}, lr {lr:g}: final val {lr_runs[(lr, aux)].final:.4f}"
        )
    (lr, aux), base = min(lr_runs.items(), key=lambda kv: kv[1].final)
    log.append(f"  -> lr {lr:g}" + ("" if aux is None else f" (aux {aux:g})"))
    target = base.best
    thetas: dict[str, float] = {}
    for mode, grid in (
        ("euclidean", args.euclidean_theta_grid),
        ("non_euclidean", args.theta_grid),
    ):
        runs = {}
        for theta in grid:
            name = f"tune/{optimizer}/{mode}-theta{theta:g}"
            flags = optimizer_flags(optimizer, lr, aux) + mode_flags(mode, args, theta) + seed
            runs[theta] = runner.run(name, flags, report_only)
            r = runs[theta]
            log.append(
                f"  {mode} theta {theta:g}: steps to {target:.4f}: "
                f"{r.steps_to(target):g}, final val {r.final:.4f}, {r.steps} steps"
            )
        thetas[mode] = min(runs, key=lambda t: (runs[t].steps_to(target), runs[t].final))
        log.append(f"  -> {mode} theta {thetas[mode]:g}")
    return Tuned(lr, aux, thetas, log)


# -- report ----------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON has no infinities: "never reached" (steps inf, reduction -inf) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def median_reduction(reductions: list[float]) -> str:
    reached = sum(math.isfinite(r) for r in reductions)
    med = statistics.median(reductions) if reductions else -math.inf
    text = f"{100 * med:.1f}%" if math.isfinite(med) else "not reached"
    return text if reached == len(reductions) else f"{text} ({reached}/{len(reductions)} reached)"


def report(
    args: argparse.Namespace, results: dict[str, dict[str, list[Run]]], tuned: dict[str, Tuned]
) -> dict[str, Any]:
    b, big = args.small_batch, args.small_batch * args.large_factor
    labels = {m: LABELS[m].format(b=b, B=big) for m in MODES}
    head = [
        "optimizer",
        *(labels[m] for m in MODES),
        "steps (mean)",
        "steps reduction " + " / ".join(labels[m] for m in MODES[1:]),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    data: dict[str, Any] = {}
    for opt, by_mode in results.items():
        row = [opt]
        reductions: dict[str, list[float]] = {m: [] for m in MODES[1:]}
        for i in range(len(args.seeds)):
            base = by_mode["small"][i]
            for m in MODES[1:]:
                needed = by_mode[m][i].steps_to(base.best)
                reductions[m].append(1.0 - needed / base.steps_to(base.best))
        for m in MODES:
            row.append(mean_sd([r.final for r in by_mode[m]]))
        row.append(
            " / ".join(f"{statistics.fmean([r.steps for r in by_mode[m]]):.0f}" for m in MODES)
        )
        row.append(" / ".join(median_reduction(reductions[m]) for m in MODES[1:]))
        lines.append("| " + " | ".join(row) + " |")
        data[opt] = {
            "lr": tuned[opt].lr,
            "aux_lr": tuned[opt].aux_lr,
            "theta": tuned[opt].theta,
            "final_val_loss": {m: [r.final for r in by_mode[m]] for m in MODES},
            "best_val_loss": {m: [r.best for r in by_mode[m]] for m in MODES},
            "steps": {m: [r.steps for r in by_mode[m]] for m in MODES},
            "steps_to_small_best": {
                m: [r.steps_to(by_mode["small"][i].best) for i, r in enumerate(by_mode[m])]
                for m in MODES
            },
            "reduction": reductions,
            "batch_trajectory": {
                m: [r.summary["batch_trajectory"] for r in by_mode[m]] for m in MODES
            },
        }
    # The reverse question, where the paper's one has no answer: at the loss each mode ends
    # at, how many steps did the small batch need to get there?
    matched = [
        "",
        f"| optimizer | steps {labels['small']} needs to reach each mode's final "
        "validation loss, vs the mode's steps (median over seeds) |",
        "|---|---|",
    ]
    for opt, by_mode in results.items():
        cells = []
        for m in MODES[1:]:
            pairs = [
                (base.steps_to(r.final), r.steps)
                for base, r in zip(by_mode["small"], by_mode[m], strict=True)
            ]
            need = statistics.median(p[0] for p in pairs)
            own = statistics.median(p[1] for p in pairs)
            saved = f"{100 * (1 - own / need):.0f}% fewer" if math.isfinite(need) else "never"
            cells.append(f"{labels[m]}: {need:g} vs {own:g} ({saved})")
            data[opt].setdefault("small_steps_to_final", {})[m] = [p[0] for p in pairs]
        matched.append(f"| {opt} | " + "; ".join(cells) + " |")
    # Where the small batch sits against the noise scale it measures: the EMA noise scale is
    # the controller's target batch x theta^2 (read back from each small-batch run's records).
    scales = [
        "",
        f"| optimizer | EMA noise scale of the {labels['small']} runs at 25 / 50 / "
        "75 / 100% of their measurements, per seed (sequences) |",
        "|---|---|",
    ]
    for opt, by_mode in results.items():
        cells = []
        for r in by_mode["small"]:
            theta = float(r.summary["args"]["theta"])
            ema = [
                rec["target_batch_size"] * theta**2
                for rec in r.records
                if rec.get("target_batch_size") is not None
            ]
            picks = [ema[max(0, round(f * len(ema)) - 1)] for f in (0.25, 0.5, 0.75, 1.0)]
            cells.append(" / ".join(f"{x:.1f}" for x in picks) if ema else "none measured")
            data[opt].setdefault("small_ema_noise_scale", []).append(picks if ema else None)
        scales.append(f"| {opt} | " + "; ".join(cells) + " |")
    table = "\n".join(lines + matched + scales)
    notes = [
        f"seeds {args.seeds}; each cell: final validation loss mean ± sd; steps: mean optimizer "
        f"steps of {' / '.join(labels[m] for m in MODES)}; reduction: median over seeds of "
        f"1 - steps to reach the same seed's {labels['small']} best validation loss / its steps.",
        *(line for t in tuned.values() for line in t.log),
    ]
    text = table + "\n\n" + "\n".join(notes) + "\n"
    print(text, flush=True)
    (Path(args.out) / "table.md").write_text(text)
    (Path(args.out) / "results.json").write_text(
        json.dumps(_finite(data), indent=1, allow_nan=False)
    )
    plot(args, results, labels)
    return data


def plot(
    args: argparse.Namespace, results: dict[str, dict[str, list[Run]]], labels: dict[str, str]
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[plots]"): no plots')
        return
    colors = dict(zip(MODES, ("tab:gray", "tab:blue", "tab:orange", "tab:green"), strict=True))
    for opt, by_mode in results.items():
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for m in MODES:
            for i, r in enumerate(by_mode[m]):
                label = labels[m] if i == 0 else None
                steps, vals = zip(*r.evals, strict=True)
                axes[0].plot(steps, vals, color=colors[m], alpha=0.7, lw=1, label=label)
                xs = [rec["step"] for rec in r.records]
                axes[1].plot(
                    xs,
                    [rec["batch_size"] for rec in r.records],
                    color=colors[m],
                    alpha=0.7,
                    lw=1,
                    label=label,
                )
                if m in ("euclidean", "non_euclidean"):
                    g = [(rec["step"], rec["gns_raw"]) for rec in r.records if rec.get("gns_raw")]
                    if g:
                        axes[2].plot(
                            *zip(*g, strict=True), color=colors[m], alpha=0.7, lw=1, label=label
                        )
        small_best = statistics.fmean(r.best for r in by_mode["small"])
        axes[0].axhline(small_best, color="k", ls=":", lw=1, label=f"{labels['small']} best (mean)")
        axes[0].set(xlabel="optimizer step", ylabel="validation loss", title=f"{opt}: validation")
        lo = min(r.best for rs in by_mode.values() for r in rs)
        hi = max(r.final for rs in by_mode.values() for r in rs)
        axes[0].set_ylim(lo - 0.05, max(lo + 0.8, hi + 0.1))
        axes[1].set(xlabel="optimizer step", ylabel="global batch (sequences)", title="batch size")
        axes[2].set(
            xlabel="optimizer step",
            ylabel="measured noise scale (sequences)",
            yscale="log",
            title="noise scale (Euclidean: l2; non-Euclidean: auto)",
        )
        for ax in axes:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(args.out) / f"{opt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("small_batch", "large_factor", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"compare.py: error: --{name.replace('_', '-')} must be >= 1")
    if args.nproc < 2:
        raise SystemExit("compare.py: error: --nproc must be >= 2 (the noise scale needs ranks)")
    owned = {"--optimizer", "--lr", "--aux-lr", "--batch-mode", "--initial-batch", "--norm",
             "--theta", "--seed", "--out", "--eval-every", "--eval-batches"}  # fmt: skip
    clash = sorted(a.split("=")[0] for a in args.train_args if a.split("=")[0] in owned)
    if clash:
        raise SystemExit(
            f"compare.py: error: {clash} after -- would override what each run sets; use "
            "compare.py's own flags (--optimizers, --lr-grid, --theta-grid, --small-batch, ...)"
        )
    if args.tune_seed in args.seeds:
        raise SystemExit("compare.py: error: --tune-seed must not be one of the reported --seeds")
    runner = Runner(args)
    tuned: dict[str, Tuned] = {}
    results: dict[str, dict[str, list[Run]]] = {}
    for opt in args.optimizers:
        t = tuned[opt] = tune(runner, opt, args.report_only)
        print("\n".join(t.log), flush=True)
        results[opt] = {m: [] for m in MODES}
        for seed in args.seeds:
            for m in MODES:
                lr, aux = t.lr, t.aux_lr
                if m == "large":  # the square-root rule, as the adaptive runs scale
                    k = math.sqrt(args.large_factor)
                    lr, aux = lr * k, None if aux is None else aux * k
                flags = optimizer_flags(opt, lr, aux) + mode_flags(m, args, t.theta.get(m))
                run = runner.run(
                    f"{opt}/{m}/seed{seed}", [*flags, "--seed", str(seed)], args.report_only
                )
                results[opt][m].append(run)
    report(args, results, tuned)


if __name__ == "__main__":
    main()
