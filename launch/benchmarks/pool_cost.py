"""Benchmark: what pooling the second moments costs on a measuring step, and its state.

One process (``attach`` on the plain model: per-micro-step samples), the main job's default
Llama (dim 128, 4 layers), micro-batch 4, 2 micro-steps, every step measuring (interval 1). Two
monitors, ``pool_moments=True`` (the default) and ``False``, run their steps alternately so
that both see the same machine load; prints the median seconds of a measuring step of each, their
ratio, and the pool's state in bytes, for l1 (Signum) and nuclear (Muon's matrix group).

    python launch/benchmarks/pool_cost.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from launch.llama import Llama, LlamaConfig
from nongns_dist import GNSConfig, GNSMonitor, attach
from nongns_dist.optim import Muon, Signum, muon_param_groups


def build(norm: str, pooled: bool) -> tuple[Llama, GNSMonitor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, max_seq_len=128))
    if norm == "nuclear":
        opt: torch.optim.Optimizer = Muon(muon_param_groups(model), lr=0.02, aux="adamw")
    else:
        opt = Signum(model.parameters(), lr=1e-3)
    config = GNSConfig(norm="auto", interval=1, adapt_batch_size=False, pool_moments=pooled)
    return model, attach(model, config, opt, micro_batch_size=4, accumulation_steps=2), opt


def step(
    model: Llama, monitor: GNSMonitor, opt: torch.optim.Optimizer, tokens: torch.Tensor
) -> None:
    for micro in monitor.micro_steps():
        with micro:
            batch = tokens[4 * micro.index : 4 * micro.index + 4]
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            (loss / micro.loss_divisor).backward()
    opt.step()
    opt.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    print(f"device=cpu ({platform.machine()}), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, reps={args.reps}")  # fmt: skip
    print("| norm | measured | pooled s/step | unpooled s/step | pooled / unpooled | pool state |")
    print("|---|---|---|---|---|---|")
    tokens = torch.randint(0, 256, (8, 129), generator=torch.Generator().manual_seed(1))
    for norm in ("l1", "nuclear"):
        runs = {pooled: build(norm, pooled) for pooled in (True, False)}
        times: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(args.reps + 2):  # two warm-up steps each
            for pooled, run in runs.items():
                start = time.perf_counter()
                step(*run, tokens)
                if rep >= 2:
                    times[pooled].append(time.perf_counter() - start)
        monitor = runs[True][1]
        assert monitor.last_estimate is not None and monitor.pooled_estimate is not None
        pool = monitor.session.pool if monitor.session is not None else None
        state = pool.memory_bytes() if pool is not None else 0
        what = "all parameters" if norm == "l1" else f"{len(monitor.plan.matrices)} matrices"
        pooled_s, plain_s = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {norm} | {what} | {pooled_s:.4f} | {plain_s:.4f} | {pooled_s / plain_s:.3f} "
              f"| {state / 2**20:.2f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
