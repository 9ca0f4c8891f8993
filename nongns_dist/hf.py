"""Hugging Face Trainer: measure the noise scale and grow the batch with one call.

    trainer = Trainer(model=model, args=TrainingArguments(..., dataloader_drop_last=True),
                      train_dataset=dataset)
    nongns_dist.hf.attach(trainer, GNSConfig(norm="auto"))   # before trainer.train()
    trainer.train()                 # or trainer.train(resume_from_checkpoint=...)

The Trainer keeps its loop; what changes, in its terms:

- The batch. The decided count becomes ``args.gradient_accumulation_steps``, which the Trainer
  reads at every optimizer step. It decides a step by ``(step + 1) % count == 0`` with ``step``
  the micro-batch index in the epoch, so a new count ``k`` is exact only where that index is a
  multiple of ``k``; elsewhere an optimizer step would follow a ``no_sync`` micro-batch and the
  replicas would diverge. So a decision stays pending (the monitor keeps running the old count,
  measuring and deciding as usual) and takes effect at the first boundary where it is exact: a
  delay of at most ``k / gcd(k, old) - 1`` optimizer steps, and never past the epoch's end (a
  new epoch starts at index 0). Counts only grow. The epoch's last window can be shorter (the
  data ran out); the monitor counts it with its real micro-steps.
- The learning rate follows samples: after each step the scheduler stands where a run at the
  first batch would stand after the same samples (``samples / first batch`` steps), times the
  batch's lr multiplier. transformers' named schedules (``LambdaLR``) and DeepSpeed's own
  (``WarmupLR``, ``WarmupDecayLR``, ...) are followed; ``ReduceLROnPlateau`` is left alone (it
  does not count steps); any other scheduler is refused when training starts.
- The end: training stops once the samples reach ``max_steps x`` the first global batch (the
  samples the Trainer's arguments name; ``num_train_epochs`` ends it too), with the end-of-run
  save and evaluation a step-count stop would have.
- Logs: every training log (``trainer.log``, so every ``report_to`` backend) carries
  ``nongns/*``: the global batch, micro-steps and lr multiplier of the next step, the samples,
  a pending count, and the last measurement's noise scale (raw and pooled), noise and signal.
- Checkpoints: every checkpoint folder gets each rank's ``nongns_rank<r>.pt`` (the monitor's
  state with this rank's pooled moments, and where in the epoch the run stands), read back
  with ``weights_only=True``; ``trainer.train(resume_from_checkpoint=...)`` continues exactly:
  the same micro-batches, counts and learning rates as the uninterrupted run. The Trainer's
  own resume assumes a constant count (``global_step x count`` micro-batches); the epoch and
  the micro-batches to skip come from that file instead. Under DeepSpeed the checkpoint's files
  are first opened with ``weights_only=True`` (``nongns_dist.deepspeed.check_checkpoint``).

Engines: DDP (and one process, measuring with >= 2 micro-steps), FSDP2 (``fsdp_version: 2``) and
DeepSpeed (ZeRO 0-3), as accelerate prepares them for the Trainer (tested: DDP, one process and
ZeRO-2; accelerate turns FSDP on only for accelerators, so FSDP2 here is untested).
``config=None`` reads the DeepSpeed config's ``"nongns"`` section, else uses ``GNSConfig()``'s
defaults.

Refused with a ``ValueError`` naming the setting, at ``attach``: ``train_sampling_strategy=
"batch_rebalance"`` (it balances token cost across ranks within one fixed window),
``sync_each_batch=True`` (every micro-step reduces: no per-rank sample), ``auto_find_batch_size``
(it restarts training with another micro-batch), more than one GPU per process (DataParallel),
tensor/sequence-parallel loading by transformers, and a sized dataset whose last micro-batch
would be short (set ``dataloader_drop_last=True``): samples are counted in micro-batches.

Samples are examples. With a loss normalised by the tokens of the window
(``num_items_in_batch``), the per-rank gradient is a token mean, the example mean when every
example has the same number of label tokens.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from nongns_dist.accelerate import rank_state_file
from nongns_dist.capture.collectives import group_rank_and_size
from nongns_dist.config import GNSConfig, as_config
from nongns_dist.engines.core import StepCore, StepEvents

__all__ = ["TrainerDriver", "attach"]

logger = logging.getLogger("nongns_dist")

#: transformers' ``PREFIX_CHECKPOINT_DIR``: checkpoint folders are ``checkpoint-<global step>``.
_CHECKPOINT_PREFIX = "checkpoint"


def attach(trainer: Any, config: GNSConfig | Mapping[str, Any] | None = None) -> TrainerDriver:
    """Make ``trainer`` (a ``transformers.Trainer``, not yet trained) measure the noise scale and
    adapt its accumulation count; returns the driver (``driver.monitor`` is the monitor once
    ``trainer.train()`` has prepared the model). ``config``: a ``GNSConfig`` or a mapping of
    its fields; ``None`` reads the DeepSpeed config's ``"nongns"`` section, else the defaults.

        >>> driver = nongns_dist.hf.attach(trainer, {"norm": "auto", "interval": 50})
        >>> trainer.train()
        >>> driver.monitor.batch_size, driver.monitor.samples  # where the run ended
    """
    if getattr(trainer, "_nongns", None) is not None:
        raise RuntimeError("nongns_dist.hf.attach was already called on this trainer")
    section = _take_deepspeed_section(trainer)
    if config is None:
        config = section or GNSConfig()
    elif section is not None:
        logger.warning(
            "nongns_dist.hf.attach: the config argument is used; the DeepSpeed config's "
            "'nongns' section is not"
        )
    config = as_config(config, where="nongns_dist.hf.attach()")
    _refuse(trainer)
    _check_first_batch(trainer, config)
    driver = TrainerDriver(trainer, config)
    trainer._nongns = driver
    return driver


def _take_deepspeed_section(trainer: Any) -> GNSConfig | None:
    """The "nongns" section of the Trainer's DeepSpeed config (its own copy), validated and
    taken out: accelerate fills every ``"auto"`` value of that config from the Trainer's
    arguments and fails on one it does not know (``"norm": "auto"``)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    from nongns_dist.deepspeed import SECTION, read_section

    ds_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    section = read_section(ds_config)
    ds_config.pop(SECTION, None)
    return section


#: The Trainer's methods the driver wraps (transformers 5.23 to 5.25 have them all).
_WRAPPED = (
    "_init_training_state", "_prepare_for_training", "training_step", "get_batch_samples",
    "_save_checkpoint", "_get_output_dir", "log",
)  # fmt: skip


def _refuse(trainer: Any) -> None:
    """What the Trainer cannot do with a count that changes, said before training starts."""
    missing = [name for name in _WRAPPED if not callable(getattr(trainer, name, None))]
    if missing:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__}: the Trainer has no {', '.join(missing)}, "
            "which nongns_dist.hf follows (written against transformers 5.23 to 5.25)"
        )
    args = trainer.args
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        raise ValueError(
            "train_sampling_strategy='batch_rebalance' balances the padded-token cost of one "
            "fixed accumulation window across ranks; with a count that changes it would balance "
            "windows that are not the ones that run; allowed: 'random', 'sequential', "
            "'group_by_length'"
        )
    if trainer.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False):
        raise ValueError(
            "accelerator_config.gradient_accumulation_kwargs sync_each_batch=True reduces the "
            "gradient of every micro-step, so no rank keeps a per-rank sample of the window; "
            "allowed: sync_each_batch=False"
        )
    if args.auto_find_batch_size:
        raise ValueError(
            "auto_find_batch_size=True restarts training with a smaller micro-batch after an "
            "out-of-memory error, which the batch schedule and the samples counted so far do not "
            "follow; allowed: auto_find_batch_size=False (nongns_dist grows the batch with the "
            "accumulation count, the micro-batch stays)"
        )
    if args.n_gpu > 1:
        raise ValueError(
            f"{args.n_gpu} GPUs in one process (torch.nn.DataParallel): its replicas' gradients "
            "are summed inside the backward, so no per-rank sample exists; launch one process "
            "per GPU (torchrun, accelerate launch)"
        )
    if getattr(trainer, "is_distributed_loading_by_transformers", False):
        raise ValueError(
            "a model sharded by transformers at load time (tensor or sequence parallel): "
            "nongns_dist measures data-parallel replicas prepared by accelerate (DDP, FSDP2, "
            "DeepSpeed)"
        )
    dataset = trainer.train_dataset
    unit = args.per_device_train_batch_size * args.world_size
    sized = dataset is not None and hasattr(dataset, "__len__")
    if sized and not args.dataloader_drop_last and len(dataset) % unit:
        raise ValueError(
            f"{len(dataset)} training examples are not a multiple of per_device_train_batch_size "
            f"x ranks = {unit}: the epoch's last micro-batch would be short and its samples "
            "miscounted; allowed: dataloader_drop_last=True, or a multiple"
        )


def _check_first_batch(trainer: Any, config: GNSConfig) -> None:
    """The first batch is the Trainer's (micro-batch x ranks x gradient_accumulation_steps): the
    Trainer sizes its epochs from that count, so a config that names another is refused."""
    from nongns_dist.controller import BatchSizeController

    args = trainer.args
    try:
        BatchSizeController(
            config,
            micro_batch_size=args.per_device_train_batch_size,
            world_size=args.world_size,
            accumulation_steps=args.gradient_accumulation_steps,
        )
    except ValueError as exc:
        raise ValueError(
            f"{exc}; under the Trainer the first batch is per_device_train_batch_size x ranks x "
            "gradient_accumulation_steps: set gradient_accumulation_steps to match, or leave "
            "initial_batch_size unset"
        ) from exc


class TrainerDriver:
    """Keeps a Trainer's accumulation count, learning rate, end and checkpoints in step with
    the monitor. Built by ``attach``; it wraps a few of the trainer's methods (on the instance)
    and is one of its callbacks."""

    def __init__(self, trainer: Any, config: GNSConfig) -> None:
        from transformers import TrainerCallback

        self.trainer = trainer
        self.config = config
        #: The monitor (``GNSMonitor``, or the DeepSpeed engine's plugin) once training started.
        self.monitor: StepCore | None = None
        #: The count the Trainer runs (``args.gradient_accumulation_steps``), and a decided one
        #: waiting for a boundary where it is exact.
        self.applied = int(trainer.args.gradient_accumulation_steps)
        self.pending: int | None = None
        #: Where the run stands: the epoch and the micro-batches run in it.
        self.epoch = 0
        self.micro = 0
        self.steps_in_epoch: int | None = None  # micro-batches per epoch (None: not sized)
        #: Samples at which training stops (max_steps x the first global batch).
        self.budget: int | None = None
        self._user_count = self.applied
        self._resume: dict[str, Any] | None = None
        self._first_epoch = True
        self._scheduler: Any = None
        self._scheduler_in_engine = False
        self._measured: dict[str, float] = {}  # the last measurement's log scalars
        self._deepspeed = bool(getattr(trainer, "is_deepspeed_enabled", False))

        driver = self

        class _Callback(TrainerCallback):
            def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                driver._epoch_begins()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                driver._step_ends(args, state, control)

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                args.gradient_accumulation_steps = driver._user_count  # the user's arguments

        trainer.add_callback(_Callback())
        self._wrap()

    # -- the trainer's methods ------------------------------------------------------------------
    def _wrap(self) -> None:
        trainer = self.trainer
        init_state, prepare = trainer._init_training_state, trainer._prepare_for_training
        training_step, batch_samples = trainer.training_step, trainer.get_batch_samples
        save_checkpoint, log = trainer._save_checkpoint, trainer.log

        def _init_training_state(*args: Any, **kwargs: Any) -> tuple[int, int]:
            epochs, micro = init_state(*args, **kwargs)
            resume = kwargs.get("resume_from_checkpoint", args[3] if len(args) > 3 else None)
            return self._resumed(resume, epochs, micro)

        def _prepare_for_training(
            max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None
        ) -> Any:
            if resume_from_checkpoint is not None and self._deepspeed:
                self._check_deepspeed_checkpoint(resume_from_checkpoint)
            model, loader = prepare(max_steps, train_dataloader, resume_from_checkpoint)
            self._start(loader)
            return model, loader

        def _training_step(*args: Any, **kwargs: Any) -> Any:
            self.micro += 1  # before: under DeepSpeed the window closes inside this call
            return training_step(*args, **kwargs)

        def _get_batch_samples(*args: Any, **kwargs: Any) -> Any:
            batches, items = batch_samples(*args, **kwargs)
            self._window_fetched(len(batches))
            return batches, items

        def _save_checkpoint(model: Any, trial: Any) -> Any:
            folder = f"{_CHECKPOINT_PREFIX}-{trainer.state.global_step}"
            self._save(os.path.join(trainer._get_output_dir(trial=trial), folder))
            return save_checkpoint(model, trial)

        def _log(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if "loss" in logs and self.monitor is not None:  # a training log
                logs.update(self.log_scalars())
            return log(logs, *args, **kwargs)

        trainer._init_training_state = _init_training_state
        trainer._prepare_for_training = _prepare_for_training
        trainer.training_step = _training_step
        trainer.get_batch_samples = _get_batch_samples
        trainer._save_checkpoint = _save_checkpoint
        trainer.log = _log

    # -- start and resume -----------------------------------------------------------------------
    def _resumed(self, checkpoint: str | None, epochs: int, micro: int) -> tuple[int, int]:
        """Where a run resumed from ``checkpoint`` starts: (epoch, micro-batches to skip in it).
        The Trainer's own numbers assume a constant count; those of our file do not."""
        self._resume, self._first_epoch = None, True
        self.epoch, self.micro, self.pending = epochs, micro, None
        self.applied = self._user_count
        if checkpoint is None:
            return epochs, micro
        file = rank_state_file(checkpoint)
        if not os.path.exists(file):
            logger.warning(
                "nongns_dist: %s has no %s (a run without nongns_dist): the batch schedule "
                "starts again from the Trainer's count", checkpoint, os.path.basename(file),
            )  # fmt: skip
            return epochs, micro
        # weights_only: a checkpoint a user downloads cannot run code when it is opened
        state = torch.load(file, map_location="cpu", weights_only=True)
        world = group_rank_and_size(None)[1]
        if state["world_size"] != world:
            raise ValueError(
                f"{checkpoint} was written by {state['world_size']} ranks, this run has {world}: "
                "the Trainer's data order and the micro-batches to skip depend on it; resume on "
                "the same number of ranks"
            )
        position = state["driver"]
        self._resume = state
        self.epoch, self.micro = int(position["epoch"]), int(position["micro"])
        if position["epoch_done"]:
            self.epoch, self.micro = self.epoch + 1, 0
        if self.trainer.args.ignore_data_skip:
            self.micro = 0
        self.applied = int(position["applied"])
        self.pending = position["pending"]
        return self.epoch, self.micro

    def _check_deepspeed_checkpoint(self, checkpoint: str) -> None:
        from nongns_dist.deepspeed import check_checkpoint

        ds_config = self.trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        universal = bool(ds_config.get("checkpoint", {}).get("load_universal", False))
        check_checkpoint(checkpoint, None, universal=universal)

    def _start(self, loader: Any) -> None:
        """The model is prepared (DDP / FSDP2 / DeepSpeed engine): build the monitor."""
        if self.monitor is not None:
            raise RuntimeError(
                "trainer.train() ran before with nongns_dist attached; build a new Trainer and "
                "attach to it (the monitor follows one run)"
            )
        trainer, args = self.trainer, self.trainer.args
        micro_batch = int(args.per_device_train_batch_size)
        if self._deepspeed:
            from nongns_dist.engines.deepspeed import install

            monitor: StepCore = install(
                trainer.model_wrapped, self.config, micro_batch_size=micro_batch
            )
        else:
            from nongns_dist.engines.torch_native import attach as attach_model

            scaler = trainer.accelerator.scaler
            monitor = attach_model(
                trainer.model_wrapped,
                self.config,
                getattr(trainer.optimizer, "optimizer", trainer.optimizer),  # accelerate's wrapper
                micro_batch_size=micro_batch,
                accumulation_steps=self._user_count,  # attach checked it against the config
                grad_scaler=scaler if scaler is not None and scaler.is_enabled() else None,
            )
        self.monitor = monitor
        if self._resume is not None:
            monitor.load_state_dict(self._resume["monitor"])
            self._resume = None  # its pooled moments are the monitor's now
        self._set_count(self.applied)
        # read by _run_epoch at each update step (and, on a resume, for the ones already run)
        args.gradient_accumulation_steps = self.applied
        monitor.subscribe(self._closed)
        self.steps_in_epoch = len(loader) if hasattr(loader, "__len__") else None
        self.budget = int(trainer.state.max_steps) * monitor.controller.initial_batch_size
        self._scheduler = self._follow_samples()
        if self._scheduler_in_engine:  # the Trainer's own is placed as each step closes
            self._place_scheduler()
        self._measured = {}

    # -- the count ------------------------------------------------------------------------------
    def _set_count(self, count: int) -> None:
        monitor = self.monitor
        assert monitor is not None
        if monitor.accumulation_steps == count:
            return
        if hasattr(monitor, "set_accumulation_steps"):  # DeepSpeed: the engine's count too
            monitor.set_accumulation_steps(count)
        else:
            monitor.set_batch_size(count * monitor.controller.unit)

    def _apply(self, count: int) -> None:
        self.applied, self.pending = count, None
        self.trainer.args.gradient_accumulation_steps = count
        self._set_count(count)

    def _window_fetched(self, count: int) -> None:
        """The Trainer fetched the micro-batches of the next window: fewer than the count only at
        the epoch's end (the data ran out); that window is measured and counted as it runs."""
        if self.monitor is None or not 0 < count < self.applied:
            return
        self._set_count(count)
        self._place_scheduler()

    def _closed(self, events: StepEvents) -> None:
        """A step closed (inside the optimizer step): the next window's count."""
        target = max(events.decision.accumulation_steps, self.applied)  # counts never shrink
        changes = target != self.applied
        if changes and (self._epoch_done or self.micro % target == 0):
            self._apply(target)
        else:
            if changes and self.pending != target:
                logger.info(
                    "nongns_dist: step %d: %d micro-steps decided, pending: the Trainer is at "
                    "micro-batch %d of the epoch, not a multiple of %d; it takes effect at the "
                    "first boundary where it is (at most %d steps), or at the epoch's end",
                    events.step, target, self.micro, target,
                    target // math.gcd(target, self.applied) - 1,
                )  # fmt: skip
            self.pending = target if changes else None
            # the monitor runs what the Trainer runs: a count waits, or a short window ended
            self._set_count(self.applied)
        self._place_scheduler()
        if events.measured:  # the decision's own scalars are the applied ones (log_scalars)
            self._measured = {
                tag.replace("Train/", ""): value
                for tag, value, _ in events.scalars()
                if not tag.endswith(("global_batch", "accumulation_steps", "lr_multiplier"))
            }

    @property
    def _epoch_done(self) -> bool:
        """Whether the window that just closed was the epoch's last (the next starts at 0)."""
        return self.steps_in_epoch is not None and self.micro >= self.steps_in_epoch

    def _epoch_begins(self) -> None:
        if self._first_epoch:
            self._first_epoch = False  # a resumed run starts inside its epoch: micro is set
        else:
            self.epoch, self.micro = self.epoch + 1, 0
        if self.pending is not None and self.micro % self.pending == 0:
            self._apply(self.pending)  # index 0 of a new epoch: every count is exact
            self._place_scheduler()

    def _step_ends(self, args: Any, state: Any, control: Any) -> None:
        monitor = self.monitor
        if monitor is None or self.budget is None or monitor.samples < self.budget:
            return
        if not control.should_training_stop:  # what DefaultFlowCallback does at max_steps
            control.should_training_stop = True
            if args.save_strategy == "steps":
                control.should_save = True
            if (
                args.eval_strategy == "steps"
                and state.global_step % state.eval_steps != 0
                and args.eval_delay <= state.global_step
            ):
                control.should_evaluate = True

    # -- the learning rate ----------------------------------------------------------------------
    def _follow_samples(self) -> Any:
        """The scheduler whose position follows samples (None: nothing to follow)."""
        trainer = self.trainer
        # DeepSpeed steps a scheduler it was given (its config's) inside engine.step(); the
        # Trainer steps its own after the optimizer step, under DeepSpeed too
        scheduler = (
            getattr(trainer.model_wrapped, "lr_scheduler", None) if self._deepspeed else None
        )
        self._scheduler_in_engine = scheduler is not None
        if scheduler is None:
            scheduler = trainer.lr_scheduler
            scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
        if scheduler is None or type(scheduler).__name__ in ("ReduceLROnPlateau", "GreedyLR"):
            return None  # steps on metrics, not on steps
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return scheduler
        if hasattr(scheduler, "last_batch_iteration"):  # DeepSpeed's closed-form schedules
            return scheduler
        raise TypeError(
            f"lr scheduler {type(scheduler).__name__}: nongns_dist moves the schedule by samples "
            "(a larger batch takes fewer steps), which needs a schedule in closed form of the "
            "step; supported: transformers' named schedules (LambdaLR), DeepSpeed's (WarmupLR, "
            "WarmupDecayLR, WarmupCosineLR, OneCycle), ReduceLROnPlateau (left alone)"
        )

    def _place_scheduler(self) -> None:
        """Put the scheduler where a run at the first batch stands after the same samples: its
        next ``step()`` sets the lr of the next window. The Trainer steps its scheduler after
        the window closed; DeepSpeed steps its own inside ``engine.step()``, before the plugin
        closes the window, so there the window's samples are counted ahead."""
        monitor, scheduler = self.monitor, self._scheduler
        if monitor is None or scheduler is None:
            return
        samples = monitor.samples + (monitor.batch_size if self._scheduler_in_engine else 0)
        first = monitor.controller.initial_batch_size
        steps: float = samples // first if samples % first == 0 else samples / first
        if hasattr(scheduler, "last_batch_iteration"):
            scheduler.last_batch_iteration = steps - 2  # DeepSpeed: step n runs at n - 1
        else:
            scheduler.last_epoch = steps - 1

    # -- logs and checkpoints ---------------------------------------------------------------------
    def log_scalars(self) -> dict[str, float]:
        """What each training log gets: the next step's batch, micro-steps and lr multiplier,
        the samples, a pending count, and the last measurement (``StepEvents.scalars``)."""
        monitor = self.monitor
        assert monitor is not None
        scalars = {
            **self._measured,
            "nongns/global_batch": float(self.applied * monitor.controller.unit),
            "nongns/accumulation_steps": float(self.applied),
            "nongns/lr_multiplier": float(monitor.controller.lr_multiplier),
            "nongns/samples": float(monitor.samples),
        }
        if self.pending is not None:
            scalars["nongns/pending_accumulation_steps"] = float(self.pending)
        return scalars

    def state_dict(self) -> dict[str, Any]:
        monitor = self.monitor
        assert monitor is not None
        return {
            "monitor": monitor.state_dict(),
            "driver": {
                "epoch": self.epoch,
                "micro": self.micro,
                "epoch_done": self._epoch_done,
                "applied": self.applied,
                "pending": self.pending,
            },
            "world_size": monitor.world_size,
        }

    def _save(self, folder: str) -> None:
        if self.monitor is None:
            return
        os.makedirs(folder, exist_ok=True)
        torch.save(self.state_dict(), rank_state_file(folder))
