"""The engine runtimes of launch/train.py: how its processes join (``init_distributed``), and how
each --engine wraps the model, builds the optimizer, runs an optimizer step over its
micro-batches and saves and loads its part of a checkpoint (layout: launch/checkpoints.py).

    ddp        DDPRuntime         torch DDP (one process: the plain module), nongns_dist.attach
    fsdp2      FSDP2Runtime       fully_shard on each transformer block and the root, attach
    fsdp1      FSDP1Runtime       FullyShardedDataParallel, a unit per block, attach
    deepspeed  DeepSpeedRuntime   a DeepSpeed engine from nongns_dist.deepspeed.initialize

Each holds ``readout`` (the noise-scale monitor: step, samples, batch, estimates),
``optimizer``, ``device``, ``eval_model`` and ``autocast``; ``train_step(micro_batches)`` runs
one optimizer step and returns the summed loss.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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

from launch import checkpoints
from launch.checkpoints import CheckpointError, load_rank_state, rank_file
from launch.cli import deepspeed_config, gns_config
from launch.llama import Block
from nongns_dist import attach
from nongns_dist.optim import Muon, SignSGD, Signum, muon_param_groups

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


# -- optimizer and loss ----------------------------------------------------------------------------


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


RUNTIMES: dict[str, type[DDPRuntime] | type[DeepSpeedRuntime]] = {
    "ddp": DDPRuntime,
    "fsdp2": FSDP2Runtime,
    "fsdp1": FSDP1Runtime,
    "deepspeed": DeepSpeedRuntime,
}
