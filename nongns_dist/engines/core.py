"""The step boundary every engine shares: controller + measurement session + lr multiplier.

``StepCore.__init__`` is the one builder of those parts for every engine: the controller from
the config, the plan from the capture's view of the parameters, the session, the lr multiplier,
and the one "cannot measure" rule (a session that can never have the 2 samples a variance needs
is not built, and the batch stays constant; one that cannot at the starting count is said so).
An engine then sets up its own hooks and calls ``start()``, which installs the capture and arms
the first step.

An engine calls ``close_step()`` after each optimizer step (the samples of that step are
counted, a finished measurement is fed to the controller, the decision applied) and reads
``accumulation_steps`` for the next one. Measuring steps are armed here, at the boundary, so
a capture backend only asks ``session.armed``.

Bad numbers never move the batch: a step whose update was not applied (a loss scaler found an
overflow) is closed with ``applied=False``: its samples are counted, it is not measured (the
controller gets nothing, the pool keeps none of its moments) and ``skipped_steps`` counts it; a
measurement with non-finite values is rejected by the controller (``controller.skipped``). Both
follow from numbers every rank shares (the all-reduced gradient, the one all-reduce of the
statistics), so every rank closes the step the same way.

A failed measurement (an exception in one rank's measurement math) is no bad number: it raises
``MeasurementError`` on every rank when the session finishes. Engines finish it before the
optimizer applies the update (``finish_measurement``; the DeepSpeed capture finishes it in its
boundary ``flush``), so no rank applies an update after a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nongns_dist.capture.base import GradientCapture
from nongns_dist.capture.collectives import group_rank_and_size
from nongns_dist.capture.plan import MeasurementPlan
from nongns_dist.capture.session import MeasurementSession
from nongns_dist.config import GNSConfig
from nongns_dist.controller import BatchDecision, BatchSizeController, ControllerReadout
from nongns_dist.estimators import GNSEstimate
from nongns_dist.optim.lr import LRMultiplier

__all__ = ["Event", "StepCore", "StepEvents"]

logger = logging.getLogger("nongns_dist")

#: (tag, value, samples seen): a scalar in the form DeepSpeed's monitor (and TensorBoard) take.
Event = tuple[str, float, int]


@dataclass(frozen=True)
class StepEvents:
    """What one closed optimizer step did: the one record every engine hands to its event
    sinks (``attach(on_events=)``, ``StepCore.subscribe``), and what the main job's
    metrics.jsonl, TensorBoard and DeepSpeed's monitor are written from."""

    #: Optimizer steps closed so far, this one included.
    step: int
    #: Samples seen so far, this step's included.
    samples: int
    #: The global batch, micro-steps and lr multiplier this step ran with.
    batch_size: int
    accumulation_steps: int
    lr_multiplier: float
    #: Whether the optimizer applied the update (False: an fp16 overflow skipped it).
    applied: bool
    #: Whether this step measured: its estimate went to the controller (a non-finite one is
    #: measured and rejected there).
    measured: bool
    #: This step's measurement (``None`` unless ``measured``).
    estimate: GNSEstimate | None
    #: The decision taken at this boundary: what the next step runs with.
    decision: BatchDecision

    def scalars(self) -> list[Event]:
        """The decision, and the finite estimates of a measuring step, as monitor scalars."""
        x, decision, estimate = self.samples, self.decision, self.estimate
        events: list[Event] = [
            ("Train/nongns/global_batch", decision.batch_size, x),
            ("Train/nongns/accumulation_steps", decision.accumulation_steps, x),
            ("Train/nongns/lr_multiplier", decision.lr_multiplier, x),
        ]
        if estimate is not None and estimate.is_finite:
            events += [
                ("Train/nongns/gns_raw", estimate.gns, x),
                ("Train/nongns/noise_raw", estimate.noise, x),
                ("Train/nongns/signal", estimate.signal, x),
            ]
            pooled = estimate.pooled
            if pooled is not None and pooled.is_finite:
                events += [
                    ("Train/nongns/gns_pooled", pooled.gns, x),
                    ("Train/nongns/noise_pooled", pooled.noise, x),
                ]
        return events


class StepCore(ControllerReadout):
    """One copy of the step-closing logic for every engine (DDP, FSDP, DeepSpeed)."""

    def __init__(
        self,
        config: GNSConfig,
        capture: GradientCapture,
        *,
        micro_batch_size: int,
        accumulation_steps: int | None,
        norm_optimizer: torch.optim.Optimizer | None,
        lr_optimizer: torch.optim.Optimizer | None,
        on_events: Callable[[StepEvents], None] | None = None,
    ) -> None:
        """Build the parts from ``config`` and ``capture``: ``norm_optimizer`` is what
        ``norm="auto"`` reads the geometry from (None: the capture knows it, or no auto),
        ``lr_optimizer`` the optimizer the lr multiplier is put into (None: none)."""
        self.config = config
        self.capture = capture
        self.group = capture.group  # the data-parallel group: decisions are checked across it
        self.device = capture.device
        rank, self.world_size = group_rank_and_size(capture.group)
        self.micro_batch_size = micro_batch_size
        self.controller = controller = BatchSizeController(
            config,
            micro_batch_size=micro_batch_size,
            world_size=self.world_size,
            accumulation_steps=accumulation_steps,
        )
        self.plan = MeasurementPlan(
            capture.plan_entries(config.norm, norm_optimizer), self.world_size, rank
        )
        session = MeasurementSession(
            self.plan,
            config,
            group=capture.group,
            micro_batch_size=micro_batch_size,
            sample_kind=capture.sample_kind,
            device=capture.device,
        )
        #: Whether anything can ever be measured: >= 2 ranks with per-rank samples, or samples
        #: per micro-step. Training still runs without (the driver, a constant batch); it is
        #: said once rather than failing mid-backward.
        self.can_measure = config.enabled and session.can_ever_measure
        if config.enabled and not self.can_measure:
            logger.warning(
                "nongns_dist: the noise scale needs >= 2 ranks with per-rank samples; with %d "
                "rank nothing is measured and the batch stays at %d",
                self.world_size,
                controller.batch_size,
            )
        elif config.enabled and not session.can_measure(controller.accumulation_steps):
            logger.warning(
                "nongns_dist: %d rank(s) with per-micro-step samples: a variance needs 2, so "
                "steps with %d micro-step(s) are not measured (start from accumulation_steps "
                ">= 2)",
                self.world_size,
                controller.accumulation_steps,
            )
        #: None: nothing can be measured (the batch stays constant).
        self.session = session if self.can_measure else None
        self.lr_multiplier = LRMultiplier(lr_optimizer) if lr_optimizer is not None else None
        #: Called with each closed step's ``StepEvents``, in order of subscription.
        self.event_sinks: list[Callable[[StepEvents], None]] = []
        if on_events is not None:
            self.subscribe(on_events)
        #: This measurement's own estimate (what ``estimate_gns`` computes from its samples).
        self.last_estimate: GNSEstimate | None = None
        self.last_decision: BatchDecision | None = None
        #: Steps closed with ``applied=False`` (their update was skipped): counted, not measured.
        self.skipped_steps = 0
        #: Engines set this False for a step whose gradients are not per-sample (DDP's first
        #: static_graph step); checked when the step is armed.
        self.measuring_allowed: Callable[[], bool] = lambda: True
        if self.lr_multiplier is not None:
            self.lr_multiplier.value = controller.lr_multiplier

    def subscribe(self, sink: Callable[[StepEvents], None]) -> None:
        """Call ``sink`` with the ``StepEvents`` of every step closed from now on."""
        self.event_sinks.append(sink)

    def start(self) -> None:
        """After the engine's own set-up: feed the session from the capture (when something can
        be measured) and arm the first step."""
        if self.session is not None:
            self.capture.install(self.session)
        self.arm()

    # -- arming -----------------------------------------------------------------------------
    def arm(self) -> bool:
        """Arm the session if the step about to run measures; returns whether it does."""
        session = self.session
        if session is None or not self.config.enabled:
            return False
        if self.controller.is_measurement_step and self.measuring_allowed():
            return session.arm(self.controller.accumulation_steps)
        session.disarm()
        return False

    @property
    def pooled_estimate(self) -> GNSEstimate | None:
        """The last measurement with its noise from the pooled second moments: what the
        controller acts on (``None`` before a measurement, or with ``pool_moments=False``)."""
        return None if self.last_estimate is None else self.last_estimate.pooled

    @property
    def measuring(self) -> bool:
        return self.session is not None and self.session.armed

    def finish_measurement(self) -> None:
        """Finish the armed measurement now, before the optimizer applies the update (a
        collective; nothing on a step that does not measure): a failure on any rank raises
        ``MeasurementError`` on every rank while no update is applied yet. ``close_step`` then
        takes the estimate (it finishes a measurement still armed itself)."""
        if self.measuring:
            assert self.session is not None
            self.session.finish()

    # -- the boundary --------------------------------------------------------------------------
    def close_step(self, *, applied: bool = True) -> BatchDecision:
        """Close the optimizer step just taken and arm the next one. ``applied=False``: the
        optimizer skipped the update (an fp16 overflow): the step's samples are counted, it is
        not measured and the batch stays."""
        session = self.session
        # finished on every rank even when skipped: the collectives stay matched if ranks were
        # ever to disagree on the skip (the consistency check then names it). An engine that
        # finished it before the optimizer update (``finish_measurement``) left the estimate in
        # the session; a rank's failed measurement raised there, on every rank.
        estimate = session.take_estimate() if session is not None else None
        if session is not None:
            session.settle_pool(applied and estimate is not None and estimate.is_finite)
        if not applied:
            self.skipped_steps += 1
            logger.info(
                "step %d: optimizer update skipped (e.g. a loss-scale overflow): samples counted, "
                "not measured, batch unchanged", self.controller.step,
            )  # fmt: skip
            estimate = None
        elif estimate is not None and not estimate.is_finite:
            logger.warning(
                "step %d: non-finite gradient statistics: measurement skipped, batch unchanged",
                self.controller.step,
            )
        if estimate is not None:
            self.last_estimate = estimate
        controller = self.controller
        ran = (controller.batch_size, controller.accumulation_steps, controller.lr_multiplier)
        before = self.controller.samples
        decision = self.controller.update(estimate)
        if session is not None and before < self.config.warmup_samples <= self.controller.samples:
            session.restart_pool()  # the warm-up's shapes would bias what the batch acts on
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
        events = StepEvents(
            controller.step, controller.samples, *ran, applied=applied,
            measured=estimate is not None, estimate=estimate, decision=decision,
        )  # fmt: skip
        for sink in self.event_sinks:
            sink(events)
        self.arm()
        return decision

    def set_batch_size(self, batch_size: int) -> None:
        """Override the next step's batch (a multiple of micro x ranks); the lr multiplier and
        the armed measurement follow it. The controller keeps deciding afterwards."""
        unit = self.controller.unit
        if batch_size < unit or batch_size % unit:
            raise ValueError(f"batch size {batch_size} is not a positive multiple of {unit}")
        self.controller.batch_size = batch_size
        if self.lr_multiplier is not None:
            self.lr_multiplier.value = self.controller.lr_multiplier
        self.arm()

    def _check_consistency(self, decision: BatchDecision) -> None:
        group = self.group
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        mine = torch.tensor(
            [decision.batch_size, self.controller.step, self.controller.samples,
             decision.lr_multiplier], dtype=torch.float64, device=self.device,
        )  # fmt: skip
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, mine, group=group)
        if any(not torch.equal(mine, other) for other in everyone):
            raise RuntimeError(
                "ranks disagree on the batch decision [batch, step, samples, multiplier]: "
                f"{[t.tolist() for t in everyone]}"
            )

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self, *, include_pool: bool = True) -> dict[str, Any]:
        """Controller and config; with ``include_pool``, this rank's pooled moments too (they
        differ per rank: save every rank's state, or the pool restarts on resume)."""
        state = {
            "controller": self.controller.state_dict(),
            "config": self.config.to_dict(),
            "skipped_steps": self.skipped_steps,
        }
        pool = self.session.pool_state() if self.session is not None else None
        if include_pool and pool is not None:
            state["pool"] = pool
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config.check_resume(state.get("config"))  # refuses estimator-defining changes
        self.controller.load_state_dict(state["controller"])
        self.skipped_steps = int(state.get("skipped_steps", 0))  # absent before it existed
        if self.session is not None and "pool" in state:
            self.session.load_pool_state(state["pool"])
        if self.lr_multiplier is not None:
            self.lr_multiplier.value = self.controller.lr_multiplier
        self.arm()
