"""Benchmark: step time of DeepSpeed with and without the nongns_dist plugin, per ZeRO stage.

    torchrun --nproc-per-node 2 launch/benchmarks/deepspeed_overhead.py

Per stage three engines on one small Llama (plain DeepSpeed; plugin with norm l1; plugin with
norm nuclear; F = 100, adaptation off so all run the same batch), interleaved round by round in
one job; the median seconds per optimizer step and the ratio to plain DeepSpeed are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import nongns_dist.deepspeed as nds
from launch.llama import Llama, LlamaConfig
from nongns_dist import exit_cleanly

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def build(stage: int, norm: str | None, args: argparse.Namespace) -> Any:
    with open(os.path.join(ROOT, "ds_configs", f"zero{stage}_adamw.json")) as f:
        config = json.load(f)
    config.update(train_micro_batch_size_per_gpu=args.micro, gradient_accumulation_steps=1)
    config["nongns"] = {
        "enabled": norm is not None,
        "norm": norm or "l1",
        "interval": args.interval,
        "adapt_batch_size": False,
    }
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=4, max_seq_len=args.seq))
    init = nds.initialize if norm is not None else deepspeed.initialize
    engine, *_ = init(model=model, model_parameters=model.parameters(), config=config)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--interval", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    names = [(s, n) for s in args.stages for n in (None, "l1", "nuclear")]
    engines = {name: build(*name, args) for name in names}
    times: dict[tuple[int, str | None], list[float]] = {name: [] for name in names}

    def step(engine: Any) -> None:
        tokens = torch.randint(0, 256, (args.micro, args.seq + 1), generator=gen)
        logits = engine(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()

    for engine in engines.values():  # warm-up, then realign so each window starts measuring
        for _ in range(2):
            step(engine)
        if hasattr(engine, "nongns"):
            engine.nongns.controller.step = 0
            engine.nongns.arm()  # measuring steps are armed at the step boundary
    for _ in range(args.rounds):
        for name, engine in engines.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(engine)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / args.steps)
    if rank == 0:
        print(f"device=cpu, ranks={world} (gloo), torch {torch.__version__}, DeepSpeed "
              f"{deepspeed.__version__}, Llama dim={args.dim} layers={args.layers} seq={args.seq} "
              f"micro-batch={args.micro}, F={args.interval}, {args.rounds} rounds x {args.steps} "
              "steps, median s/step")  # fmt: skip
        print("\n| ZeRO stage | plain s/step | l1 s/step (ratio) | nuclear s/step (ratio) |")
        print("|---|---|---|---|")
        for stage in args.stages:
            base = statistics.median(times[(stage, None)])
            l1 = statistics.median(times[(stage, "l1")])
            nuc = statistics.median(times[(stage, "nuclear")])
            print(f"| {stage} | {base:.4f} | {l1:.4f} ({l1 / base:.3f}) | "
                  f"{nuc:.4f} ({nuc / base:.3f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
    exit_cleanly()  # exit 0 without gloo's teardown abort (nongns_dist.exit_cleanly)
