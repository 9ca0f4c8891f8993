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
    resume_point,
    save_checkpoint,
)
from launch.data import (
    BYTE_VOCAB_SIZE,
    Corpus,
    batch_rng,
    build_stdlib_corpus,
    load_corpus,
    sample_windows,
    validation_windows,
)
from launch.llama import Block, Llama, LlamaConfig
from launch.metrics import RunLog, finite_or_none
from nongns_dist import (
    GNSConfig,
    GNSEstimate,
    attach,
    exit_cleanly,
    warmup_cosine,
)
from nongns_dist.optim import Muon, SignSGD, Signum, muon_param_groups

OPTIMIZERS = ("signum", "signsgd", "muon", "specsgd", "adamw", "sgd")
#: Peak learning rates for the default model (muon, specsgd: of the hidden-matrix group).
DEFAULT_LR = {
    "signum": 1e-3,
    "signsgd": 3e-4,
    "muon": 0.02,
    "specsgd": 0.02,
    "adamw": 3e-3,
    "sgd": 0.3,
}
#: Optimizers that orthogonalise whole matrices (Newton-Schulz): not on parameter shards.
MATRIX_OPTIMIZERS = ("muon", "specsgd")
#: The engines that hand the optimizer parameter shards.
FSDP_ENGINES = ("fsdp2", "fsdp1")


# -- command line -------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # A None default means "decided from other flags", which the help text says.
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # compare.py checks the flags it forwards by their full names
    )
    p.add_argument(
        "--engine",
        choices=tuple(RUNTIMES),
        default="ddp",
        help="data-parallel runtime: torch DDP, FSDP2 (fully_shard on each transformer block and "
        "the root) or FSDP1 (FullyShardedDataParallel, one unit per block), each with "
        "nongns_dist.attach; or a DeepSpeed engine from nongns_dist.deepspeed.initialize (config "
        "built from these flags, see --ds-config). fsdp1/fsdp2 refuse muon/specsgd",
    )
    p.add_argument(
        "--fsdp-strategy",
        choices=("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"),
        default=None,
        help="fsdp1: FSDP's sharding strategy (default FULL_SHARD; HYBRID_SHARD is not "
        "supported by nongns_dist)",
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help="deepspeed: ZeRO stage (default: --ds-config's, else 0); muon/specsgd need 0",
    )
    p.add_argument(
        "--ds-config",
        default=None,
        help="deepspeed: a JSON file with further DeepSpeed settings; the batch, optimizer, "
        "scheduler, gradient_clipping and nongns keys come from the flags and must not be in it",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: cuda when torch finds a CUDA device, else cpu. cuda: one GPU per process "
        "(LOCAL_RANK), NCCL; cpu: gloo",
    )
    p.add_argument(
        "--autocast",
        choices=("none", "bf16"),
        default="none",
        help="bf16: forward passes under torch.autocast(bfloat16), the loss in float32; "
        "parameters, gradients and the noise-scale statistics stay float32. Also on the CPU "
        "(slower there than float32: for checking a GPU run's numerics on a CPU)",
    )
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is used.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="signum",
        help="specsgd = Muon without momentum: spectral descent (Newton-Schulz) on hidden "
        "matrices, signSGD on the rest",
    )
    lrs = ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
    p.add_argument("--lr", type=float, default=None, help=f"peak lr (default: {lrs})")
    p.add_argument(
        "--aux-lr", type=float, default=3e-3, help="muon/specsgd: lr of non-matrix parameters"
    )
    p.add_argument(
        "--grad-clip",
        type=float,
        default=0.0,
        help="clip the global gradient norm to this before the optimizer step; 0: off (every "
        "engine; DeepSpeed's own default of 1.0 is overridden). The noise scale is measured "
        "on the unclipped gradients",
    )
    p.add_argument(
        "--ns-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="muon/specsgd: Newton-Schulz precision; bfloat16 is torch.optim.Muon's own step "
        "(GPUs), float32 the same update without the 12x+ bfloat16 matmul penalty of CPUs",
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="decoupled; SGD: L2 in the gradient"
    )

    gns = p.add_argument_group("noise scale and batch (nongns_dist.GNSConfig)")
    gns.add_argument(
        "--batch-mode",
        choices=("constant", "adaptive"),
        default="adaptive",
        help="constant still measures and logs the noise scale",
    )
    gns.add_argument(
        "--norm",
        choices=("l1", "l2", "nuclear", "auto"),
        default="auto",
        help="auto: the dual norm of the optimizer's geometry",
    )
    gns.add_argument(
        "--theta",
        type=float,
        default=None,
        help="target batch = noise / (theta^2 signal); default: the library's "
        f"{GNSConfig().theta} (the paper's 0.6 calibrated to the library's estimator), 0.6 with "
        "--estimator paper; the paper's l2 (Euclidean) value is 0.3",
    )
    gns.add_argument(
        "--estimator",
        choices=("pooled", "moments", "paper"),
        default="pooled",
        help="pooled: the level from a short EMA of each measurement's own noise, only the "
        "square root's bias from moments pooled over measurements, l1 with c4 (the library's "
        "default); moments: the moments themselves pooled (an earlier default, which lags in a "
        "live run: level_beta=None); paper: each measurement's noise, no c4, EMA of the noise "
        "(arXiv 2602.03001)",
    )
    gns.add_argument("--interval", type=int, default=10, help="measure every N optimizer steps")
    gns.add_argument(
        "--lr-scaling",
        choices=("sqrt", "linear", "none"),
        default="sqrt",
        help="lr multiplier as the batch grows from B0 to B: sqrt(B/B0), B/B0 or 1",
    )
    gns.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per micro-step")
    gns.add_argument("--initial-batch", type=int, default=8, help="global batch at the start")
    gns.add_argument("--max-batch", type=int, default=64, help="cap on the global batch; 0: none")
    gns.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.15,
        help="share of the budget for the lr warm-up; the batch may grow only after it",
    )

    run = p.add_argument_group("model and run")
    run.add_argument("--sample-budget", type=int, default=6144, help="sequences to train on")
    run.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    run.add_argument("--dim", type=int, default=128, help="model width")
    run.add_argument("--layers", type=int, default=4, help="transformer blocks")
    run.add_argument("--heads", type=int, default=4, help="attention heads")
    run.add_argument("--eval-every", type=int, default=50, help="optimizer steps; 0: at the end")
    run.add_argument("--eval-batches", type=int, default=16, help="micro-batches of validation")
    run.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    run.add_argument(
        "--out", default=None, help="run directory (default: runs/<engine>-<optimizer>-<mode>)"
    )

    ckpt = p.add_argument_group("checkpoints (README: Long runs)")
    ckpt.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save a checkpoint every N optimizer steps in <out>/checkpoints/ (0: only at the "
        "end and on SIGTERM)",
    )
    ckpt.add_argument(
        "--keep-checkpoints", type=int, default=2, help="keep the last K checkpoints; 0: all"
    )
    ckpt.add_argument(
        "--resume",
        default=None,
        help="continue from a checkpoint directory, or a run directory's latest; 'auto': "
        "--out's latest if there is one, else start fresh (for torchrun --max-restarts). "
        "Other ranks or micro-batch: the batch converts (README: Long runs)",
    )

    data = p.add_argument_group("data")
    data.add_argument(
        "--data", default="stdlib", help="'stdlib', a text file (bytes) or a uint16 .bin file"
    )
    data.add_argument("--corpus-mb", type=float, default=4.0, help="size cap of the stdlib corpus")
    data.add_argument("--corpus-dir", default="runs/corpus", help="cache of the stdlib corpus")
    data.add_argument("--val-bin", default=None, help="validation tokens for a .bin --data")
    data.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of a file")
    return p


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> argparse.Namespace:
    """Parse and check the flags; ``world_size`` defaults to torchrun's WORLD_SIZE (else 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # torchrun exports WORLD_SIZE before the processes start, so batch arithmetic is checked
    # here, before any process group exists, and every rank fails with the same message.
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    unit = args.micro_batch * world
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: torch finds no CUDA device (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); use --device cpu"
        )
    if world < 2 and args.engine in FSDP_ENGINES:
        parser.error(
            f"--engine {args.engine} shards across ranks and measures across them: launch 2 or "
            "more (torchrun --nproc-per-node 2 ...); one process runs with --engine ddp"
        )
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.theta is None:  # the paper's estimator keeps the paper's theta
        args.theta = PAPER_THETA if args.estimator == "paper" else GNSConfig().theta
    if args.out is None:
        args.out = f"runs/{args.engine}-{args.optimizer}-{args.batch_mode}"
    if args.max_batch < 0:
        parser.error(f"--max-batch must be >= 0 (0: no cap), got {args.max_batch}")
    for name in ("micro_batch", "sample_budget", "seq_len", "eval_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.grad_clip < 0:
        parser.error(f"--grad-clip must be >= 0 (0: off), got {args.grad_clip}")
    if args.sample_budget < args.initial_batch:
        parser.error(f"--sample-budget {args.sample_budget} < --initial-batch {args.initial_batch}")
    if not 0.0 <= args.warmup_fraction < 1.0:
        parser.error(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    if args.engine != "deepspeed" and (args.zero_stage is not None or args.ds_config):
        parser.error("--zero-stage and --ds-config need --engine deepspeed")
    if args.engine != "fsdp1" and args.fsdp_strategy is not None:
        parser.error("--fsdp-strategy needs --engine fsdp1 (fsdp2 always shards fully)")
    idle = idle_flags(args, given_flags(argv))
    if idle:
        parser.error("; ".join(idle) + ": drop " + ("it" if len(idle) == 1 else "them"))
    if args.engine == "fsdp1" and args.fsdp_strategy is None:
        args.fsdp_strategy = "FULL_SHARD"
    try:
        # before the configs: on a resume they start from its batch
        resume_point(args, world, flag_defaults())
    except (CheckpointError, ValueError) as exc:
        parser.error(str(exc))
    if args.resume_from is None and args.initial_batch % unit:
        parser.error(
            f"--initial-batch {args.initial_batch} is not a multiple of --micro-batch x world "
            f"size = {args.micro_batch} x {world} = {unit}"
        )
    if args.engine in FSDP_ENGINES and args.optimizer in MATRIX_OPTIMIZERS:
        parser.error(
            f"--optimizer {args.optimizer} cannot run under --engine {args.engine}: FSDP hands "
            "the optimizer shards of each matrix (FSDP2: DTensor rows, FSDP1: flat 1-D pieces), "
            "and Newton-Schulz orthogonalises whole matrices; use --engine ddp or --engine "
            "deepspeed --zero-stage 0"
        )
    if args.engine == "deepspeed":
        try:
            config = deepspeed_config(args, world)
        except ValueError as exc:
            parser.error(str(exc))
        stage = config["zero_optimization"]["stage"]
        if args.optimizer in MATRIX_OPTIMIZERS and stage != 0:
            parser.error(
                f"--optimizer {args.optimizer} needs --zero-stage 0 under DeepSpeed: ZeRO {stage} "
                "hands the optimizer flat 1-D partitions, and Muon orthogonalises whole matrices "
                "(DeepSpeed's own Muon under ZeRO: ds_configs/zero*_muon.json with "
                "nongns_dist.deepspeed.initialize in your own loop)"
            )
    if args.data != "stdlib" and not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file (or use 'stdlib')")
    if args.val_bin is not None and not args.data.endswith(".bin"):
        parser.error("--val-bin needs a .bin --data file")
    # The library and the model validate their own fields; their messages name field and value.
    try:
        gns_config(args)
        model_config(args, vocab_size=BYTE_VOCAB_SIZE)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def flag_defaults() -> dict[str, Any]:
    """Every flag's default by destination: a checkpoint saved before a flag existed ran with it
    (``checkpoints.check_checkpoint`` compares the flags)."""
    parser = build_parser()
    return {action.dest: parser.get_default(action.dest) for action in parser._actions}


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags the command line names, whatever their values (one given
    at its default value included): the parser again with every default suppressed."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def idle_flags(args: argparse.Namespace, given: set[str]) -> list[str]:
    """What the flags in ``given`` that would do nothing in this run need, one message each:
    a flag that is silently ignored hides a mistake (a Muon setting on an AdamW run, a corpus
    size for a file). --fsdp-strategy, --zero-stage and --ds-config are checked above them."""
    idle = []
    for flag in ("aux_lr", "ns_dtype"):
        if flag in given and args.optimizer not in MATRIX_OPTIMIZERS:
            idle.append(
                f"--{flag.replace('_', '-')} applies to --optimizer muon or specsgd only (their "
                f"non-matrix parameters, their Newton-Schulz), not {args.optimizer}"
            )
    euclidean = args.norm == "l2" or (args.norm == "auto" and args.optimizer == "sgd")
    if "estimator" in given and euclidean:
        norm = "--norm l2" if args.norm == "l2" else "--norm auto with --optimizer sgd (l2)"
        idle.append(
            f"--estimator chooses how l1 and nuclear noise is pooled and bias-corrected; {norm} "
            "is linear in the moments, never pooled and has no c4: both estimators are the same"
        )
    if args.data != "stdlib":
        idle += [
            f"--{flag.replace('_', '-')} applies to --data stdlib only, not --data {args.data}"
            for flag in ("corpus_mb", "corpus_dir")
            if flag in given
        ]
    if "val_fraction" in given and (args.data == "stdlib" or args.val_bin is not None):
        held_out = (
            "the stdlib corpus holds out whole files of its own"
            if args.data == "stdlib"
            else "--val-bin is the validation set"
        )
        idle.append(f"--val-fraction splits the tail of a --data file; {held_out}")
    return idle


#: The paper's theta, the default of --estimator paper (it was tuned with that estimator).
PAPER_THETA = 0.6


def gns_config(args: argparse.Namespace) -> GNSConfig:
    paper = args.estimator == "paper"
    return GNSConfig(
        adapt_batch_size=args.batch_mode == "adaptive",
        norm=args.norm,
        theta=args.theta,
        interval=args.interval,
        warmup_samples=int(args.warmup_fraction * args.sample_budget),
        # on a resume, the checkpoint's batch: loading its state restores the run's own B0
        initial_batch_size=args.start_batch,
        max_batch_size=args.max_batch or None,
        lr_scaling=args.lr_scaling,
        pool_moments=not paper,
        bias_correction=not paper,
        level_beta=None if args.estimator == "moments" else GNSConfig.level_beta,
    )


#: DeepSpeed config keys that train.py derives from its flags.
DS_OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "nongns",
)


def deepspeed_config(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: --ds-config's settings plus the batch and the "nongns"
    section from the flags. The optimizer is train.py's own (a client optimizer), so every
    --optimizer works at stage 0; the lr schedule is train.py's too."""
    config: dict[str, Any] = {}
    if args.ds_config is not None:
        try:
            config = json.loads(Path(args.ds_config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--ds-config {args.ds_config}: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"--ds-config {args.ds_config}: the JSON must be an object")
        owned = [k for k in DS_OWNED_KEYS if k in config]
        if owned:
            raise ValueError(
                f"--ds-config {args.ds_config} sets {owned}, which train.py derives from its "
                "flags (--micro-batch, --initial-batch, --optimizer, --lr, --grad-clip, the "
                "noise-scale flags); remove them from the file"
            )
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"--ds-config {args.ds_config}: zero_optimization must be an object")
    zero = dict(zero)
    file_stage = zero.get("stage")
    if file_stage is not None and (type(file_stage) is not int or not 0 <= file_stage <= 3):
        raise ValueError(
            f"--ds-config {args.ds_config}: zero_optimization.stage must be 0, 1, 2 or 3, "
            f"got {file_stage!r}"
        )
    if args.zero_stage is not None and file_stage not in (None, args.zero_stage):
        raise ValueError(
            f"--zero-stage {args.zero_stage} contradicts --ds-config's stage {file_stage}"
        )
    zero["stage"] = args.zero_stage if args.zero_stage is not None else (file_stage or 0)
    if zero["stage"] > 0:
        # ZeRO's list of "tested" optimizers is torch's and DeepSpeed's own; Signum updates
        # elementwise, so flat partitions are fine (tests/test_deepspeed.py runs it at 1-3).
        config.setdefault("zero_allow_untested_optimizer", True)
    return {
        **config,
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.start_batch // (args.micro_batch * world_size),
        "zero_optimization": zero,
        "gradient_clipping": args.grad_clip,  # DeepSpeed 0.19 clips at 1.0 unless told
        "nongns": gns_config(args).to_dict(),
    }


def model_config(args: argparse.Namespace, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.seq_len,
    )


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
