"""torch-native runtime: ``attach`` a monitor to a DDP model and drive accumulation on the fly.

    monitor = attach(ddp_model, GNSConfig(norm="auto", interval=100), optimizer,
                     micro_batch_size=8)
    while monitor.samples < budget:
        for micro in monitor.micro_steps():        # as many as the controller decided
            with micro:                            # no_sync() except on the last micro-step
                loss = loss_fn(ddp_model(x), y) / micro.loss_divisor
                loss.backward()
        optimizer.step()                           # runs with lr x multiplier, then the
        optimizer.zero_grad()                      # step closes: samples counted, batch decided

Decisions come only from all-reduced numbers, so every rank takes the same one
(``check_consistency=True`` verifies it with one tiny all-gather per step).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nongns_dist.capture.ddp import DDPCaptureState, gns_allreduce_hook
from nongns_dist.capture.statistics import Measurement, MeasurementPlan
from nongns_dist.config import GNSConfig
from nongns_dist.controller import BatchDecision, BatchSizeController, ControllerReadout
from nongns_dist.estimators import GNSEstimate
from nongns_dist.optim.geometry import parameter_norms
from nongns_dist.optim.lr import LRMultiplier

__all__ = ["GNSMonitor", "MicroStep", "attach"]

logger = logging.getLogger("nongns_dist")

_SUPPORTED = "torch.nn.parallel.DistributedDataParallel"


class MicroStep:
    """One micro-step of an optimizer step; ``with micro:`` enters ``no_sync`` unless last."""

    def __init__(
        self,
        model: DistributedDataParallel,
        index: int,
        accumulation_steps: int,
        *,
        sync_every_micro_step: bool = False,
    ) -> None:
        self.index = index
        self.accumulation_steps = accumulation_steps
        self.is_last = index == accumulation_steps - 1
        #: Divide the micro-batch mean loss by this so the step's gradient is a mean over the batch.
        self.loss_divisor = accumulation_steps
        self._context: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if self.is_last or sync_every_micro_step else model.no_sync()
        )

    def __enter__(self) -> MicroStep:
        self._context.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._context.__exit__(exc_type, exc, tb)


class GNSMonitor(ControllerReadout):
    """Measurement, controller and accumulation driver of one model. Build with ``attach``."""

    def __init__(
        self,
        model: DistributedDataParallel,
        config: GNSConfig,
        optimizer: torch.optim.Optimizer | None,
        *,
        micro_batch_size: int,
        accumulation_steps: int | None,
        process_group: dist.ProcessGroup | None,
    ) -> None:
        self.model = model
        self.config = config
        self.optimizer = optimizer
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.micro_batch_size = micro_batch_size
        self.controller = BatchSizeController(
            config,
            micro_batch_size=micro_batch_size,
            world_size=self.world_size,
            accumulation_steps=accumulation_steps,
        )
        self.last_estimate: GNSEstimate | None = None
        self.last_decision: BatchDecision | None = None
        self._pending: GNSEstimate | None = None  # measured in the step in flight
        self._micro_steps_run = 0

        self.plan = MeasurementPlan(
            _named_norms(model.module, optimizer, config.norm),
            self.world_size,
            dist.get_rank(process_group),
        )
        self.hook_state = DDPCaptureState(
            process_group,
            self.plan,
            measure_now=self._measure_now,
            make_measurement=self._new_measurement,
            on_estimate=self._on_estimate,
            layer_breakdown=config.layer_breakdown,
        )
        # Per-rank samples: one rank is one sample, and a variance needs two. Training still
        # runs (the driver, a constant batch); it is said once rather than failing mid-backward.
        self.can_measure = config.enabled and self.world_size >= 2
        if config.enabled and not self.can_measure:
            logger.warning(
                "nongns_dist: the noise scale needs >= 2 ranks under DDP (one sample per rank); "
                "with %d rank nothing is measured and the batch stays at %d",
                self.world_size,
                self.controller.batch_size,
            )
        if self.can_measure:
            model.register_comm_hook(self.hook_state, gns_allreduce_hook)
        self.lr_multiplier = LRMultiplier(optimizer) if optimizer is not None else None
        self._step_hook = (
            optimizer.register_step_post_hook(self._after_optimizer_step)
            if optimizer is not None
            else None
        )

    def micro_steps(self) -> Iterator[MicroStep]:
        """The micro-steps of the next optimizer step, with the count the controller decided."""
        accumulation = self.controller.accumulation_steps
        sync_all = self._needs_synced_first_step()
        for i in range(accumulation):
            self._micro_steps_run += 1
            yield MicroStep(self.model, i, accumulation, sync_every_micro_step=sync_all)

    def _needs_synced_first_step(self) -> bool:
        # torch's DDP with static_graph=True records the graph on its first iteration and hits an
        # internal assert if that iteration ran under no_sync (reproduced without this library).
        # So the first step syncs every micro-step: the same training gradient, but the buckets
        # then do not hold per-rank samples, and that step is not measured.
        return bool(getattr(self.model, "static_graph", False)) and self.controller.step == 0

    def _measure_now(self) -> bool:
        return (
            self.can_measure
            and self.controller.is_measurement_step
            and not self._needs_synced_first_step()
        )

    # -- measurement callbacks --------------------------------------------------------------------
    def _new_measurement(self) -> Measurement:
        return Measurement(
            self.plan,
            num_samples=self.world_size,
            sample_size=self.micro_batch_size * self.controller.accumulation_steps,
            bias_correction=self.config.bias_correction,
            sqrt_trace_method=self.config.sqrt_trace_method,
            sqrt_trace_tol=self.config.sqrt_trace_tol,
            group=self.process_group,
            centered_grams=True,  # DDP replicates the mean: Grams of deviations
        )

    def _on_estimate(self, estimate: GNSEstimate) -> None:
        if self._pending is not None:
            raise RuntimeError(
                "a measuring step ran more than one synchronised backward; run the micro-steps "
                "through monitor.micro_steps() so that all but the last use no_sync()"
            )
        self._pending = estimate

    # -- the step boundary ------------------------------------------------------------------------
    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step_done()

    def step_done(self) -> BatchDecision:
        """Close the optimizer step: count its samples, feed a measurement to the controller and
        apply its decision (accumulation count, lr multiplier). Called by the optimizer's step
        post-hook when ``attach`` got the optimizer; call it yourself otherwise."""
        estimate, self._pending = self._pending, None
        if estimate is not None:
            self.last_estimate = estimate
        decision = self.controller.update(estimate)
        if self.lr_multiplier is not None:
            self.lr_multiplier.value = decision.lr_multiplier
        if self.config.check_consistency:
            self._check_consistency(decision)
        if decision.changed:
            logger.info(
                "step %d: global batch -> %d (accumulation %d, lr x%.3f)",
                self.controller.step,
                decision.batch_size,
                decision.accumulation_steps,
                decision.lr_multiplier,
            )
        self.last_decision = decision
        self._micro_steps_run = 0
        return decision

    def _check_consistency(self, decision: BatchDecision) -> None:
        mine = torch.tensor(
            [decision.batch_size, self.controller.step, self.controller.samples,
             decision.lr_multiplier], dtype=torch.float64,
        )  # fmt: skip
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.process_group)
        if any(not torch.equal(mine, other) for other in everyone):
            raise RuntimeError(
                "ranks disagree on the batch decision [batch, step, samples, multiplier]: "
                f"{[t.tolist() for t in everyone]}"
            )

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "config": self.config.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        if self.lr_multiplier is not None:
            self.lr_multiplier.value = self.controller.lr_multiplier

    def detach(self) -> None:
        """Remove the optimizer hooks (DDP cannot unregister a comm hook: build a new DDP)."""
        if self.lr_multiplier is not None:
            self.lr_multiplier.remove()
        if self._step_hook is not None:
            self._step_hook.remove()


def _named_norms(
    module: nn.Module, optimizer: torch.optim.Optimizer | None, norm: str
) -> list[tuple[str, torch.Tensor, str | None]]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    norms = parameter_norms(optimizer, norm, [p for _, p in named])
    result: list[tuple[str, torch.Tensor, str | None]] = [(n, p, norms.get(p)) for n, p in named]
    if norm == "nuclear" and not any(k == "nuclear" for _, _, k in result):
        raise ValueError("norm='nuclear' needs at least one trainable parameter with >= 2 dims")
    if not any(k is not None for _, _, k in result):
        raise ValueError(f"norm={norm!r} leaves no trainable parameter to measure")
    return result


def attach(
    model: nn.Module,
    config: GNSConfig,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    micro_batch_size: int,
    accumulation_steps: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> GNSMonitor:
    """Measure the noise scale of ``model`` and adapt its batch; returns the ``GNSMonitor``.

    ``model``: a ``DistributedDataParallel``. ``optimizer``: needed for ``norm="auto"``; when
    given, its steps close the monitor's steps and receive the lr multiplier.
    ``micro_batch_size``: examples per rank per micro-step. ``accumulation_steps``: the initial
    count (else from ``config.initial_batch_size``, else 1).
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"attach() supports {_SUPPORTED}; got {type(model).__name__} "
            "(for DeepSpeed use nongns_dist.deepspeed.initialize)"
        )
    if getattr(model, "_nongns_monitor", None) is not None:
        raise RuntimeError("a GNSMonitor is already attached to this model")
    if process_group is None:
        process_group = model.process_group
    monitor = GNSMonitor(
        model,
        config,
        optimizer,
        micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps,
        process_group=process_group,
    )
    model._nongns_monitor = monitor  # type: ignore[assignment]
    return monitor
