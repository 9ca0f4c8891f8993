"""Benchmark: what a measuring step costs in one process, ours against the paper's scheme.

One process, ``attach`` on the plain Llama (per-micro-step samples), every step of the timed
monitors measuring (interval 1). Three variants run their steps alternately, so that all see the
same machine load: no monitor (the plain step), ours (pooled second moments, c4, tr(C^{1/2}) by
``--sqrt-trace``) and the paper's scheme (each measurement's own noise, no c4, eigvalsh). Prints
the median seconds per step, each measuring step as a ratio to the plain step, and the amortised
overhead at interval F (a step that does not measure is timed too: (F - 1) of them and one
measuring step, against F plain steps).

    python launch/benchmarks/step_cost.py                       # the main job's model, CPU
    python launch/benchmarks/step_cost.py --device cuda --dim 768 --layers 12 --heads 12 \\
        --seq 1024 --micro 8 --sqrt-trace newton_schulz       # the paper's 160M shape
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from launch.llama import Llama, LlamaConfig
from nongns_dist import GNSConfig, attach
from nongns_dist.optim import Muon, Signum, muon_param_groups

Step = Callable[[torch.Tensor], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-step")
    p.add_argument("--accumulation", type=int, default=2, help="micro-steps (samples) per step")
    p.add_argument("--norms", nargs="+", default=["l1", "nuclear"], choices=("l1", "nuclear"))
    p.add_argument("--sqrt-trace", default="eigh", choices=("eigh", "newton_schulz"))
    p.add_argument("--interval", type=int, default=100, help="F for the amortised overhead")
    p.add_argument("--reps", type=int, default=10)
    return p.parse_args(argv)


def build(args: argparse.Namespace, norm: str, config: GNSConfig | None) -> Step:
    """One training step of a fresh model: Signum (l1) or Muon (nuclear), with a monitor
    attached when ``config`` is given."""
    torch.manual_seed(0)
    cfg = LlamaConfig(args.vocab, args.dim, args.layers, args.heads, max_seq_len=args.seq)
    model = Llama(cfg).to(args.device)
    if norm == "nuclear":
        opt: torch.optim.Optimizer = Muon(muon_param_groups(model), lr=0.02, aux="adamw")
    else:
        opt = Signum(model.parameters(), lr=1e-3)
    monitor = None
    if config is not None:
        monitor = attach(
            model, config, opt, micro_batch_size=args.micro, accumulation_steps=args.accumulation
        )

    def step(tokens: torch.Tensor) -> None:
        for i in range(args.accumulation):
            batch = tokens[i * args.micro : (i + 1) * args.micro]
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            (loss / args.accumulation).backward()
        opt.step()  # closes the monitor's step
        opt.zero_grad(set_to_none=True)
        if monitor is not None and config is not None and config.interval == 1:
            assert monitor.last_estimate is not None  # it measured

    return step


def main() -> None:
    args = parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    print(
        f"device={args.device} ({name}), torch {torch.__version__}, threads="
        f"{torch.get_num_threads()}, model dim {args.dim} x {args.layers} layers, seq "
        f"{args.seq}, micro {args.micro} x {args.accumulation} micro-steps, sqrt-trace "
        f"{args.sqrt_trace}, reps {args.reps}"
    )
    print("| norm | plain s/step | not measuring | ours measuring (x plain) | paper measuring "
          f"(x plain) | ours amortised F={args.interval} | paper amortised |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    tokens = torch.randint(
        0, args.vocab, (args.micro * args.accumulation, args.seq + 1),
        generator=torch.Generator().manual_seed(1),
    ).to(args.device)  # fmt: skip
    base = {"norm": "auto", "adapt_batch_size": False, "sqrt_trace_method": args.sqrt_trace}
    for norm in args.norms:
        variants = {
            "plain": build(args, norm, None),
            "idle": build(args, norm, GNSConfig(**base, interval=10**6)),  # step 0 measures
            "ours": build(args, norm, GNSConfig(**base, interval=1)),
            "paper": build(
                args, norm,
                GNSConfig(**{**base, "sqrt_trace_method": "eigh"}, interval=1,
                          pool_moments=False, bias_correction=False),
            ),
        }  # fmt: skip
        times: dict[str, list[float]] = {key: [] for key in variants}
        for rep in range(args.reps + 2):  # two warm-up steps each (idle: its measuring step 0)
            for key, step in variants.items():
                sync()
                start = time.perf_counter()
                step(tokens)
                sync()
                if rep >= 2:
                    times[key].append(time.perf_counter() - start)
        t = {key: statistics.median(values) for key, values in times.items()}
        print(
            f"| {norm} | {t['plain']:.4f} | {t['idle']:.4f} | {t['ours']:.4f} "
            f"({t['ours'] / t['plain']:.3f}) | {t['paper']:.4f} ({t['paper'] / t['plain']:.3f}) "
            f"| {amortised(t, 'ours', args.interval)} | {amortised(t, 'paper', args.interval)} |"
        )


def amortised(t: dict[str, float], variant: str, interval: int) -> str:
    """Overhead per step over ``interval`` steps: one measuring, the others not, against plain."""
    cost = ((interval - 1) * t["idle"] + t[variant]) / (interval * t["plain"]) - 1
    return f"{cost:+.2%}"


if __name__ == "__main__":
    main()
