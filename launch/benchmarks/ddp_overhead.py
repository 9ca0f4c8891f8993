"""Benchmark: cost of nongns_dist under DDP, and its extra bytes against the paper's scheme.

    torchrun --nproc-per-node 2 launch/benchmarks/ddp_overhead.py

One job, one model, configurations interleaved round by round (so drifts of a shared CPU hit
all of them alike); the median step time of each is compared with plain DDP and the same
optimizer (Signum). Bytes are counted by wrapping the
torch.distributed collectives on one measuring step and one plain step:
* handed: tensor bytes each rank passes to collectives;
* received: a ring model of what each rank receives: all-reduce 2(R-1)/R N, reduce-scatter
  (R-1)/R N of its input, all-gather (R-1)/R N of its output.
The paper's scheme (PAPER.md "Paper implementation") runs as its own comm hook: an extra
all-reduce of the squared gradients (l1), an all-reduce of every float32 Gram to every rank and
an eigendecomposition of every matrix on every rank (nuclear).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from launch.benchmarks.comm_bytes import ByteCounter
from launch.llama import Llama, LlamaConfig
from nongns_dist import GNSConfig, attach, exit_cleanly
from nongns_dist.norms import as_matrix
from nongns_dist.optim import Signum

# -- the paper's scheme, as a comm hook ----------------------------------------------------------


class PaperState:
    def __init__(self, norm: str, module: torch.nn.Module, micro: int) -> None:
        self.norm, self.micro = norm, micro
        self.measuring = False
        self.matrices = {id(p) for p in module.parameters() if p.dim() == 2}
        self.pending: list[tuple[Any, ...]] = []
        self.estimate = None

    def finish(self) -> float:
        world = dist.get_world_size()
        n, b = world, self.micro
        noise = signal = 0.0
        for kind, work, payload, mean in self.pending:
            work.wait()
            if kind == "l1":
                var = (payload - n * mean.float() ** 2).clamp_min(0) * (b / (n - 1))
                noise += float(var.sqrt().sum())
                signal += float(mean.abs().sum())
            else:
                for gram_sum, m in payload:
                    cov = (gram_sum - n * m @ m.T) * (b / (n - 1))
                    noise += float(torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().sum())
                    signal += float(torch.linalg.eigvalsh(m @ m.T).clamp_min(0).sqrt().sum())
        self.pending = []
        return noise**2 / max(signal**2, 1e-30)


def paper_hook(state: PaperState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    world = dist.get_world_size()
    if state.measuring:
        if state.norm == "l1":
            squares = buffer.float().square()
            work = dist.all_reduce(squares, async_op=True)
            state.pending.append(("l1", work, squares, buffer))
        else:
            grams, offset = [], 0
            for p in bucket.parameters():
                if id(p) in state.matrices:
                    g = as_matrix(buffer[offset : offset + p.numel()].view(p.shape)).float()
                    grams.append((g @ g.T, offset, p))
                offset += p.numel()
            if grams:
                flat = torch.cat([g.flatten() for g, _, _ in grams])
                work = dist.all_reduce(flat, async_op=True)
                state.pending.append(("nuclear", work, (flat, grams), buffer))
    buffer.div_(world)
    fut = dist.all_reduce(buffer, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


paper_hook.__annotations__ = {
    "state": PaperState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _unpack_paper(state: PaperState) -> None:
    # turn flat all-reduced Grams back into (gram_sum, mean matrix) pairs once they arrived
    unpacked = []
    for kind, work, payload, buffer in state.pending:
        if kind == "nuclear":
            work.wait()
            flat, grams = payload
            pairs, at = [], 0
            for g, offset, p in grams:
                size = g.numel()
                mean = as_matrix(buffer[offset : offset + p.numel()].view(p.shape)).float()
                pairs.append((flat[at : at + size].view_as(g), mean))
                at += size
            unpacked.append((kind, work, pairs, buffer))
        else:
            unpacked.append((kind, work, payload, buffer))
    state.pending = unpacked


# -- one configuration --------------------------------------------------------------------------


def build(kind: str, norm: str, interval: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    module = Llama(LlamaConfig(vocab_size=256, dim=args.dim, n_layers=args.layers,
                               n_heads=args.heads, max_seq_len=args.seq))  # fmt: skip
    ddp = DDP(module, bucket_cap_mb=args.bucket_mb)
    # Signum for both norms (the norm is explicit): torch.optim.Muon orthogonalises in bfloat16,
    # which takes seconds per step on CPU and would drown the measurement in optimizer time.
    opt = Signum(module.parameters(), lr=1e-4, momentum=0.9)
    cfg: dict[str, Any] = {"kind": kind, "norm": norm, "ddp": ddp, "opt": opt, "times": []}
    if kind == "ours":
        gns = GNSConfig.from_dict({"norm": norm, "interval": interval, "adapt_batch_size": False})
        cfg["monitor"] = attach(ddp, gns, opt, micro_batch_size=args.micro)
    elif kind == "paper":
        cfg["paper"] = PaperState(norm, module, args.micro)
        ddp.register_comm_hook(cfg["paper"], paper_hook)
    return cfg


def train_step(cfg: dict[str, Any], tokens: torch.Tensor, measuring: bool) -> None:
    ddp, opt = cfg["ddp"], cfg["opt"]
    if "paper" in cfg:
        cfg["paper"].measuring = measuring
    loss = torch.nn.functional.cross_entropy(
        ddp(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
    )
    loss.backward()
    if "paper" in cfg and measuring:
        _unpack_paper(cfg["paper"])
        cfg["paper"].finish()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=100, help="steps per config per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--norms", nargs="+", default=["l1", "nuclear"], choices=["l1", "nuclear"])
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    counter = ByteCounter()
    counter.install()

    variants = (("plain", 0), ("ours", 100), ("ours", 1), ("paper", 1))
    names = [(kind, norm, interval) for norm in args.norms for kind, interval in variants]
    configs = {n: build(*n, args) for n in names}
    gen = torch.Generator().manual_seed(rank)

    def batch() -> torch.Tensor:
        return torch.randint(0, 256, (args.micro, args.seq + 1), generator=gen)

    for name, cfg in configs.items():  # warm-up (DDP rebuilds its buckets after step 1)
        for _ in range(3):
            train_step(cfg, batch(), measuring=name[0] == "paper")
        if name[0] == "ours":  # realign so each timed window starts on a measuring step
            cfg["monitor"].controller.step = 0
            cfg["monitor"].arm()  # measuring steps are armed at the step boundary

    bytes_table: dict[str, tuple[int, float]] = {}
    for name, cfg in configs.items():
        if name[2] in (0, 1):  # one counted step: plain path for ours-at-plain, measuring else
            with counter.counting():
                train_step(cfg, batch(), measuring=True)
            total_handed = int(sum(counter.handed.values()))
            bytes_table[f"{name[0]} {name[1]}"] = (total_handed, sum(counter.received.values()))
            if name[0] == "ours":
                cfg["monitor"].controller.step = 0
                cfg["monitor"].arm()

    for _ in range(args.rounds):
        for name, cfg in configs.items():
            dist.barrier()
            start = time.perf_counter()
            for i in range(args.steps):
                train_step(cfg, batch(), measuring=name[0] == "paper" and i % name[2] == 0)
            dist.barrier()
            cfg["times"].append((time.perf_counter() - start) / args.steps)

    if rank != 0:
        dist.destroy_process_group()
        return
    params = sum(p.numel() for p in configs[names[0]]["ddp"].module.parameters())
    print(f"device=cpu, ranks={world} (gloo), torch {torch.__version__}, threads/rank="
          f"{torch.get_num_threads()}, Llama dim={args.dim} layers={args.layers} "
          f"seq={args.seq} micro-batch={args.micro}, {params / 1e6:.2f}M params, "
          f"{args.rounds} rounds x {args.steps} steps, median s/step")  # fmt: skip
    print("\n| config | s/step | ratio to plain DDP |\n|---|---|---|")
    for name, cfg in configs.items():
        t = statistics.median(cfg["times"])
        base = statistics.median(configs[("plain", name[1], 0)]["times"])
        label = f"{name[0]} {name[1]}" + (f" F={name[2]}" if name[0] != "plain" else "")
        print(f"| {label} | {t:.4f} | {t / base:.3f} |")

    # gradient bytes: what ours hands over on a plain step equals the gradient all-reduce
    grad_handed = sum(p.numel() * 4 for p in configs[names[0]]["ddp"].module.parameters())
    grad_received = 2 * (world - 1) / world * grad_handed
    print("\n| measuring step, extra bytes per rank | handed | received (ring model) |"
          " received / gradient all-reduce |\n|---|---|---|---|")  # fmt: skip
    for norm in args.norms:
        for kind in ("ours", "paper"):
            handed, received = bytes_table[f"{kind} {norm}"]
            extra_h, extra_r = handed - grad_handed, received - grad_received
            print(
                f"| {kind} {norm} | {extra_h:,} | {extra_r:,.0f} | {extra_r / grad_received:.3f} |"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_cleanly()  # exit 0 without gloo's teardown abort (nongns_dist.exit_cleanly)
