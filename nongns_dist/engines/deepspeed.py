"""The DeepSpeed plugin: accumulation counts on the fly with the user's loop unchanged.

    engine, optimizer, _, scheduler = nongns_dist.deepspeed.initialize(model=model, config=cfg, ...)
    for batch in micro_batches:               # a stream of micro-batches, as with DeepSpeed
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

``engine.set_train_batch_size`` alone gives wrong accumulation windows (its boundary is a global
modulo counter, DESIGN.md section 4). So the plugin counts micro-steps itself, marks the boundary
with ``set_gradient_accumulation_boundary`` before every backward, and changes the batch only at
a boundary (``set_train_batch_size`` then keeps DeepSpeed's loss division and sample count right).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from nongns_dist.capture.deepspeed import check_supported, install_capture
from nongns_dist.capture.statistics import Measurement, MeasurementPlan, SampleAccumulator
from nongns_dist.config import GNSConfig
from nongns_dist.controller import BatchDecision, BatchSizeController, ControllerReadout
from nongns_dist.estimators import GNSEstimate
from nongns_dist.optim.geometry import group_norms, parameter_norms
from nongns_dist.optim.lr import LRMultiplier

__all__ = ["DeepSpeedGNSPlugin"]

logger = logging.getLogger("nongns_dist")


def _basic_optimizer(engine: Any) -> torch.optim.Optimizer:
    # ZeRO wraps the user's (or DeepSpeed's) optimizer; the wrapper shares its param_groups
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer


def _module_groups(engine: Any) -> list[list[torch.Tensor]]:
    """Module parameters per optimizer group (ZeRO keeps them beside its flat partitions)."""
    for attr in ("bit16_groups", "fp16_groups"):
        groups = getattr(engine.optimizer, attr, None)
        if groups is not None:
            return [list(g) for g in groups]
    return [list(g["params"]) for g in _basic_optimizer(engine).param_groups]


def _named_norms(engine: Any, norm: str) -> list[tuple[str, torch.Tensor, str | None]]:
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if norm == "auto":
        per_param: dict[int, str | None] = {}
        for params, kind in zip(
            _module_groups(engine), group_norms(_basic_optimizer(engine)), strict=True
        ):
            for p in params:
                dims = len(getattr(p, "ds_shape", p.shape))
                per_param[id(p)] = kind if (kind != "nuclear" or dims >= 2) else None
        result = [(n, p, per_param.get(id(p))) for n, p in named]
    else:
        by_param = parameter_norms(None, norm, [p for _, p in named])
        result = [(n, p, by_param[p]) for n, p in named]
        if norm == "nuclear":  # ZeRO-3 parameters are empty placeholders: use their real shape
            result = [
                (n, p, "nuclear" if len(getattr(p, "ds_shape", p.shape)) >= 2 else None)
                for n, p, _ in result
            ]
    if not any(k is not None for _, _, k in result):
        raise ValueError(f"norm={norm!r} leaves no trainable parameter to measure")
    return result


class DeepSpeedGNSPlugin(ControllerReadout):
    """Measurement, batch controller and accumulation driver of one DeepSpeed engine."""

    def __init__(self, engine: Any, config: GNSConfig) -> None:
        check_supported(engine)
        self.engine = engine
        self.config = config
        self.world_size = int(engine.dp_world_size)
        self.micro_batch_size = int(engine.train_micro_batch_size_per_gpu())
        engine_acc = int(engine.gradient_accumulation_steps())
        self.controller = BatchSizeController(
            config,
            micro_batch_size=self.micro_batch_size,
            world_size=self.world_size,
            accumulation_steps=None if config.initial_batch_size else engine_acc,
        )
        if self.controller.accumulation_steps != engine_acc:
            engine.set_train_batch_size(self.controller.batch_size)
        self.plan = MeasurementPlan(
            _named_norms(engine, config.norm), self.world_size, dist.get_rank()
        )
        self.last_estimate: GNSEstimate | None = None
        self.last_decision: BatchDecision | None = None
        self.micro_step = 0  # index of the next micro-step within the optimizer step
        self._accumulator: SampleAccumulator | None = None
        self.sample_kind = install_capture(
            engine,
            self.plan,
            measuring=self._measuring,
            accumulation_steps=lambda: self.controller.accumulation_steps,
            add_sample=self._add_sample,
        )
        if self._num_samples() < 2:
            logger.warning(
                "nongns_dist: %d rank(s) with %s samples give fewer than the 2 samples a "
                "variance needs; nothing is measured while that holds",
                self.world_size,
                "per-rank" if self.sample_kind == "rank" else "per-micro-step",
            )
        self.lr_multiplier = LRMultiplier(_basic_optimizer(engine))
        self._wrap_engine()

    # -- measurement --------------------------------------------------------------------------
    def _measuring(self) -> bool:
        return self.controller.is_measurement_step and self._num_samples() >= 2

    def _num_samples(self) -> int:
        per_micro = self.sample_kind == "micro"
        return self.world_size * (self.controller.accumulation_steps if per_micro else 1)

    def _add_sample(self, tracked: Any, grad: torch.Tensor) -> None:
        if self._accumulator is None:
            acc = self.controller.accumulation_steps
            per_micro = self.sample_kind == "micro"
            measurement = Measurement(
                self.plan,
                num_samples=self._num_samples(),
                sample_size=self.micro_batch_size * (1 if per_micro else acc),
                bias_correction=self.config.bias_correction,
                sqrt_trace_method=self.config.sqrt_trace_method,
                sqrt_trace_tol=self.config.sqrt_trace_tol,
                group=None,
            )
            self._accumulator = SampleAccumulator(measurement)
        self._accumulator.add(tracked, grad)

    # -- the engine's loop ----------------------------------------------------------------------
    def _wrap_engine(self) -> None:
        engine = self.engine
        backward, step = engine.backward, engine.step
        save, load = engine.save_checkpoint, engine.load_checkpoint

        def wrapped_backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            is_last = self.micro_step == self.controller.accumulation_steps - 1
            engine.set_gradient_accumulation_boundary(is_last)
            return backward(loss, *args, **kwargs)

        def wrapped_step(*args: Any, **kwargs: Any) -> Any:
            boundary = self.micro_step == self.controller.accumulation_steps - 1
            estimate = None
            if boundary and self._accumulator is not None:
                # before the optimizer step: the statistics are of the raw, unclipped gradient
                estimate = self._accumulator.finish(layer_breakdown=self.config.layer_breakdown)
                self._accumulator = None
            result = step(*args, **kwargs)
            self.micro_step += 1
            if boundary:
                self._close_step(estimate)
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
            state["nongns"] = self.state_dict()
            return save(save_dir, tag, state, *a, **k)

        def wrapped_load(*args: Any, **kwargs: Any) -> Any:
            path, client_state = load(*args, **kwargs)
            if client_state and "nongns" in client_state:
                self.load_state_dict(client_state.pop("nongns"))
            return path, client_state

        engine.backward, engine.step = wrapped_backward, wrapped_step
        engine.save_checkpoint, engine.load_checkpoint = wrapped_save, wrapped_load

    def _close_step(self, estimate: GNSEstimate | None) -> None:
        if estimate is not None:
            self.last_estimate = estimate
        decision = self.controller.update(estimate)
        self.micro_step = 0
        if decision.accumulation_steps != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(decision.batch_size)
        self.lr_multiplier.value = decision.lr_multiplier
        self.last_decision = decision
        if self.config.check_consistency:
            mine = torch.tensor([decision.batch_size, self.controller.samples], dtype=torch.float64)
            everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(everyone, mine)
            if any(not torch.equal(mine, other) for other in everyone):
                raise RuntimeError(f"ranks disagree on [batch, samples]: {everyone}")
        self._log(estimate, decision)

    def _log(self, estimate: GNSEstimate | None, decision: BatchDecision) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if dist.get_rank() != 0 or monitor is None or not getattr(monitor, "enabled", False):
            return
        x = self.controller.samples
        events = [
            ("Train/nongns/global_batch", decision.batch_size, x),
            ("Train/nongns/accumulation_steps", decision.accumulation_steps, x),
            ("Train/nongns/lr_multiplier", decision.lr_multiplier, x),
        ]
        if estimate is not None and estimate.is_finite:
            events += [
                ("Train/nongns/gns", estimate.gns, x),
                ("Train/nongns/noise", estimate.noise, x),
                ("Train/nongns/signal", estimate.signal, x),
            ]
        monitor.write_events(events)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "micro_step": self.micro_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.micro_step = int(state["micro_step"])
        if self.engine.gradient_accumulation_steps() != self.controller.accumulation_steps:
            self.engine.set_train_batch_size(self.controller.batch_size)
        self.lr_multiplier.value = self.controller.lr_multiplier

    def set_accumulation_steps(self, accumulation_steps: int) -> None:
        """Override the count for the next optimizer step (at a boundary only). For tests and
        for resuming a run by hand; the controller keeps deciding afterwards."""
        if self.micro_step != 0:
            raise RuntimeError("the accumulation count can change only at a step boundary")
        self.controller.batch_size = accumulation_steps * self.controller.unit
        self.engine.set_train_batch_size(self.controller.batch_size)
