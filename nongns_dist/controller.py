"""The batch-size rule (Algorithm 1 of PAPER.md) as pure policy: no torch.distributed here.

The controller consumes only all-reduced numbers (noise, signal), so every rank that feeds it
the same numbers takes the same decision. Per optimizer step::

    ctrl = BatchSizeController(GNSConfig(norm="l1", interval=100), micro_batch_size=8,
                               world_size=2)
    for step in range(...):
        acc = ctrl.accumulation_steps             # micro-steps of this optimizer step
        ...forward/backward acc micro-batches, optimizer.step()...
        estimate = measure() if ctrl.is_measurement_step else None
        decision = ctrl.update(estimate)          # counts samples; may grow the next batch

Differences from the paper, decided here:
* A measurement that carries ``pooled_noise`` (the session pooled the second moments over
  measurements, ``GNSConfig.pool_moments``) is acted on with that noise as it is: it is already
  an average over measurements. The EMA of each measurement's raw noise is still kept (the
  paper's N), used when no pooled noise comes.
* The EMAs are bias-corrected (divided by 1 - beta^k). With bN == bM, as in the paper, the ratio
  N / M, and so every decision, is exactly the paper's; with unequal betas it stays unbiased.
* Warm-up is counted in samples (the paper's I is its lr warm-up, also sample-based).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from nongns_dist.config import GNSConfig, check_count

__all__ = [
    "BatchDecision",
    "BatchSizeController",
    "ControllerReadout",
    "feasible_batch_size",
    "lr_multiplier",
    "resume_batch_size",
    "warmup_cosine",
]

logger = logging.getLogger("nongns_dist")


class NoiseAndSignal(Protocol):
    @property
    def noise(self) -> float: ...

    @property
    def signal(self) -> float: ...


@dataclass(frozen=True)
class BatchDecision:
    """What the next optimizer step runs with."""

    batch_size: int
    accumulation_steps: int
    lr_multiplier: float
    changed: bool
    #: The target noise / (theta^2 signal) of the EMAs, when one was computed this step.
    target_batch_size: float | None = None


def feasible_batch_size(
    target: float, *, unit: int, current: int, maximum: int | None = None
) -> int:
    """Largest multiple of ``unit`` (micro x ranks) at or below ``target``, never below
    ``current`` and never above ``maximum`` (rounded down to a multiple of ``unit``)."""
    if unit < 1 or current < unit or current % unit:
        raise ValueError(f"current batch {current} must be a positive multiple of unit {unit}")
    best = current
    if math.isfinite(target):
        best = max(best, int(target // unit) * unit)
    elif target > 0:  # +inf: as large as allowed
        best = maximum if maximum is not None else current
    if maximum is not None:
        best = min(best, max(maximum // unit * unit, current))
    return best


def resume_batch_size(batch_size: int, *, unit: int, maximum: int | None = None) -> int:
    """The batch a run resumed on another ``unit`` (micro-batch x ranks) continues with: the
    smallest multiple of ``unit`` not below the checkpoint's ``batch_size`` (the batch never
    shrinks on a resume), capped by ``maximum`` rounded down to a multiple of ``unit``.

    >>> resume_batch_size(24, unit=16), resume_batch_size(24, unit=16, maximum=40)
    (32, 32)
    >>> resume_batch_size(56, unit=16, maximum=60)  # the cap wins: 64 is not allowed
    48
    """
    if batch_size < 1 or unit < 1:
        raise ValueError(f"batch_size and unit must be >= 1, got {batch_size}, {unit}")
    batch = -(-batch_size // unit) * unit
    if maximum is not None:
        cap = maximum // unit * unit
        if cap < unit:
            raise ValueError(
                f"max_batch_size={maximum} is below one micro-step of every rank "
                f"(micro_batch_size x world_size = {unit}): no batch is feasible"
            )
        batch = min(batch, cap)
    return batch


def lr_multiplier(batch_size: int, initial_batch_size: int, scaling: str) -> float:
    """sqrt(B/B0), B/B0 or 1 for ``scaling`` = ``sqrt``, ``linear``, ``none``."""
    ratio = batch_size / initial_batch_size
    if scaling == "sqrt":
        return math.sqrt(ratio)
    if scaling == "linear":
        return ratio
    if scaling == "none":
        return 1.0
    raise ValueError(f"lr_scaling must be 'sqrt', 'linear' or 'none', got {scaling!r}")


def warmup_cosine(
    samples_seen: int,
    total_samples: int,
    *,
    warmup_fraction: float = 0.15,
    final_ratio: float = 0.0,
) -> float:
    """Learning-rate factor over SAMPLES: linear warm-up over ``warmup_fraction`` of the budget,
    then cosine down to ``final_ratio``. Multiply by the peak lr and the controller's multiplier.

    >>> warmup_cosine(0, 1000), warmup_cosine(150, 1000), warmup_cosine(1000, 1000)
    (0.0, 1.0, 0.0)
    """
    if total_samples <= 0:
        raise ValueError(f"total_samples must be > 0, got {total_samples}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup = warmup_fraction * total_samples
    if samples_seen < warmup:
        return samples_seen / warmup
    progress = min(1.0, (samples_seen - warmup) / (total_samples - warmup))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchSizeController:
    """Algorithm 1: EMA of squared noise and signal every ``interval`` steps; after the warm-up
    the global batch becomes max(feasible(N / (theta^2 M)), B), so it never decreases.

    Feasible batches are ``micro_batch_size * world_size * accumulation_steps``.
    """

    def __init__(
        self,
        config: GNSConfig,
        *,
        micro_batch_size: int,
        world_size: int,
        accumulation_steps: int | None = None,
    ) -> None:
        if not isinstance(config, GNSConfig):
            raise TypeError(
                f"config must be a GNSConfig (GNSConfig.from_dict reads a mapping), got "
                f"{type(config).__name__}: {config!r}"
            )
        micro_batch_size = check_count("micro_batch_size", micro_batch_size)
        world_size = check_count("world_size", world_size)
        if accumulation_steps is not None:
            accumulation_steps = check_count("accumulation_steps", accumulation_steps)
        self.config = config
        self.unit = micro_batch_size * world_size
        schedule = config.batch_schedule
        if schedule is not None and config.initial_batch_size is None:
            initial = resume_batch_size(
                schedule[0][1], unit=self.unit, maximum=config.max_batch_size
            )
            if accumulation_steps is not None and accumulation_steps * self.unit != initial:
                raise ValueError(
                    f"accumulation_steps={accumulation_steps} gives batch "
                    f"{accumulation_steps * self.unit}, but batch_schedule starts at {initial}"
                )
        elif config.initial_batch_size is not None:
            if config.initial_batch_size % self.unit:
                raise ValueError(
                    f"initial_batch_size={config.initial_batch_size} is not a multiple of "
                    f"micro_batch_size x world_size = {self.unit}"
                )
            initial = config.initial_batch_size
            if accumulation_steps is not None and accumulation_steps * self.unit != initial:
                raise ValueError(
                    f"accumulation_steps={accumulation_steps} gives batch "
                    f"{accumulation_steps * self.unit}, but initial_batch_size={initial}"
                )
        else:
            initial = self.unit * (accumulation_steps or 1)
        if config.max_batch_size is not None and config.max_batch_size < initial:
            raise ValueError(
                f"max_batch_size={config.max_batch_size} is below the initial batch {initial}"
            )
        self.initial_batch_size = initial
        # -- internal state (everything in state_dict) --
        self.batch_size = initial
        self.step = 0  # optimizer steps completed
        self.samples = 0  # samples consumed by completed steps
        self.noise_ema = 0.0  # raw (biased) EMA of the squared noise
        self.signal_ema = 0.0
        self.num_updates = 0  # measurements that entered the EMAs
        self.skipped = 0  # measurements rejected (non-finite)
        self.last_target: float | None = None
        #: Squared noise of the pooled moments at the last measurement, when it came pooled.
        self.pooled_noise: float | None = None

    # -- queries ---------------------------------------------------------------------------
    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.unit

    @property
    def lr_multiplier(self) -> float:
        return lr_multiplier(self.batch_size, self.initial_batch_size, self.config.lr_scaling)

    @property
    def is_measurement_step(self) -> bool:
        """Whether the step about to run (``self.step``) measures: every ``interval`` steps."""
        return self.step % self.config.interval == 0

    def ema(self) -> tuple[float, float] | None:
        """Bias-corrected (noise, signal) EMAs, or None before the first measurement."""
        if self.num_updates == 0:
            return None
        bn, bm = self.config.ema_beta_noise, self.config.ema_beta_signal
        k = self.num_updates
        noise = self.noise_ema / (1 - bn**k) if self.pooled_noise is None else self.pooled_noise
        return noise, self.signal_ema / (1 - bm**k)

    # -- the rule ---------------------------------------------------------------------------
    def update(self, estimate: NoiseAndSignal | None = None) -> BatchDecision:
        """Close the optimizer step just taken (with ``self.batch_size`` samples) and decide the
        next one. Pass the measurement on measuring steps; a non-finite one is skipped."""
        self.samples += self.batch_size
        self.step += 1
        target = None
        if estimate is not None:
            noise, signal = float(estimate.noise), float(estimate.signal)
            pooled = getattr(estimate, "pooled_noise", None)
            values = (noise, signal) if pooled is None else (noise, signal, float(pooled))
            if all(math.isfinite(v) and v >= 0 for v in values):
                bn, bm = self.config.ema_beta_noise, self.config.ema_beta_signal
                self.noise_ema = bn * self.noise_ema + (1 - bn) * noise
                self.signal_ema = bm * self.signal_ema + (1 - bm) * signal
                self.pooled_noise = None if pooled is None else float(pooled)
                self.num_updates += 1
                target = self._target()
            else:
                self.skipped += 1
        changed = False
        if self.config.batch_schedule is not None:
            scheduled = self.scheduled(self.samples)  # made feasible as on an elastic resume
            new = resume_batch_size(scheduled, unit=self.unit, maximum=self.config.max_batch_size)
            changed = new != self.batch_size
            self.batch_size = new
        elif (
            target is not None
            and self.config.adapt_batch_size
            and self.samples >= self.config.warmup_samples
        ):
            new = feasible_batch_size(
                target, unit=self.unit, current=self.batch_size, maximum=self.config.max_batch_size
            )
            changed = new != self.batch_size
            self.batch_size = new
        self.last_target = target if target is not None else self.last_target
        return BatchDecision(
            self.batch_size, self.accumulation_steps, self.lr_multiplier, changed, target
        )

    def scheduled(self, samples: int) -> int:
        """The batch ``config.batch_schedule`` gives a step that starts after ``samples``
        samples (as written: ``update`` makes it feasible)."""
        schedule = self.config.batch_schedule
        assert schedule is not None
        return next(batch for threshold, batch in reversed(schedule) if threshold <= samples)

    def _target(self) -> float:
        ema = self.ema()
        assert ema is not None
        noise, signal = ema
        # theta^2 * signal may underflow to 0 for a subnormal signal: that is a zero signal
        denominator = self.config.theta**2 * signal
        if denominator <= 0:
            return math.inf if noise > 0 else float(self.batch_size)
        return noise / denominator

    # -- checkpointing -------------------------------------------------------------------------
    _STATE_KEYS = (
        "batch_size",
        "step",
        "samples",
        "noise_ema",
        "signal_ema",
        "num_updates",
        "skipped",
        "last_target",
        "pooled_noise",
        "initial_batch_size",
        "unit",
    )

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``. A state taken with another unit (micro-batch x ranks:
        an elastic resume) is converted: step, samples, warm-up progress (samples), EMAs and the
        initial batch (the lr multiplier's reference) kept, the batch moved to
        ``resume_batch_size`` of the new unit, so the lr multiplier follows the new batch.

        ``max_batch_size`` is this config's: with the same unit too, a saved batch above it is
        capped to it (rounded down to a multiple of the unit; the cap wins over "the batch never
        shrinks", as on an elastic resume) and the lr multiplier follows, with a warning.
        (Which config fields may change on a resume at all: ``GNSConfig.check_resume``.)"""
        state = {"pooled_noise": None, **state}  # checkpoints from before pooling lack it
        missing = sorted(set(self._STATE_KEYS) - set(state))
        extra = sorted(set(state) - set(self._STATE_KEYS))
        if missing or extra:
            raise ValueError(f"controller state: missing keys {missing}, unknown keys {extra}")
        maximum = self.config.max_batch_size
        if (
            state["unit"] == self.unit
            and maximum is not None
            and state["batch_size"] % self.unit == 0
            and state["batch_size"] > maximum // self.unit * self.unit
        ):
            batch = resume_batch_size(state["batch_size"], unit=self.unit, maximum=maximum)
            logger.warning(
                "nongns_dist: resuming with max_batch_size=%d below the checkpoint's global batch "
                "%d: batch %d -> %d, lr multiplier %.4g -> %.4g",
                maximum, state["batch_size"], state["batch_size"], batch,
                lr_multiplier(state["batch_size"], state["initial_batch_size"],
                              self.config.lr_scaling),
                lr_multiplier(batch, state["initial_batch_size"], self.config.lr_scaling),
            )  # fmt: skip
            state = {**state, "batch_size": batch}
        if state["unit"] != self.unit:
            batch = resume_batch_size(
                state["batch_size"], unit=self.unit, maximum=self.config.max_batch_size
            )
            logger.warning(
                "nongns_dist: resuming with micro_batch_size x world_size = %d (checkpoint: %d): "
                "global batch %d -> %d, lr multiplier %.4g -> %.4g",
                self.unit, state["unit"], state["batch_size"], batch,
                lr_multiplier(state["batch_size"], state["initial_batch_size"],
                              self.config.lr_scaling),
                lr_multiplier(batch, state["initial_batch_size"], self.config.lr_scaling),
            )  # fmt: skip
            state = {**state, "unit": self.unit, "batch_size": batch}
        if state["batch_size"] % self.unit:
            raise ValueError(
                f"checkpoint batch {state['batch_size']} is not a multiple of {self.unit}"
            )
        for key in self._STATE_KEYS:
            setattr(self, key, state[key])


class ControllerReadout:
    """What a training loop reads from a runtime that owns a ``controller``."""

    controller: BatchSizeController

    @property
    def accumulation_steps(self) -> int:
        return self.controller.accumulation_steps

    @property
    def batch_size(self) -> int:
        return self.controller.batch_size

    @property
    def samples(self) -> int:
        return self.controller.samples

    @property
    def step(self) -> int:
        return self.controller.step
