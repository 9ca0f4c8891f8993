"""Benchmark: cost of nongns_dist under FSDP2, and its extra bytes against the paper's scheme.

    torchrun --standalone --nproc-per-node 2 launch/benchmarks/fsdp_overhead.py

The Llama of launch/llama.py, every block ``fully_shard``-ed and then the root, Signum for every
configuration (the norm is explicit). One job, configurations interleaved round by round (a
drift of the shared CPU hits all alike): plain FSDP2; ours (``attach``) at F = 100 and F = 1;
the paper's scheme (PAPER.md "Paper implementation") at F = 1 and F = 100, as its own custom
reduce-scatter and all-reduce hook on the same FSDP2 units:
* l1: an extra reduce-scatter of the element-wise squares of the local gradient, next to the
  gradient's own;
* nuclear: float32 Grams of every matrix all-reduced to all ranks, an all-gather of the mean
  gradient of the matrices, two eigendecompositions per matrix on every rank.
Every step is timed on its own, so the measuring steps of the F = 100 runs are told apart.

Bytes are counted by wrapping the torch.distributed collectives on one measuring step and one
plain step: "handed" = tensor bytes a rank passes in; "received" = a ring model of what each
rank receives: all-reduce 2(R-1)/R N, reduce-scatter (R-1)/R N of its input, all-gather
(R-1)/R N of its output. Extra = measuring step minus plain FSDP2 step, per (collective, dtype),
which names each term (FSDP2's own traffic is float32 all-gathers and reduce-scatters).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from launch.benchmarks.comm_bytes import ByteCounter, Bytes
from launch.llama import Llama, LlamaConfig
from nongns_dist import GNSConfig, attach, exit_cleanly
from nongns_dist.capture.fsdp2 import slot_width, unchunk
from nongns_dist.engines.torch_native import GNSMonitor
from nongns_dist.norms import as_matrix
from nongns_dist.optim import Signum

# -- counting bytes by wrapping the collectives ------------------------------------------------

#: What each extra (collective, dtype) of a measuring step is, in either scheme.
TERMS = {
    ("reduce-scatter", "float32"): "squares of the local gradient, reduce-scattered (float32)",
    ("reduce-scatter", "float64"): "Gram upper triangles to their owners (float64)",
    ("all-reduce", "float32"): "Grams all-reduced to every rank (float32)",
    ("all-gather", "float32"): "mean gradient of the matrices, all-gathered (float32)",
    ("all-reduce", "float64"): "partial sums, one all-reduce (float64)",
}

# -- the paper's scheme, as its own FSDP2 reduce-scatter + all-reduce hook ----------------------


class PaperScheme:
    """PAPER.md's FSDP implementation of the estimate: measures, feeds no controller.

    ``measuring`` is set by the driver before the backward of a measuring step; ``finish`` after
    it returns (noise, signal) of that step, the same on every rank."""

    def __init__(self, model: nn.Module, norm: str, micro_batch_size: int) -> None:
        self.norm = norm
        self.num_samples = dist.get_world_size()
        self.sample_size = micro_batch_size
        self.measuring = False
        self.step = 0
        self.partial = torch.zeros(2, dtype=torch.float64)  # sums of per-layer noise, signal
        for module in model.modules():
            if isinstance(module, FSDPModule):
                groups = module._get_fsdp_state()._fsdp_param_groups
                if groups:
                    comm = PaperReduceScatter(self, groups[0])
                    module.set_custom_reduce_scatter(comm)  # type: ignore[arg-type]
                    module.set_all_reduce_hook(comm.on_mean)

    def finish(self) -> tuple[float, float]:
        partial, self.partial = self.partial, torch.zeros(2, dtype=torch.float64)
        if self.norm == "l1":  # each rank summed its own chunks; nuclear: all ranks did all
            dist.all_reduce(partial)
        return float(partial[0]) ** 2, float(partial[1]) ** 2

    # -- l1 ----------------------------------------------------------------------------------
    def start_l1(self, local: torch.Tensor, group: dist.ProcessGroup) -> tuple[Any, ...]:
        squares = local.float().square()
        received = torch.empty(local.numel() // group.size(), device=local.device)
        work = dist.reduce_scatter_single(received, squares, group=group, async_op=True)
        return work, received, squares

    def finish_l1(self, mean: torch.Tensor, pending: tuple[Any, ...]) -> None:
        work, squares_sum, _ = pending
        work.wait()
        n, b = self.num_samples, self.sample_size
        var = ((squares_sum - n * mean.square()) * (b / (n - 1))).clamp_min(0)
        self.partial[0] += var.sqrt().sum(dtype=torch.float64)
        self.partial[1] += mean.abs().sum(dtype=torch.float64)

    # -- nuclear -----------------------------------------------------------------------------
    def start_nuclear(
        self, local: torch.Tensor, layout: list[tuple[Any, int, int]], group: Any
    ) -> tuple[Any, ...]:
        rows = local.view(group.size(), -1)
        grams = []
        for fsdp_param, start, width in layout:
            g = as_matrix(unchunk(rows[:, start : start + width], fsdp_param)).float()
            grams.append(g @ g.T)
        flat = torch.cat([g.flatten() for g in grams])
        work = dist.all_reduce(flat, group=group, async_op=True)
        return work, flat

    def finish_nuclear(
        self,
        mean: torch.Tensor,
        layout: list[tuple[Any, int, int]],
        group: dist.ProcessGroup,
        pending: tuple[Any, ...],
    ) -> None:
        shards = group.size()
        mine = torch.cat([mean[start : start + width] for _, start, width in layout])
        gathered = torch.empty(shards * mine.numel(), dtype=mine.dtype, device=mine.device)
        dist.all_gather_single(gathered, mine, group=group)
        gathered_rows = gathered.view(shards, -1)
        work, flat = pending
        work.wait()
        n, b = self.num_samples, self.sample_size
        at = column = 0
        for fsdp_param, _, width in layout:
            g = as_matrix(unchunk(gathered_rows[:, column : column + width], fsdp_param)).float()
            column += width
            m = g.shape[0]
            gram_sum = flat[at : at + m * m].view(m, m)
            at += m * m
            cov = (gram_sum - n * g @ g.T) * (b / (n - 1))
            self.partial[0] += torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().sum().double()
            self.partial[1] += torch.linalg.eigvalsh(g @ g.T).clamp_min(0).sqrt().sum().double()


class PaperReduceScatter:
    """One FSDP2 unit's reduce-scatter: FSDP's own, plus the paper's work on measuring steps."""

    def __init__(self, scheme: PaperScheme, param_group: Any) -> None:
        self.scheme = scheme
        self.param_group = param_group
        self.inner = param_group._reduce_scatter_comm
        self.pending: tuple[Any, ...] | None = None
        self.group: dist.ProcessGroup | None = None

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def _layout(self, numel: int, shards: int) -> list[tuple[Any, int, int]]:
        """(full size, start column, width) of each matrix in ``input.view(shards, -1)``."""
        layout, column = [], 0
        for fsdp_param in self.param_group.fsdp_params:  # every parameter has a gradient here
            if fsdp_param.fsdp_placement.dim != 0:
                raise NotImplementedError("the paper's scheme here handles Shard(0) only")
            width = slot_width(fsdp_param, shards)
            if len(fsdp_param._orig_size) == 2:
                layout.append((fsdp_param, column, width))
            column += width
        if column * shards != numel:
            raise RuntimeError(f"reduce-scatter layout: {numel} elements, {column * shards} known")
        return layout

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> Any:
        if self.scheme.measuring:
            self.group = group
            if self.scheme.norm == "l1":
                self.pending = self.scheme.start_l1(input_tensor, group)
            else:
                layout = self._layout(input_tensor.numel(), group.size())
                self.pending = self.scheme.start_nuclear(input_tensor, layout, group)
        return self.inner(
            output_tensor=output_tensor,
            input_tensor=input_tensor,
            group=group,
            op=op,
            async_op=async_op,
        )

    def on_mean(self, output: torch.Tensor) -> None:
        """All-reduce hook: ``output`` is this rank's shard of the mean (float32, op AVG)."""
        if self.pending is None or self.group is None:
            return
        pending, self.pending = self.pending, None
        if self.scheme.norm == "l1":
            self.scheme.finish_l1(output, pending)
        else:
            layout = self._layout(output.numel() * self.group.size(), self.group.size())
            self.scheme.finish_nuclear(output, layout, self.group, pending)


# -- one configuration --------------------------------------------------------------------------


@dataclass
class Run:
    kind: str  # plain, ours, paper
    norm: str
    interval: int  # F; 0 for plain
    model: nn.Module
    optimizer: torch.optim.Optimizer
    monitor: GNSMonitor | None = None
    paper: PaperScheme | None = None
    times: list[float] = field(default_factory=list)  # s per step, rank 0's clock
    measured: list[bool] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.kind == "plain":
            return "plain FSDP2"
        return f"{self.kind} {self.norm} F={self.interval}"

    def realign(self, step: int) -> None:
        """Make the next step number ``step`` of the measuring schedule."""
        if self.monitor is not None:
            self.monitor.controller.step = step
            self.monitor.arm()  # arming happens at a step's close: redo it for the new count
        if self.paper is not None:
            self.paper.step = step

    def will_measure(self) -> bool:
        if self.monitor is not None:
            return self.monitor.measuring
        if self.paper is not None:
            return self.paper.step % self.interval == 0
        return False


def build_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = Llama(
        LlamaConfig(
            vocab_size=256,
            dim=args.dim,
            n_layers=args.layers,
            n_heads=args.heads,
            max_seq_len=args.seq,
        )
    )
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def build(kind: str, norm: str, interval: int, args: argparse.Namespace, **gns: Any) -> Run:
    model = build_model(args)
    # Signum for both norms: torch.optim.Muon orthogonalises in bfloat16, seconds per step on CPU
    optimizer = Signum(model.parameters(), lr=1e-4, momentum=0.9)
    run = Run(kind, norm, interval, model, optimizer)
    if kind == "ours":
        config = GNSConfig(norm=norm, interval=interval, adapt_batch_size=False, **gns)  # type: ignore[arg-type]
        run.monitor = attach(model, config, optimizer, micro_batch_size=args.micro)
    elif kind == "paper":
        run.paper = PaperScheme(model, norm, args.micro)
    return run


def train_step(run: Run, tokens: torch.Tensor) -> bool:
    """One optimizer step; returns whether it measured."""
    measuring = run.will_measure()

    def backward() -> None:
        logits = run.model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()

    if run.monitor is not None:
        for micro in run.monitor.micro_steps():
            with micro:
                backward()
    else:
        if run.paper is not None:
            run.paper.measuring = measuring
        backward()
        if run.paper is not None:
            if measuring:
                run.paper.finish()
            run.paper.measuring = False
            run.paper.step += 1
    run.optimizer.step()  # ours: its post-hook closes the step (finish, arm the next)
    run.optimizer.zero_grad(set_to_none=True)
    return measuring


# -- reporting ------------------------------------------------------------------------------------


def _sanity(args: argparse.Namespace, batch: Callable[[], torch.Tensor]) -> list[str]:
    """Ours and the paper's scheme on one model, the same step: ours chains the paper's comm
    and hook, so both see the same local gradients. Bessel only (no c4 correction) in both."""
    lines = []
    for norm in args.norms:
        run = build("paper", norm, 1, args)
        config = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, bias_correction=False)
        run.monitor = attach(run.model, config, run.optimizer, micro_batch_size=args.micro)
        assert run.paper is not None
        run.paper.measuring = True
        tokens = batch()
        for micro in run.monitor.micro_steps():
            with micro:
                logits = run.model(tokens[:, :-1])
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), tokens[:, 1:].flatten()
                ).backward()
        paper_noise, paper_signal = run.paper.finish()
        run.optimizer.step()
        ours = run.monitor.last_estimate
        assert ours is not None
        lines.append(
            f"{norm}: ours noise {ours.noise:.6g} signal {ours.signal:.6g} B {ours.gns:.6g}; "
            f"paper noise {paper_noise:.6g} signal {paper_signal:.6g} "
            f"B {paper_noise / paper_signal:.6g}; "
            f"B ours / paper {ours.gns * paper_signal / paper_noise:.6f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per config per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--norms", nargs="+", default=["l1", "nuclear"], choices=["l1", "nuclear"])
    parser.add_argument("--paper-intervals", nargs="+", type=int, default=[1, 100])
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    counter = ByteCounter()
    counter.install()
    gen = torch.Generator().manual_seed(rank)

    def batch() -> torch.Tensor:
        return torch.randint(0, 256, (args.micro, args.seq + 1), generator=gen)

    runs = [build("plain", "-", 0, args)]
    for norm in args.norms:
        runs += [build("ours", norm, 100, args), build("ours", norm, 1, args)]
        runs += [build("paper", norm, f, args) for f in args.paper_intervals]

    for run in runs:  # warm-up (lazy init), then counted steps
        for _ in range(3):
            train_step(run, batch())
    counted: dict[str, tuple[bool, Bytes, Bytes]] = {}
    for run in runs:
        # F=1: a measuring step; F=100 one step after its measuring one: a plain step
        run.realign(1 if run.interval == 100 else 0)
        with counter.counting():
            measured = train_step(run, batch())
        counted[run.label] = (measured, counter.handed, counter.received)
        run.realign(0)

    for _ in range(args.rounds):
        for run in runs:
            # one untimed step after switching models (cold caches), then the window; it opens
            # on a measuring step, the only one of an F=100 run's window
            run.realign(max(run.interval - 1, 0))
            dist.barrier()
            train_step(run, batch())
            for _ in range(args.steps):
                start = time.perf_counter()
                run.measured.append(train_step(run, batch()))
                run.times.append(time.perf_counter() - start)
            dist.barrier()

    sanity = _sanity(args, batch)
    if rank != 0:
        dist.destroy_process_group()
        return
    report(runs, counted, sanity, args, world)
    dist.destroy_process_group()


def report(
    runs: list[Run],
    counted: dict[str, tuple[bool, Bytes, Bytes]],
    sanity: list[str],
    args: argparse.Namespace,
    world: int,
) -> None:
    model = runs[0].model
    shapes = Counter(tuple(p.shape) for p in model.parameters())  # DTensor: the global shape
    params = sum(math.prod(s) * k for s, k in shapes.items())
    print(f"command: torchrun --standalone --nproc-per-node {world} {' '.join(sys.argv)}")
    print(
        f"device=cpu, ranks={world} (gloo), torch {torch.__version__}, threads/rank="
        f"{torch.get_num_threads()}, FSDP2 (fully_shard per block + root), Llama dim={args.dim} "
        f"layers={args.layers} seq={args.seq} micro-batch={args.micro}, "
        f"{params / 1e6:.2f}M params, {args.rounds} rounds x {args.steps} steps, Signum"
    )
    print("parameter shapes: " + ", ".join(f"{k} x {s}" for s, k in sorted(shapes.items())))

    plain = statistics.median(runs[0].times)
    print(
        "\n| config | measuring / timed steps | median s/step | ratio to plain |"
        " median s, measuring steps | median s, other steps |\n|---|---|---|---|---|---|"
    )
    for run in runs:
        meas = [t for t, m in zip(run.times, run.measured, strict=True) if m]
        other = [t for t, m in zip(run.times, run.measured, strict=True) if not m]
        t = statistics.median(run.times)
        cells = [f"{statistics.median(x):.4f}" if x else "-" for x in (meas, other)]
        print(
            f"| {run.label} | {len(meas)} / {len(run.times)} | {t:.4f} | {t / plain:.3f} | "
            f"{cells[0]} | {cells[1]} |"
        )

    def median_of(label: str, measuring: bool) -> float | None:
        run = next((r for r in runs if r.label == label), None)
        if run is None:
            return None
        x = [t for t, m in zip(run.times, run.measured, strict=True) if m == measuring]
        return statistics.median(x) if x else None

    def amortised(label: str) -> str:
        # the F=100 run's own steps: 99 that do not measure, 1 that does
        measuring, other = median_of(label, True), median_of(label, False)
        if measuring is None or other is None:
            return "-"
        return f"{(99 * other + measuring) / 100 / plain - 1:+.2%}"

    print(
        "\n| norm | scheme | measuring step (F=1) / plain | ours / paper |"
        " amortised at F=100: (F=1 - plain) / 100 | from the F=100 run: (99 other + 1"
        " measuring) / 100 |\n|---|---|---|---|---|---|"
    )
    for norm in args.norms:
        ours = median_of(f"ours {norm} F=1", True)
        paper = median_of(f"paper {norm} F=1", True)
        for kind, measuring_step in (("ours", ours), ("paper", paper)):
            if measuring_step is None:
                continue
            versus = f"{ours / paper:.3f}" if kind == "ours" and ours and paper else ""
            print(
                f"| {norm} | {kind} | {measuring_step / plain:.3f} | {versus} | "
                f"{(measuring_step - plain) / 100 / plain:+.2%} | "
                f"{amortised(f'{kind} {norm} F=100')} |"
            )

    _, plain_handed, plain_received = counted["plain FSDP2"]
    grad_rs = plain_received[("reduce-scatter", "float32")]
    print(
        "\nplain FSDP2 step, bytes received per rank (ring model): "
        + ", ".join(f"{f} {d} {v:,.0f}" for (f, d), v in sorted(plain_received.items()))
        + f"; handed: {sum(plain_handed.values()):,.0f}"
    )

    def extra(label: str) -> tuple[bool, Bytes, Bytes]:
        """Bytes of this step beyond the plain FSDP2 step's, per (collective, dtype)."""
        measured, handed, received = counted[label]

        def minus(mine: Bytes, plain: Bytes) -> Bytes:
            keys = set(mine) | set(plain)
            diff = {k: mine.get(k, 0.0) - plain.get(k, 0.0) for k in keys}
            return {k: v for k, v in diff.items() if v}

        return measured, minus(handed, plain_handed), minus(received, plain_received)

    print(
        "\n| step | measured | extra handed | extra received (ring model) |"
        " received / gradient reduce-scatter |\n|---|---|---|---|---|"
    )
    for run in runs[1:]:
        measured, dh, dr = extra(run.label)
        print(
            f"| {run.label} | {'yes' if measured else 'no'} | {sum(dh.values()):,.0f} | "
            f"{sum(dr.values()):,.0f} | {sum(dr.values()) / grad_rs:.3f} |"
        )

    print(
        "\n| norm | term (extra per measuring step) | ours received | paper received |"
        " ours / paper |\n|---|---|---|---|---|"
    )
    for norm in args.norms:
        if f"paper {norm} F=1" not in counted:
            continue
        _, _, ours_bytes = extra(f"ours {norm} F=1")
        _, _, paper_bytes = extra(f"paper {norm} F=1")
        for key in sorted(set(ours_bytes) | set(paper_bytes)):
            a, b = ours_bytes.get(key, 0.0), paper_bytes.get(key, 0.0)
            ratio = f"{a / b:.3f}" if b else "-"
            print(f"| {norm} | {TERMS.get(key, ' '.join(key))} | {a:,.0f} | {b:,.0f} | {ratio} |")
        total_a, total_b = sum(ours_bytes.values()), sum(paper_bytes.values())
        print(f"| {norm} | **total** | {total_a:,.0f} | {total_b:,.0f} | {total_a / total_b:.3f} |")

    print("\nsanity: one step, both schemes on the same local gradients (Bessel only, no c4):")
    for line in sanity:
        print(f"  {line}")


if __name__ == "__main__":
    main()
    exit_cleanly()  # exit 0 without gloo's teardown abort (nongns_dist.exit_cleanly)
