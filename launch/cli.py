"""The command line of launch/train.py: its flags, their checks, and the configs they build
(``gns_config``, ``deepspeed_config``, ``model_config``).

``parse_args`` refuses what would fail or do nothing later before any process group exists
(torchrun exports WORLD_SIZE first), so every rank stops with the same message: values out of
range, batch arithmetic, flags another engine or optimizer needs (``idle_flags``), and a
--resume that these flags cannot continue (``checkpoints.resume_point``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from launch.checkpoints import CheckpointError, resume_point
from launch.data import BYTE_VOCAB_SIZE
from launch.llama import LlamaConfig
from nongns_dist import GNSConfig
from nongns_dist.schedule import read_file

#: The engines, in --help's order (RUNTIMES maps each to its runtime).
ENGINES = ("ddp", "fsdp2", "fsdp1", "deepspeed")
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


#: --help's description: the first paragraph of train.py's docstring.
DESCRIPTION = (
    "Train a small Llama data-parallel, growing the global batch from the optimizer-geometry "
    "noise scale (nongns_dist, arXiv 2602.03001). CPU + gloo; no downloads: by default the "
    "corpus is the bytes of this machine's Python standard library. On a GPU machine (--device "
    "auto picks CUDA when torch finds it) each process drives the GPU of its LOCAL_RANK over NCCL."
)


# -- flags ----------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # A None default means "decided from other flags", which the help text says.
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # compare.py checks the flags it forwards by their full names
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
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
        "--batch-schedule",
        default=None,
        metavar="JSON",
        help="replay a learned schedule instead of deciding one: a file holding "
        '{"batch_schedule": [[samples, batch], ...]} (python -m nongns_dist.schedule '
        "METRICS --format nongns); the first batch is the initial batch, measurements are "
        "only logged",
    )
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
    if args.batch_schedule is not None:
        try:
            # lists, as trainer.json keeps them (a resume compares the flags)
            args.batch_schedule = [list(p) for p in read_file(args.batch_schedule)]
        except (OSError, ValueError) as exc:
            parser.error(f"--batch-schedule: {exc}")
        if args.batch_mode != "adaptive":
            parser.error("--batch-schedule moves the batch; --batch-mode constant keeps it")
        first = args.batch_schedule[0][1]
        if "initial_batch" in given_flags(argv) and args.initial_batch != first:
            parser.error(
                f"--initial-batch {args.initial_batch} differs from the first batch of "
                f"--batch-schedule ({first}): drop --initial-batch"
            )
        args.initial_batch = first
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


# -- the configs the flags build ---------------------------------------------------------------


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
        # (a replayed schedule names its own first batch; a resume restores the batch)
        initial_batch_size=None if args.batch_schedule else args.start_batch,
        batch_schedule=args.batch_schedule,
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
