"""Benchmark: extra peak memory of a measuring step over a plain step, as the model deepens.

    torchrun --standalone --nproc-per-node 2 launch/benchmarks/measure_memory.py

L bias-free Linear(1024, 1024) layers (4 MiB of float32 parameters each), 2 gloo ranks, one
monitor with ``interval=2`` so measuring and plain steps alternate on the same model. Peak
resident memory of each step is read from the kernel (VmHWM, reset through
/proc/self/clear_refs before the step); the process is started with a fixed glibc mmap
threshold so every large tensor is mapped and unmapped, and freed memory leaves RSS at once.
Reported: rank 0's extra peak (measuring - plain, median over steps) in MiB and as a multiple
of the parameter bytes, for DDP and FSDP2, norms nuclear and l1, L = 8, 24, 48.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # before torch allocates anything
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from nongns_dist import GNSConfig, attach, exit_cleanly

WIDTH = 1024
MICRO = 8


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _wrap(engine: str, layers: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    module = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    if engine == "ddp":
        return module, DDP(module)
    from torch.distributed.fsdp import fully_shard

    for layer in module:
        fully_shard(layer)
    fully_shard(module)
    return module, module


def run(engine: str, layers: int, norm: str, steps: int) -> tuple[float, float]:
    """Median peak (KiB) of measuring and of plain steps."""
    module, model = _wrap(engine, layers)
    opt = torch.optim.SGD(module.parameters(), lr=1e-6)
    monitor = attach(
        model, GNSConfig.from_dict({"norm": norm, "interval": 2, "adapt_batch_size": False}), opt,
        micro_batch_size=MICRO,
    )  # fmt: skip
    rank = dist.get_rank()
    peaks: dict[bool, list[int]] = {True: [], False: []}
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * rank + step)
        x = torch.randn(MICRO, WIDTH, generator=g)
        measuring = monitor.measuring
        dist.barrier()
        _reset_peak()
        for micro in monitor.micro_steps():
            with micro:
                (model(x).square().mean() / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        peak = _peak_kib()
        if step >= 2:  # after the first steps' one-off allocations
            peaks[measuring].append(peak)
    monitor.detach()
    return statistics.median(peaks[True]), statistics.median(peaks[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 24, 48])
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2"])
    parser.add_argument("--norms", nargs="+", default=["nuclear", "l1"])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = []
    for engine in args.engines:
        for norm in args.norms:
            for layers in args.layers:
                measuring, plain = run(engine, layers, norm, args.steps)
                param_mib = layers * WIDTH * WIDTH * 4 / 2**20
                extra = (measuring - plain) / 1024
                rows.append((engine, norm, layers, param_mib, plain / 1024, extra))
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f"# torch {torch.__version__}, {world} gloo ranks (CPU), Linear({WIDTH}, {WIDTH})"
              f" x L, micro-batch {MICRO}, interval 2, rank 0")  # fmt: skip
        print("| engine | norm | L | params MiB | plain-step peak MiB | extra peak MiB | "
              "extra / params |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for engine, norm, layers, param_mib, plain_mib, extra in rows:
            print(f"| {engine} | {norm} | {layers} | {param_mib:.0f} | {plain_mib:.0f} | "
                  f"{extra:.1f} | {extra / param_mib:.3f}x |")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_cleanly()  # exit 0 without gloo's teardown abort (nongns_dist.exit_cleanly)
