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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# Run as a script (torchrun launch/train.py), Python puts launch/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch import checkpoints
from launch.checkpoints import (
    CheckpointError,
    load_rank_state,
    load_resume,
    rank_file,
    save_checkpoint,
)
from launch.cli import deepspeed_config, flag_defaults, gns_config, model_config, parse_args
from launch.data import (
    Corpus,
    batch_rng,
    build_stdlib_corpus,
    load_corpus,
    sample_windows,
    validation_windows,
)
from launch.llama import Block, Llama
from launch.metrics import RunLog, finite_or_none
from nongns_dist import (
    GNSEstimate,
    attach,
    exit_cleanly,
    warmup_cosine,
)
from nongns_dist.optim import Muon, SignSGD, Signum, muon_param_groups


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    wd = args.weight_decay
    if args.optimizer == "signum":
        return Signum(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)
    if args.optimizer == "signsgd":
        return SignSGD(model.parameters(), lr=args.lr, weight_decay=wd)
    if args.optimizer == "muon":
        return Muon(
            muon_param_groups(model),
            lr=args.lr,
            weight_decay=wd,
            ns_dtype=getattr(torch, args.ns_dtype),
            aux="adamw",
            aux_lr=args.aux_lr,
            aux_weight_decay=wd,
        )
    if args.optimizer == "specsgd":
        # nongns_dist.optim.SpecSGD takes matrices only; the hybrid without momentum is spectral
        # descent on hidden matrices and sign descent on embeddings, head and gains.
        return Muon(
            muon_param_groups(model),
            lr=args.lr,
            momentum=0.0,
            nesterov=False,
            weight_decay=wd,
            ns_dtype=getattr(torch, args.ns_dtype),
            aux="signum",
            aux_lr=args.aux_lr,
            aux_momentum=0.0,
            aux_weight_decay=wd,
        )
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)


# -- distributed setup ----------------------------------------------------------------------------


def init_distributed(args: argparse.Namespace) -> tuple[int, int, int]:
    """Join the launcher's group (env://): NCCL on CUDA, each process on the GPU of its local
    rank; gloo on the CPU. Returns (rank, world size, local rank)."""
    local = os.environ.get("LOCAL_RANK", args.local_rank)  # torchrun / deepspeed's --local_rank
    if local is None:
        raise SystemExit("train.py: error: no LOCAL_RANK: start with torchrun or deepspeed")
    backend = "gloo"
    if args.device == "cuda":
        # before the group: NCCL binds each rank's communicator to the current device
        torch.cuda.set_device(int(local))
        backend = "nccl"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
        # A torchrun restart (--max-restarts): the agent's store still holds the previous
        # attempt's addresses (gloo's; NCCL's unique id) under env://'s keys, and the new group
        # would connect to the dead ranks (pytorch/pytorch#135712). Each attempt gets its own
        # key prefix.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False
        )
        store = dist.PrefixStore(f"nongns_attempt_{restart}", agent_store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(local)


def training_device(args: argparse.Namespace) -> torch.device:
    """Where this process keeps its model and batches (after ``init_distributed``)."""
    if args.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


# -- loss and evaluation ---------------------------------------------------------------------------


def next_token_loss(model: nn.Module, tokens: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """Mean cross-entropy of (batch, seq + 1) tokens. Called on the engine's wrapper when
    training, so that its hooks (and the noise-scale capture in them) run. ``autocast``: the
    forward in bfloat16 autocast on the tokens' device; the loss is taken in float32."""
    precision = (
        torch.autocast(tokens.device.type, dtype=torch.bfloat16)
        if autocast
        else contextlib.nullcontext()
    )
    with precision:
        logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


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


def global_mean_and_any(value: torch.Tensor, flag: bool) -> tuple[float, bool]:
    """The mean of ``value`` (a 0-dim tensor on the training device) over ranks and whether any
    rank raised ``flag``: one all-reduce, on ``value``'s device, and one host sync."""
    totals = torch.stack([value.double(), value.new_tensor(float(flag), dtype=torch.float64)])
    dist.all_reduce(totals)
    return totals[0].item() / dist.get_world_size(), bool(totals[1] > 0)


# -- engines -------------------------------------------------------------------------------------


class DDPRuntime:
    """torch DDP with nongns_dist.attach: no_sync micro-steps, one optimizer.step(). The FSDP
    runtimes below change only how the model is wrapped, clipped and saved."""

    def __init__(self, args: argparse.Namespace, model: nn.Module) -> None:
        self.model = model
        self.device = training_device(args)  # the model is already there
        self.autocast = args.autocast == "bf16"
        self.grad_clip = args.grad_clip
        self.wrapped = self.wrap(args, model)
        # Built after wrapping: FSDP2 swaps the parameters for DTensors, FSDP1 for flat shards.
        self.optimizer = build_optimizer(args, self.wrapped)
        self.readout = attach(
            self.wrapped, gns_config(args), self.optimizer, micro_batch_size=args.micro_batch
        )
        # DDP's replicas are whole, so evaluation bypasses its hooks; FSDP's forward must gather.
        self.eval_model: nn.Module = model if isinstance(self.wrapped, DDP) else self.wrapped

    def wrap(self, args: argparse.Namespace, model: nn.Module) -> nn.Module:
        # One process: the plain module, which attach() measures from its micro-steps.
        if dist.get_world_size() == 1:
            return model
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def train_step(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device)
        for micro, tokens in zip(self.readout.micro_steps(), micro_batches, strict=True):
            with micro:  # no gradient sync on all but the last micro-step
                loss = next_token_loss(self.wrapped, tokens, self.autocast)
                (loss / micro.loss_divisor).backward()
            loss_sum += loss.detach()
        if self.grad_clip:
            self.clip_gradients()
        self.optimizer.step()  # also closes the monitor's step: samples counted, next batch set
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def clip_gradients(self) -> None:
        # FSDP2: DTensor gradients, whose norms clip_grad_norm_ reduces across the shards.
        torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.grad_clip)

    def full_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.model.state_dict(), self.optimizer.state_dict()

    def load_full_state(self, model: dict[str, Any], optimizer: dict[str, Any]) -> None:
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)

    def save(self, directory: Path, rank_state: dict[str, Any]) -> None:
        """Collective (FSDP gathers): rank 0 writes model.pt, every rank its rank file."""
        model, optimizer = self.full_state()
        if dist.get_rank() == 0:
            checkpoints.save_torch({"model": model, "optimizer": optimizer}, directory / "model.pt")
        rank_state = {**rank_state, "monitor": self.readout.state_dict()}  # with its pool
        checkpoints.save_torch(rank_state, rank_file(directory, dist.get_rank()))

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore model, optimizer and monitor; returns this rank's saved state."""
        # On the CPU whatever device wrote it: load_state_dict copies into this run's device
        # (the optimizer's state follows its parameters), so CUDA and CPU runs resume each other.
        state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        self.load_full_state(state["model"], state["optimizer"])
        rank_state = load_rank_state(directory)
        self.readout.load_state_dict(rank_state["monitor"])
        return rank_state


class FSDP2Runtime(DDPRuntime):
    """FSDP2 as torchtitan applies it: ``fully_shard`` on each transformer block, then the root.
    Saved as full (unsharded) state dicts in model.pt, the DDP layout."""

    #: Full state dicts on rank 0 only (on the CPU); the other ranks take part in the gathers.
    cpu_offload = True

    def wrap(self, args: argparse.Namespace, model: nn.Module) -> nn.Module:
        # fully_shard's default mesh is on the accelerator whenever one exists: name the device
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # in place: the root gathers what the blocks leave out
        return model

    def full_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # Collective: every rank takes part in the gathers. The model's keys are the plain
        # module's (Llama.load_state_dict takes them), the optimizer's parameter names.
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.cpu_offload)
        model = get_model_state_dict(self.wrapped, options=options)
        # get_optimizer_state_dict fills an empty state with a zero-lr optimizer.step() (not
        # counted by the monitor: no gradient was reduced); a stateless optimizer (signsgd) has
        # nothing to gather.
        optimizer = (
            get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
            if self.optimizer.state
            else {}
        )
        return model, optimizer

    def load_full_state(self, model: dict[str, Any], optimizer: dict[str, Any]) -> None:
        options = StateDictOptions(full_state_dict=True)  # every rank reads the whole file
        set_model_state_dict(self.wrapped, model, options=options)
        if optimizer:
            set_optimizer_state_dict(self.wrapped, self.optimizer, optimizer, options=options)


class FSDP1Runtime(FSDP2Runtime):
    """FSDP1: a FullyShardedDataParallel unit per transformer block under a root unit, with the
    original parameters (use_orig_params) for the optimizer; saved as FSDP2 is."""

    # Every rank gathers the full state dicts. FSDP1's CPU offload frees the storage it then
    # copies from when the parameters are already on the CPU (torch 2.13 FlatParamHandle.to_cpu:
    # .to("cpu") is a no-op, then the unsharded flat parameter is freed): a segfault.
    cpu_offload = False

    def wrap(self, args: argparse.Namespace, model: nn.Module) -> nn.Module:
        return FullyShardedDataParallel(
            model,
            sharding_strategy=ShardingStrategy[args.fsdp_strategy],
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            use_orig_params=True,
            device_id=self.device,
        )

    def clip_gradients(self) -> None:
        # Parameters are views of flat shards: only FSDP's own clip reduces the norm across them.
        assert isinstance(self.wrapped, FullyShardedDataParallel)
        self.wrapped.clip_grad_norm_(self.grad_clip)


class DeepSpeedRuntime:
    """A DeepSpeed engine from nongns_dist.deepspeed.initialize: the plugin counts the
    micro-steps of a plain engine(x) / backward / step stream and sets the accumulation."""

    def __init__(self, args: argparse.Namespace, model: nn.Module) -> None:
        self.device = training_device(args)
        self.autocast = args.autocast == "bf16"
        # DeepSpeed picks its accelerator once, at its first use: on the CPU (gloo) tell it, or
        # it would move the model to a GPU when it finds one. On CUDA it finds it itself.
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import nongns_dist.deepspeed as nds

        self.optimizer = build_optimizer(args, model)  # groups (and lrs) stay shared under ZeRO
        config = deepspeed_config(args, dist.get_world_size())
        self.engine, *_ = nds.initialize(model=model, optimizer=self.optimizer, config=config)
        self.zero_stage = int(config["zero_optimization"]["stage"])  # resuming checks it
        self.readout = self.engine.nongns
        self.eval_model = self.engine  # ZeRO-3 gathers its partitions in the engine's forward

    def train_step(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device)
        for tokens in micro_batches:
            loss = next_token_loss(self.engine, tokens, self.autocast)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation count
            self.engine.step()  # the last one of the step runs the optimizer
            loss_sum += loss.detach()
        return loss_sum

    def save(self, directory: Path, rank_state: dict[str, Any]) -> None:
        # The checkpoint directory is DeepSpeed's tag; the plugin adds its state to the
        # client_state and writes each rank's pooled moments beside DeepSpeed's files.
        # A write that fails inside save_checkpoint would leave this rank before DeepSpeed's
        # closing barrier while the others wait in it (a hang, seen on a full tmpfs): its
        # checkpoint engine's writes note their errors instead, raised after the barrier.
        engine, failures = self.engine.checkpoint_engine, []
        write = engine.save

        def noting_save(state_dict: Any, path: str) -> None:
            try:
                write(state_dict, path)
            except Exception as exc:
                # kept as text: the exception's frames hold torch's writer and its open file,
                # whose space a full disk needs back
                failures.append(f"writing {path}: {type(exc).__name__}: {exc}")

        engine.save = noting_save
        try:
            self.engine.save_checkpoint(
                str(directory.parent), tag=directory.name, save_latest=False
            )
        finally:
            engine.save = write
        if failures:
            raise RuntimeError(failures[0])
        checkpoints.save_torch(rank_state, rank_file(directory, dist.get_rank()))

    def load(self, directory: Path) -> dict[str, Any]:
        import nongns_dist.deepspeed as nds

        # DeepSpeed unpickles its files with weights_only=False: open them safely first (the
        # plugin's load checks too; this also covers an engine without it)
        nds.check_checkpoint(directory.parent, tag=directory.name)
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint to load there")
        return load_rank_state(directory)


# -- the loop ------------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM (a scheduler's preemption, torchrun stopping its workers) asks the run to stop:
    the loop checkpoints at the next step boundary and leaves with exit code 0. Every rank
    learns of it in the step's loss all-reduce, so they stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


RUNTIMES: dict[str, type[DDPRuntime] | type[DeepSpeedRuntime]] = {
    "ddp": DDPRuntime,
    "fsdp2": FSDP2Runtime,
    "fsdp1": FSDP1Runtime,
    "deepspeed": DeepSpeedRuntime,
}


def train(args: argparse.Namespace) -> None:
    """Run the job; the process group stays up for ``exit_cleanly`` unless the job failed."""
    rank, world, local_rank = init_distributed(args)
    try:
        _train(args, rank, world, local_rank)
    except BaseException:
        dist.destroy_process_group()
        raise


def _train(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> None:
    started = time.perf_counter()
    out = Path(args.out)
    stop = StopRequest()  # SIGTERM: checkpoint at the next step boundary, then leave
    corpus = load_data(args, local_rank)
    val_windows = validation_windows(
        corpus.val, args.seq_len, args.eval_batches * args.micro_batch
    ).to(training_device(args))

    # The same initial weights everywhere: DDP and DeepSpeed broadcast rank 0's, FSDP keeps
    # each rank's shard of its own copy, identical by the seed.
    # Built on the CPU, then moved: the same weights on every device.
    torch.manual_seed(args.seed)
    model = Llama(model_config(args, corpus.vocab_size)).to(training_device(args))
    n_params = sum(p.numel() for p in model.parameters())  # before FSDP or ZeRO-3 shard them
    try:
        runtime: DDPRuntime | DeepSpeedRuntime = RUNTIMES[args.engine](args, model)
    except (ValueError, NotImplementedError) as exc:
        # e.g. a norm that leaves no parameter to measure, or a --ds-config setting the
        # DeepSpeed plugin does not support (offload, DeepCompile, ...)
        raise SystemExit(f"train.py: error: {exc}") from exc
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

    log.say(
        f"{args.engine} on {args.device}"
        + (" (bf16 autocast)" if args.autocast == "bf16" else "")
        + f", world size {world}, {n_params / 1e6:.2f}M parameters, {args.optimizer} "
        f"lr {args.lr:g}, batch {args.batch_mode} from {args.initial_batch} (max "
        f"{args.max_batch}), budget {args.sample_budget} samples\ndata: {corpus.description}\n"
        f"run directory: {out}"
        + (f"\nresumed from {resume} at step {monitor.step}, batch {monitor.batch_size}"
           if resume else "")
    )  # fmt: skip
    bar = tqdm(
        total=args.sample_budget,
        initial=monitor.samples,
        unit="sample",
        disable=rank != 0,
        dynamic_ncols=True,
    )
    val_loss: float | None = None
    saved: Path | None = None
    while monitor.samples < args.sample_budget:
        # What this step runs with; the controller may change them when the step closes.
        step, batch_size = monitor.step, monitor.batch_size
        accumulation, multiplier = monitor.accumulation_steps, monitor.controller.lr_multiplier
        log.batch(step, batch_size)
        schedule = warmup_cosine(
            monitor.samples, args.sample_budget, warmup_fraction=args.warmup_fraction
        )
        for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
            group["lr"] = peak * schedule  # the library multiplies by sqrt(B/B0) during step()

        # the data position is the step: windows are drawn from (seed, rank, step)
        rng = batch_rng(args.seed, rank, step)
        windows = sample_windows(corpus.train, args.seq_len, accumulation * args.micro_batch, rng)
        windows = windows.to(runtime.device, non_blocking=True)  # from the CPU's generator
        before = monitor.last_estimate
        loss_sum = runtime.train_step(list(windows.split(args.micro_batch)))
        decision = monitor.last_decision
        assert decision is not None and monitor.step == step + 1  # set by the step that closed
        train_loss, stopping = global_mean_and_any(loss_sum / accumulation, stop.requested)

        record: dict[str, Any] = {
            "step": monitor.step,
            "samples": monitor.samples,
            "tokens": monitor.samples * args.seq_len,
            "batch_size": batch_size,
            "accumulation": accumulation,
            "lr": peak_lrs[0] * schedule * multiplier,
            "lr_multiplier": multiplier,
            "train_loss": train_loss,
        }
        estimate: GNSEstimate | None = monitor.last_estimate
        if estimate is not None and estimate is not before:  # this step measured
            # raw: this measurement alone; pooled: the noise the controller acts on
            pooled = estimate.pooled
            record |= {
                "gns_raw": finite_or_none(estimate.gns),
                "noise_raw": finite_or_none(estimate.noise),
                "signal": finite_or_none(estimate.signal),
                "gns_pooled": None if pooled is None else finite_or_none(pooled.gns),
                "noise_pooled": None if pooled is None else finite_or_none(pooled.noise),
                "target_batch_size": decision.target_batch_size,
            }
        done = monitor.samples >= args.sample_budget
        if done or (args.eval_every and monitor.step % args.eval_every == 0):
            val_loss = evaluate(runtime.eval_model, val_windows, args.micro_batch, runtime.autocast)
            record["val_loss"] = val_loss
        log.write(record)
        if decision.changed:
            log.say(
                f"step {monitor.step}: global batch {batch_size} -> {decision.batch_size} "
                f"(accumulation {decision.accumulation_steps}, lr x{decision.lr_multiplier:.3f})"
            )
        postfix = {"loss": f"{record['train_loss']:.3f}", "B": monitor.batch_size}
        if val_loss is not None:
            postfix["val"] = f"{val_loss:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(min(batch_size, bar.total - bar.n))  # the last batch may overshoot the budget
        every = args.checkpoint_every
        if done or stopping or (every and monitor.step % every == 0):
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
    if rank != 0:
        return
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


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
    exit_cleanly()  # the run is over, its files closed: exit 0 without gloo's teardown abort
