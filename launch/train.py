"""Train a small Llama data-parallel, growing the global batch from the optimizer-geometry noise
scale (nongns_dist, arXiv 2602.03001). CPU + gloo; no downloads: by default the corpus is the
bytes of this machine's Python standard library. On a GPU machine (--device auto picks CUDA
when torch finds it) each process drives the GPU of its LOCAL_RANK over NCCL.

    torchrun --standalone --nproc-per-node 2 launch/train.py      # the default: ~2 min, 2 cores
    torchrun ... launch/train.py --optimizer adamw --batch-mode constant --initial-batch 32
    torchrun ... launch/train.py --engine fsdp2                   # fully_shard per block + root
    torchrun --standalone --nproc-per-node 8 launch/train.py --device cuda --autocast bf16
    torchrun ... launch/train.py --engine fsdp1 --fsdp-strategy SHARD_GRAD_OP
    torchrun ... launch/train.py --engine deepspeed --zero-stage 2  # DeepSpeed, ZeRO-2
    bash launch/deepspeed_launcher.sh --zero-stage 1              # DeepSpeed's own launcher
    bash launch/two_nodes_local.sh --sample-budget 2000           # two "nodes" on one machine

The run ends when --sample-budget samples are spent. The learning rate follows the samples seen
(linear warm-up over --warmup-fraction of the budget, then cosine to 0) times the batch
controller's multiplier sqrt(B/B0), which the library (``nongns_dist.attach`` for DDP, FSDP2
and FSDP1, ``nongns_dist.deepspeed.initialize`` for DeepSpeed) applies inside optimizer.step().
Outputs in --out: metrics.jsonl (one line per optimizer step), TensorBoard events when the
``tensorboard`` package is installed, checkpoints/ (step directories: launch/checkpoints.py;
--checkpoint-every, --resume, SIGTERM: README "Long runs") and summary.json.

This file is the job and its loop; the flags are launch/cli.py, the engines launch/runtimes.py,
saving and resuming launch/checkpoints.py, metrics.jsonl and TensorBoard launch/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

# Run as a script (torchrun launch/train.py), Python puts launch/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.checkpoints import load_resume, save_checkpoint
from launch.cli import flag_defaults, model_config, parse_args
from launch.data import (
    Corpus,
    batch_rng,
    build_stdlib_corpus,
    load_corpus,
    sample_windows,
    validation_windows,
)
from launch.llama import Llama
from launch.metrics import RunLog, step_record
from launch.runtimes import (
    RUNTIMES,
    DDPRuntime,
    DeepSpeedRuntime,
    init_distributed,
    next_token_loss,
    training_device,
)
from nongns_dist import StepEvents, exit_cleanly, warmup_cosine
from nongns_dist.controller import ControllerReadout


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


def train(args: argparse.Namespace) -> None:
    """Run the job; the process group stays up for ``exit_cleanly`` unless the job failed."""
    rank, world, local_rank = init_distributed(args)
    try:
        _train(args, rank, world, local_rank)
    except BaseException:
        dist.destroy_process_group()
        raise


def _train(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> None:
    """The job on this rank: data, runtime, the checkpoint to resume, then optimizer steps until
    the budget is spent (each logged, evaluated and checkpointed as the flags say), summary."""
    started = time.perf_counter()
    out = Path(args.out)
    stop = StopRequest()  # SIGTERM: checkpoint at the next step boundary, then leave
    corpus = load_data(args, local_rank)
    val_windows = validation_windows(
        corpus.val, args.seq_len, args.eval_batches * args.micro_batch
    ).to(training_device(args))
    runtime, n_params = build_runtime(args, corpus.vocab_size)
    monitor, optimizer = runtime.readout, runtime.optimizer
    peak_lrs = [group["lr"] for group in optimizer.param_groups]  # Muon's groups differ
    resume = Path(args.resume_from) if args.resume_from else None
    if resume is not None:
        # before the log: a bad checkpoint overwrites nothing
        resume = load_resume(runtime, args, world, flag_defaults())
        args.resume_from = str(resume)  # the one loaded: summary.json and later trainer.json
        if monitor.samples >= args.sample_budget:
            if rank == 0:
                print(f"{resume}: the run is complete ({monitor.samples} samples)", flush=True)
            return
    log = RunLog(out, enabled=rank == 0, resume=resume)
    log.say(describe_run(args, world, n_params, corpus, resume, monitor))
    bar = tqdm(
        total=args.sample_budget,
        initial=monitor.samples,
        unit="sample",
        disable=rank != 0,
        dynamic_ncols=True,
    )
    val_loss: float | None = None
    saved: Path | None = None
    closed: list[StepEvents] = []  # what each step that closes says about itself
    monitor.subscribe(closed.append)
    while monitor.samples < args.sample_budget:
        # What this step runs with; the controller may change them when the step closes.
        step, batch_size, accumulation = (
            monitor.step,
            monitor.batch_size,
            monitor.accumulation_steps,
        )
        log.batch(step, batch_size)
        schedule = set_lr(optimizer, peak_lrs, monitor.samples, args)
        micro_batches = step_batches(corpus, args, rank, step, accumulation, runtime.device)
        loss_sum = runtime.train_step(micro_batches)
        events = closed.pop()
        assert not closed and events.step == step + 1  # exactly this step closed
        decision = events.decision
        train_loss, stopping = global_mean_and_any(loss_sum / accumulation, stop.requested)

        lr = peak_lrs[0] * schedule * events.lr_multiplier
        record = step_record(events, args.seq_len, lr=lr, train_loss=train_loss)
        done = monitor.samples >= args.sample_budget
        if done or due(monitor.step, args.eval_every):
            val_loss = evaluate(runtime.eval_model, val_windows, args.micro_batch, runtime.autocast)
            record["val_loss"] = val_loss
        log.write(record)
        if decision.changed:
            log.say(
                f"step {monitor.step}: global batch {batch_size} -> {decision.batch_size} "
                f"(accumulation {decision.accumulation_steps}, lr x{decision.lr_multiplier:.3f})"
            )
        show_progress(bar, train_loss, batch_size, monitor.batch_size, val_loss)
        if done or stopping or due(monitor.step, args.checkpoint_every):
            saved = save_checkpoint(runtime, args, world)
        if stopping and not done:
            bar.close()
            log.close()
            log.say(
                f"SIGTERM: stopped after step {monitor.step} ({monitor.samples} samples), "
                f"checkpoint {saved}; continue with --resume {out} (or --resume auto)"
            )
            return
    bar.close()

    assert val_loss is not None and saved is not None  # the last step evaluates and saves
    log.close()
    if rank == 0:
        write_summary(args, world, n_params, corpus, monitor, log, val_loss, saved, started)


# -- the parts of the job, in the order it uses them -----------------------------------------------


class StopRequest:
    """SIGTERM (a scheduler's preemption, torchrun stopping its workers) asks the run to stop:
    the loop checkpoints at the next step boundary and leaves with exit code 0. Every rank
    learns of it in the step's loss all-reduce, so they stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


def load_data(args: argparse.Namespace, local_rank: int) -> Corpus:
    # One process per node builds the stdlib cache; the others wait, then read it. (Two nodes
    # sharing a file system both build; the cache's writes are atomic renames, so that is safe.)
    if args.data == "stdlib" and local_rank == 0:
        build_stdlib_corpus(args.corpus_dir, args.corpus_mb)
    dist.barrier()
    return load_corpus(
        args.data,
        cache_dir=args.corpus_dir,
        corpus_mb=args.corpus_mb,
        val_fraction=args.val_fraction,
        val_bin=args.val_bin,
    )


def build_runtime(
    args: argparse.Namespace, vocab_size: int
) -> tuple[DDPRuntime | DeepSpeedRuntime, int]:
    """The model on the training device in --engine's runtime, and its parameter count."""
    # The same initial weights everywhere: DDP and DeepSpeed broadcast rank 0's, FSDP keeps
    # each rank's shard of its own copy, identical by the seed.
    # Built on the CPU, then moved: the same weights on every device.
    torch.manual_seed(args.seed)
    model = Llama(model_config(args, vocab_size)).to(training_device(args))
    n_params = sum(p.numel() for p in model.parameters())  # before FSDP or ZeRO-3 shard them
    try:
        runtime: DDPRuntime | DeepSpeedRuntime = RUNTIMES[args.engine](args, model)
    except (ValueError, NotImplementedError) as exc:
        # e.g. a norm that leaves no parameter to measure, or a --ds-config setting the
        # DeepSpeed plugin does not support (offload, DeepCompile, ...)
        raise SystemExit(f"train.py: error: {exc}") from exc
    return runtime, n_params


def describe_run(
    args: argparse.Namespace,
    world: int,
    n_params: int,
    corpus: Corpus,
    resume: Path | None,
    monitor: ControllerReadout,
) -> str:
    """The run's opening lines: engine, model, optimizer, batch, data, where it writes."""
    return (
        f"{args.engine} on {args.device}"
        + (" (bf16 autocast)" if args.autocast == "bf16" else "")
        + f", world size {world}, {n_params / 1e6:.2f}M parameters, {args.optimizer} "
        f"lr {args.lr:g}, batch {args.batch_mode} from {args.initial_batch} (max "
        f"{args.max_batch}), budget {args.sample_budget} samples\ndata: {corpus.description}\n"
        f"run directory: {Path(args.out)}"
        + (f"\nresumed from {resume} at step {monitor.step}, batch {monitor.batch_size}"
           if resume else "")
    )  # fmt: skip


def set_lr(
    optimizer: torch.optim.Optimizer,
    peak_lrs: list[float],
    samples: int,
    args: argparse.Namespace,
) -> float:
    """Set each group's lr to its peak times the schedule at ``samples`` (linear warm-up, then
    cosine to 0 at the budget); returns the schedule's factor."""
    schedule = warmup_cosine(samples, args.sample_budget, warmup_fraction=args.warmup_fraction)
    for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
        group["lr"] = peak * schedule  # the library multiplies by sqrt(B/B0) during step()
    return schedule


def step_batches(
    corpus: Corpus,
    args: argparse.Namespace,
    rank: int,
    step: int,
    accumulation: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """This rank's micro-batches of ``step``, on ``device``."""
    # the data position is the step: windows are drawn from (seed, rank, step)
    rng = batch_rng(args.seed, rank, step)
    windows = sample_windows(corpus.train, args.seq_len, accumulation * args.micro_batch, rng)
    windows = windows.to(device, non_blocking=True)  # from the CPU's generator
    return list(windows.split(args.micro_batch))


def global_mean_and_any(value: torch.Tensor, flag: bool) -> tuple[float, bool]:
    """The mean of ``value`` (a 0-dim tensor on the training device) over ranks and whether any
    rank raised ``flag``: one all-reduce, on ``value``'s device, and one host sync."""
    totals = torch.stack([value.double(), value.new_tensor(float(flag), dtype=torch.float64)])
    dist.all_reduce(totals)
    return totals[0].item() / dist.get_world_size(), bool(totals[1] > 0)


def due(step: int, every: int) -> bool:
    """Whether an --eval-every or --checkpoint-every of ``every`` (0: off) falls on ``step``."""
    return bool(every and step % every == 0)


@torch.no_grad()
def evaluate(
    model: nn.Module, windows: torch.Tensor, micro_batch: int, autocast: bool = False
) -> float:
    """Mean loss over fixed validation windows (on the training device); the ranks split the
    micro-batches and sum.

    Every rank runs the same number of forwards (a rank short of one repeats a micro-batch and
    leaves it out of the sums): the forwards of FSDP and ZeRO-3 gather parameters collectively."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = windows.split(micro_batch)
    # loss sum, micro-batch count; on the device, where NCCL reduces it
    totals = torch.zeros(2, dtype=torch.float64, device=windows.device)
    for i in range(rank, -(-len(batches) // world) * world, world):
        loss = next_token_loss(model, batches[min(i, len(batches) - 1)], autocast)
        if i < len(batches):
            totals[0] += loss.double()  # float32 -> float64 is exact: as adding loss.item()
            totals[1] += 1.0
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def show_progress(
    bar: tqdm, train_loss: float, batch_size: int, next_batch: int, val_loss: float | None
) -> None:
    """The progress bar after a step that ran ``batch_size`` samples; the next runs
    ``next_batch``."""
    postfix = {"loss": f"{train_loss:.3f}", "B": next_batch}
    if val_loss is not None:
        postfix["val"] = f"{val_loss:.3f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(min(batch_size, bar.total - bar.n))  # the last batch may overshoot the budget


def write_summary(
    args: argparse.Namespace,
    world: int,
    n_params: int,
    corpus: Corpus,
    monitor: ControllerReadout,
    log: RunLog,
    val_loss: float,
    saved: Path,
    started: float,
) -> None:
    """Rank 0, at the end: summary.json and the closing lines."""
    out = Path(args.out)
    summary = {
        "final_val_loss": val_loss,
        "steps": monitor.step,
        "samples": monitor.samples,
        "tokens": monitor.samples * args.seq_len,
        "batch_trajectory": log.batch_trajectory,
        "wall_s": round(time.perf_counter() - started, 1),
        "engine": args.engine,
        "world_size": world,
        "parameters": n_params,
        "data": corpus.description,
        "resumed_from": args.resume_from,
        "args": vars(args),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"final validation loss {val_loss:.4f} after {monitor.step} steps, "
        f"{monitor.samples} samples ({monitor.samples * args.seq_len:,} tokens), "
        f"{summary['wall_s']} s\n"
        f"batch trajectory (step, global batch): {log.batch_trajectory}\n"
        f"outputs: {out}/metrics.jsonl, summary.json, checkpoint {saved}",
        flush=True,
    )


if __name__ == "__main__":
    main()
    exit_cleanly()  # the run is over, its files closed: exit 0 without gloo's teardown abort
