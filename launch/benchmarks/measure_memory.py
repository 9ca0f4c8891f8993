"""Benchmark: memory of attaching a monitor that measures every step, persistent and transient.

    torchrun --standalone --nproc-per-node 2 launch/benchmarks/measure_memory.py
    torchrun --standalone --nproc-per-node 4 launch/benchmarks/measure_memory.py

L bias-free Linear(1024, 1024) layers (4 MiB of float32 parameters each, initialised with std
1/sqrt(1024) so that 48 of them neither vanish nor explode), gloo ranks on CPU, DDP with its
default 25 MB buckets, FSDP2 with each layer and the root ``fully_shard``-ed. Each row is one
model in one process, trained on the same inputs in two phases:

1. ``--steps`` plain steps, no monitor attached (the job without the library);
2. ``attach(interval=1)``, then ``--steps`` steps that all measure.

Resident memory is read from the kernel: VmRSS between steps (after ``optimizer.step``) and the
peak of each step (VmHWM, reset through /proc/self/clear_refs before the step). The process is
started with a fixed glibc mmap threshold so every large tensor is mapped and unmapped and
freed memory leaves RSS at once: the numbers are what is held, not what the allocator keeps
cached (``--glibc-default`` measures with glibc's adaptive threshold instead).

* persistent = RSS between measuring steps - RSS between plain steps: what ``attach`` and the
  pooled moments keep from one step to the next;
* transient = how far a measuring step's peak rises above its starting RSS, minus the same for
  a plain step: the measuring step's own temporaries;
* total = persistent + transient = peak of a measuring step - peak of a plain step: the growth
  of the process's peak RSS over the plain run.

Each in MiB and as a multiple of the rank's parameter bytes: DDP the whole model (every rank
holds it), FSDP2 the rank's shard (the model / ranks). Medians over the steps after the first
two of each phase, rank 0 (``--all-ranks``: the largest over the ranks); the one-off costs of
the first monitor in a process are taken before the rows and printed apart. The library's own
account, ``MeasurementSession.memory_bytes``: "pool" between steps (the persistent state) and
"held" at the end of a measuring step, before it is settled (the pool plus the moments held
for it); "expected" is the pool's size from the plan (float64 triangles m(m+1)/2 of the
matrices this rank owns, float32 moments of this rank's l1 coordinates).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
from typing import Any

if "--glibc-default" not in sys.argv and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # before torch allocates anything
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from nongns_dist import GNSConfig, attach, exit_cleanly

WIDTH = 1024
MICRO = 8
SKIP = 2  # first steps of each phase: one-off allocations (buckets, workspaces)
MIB = 2**20


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _wrap(engine: str, layers: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    linears = [nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)]
    for linear in linears:
        nn.init.normal_(linear.weight, std=WIDTH**-0.5)
    module = nn.Sequential(*linears)
    if engine == "ddp":
        return module, DDP(module)
    from torch.distributed.fsdp import fully_shard

    for layer in module:
        fully_shard(layer)
    fully_shard(module)
    return module, module


def _phase(model: nn.Module, opt: torch.optim.Optimizer, monitor: Any, steps: int) -> list:
    """(RSS before, peak, RSS after) in KiB of each step after the first ``SKIP``."""
    rank = dist.get_rank()
    rows = []
    for step in range(steps):
        x = torch.randn(MICRO, WIDTH, generator=torch.Generator().manual_seed(100 * rank + step))
        dist.barrier()
        before = _kib("VmRSS")
        _reset_peak()
        if monitor is None:
            model(x).square().mean().backward()
        else:
            for micro in monitor.micro_steps():
                with micro:
                    (model(x).square().mean() / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        peak = _kib("VmHWM")
        if step >= SKIP:
            rows.append((before, peak, _kib("VmRSS")))
    return rows


def _expected_pool_bytes(session: Any) -> int:
    """The pool's size from the plan: what ``memory_bytes`` should report between steps."""
    total = 0
    for t in session.plan.params:
        if t.norm.matrix:
            if t.owner == session.rank:
                total += t.gram_size * (t.gram_size + 1) // 2 * 8
        else:  # DDP: each parameter split evenly over the ranks; FSDP2: the rank's shard
            total += math.ceil(t.shape.numel() / session.world_size) * 4
    return total


def run(engine: str, layers: int, norm: str, steps: int) -> dict[str, float]:
    module, model = _wrap(engine, layers)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    plain = _phase(model, opt, None, steps)
    config = {"norm": norm, "interval": 1, "adapt_batch_size": False}
    monitor = attach(model, GNSConfig.from_dict(config), opt, micro_batch_size=MICRO)
    session: Any = monitor.session
    held: list[int] = []
    finish = session.finish

    def finish_and_count() -> Any:  # the moments held for the step, before it is settled
        held.append(session.memory_bytes())
        return finish()

    session.finish = finish_and_count
    measuring = _phase(model, opt, monitor, steps)
    pool, expected = session.memory_bytes(), _expected_pool_bytes(session)
    monitor.detach()
    del monitor, opt, model, module
    gc.collect()

    def median(rows: list, i: int) -> float:
        return statistics.median(r[i] for r in rows) / 1024

    def rise(rows: list) -> float:
        return statistics.median(r[1] - r[0] for r in rows) / 1024

    return {
        "persistent": median(measuring, 2) - median(plain, 2),
        "transient": rise(measuring) - rise(plain),
        "total": median(measuring, 1) - median(plain, 1),
        "pool": pool / MIB,
        "expected": expected / MIB,
        "held": max(held) / MIB,
        "drift": (measuring[-1][2] - measuring[0][2]) / 1024,  # a leak would show here
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 48])
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2"])
    parser.add_argument("--norms", nargs="+", default=["nuclear", "l1"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--all-ranks", action="store_true", help="largest over the ranks")
    parser.add_argument("--glibc-default", action="store_true", help="no fixed mmap threshold")
    args = parser.parse_args()
    if args.steps <= SKIP:
        parser.error(f"--steps must be > {SKIP}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    keys = ("persistent", "transient", "total", "pool", "expected", "held", "drift")
    # The first monitor of a process also pays one-off costs that stay (the eigensolver's and
    # gloo's lazily built state): taken here, on one layer, so that no row below carries them.
    one_off = 0.0
    for norm in args.norms:
        warm_up = run(args.engines[0], 1, norm, SKIP + 2)
        one_off += warm_up["persistent"] - warm_up["pool"]
    if args.all_ranks:
        largest = torch.tensor([one_off], dtype=torch.float64)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        one_off = float(largest)
    rows = []
    for engine in args.engines:
        for norm in args.norms:
            for layers in args.layers:
                result = run(engine, layers, norm, args.steps)
                values = torch.tensor([result[k] for k in keys], dtype=torch.float64)
                if args.all_ranks:
                    dist.all_reduce(values, op=dist.ReduceOp.MAX)
                model_mib = layers * WIDTH * WIDTH * 4 / MIB
                rank_mib = model_mib / world if engine == "fsdp2" else model_mib
                result = dict(zip(keys, values.tolist(), strict=True))
                rows.append((engine, norm, layers, rank_mib, result))
    if dist.get_rank() == 0:
        threshold = "glibc default" if args.glibc_default else "mmap threshold 65536"
        who = "largest over the ranks" if args.all_ranks else "rank 0"
        print(f"# torch {torch.__version__}, {world} gloo ranks (CPU), Linear({WIDTH}, {WIDTH})"
              f" x L, micro-batch {MICRO}, interval 1, {args.steps} steps a phase, {threshold},"
              f" {who}; MiB (x the rank's parameter bytes)")  # fmt: skip
        print("| engine | norm | L | rank's params | persistent | transient | total | "
              "pool (expected) | held in step | drift |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for engine, norm, layers, rank_mib, r in rows:
            cells = [f"{r[k]:.1f} ({r[k] / rank_mib:.3f}x)" for k in ("persistent", "transient",
                                                                       "total")]  # fmt: skip
            print(f"| {engine} | {norm} | {layers} | {rank_mib:.0f} | {' | '.join(cells)} | "
                  f"{r['pool']:.1f} ({r['expected']:.1f}) | {r['held']:.1f} | "
                  f"{r['drift']:.1f} |")  # fmt: skip
        print(f"# once per process, before the rows (first monitor, L = 1): {one_off:.1f} MiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_cleanly()  # exit 0 without gloo's teardown abort (nongns_dist.exit_cleanly)
