"""Benchmark: one Muon step (momentum, quintic Newton-Schulz, update) with the iteration in
bfloat16 (torch.optim.Muon's own step) against float32 (``Muon(ns_dtype=torch.float32)``), on
the hidden matrices of the main job's default Llama (dim 128, 4 layers) and on square matrices.
Prints one markdown row per shape: median seconds per step for each dtype and their ratio.

    python launch/benchmarks/muon_ns_dtype.py                   # CPU, threads as torch sets
    python launch/benchmarks/muon_ns_dtype.py --device cuda     # one GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from launch.llama import Llama, LlamaConfig
from nongns_dist.optim import Muon, muon_param_groups


def step_seconds(shape: tuple[int, ...], count: int, dtype: torch.dtype, device: str,
                 reps: int) -> float:  # fmt: skip
    params = [nn.Parameter(torch.randn(shape, device=device)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(shape, device=device)
    opt = Muon(params, lr=0.02, ns_dtype=dtype)
    times = []
    for _ in range(reps + 1):  # the first step allocates the momentum buffers
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    # The Muon group of the main job's default Llama, then square matrices of growing size.
    model = Llama(LlamaConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, max_seq_len=128))
    shapes = Counter(tuple(p.shape) for p in muon_param_groups(model)[0]["params"])
    cases = [*shapes.items(), ((512, 512), 1), ((1024, 1024), 1)]
    print(f"device={args.device} ({platform.machine()}), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, reps={args.reps}")  # fmt: skip
    print("| shape | matrices | bfloat16 s/step | float32 s/step | bfloat16 / float32 |")
    print("|---|---|---|---|---|")
    for shape, count in cases:
        bf16 = step_seconds(shape, count, torch.bfloat16, args.device, args.reps)
        fp32 = step_seconds(shape, count, torch.float32, args.device, args.reps)
        print(f"| {shape[0]} x {shape[1]} | {count} | {bf16:.4f} | {fp32:.4f} | "
              f"{bf16 / fp32:.1f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
