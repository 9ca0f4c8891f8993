"""The DeepSpeed plugin: accumulation counts on the fly with the user's loop unchanged.

    engine, optimizer, _, scheduler = nongns_dist.deepspeed.initialize(model=model, config=cfg, ...)
    for batch in micro_batches:               # a stream of micro-batches, as with DeepSpeed
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

``engine.set_train_batch_size`` alone gives wrong accumulation windows (its boundary is a global
modulo counter, DESIGN.md section 4). So the plugin counts micro-steps itself, where backward
happens, marks the boundary with ``set_gradient_accumulation_boundary`` before every backward,
and changes the batch only at a boundary (``set_train_batch_size`` then keeps DeepSpeed's loss
division and sample count right). The window closes at the first ``engine.step()`` after its
last backward: a loop that steps after every micro-step (DeepSpeed's own) and one that steps
once per window (accelerate, the Trainer) are both followed. ``engine.backward(loss,
scale_wrt_gas=False)`` (DeepSpeed does not divide the loss by the count: the driver did) is read
per backward: the fp16 loss scale the backward applied is then the scale alone.

fp16: statistics are divided by the loss scale the window's backward passes ran with, and a step
whose update DeepSpeed skipped (overflow: ``engine.was_step_applied()`` is False) is closed as
skipped: its samples counted, not measured, the next window as decided.

``engine.load_checkpoint`` first opens the checkpoint's files with ``weights_only=True``
(``nongns_dist.deepspeed.check_checkpoint``): DeepSpeed's own load unpickles them without
restriction, so a crafted file would run code.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from nongns_dist.capture.deepspeed import DeepSpeedCapture, basic_optimizer, loss_scale
from nongns_dist.config import GNSConfig
from nongns_dist.deepspeed import check_checkpoint
from nongns_dist.engines.core import StepCore, StepEvents

__all__ = ["DeepSpeedGNSPlugin", "install"]

logger = logging.getLogger("nongns_dist")


class DeepSpeedGNSPlugin(StepCore):
    """Measurement, batch controller and accumulation driver of one DeepSpeed engine."""

    def __init__(self, engine: Any, config: GNSConfig) -> None:
        self.engine = engine
        capture = DeepSpeedCapture(engine)
        engine_acc = int(engine.gradient_accumulation_steps())
        self._loss_grad: torch.Tensor | None = None  # d(what backward ran on) / d(user's loss)
        self.micro_step = 0  # backward passes run in the optimizer step so far
        self._loss_divided = True  # whether DeepSpeed divided the last backward's loss
        super().__init__(
            config,
            capture,
            micro_batch_size=int(engine.train_micro_batch_size_per_gpu()),
            # the config names the first batch (its own, or its schedule's), else the engine's
            accumulation_steps=(
                None if config.initial_batch_size or config.batch_schedule else engine_acc
            ),
            norm_optimizer=None,  # the capture reads DeepSpeed's own optimizer
            lr_optimizer=basic_optimizer(engine),
            on_events=self._write_events,
        )
        self.capture: DeepSpeedCapture = capture
        self.sample_kind = capture.sample_kind
        if self.controller.accumulation_steps != engine_acc:
            engine.set_train_batch_size(self.controller.batch_size)
        if engine.fp16_enabled() and self.session is not None:
            self.session.loss_scale = self._applied_loss_scale
        self._wrap_engine()
        self.start()

    # -- the engine's loop ----------------------------------------------------------------------
    def _wrap_engine(self) -> None:
        engine = self.engine
        backward, step = engine.backward, engine.step
        save, load = engine.save_checkpoint, engine.load_checkpoint

        def wrapped_backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            accumulation = self.controller.accumulation_steps
            if self.micro_step >= accumulation:
                raise RuntimeError(
                    f"engine.backward after the {accumulation} micro-steps of this optimizer step "
                    "without engine.step(): the window is full (the plugin decided "
                    f"{accumulation} micro-steps; read engine.nongns.accumulation_steps)"
                )
            engine.set_gradient_accumulation_boundary(self.micro_step == accumulation - 1)
            # scale_wrt_gas=False: DeepSpeed does not divide this loss by the count
            self._loss_divided = bool(kwargs.get("scale_wrt_gas", True))
            if self.measuring and engine.fp16_enabled() and loss.requires_grad:
                loss.register_hook(self._keep_loss_grad)
            result = backward(loss, *args, **kwargs)
            self.micro_step += 1
            return result

        def wrapped_step(*args: Any, **kwargs: Any) -> Any:
            # the window's last backward has run: before the optimizer step, statistics of the
            # raw, unclipped gradient
            boundary = self.micro_step == self.controller.accumulation_steps
            if boundary:
                self.capture.flush()
            result = step(*args, **kwargs)
            if boundary:
                self.micro_step = 0
                # False after an fp16 overflow: DeepSpeed zeroed the gradients, kept the weights
                self.close_step(applied=bool(engine.was_step_applied()))
                if self.controller.accumulation_steps != engine.gradient_accumulation_steps():
                    engine.set_train_batch_size(self.controller.batch_size)
            return result

        def wrapped_save(save_dir: str, tag: Any = None, client_state: Any = None, *a: Any,
                         **k: Any) -> Any:  # fmt: skip
            if self.micro_step != 0:
                raise RuntimeError(
                    f"save_checkpoint between micro-steps ({self.micro_step} of "
                    f"{self.controller.accumulation_steps} done): DeepSpeed does not save "
                    "accumulated gradients, so they would be lost; save after the step's last "
                    "engine.step() (engine.nongns.micro_step == 0)"
                )
            state = dict(client_state or {})
            # client_state is written once (by rank 0): the per-rank pool goes in its own file
            state["nongns"] = self.state_dict(include_pool=False)
            result = save(save_dir, tag, state, *a, **k)
            pool = self.session.pool_state() if self.session is not None else None
            if pool is not None:
                tag = tag if tag is not None else f"global_step{engine.global_steps}"
                torch.save(pool, self._pool_file(os.path.join(save_dir, str(tag))))
            return result

        load_signature = inspect.signature(load)

        def wrapped_load(*args: Any, **kwargs: Any) -> Any:
            # DeepSpeed unpickles the files without restriction: open them safely first
            given = load_signature.bind(*args, **kwargs).arguments
            check_checkpoint(
                given["load_dir"],
                given.get("tag"),
                universal=bool(engine.load_universal_checkpoint()),
            )
            path, client_state = load(*args, **kwargs)
            if client_state and "nongns" in client_state:
                self.load_state_dict(client_state.pop("nongns"))
                if path is not None and self.session is not None:
                    file = self._pool_file(os.path.dirname(path))
                    pool = (
                        torch.load(file, map_location="cpu", weights_only=True)
                        if os.path.exists(file)
                        else None
                    )
                    self.session.load_pool_state(pool)
            return path, client_state

        engine.backward, engine.step = wrapped_backward, wrapped_step
        engine.save_checkpoint, engine.load_checkpoint = wrapped_save, wrapped_load

    def _keep_loss_grad(self, grad: torch.Tensor) -> None:
        self._loss_grad = grad.detach()

    def _applied_loss_scale(self) -> float:
        """The fp16 loss scale this window's backward passes really applied. The optimizer's
        ``loss_scale`` is not always it: DeepSpeed 0.19.8 does not scale the loss at ZeRO stage
        0 (``engine.backward`` skips ``FP16_Optimizer``; deepspeedai/DeepSpeed#8393) while its
        optimizer reports 2^k. The gradient that reached the user's loss is scale / accumulation
        count (scale alone after ``scale_wrt_gas=False``); it is rounded to the loss's dtype, so
        it only picks between the two exact candidates (the optimizer's scale, or none)."""
        scale = loss_scale(self.engine)
        if self._loss_grad is None:
            return scale
        divisor = self.engine.gradient_accumulation_steps() if self._loss_divided else 1
        applied = float(self._loss_grad) * divisor
        return scale if abs(math.log(applied / scale)) < abs(math.log(applied)) else 1.0

    def _write_events(self, events: StepEvents) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if dist.get_rank() != 0 or monitor is None or not getattr(monitor, "enabled", False):
            return
        monitor.write_events(events.scalars())

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self, *, include_pool: bool = True) -> dict[str, Any]:
        return {**super().state_dict(include_pool=include_pool), "micro_step": self.micro_step}

    def _pool_file(self, tag_dir: str) -> str:
        """This rank's pooled moments, beside DeepSpeed's files of the tag (named by the global
        rank too: tensor- or pipeline-parallel peers share a data-parallel rank)."""
        session = self.session
        assert session is not None
        name = f"nongns_pool_rank{dist.get_rank()}_dp{session.rank}_of_{session.world_size}.pt"
        return os.path.join(tag_dir, name)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.micro_step = int(state["micro_step"])
        if self.engine.gradient_accumulation_steps() != self.controller.accumulation_steps:
            self.engine.set_train_batch_size(self.controller.batch_size)

    def set_accumulation_steps(self, accumulation_steps: int) -> None:
        """Override the count for the next optimizer step (at a boundary only); its lr
        multiplier follows. For tests and for resuming a run by hand; the controller keeps
        deciding afterwards."""
        if self.micro_step != 0:
            raise RuntimeError("the accumulation count can change only at a step boundary")
        self.set_batch_size(accumulation_steps * self.controller.unit)
        self.engine.set_train_batch_size(self.controller.batch_size)


def install(engine: Any, config: GNSConfig, *, micro_batch_size: int | None = None) -> Any:
    """Give a DeepSpeed engine that something else started (accelerate, the Trainer) its plugin,
    ``engine.nongns``; returns it. ``micro_batch_size``, when given, must be the engine's."""
    if not any(cls.__name__ == "DeepSpeedEngine" for cls in type(engine).__mro__):
        raise TypeError(f"under DeepSpeed, pass the prepared engine; got {type(engine).__name__}")
    if getattr(engine, "nongns", None) is not None:
        raise RuntimeError("this DeepSpeed engine already has a plugin (engine.nongns)")
    engine_micro = int(engine.train_micro_batch_size_per_gpu())
    if micro_batch_size is not None and engine_micro != micro_batch_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size}, but the DeepSpeed engine's "
            f"train_micro_batch_size_per_gpu is {engine_micro}; allowed: the same number"
        )
    engine.nongns = DeepSpeedGNSPlugin(engine, config)
    return engine.nongns
