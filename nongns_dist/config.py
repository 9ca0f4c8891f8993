"""``GNSConfig``: every knob of the estimator and of the batch-size rule, validated once.

The same object is built from Python keyword arguments or from the top-level ``"nongns"``
section of a DeepSpeed JSON config (``GNSConfig.from_dict``). Validation is done by pydantic in
strict mode, so a wrong type is an error rather than a silent coercion (``"0.6"`` is not a
theta); every failure is a ``ValueError`` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from nongns_dist.norms import SqrtTraceMethod

__all__ = ["RESUME_FIXED", "GNSConfig", "NormName", "as_config", "check_count"]

#: The registry's norms (``nongns_dist.norms.NORMS``; a test keeps the two equal), plus ``auto``:
#: each parameter group's own, read from the optimizer (see ``nongns_dist.optim``). A literal so
#: that validation names the allowed values.
NormName = Literal["l1", "l2", "nuclear", "auto"]
LRScaling = Literal["sqrt", "linear", "none"]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
#: Counts of samples and steps: exact in the float64 tensors that carry them between ranks.
MAX_COUNT = 2**53
PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


def _as_tuples(value: object) -> object:
    """JSON gives lists: ``[[0, 64], [12800, 128]]`` reads as tuples (anything else is left to
    the type check)."""
    if isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


#: ``((samples, global batch), ...)``: from the step at which ``samples`` samples have been
#: consumed, the batch is ``global batch``.
BatchSchedule = Annotated[tuple[tuple[Count, PositiveInt], ...], BeforeValidator(_as_tuples)]


@dataclass(
    frozen=True,
    kw_only=True,
    config=ConfigDict(strict=True, extra="forbid", validate_default=True, allow_inf_nan=False),
)
class GNSConfig:
    """Configuration of noise-scale measurement and adaptive batch sizes.

    Field names are also the keys of the DeepSpeed ``"nongns"`` section.

    Example::

        >>> cfg = GNSConfig(norm="l1", theta=0.6, interval=100, initial_batch_size=64)
        >>> cfg.theta
        0.6
        >>> GNSConfig.from_dict({"enabled": True, "norm": "nuclear"}).norm
        'nuclear'
    """

    # -- switch ------------------------------------------------------------------------------
    #: Attach the plugin at all (the DeepSpeed entry point reads this).
    enabled: bool = True
    #: Adapt the batch. ``False`` measures and logs only: the batch stays at its initial size.
    adapt_batch_size: bool = True

    # -- estimator ---------------------------------------------------------------------------
    #: Geometry of the noise scale: ``l1`` (sign methods, AdamW), ``nuclear`` (Muon, specSGD),
    #: ``l2`` (SGD), ``auto`` (per parameter group, from the optimizer).
    norm: NormName = "auto"
    #: Divide the l_1 sum of per-coordinate standard deviations by c4(n), which removes the bias
    #: of a square root of a variance estimated from n samples. ``False`` is the paper exactly.
    bias_correction: bool = True
    #: Pool the centred second moments (per-coordinate variances, per-matrix covariances) in an
    #: EMA over measurements and take the square roots of the pooled moments: the noise then
    #: reads close to the population whatever the number of samples n (tr(C^{1/2}) from n = 2
    #: samples reads ~0.4x). Costs state: float32 per measured l1 coordinate on the rank that
    #: sums it, float64 m x m per matrix on its owner. ``False`` (with
    #: ``bias_correction=False``): the paper's EMA of each measurement's noise, exactly. l2 is
    #: linear in the moments and is never pooled.
    pool_moments: bool = True
    #: Degrees of freedom the pooled moments settle at (each square root then reads about as if
    #: from pool_dof + 1 samples). A measurement of n samples enters with EMA weight
    #: 2(n-1) / (pool_dof + n - 1), so the pool remembers about pool_dof / (2(n-1))
    #: measurements: 25 at n = 2, 4 at n = 8. ``ema_beta_noise`` is not used for pooled noise.
    #: In a live run more degrees of freedom remove more of the square root's bias but mix
    #: older moment shapes into it (the bias ratio then reads high); 50 balanced the two in the
    #: main job (BENCHMARKS.md "Estimator tracking").
    pool_dof: Annotated[float, Field(gt=0.0, le=1e6)] = 50.0
    #: The acted-on noise tracks a live run: its LEVEL is an EMA of this coefficient of each
    #: measurement's own root (the noise before squaring), and only the BIAS of that root at
    #: this n (it reads low: a square root of n - 1 degrees of freedom) comes from the long
    #: pool, as the ratio of the root of the pooled moment shapes (moments / their all-reduced
    #: total trace) to the pooled roots of the same measurements (``MomentPool``'s
    #: level-and-bias mode). A 10x change of the noise is within 10% after 20 measurements at
    #: 0.8 (0.8^20 x 10 = 0.12); the pool restarts at the end of ``warmup_samples``, so no
    #: warm-up shape biases the ratio. ``None``: pool the moments themselves (the earlier
    #: estimator; it lags by ~pool_dof / (2(n-1)) measurements).
    level_beta: Beta | None = 0.8
    #: How the nuclear-norm estimate takes tr(C^{1/2}): LAPACK ``eigh`` or a matmul-only
    #: coupled Newton-Schulz iteration (faster on accelerators, see BENCHMARKS.md).
    sqrt_trace_method: SqrtTraceMethod = "eigh"
    #: Relative accuracy at which the Newton-Schulz iteration stops.
    sqrt_trace_tol: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-3
    #: Keep per-parameter noise and signal in ``GNSEstimate.layers``.
    layer_breakdown: bool = False

    # -- batch-size rule (Algorithm 1) ------------------------------------------------------
    #: Measure every ``interval`` optimizer steps (F in the paper); other steps cost nothing.
    interval: PositiveInt = 100
    #: Target batch is noise / (theta^2 * signal): smaller theta, larger batches. Allowed:
    #: 1e-3 <= theta <= 1e3. Far above 1 the target is already below any batch. Below 1e-3 the
    #: target is over a million times the noise scale (critical batch), beyond any batch a run
    #: can take, and smaller still it stops being a number: theta^2 underflows float64 to 0
    #: below ~1.5e-162 (a division by zero), and from ~1e-150 noise / (theta^2 signal)
    #: overflows to inf for ordinary noise scales. 0.65 is the paper's 0.6 calibrated to this
    #: estimator: the paper tuned 0.6 with its own noise, which at its 8 ranks reads a fraction
    #: r of the population (measured on the main job: l1 0.83-0.88, nuclear 0.76-0.87), while
    #: the noise acted on here reads the population itself, so the same decisions need
    #: 0.6 / sqrt(r) (README "Theta"; launch/benchmarks/theta_calibration.py). The Euclidean
    #: (l2) noise is unbiased in both: the paper's 0.3 applies to it unchanged.
    theta: Annotated[float, Field(ge=1e-3, le=1e3)] = 0.65
    #: EMA coefficients of the squared noise and signal (bN, bM in the paper).
    ema_beta_noise: Beta = 0.9
    ema_beta_signal: Beta = 0.9
    #: Samples consumed before the batch may grow (I in the paper; they use the lr warm-up).
    warmup_samples: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 0
    #: Global batch of the first step; ``None`` takes the engine's (micro x ranks x accumulation).
    initial_batch_size: PositiveInt | None = None
    #: Cap on the global batch, rounded down to a feasible size; ``None`` means no cap.
    max_batch_size: PositiveInt | None = None
    #: Learning-rate multiplier as the batch grows from B0 to B: sqrt(B/B0), B/B0 or 1.
    lr_scaling: LRScaling = "sqrt"
    #: Replay a schedule instead of deciding one: ``[[samples, batch], ...]``, the first at 0
    #: samples, thresholds increasing (``nongns_dist.schedule`` exports it from a run's
    #: metrics.jsonl). The batch of a step is the last entry whose threshold the samples
    #: consumed before it reach, made feasible as on an elastic resume (the smallest multiple
    #: of micro x ranks at or above it, capped by ``max_batch_size``); the first entry is the
    #: initial batch. Measurements still run (every ``interval``) and are logged; they never
    #: move the batch. ``None``: the batch follows the noise scale.
    batch_schedule: BatchSchedule | None = None

    # -- safety --------------------------------------------------------------------------------
    #: All-gather each decision and raise if ranks disagree (costs one tiny collective).
    check_consistency: bool = False

    @model_validator(mode="after")
    def _check_batch_bounds(self) -> GNSConfig:
        if (
            self.initial_batch_size is not None
            and self.max_batch_size is not None
            and self.max_batch_size < self.initial_batch_size
        ):
            raise ValueError(
                f"max_batch_size={self.max_batch_size} is below "
                f"initial_batch_size={self.initial_batch_size}; allowed: max_batch_size >= "
                "initial_batch_size"
            )
        schedule = self.batch_schedule
        if schedule is not None:
            thresholds = [samples for samples, _ in schedule]
            if not thresholds or thresholds[0] != 0:
                raise ValueError(
                    f"batch_schedule={list(schedule)} must start at 0 samples; allowed: "
                    "[[0, first batch], [samples, batch], ...]"
                )
            if any(b <= a for a, b in itertools.pairwise(thresholds)):
                raise ValueError(f"batch_schedule thresholds {thresholds} must increase strictly")
            first = schedule[0][1]
            if self.initial_batch_size is not None and self.initial_batch_size != first:
                raise ValueError(
                    f"initial_batch_size={self.initial_batch_size} differs from the first batch "
                    f"of batch_schedule ({first}); allowed: leave initial_batch_size unset, or "
                    "equal to it"
                )
            if not self.adapt_batch_size:
                raise ValueError(
                    "batch_schedule with adapt_batch_size=False: the schedule moves the batch, "
                    "adapt_batch_size=False keeps it; allowed: one of the two"
                )
        return self

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> GNSConfig:
        """Build from the DeepSpeed ``"nongns"`` section (unknown keys are errors)."""
        if not isinstance(section, Mapping):
            raise ValueError(
                f"the 'nongns' config section must be a mapping, got {type(section).__name__}"
            )
        unknown = sorted(set(section) - cls.field_names())
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in the 'nongns' section; allowed: "
                f"{sorted(cls.field_names())}"
            )
        return cls(**dict(section))

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_resume(self, saved: Mapping[str, Any] | None) -> None:
        """Refuse to continue a state saved under ``saved`` (its ``to_dict()``) with this
        config when a field in ``RESUME_FIXED`` differs: those define what the saved numbers
        (EMAs of noise and signal, pooled moments) mean, and mixing them with numbers measured
        another way gives neither estimate. Raises ``ValueError`` naming the field and both
        values; ``None`` (a state saved without its config) and fields the saved config lacks
        (an older version) are not compared.

        May change on a resume (each applies from the next step): ``enabled``,
        ``adapt_batch_size``, ``interval``, ``theta``, ``warmup_samples`` (samples already
        seen count), ``max_batch_size`` (raised: the batch may grow further; lowered below the
        saved batch: the batch is capped to it at once, rounded down to a feasible batch, and
        the lr multiplier follows), ``lr_scaling`` (the multiplier is recomputed),
        ``sqrt_trace_method`` and ``sqrt_trace_tol`` (the same quantity, computed another
        way), ``layer_breakdown``, ``check_consistency``, and ``initial_batch_size`` (only the
        fresh start reads it: a resumed run keeps the saved run's initial batch as the lr
        multiplier's reference).
        """
        if saved is None:
            return
        if not isinstance(saved, Mapping):
            raise ValueError(
                f"the saved state's 'config' must be a mapping (GNSConfig.to_dict()), got "
                f"{type(saved).__name__}"
            )
        for name, reason in RESUME_FIXED.items():
            if name in saved and saved[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume: the checkpoint was measured with {name}={saved[name]!r}, "
                    f"this config has {name}={getattr(self, name)!r}; {name} may not change on "
                    f"a resume ({reason}). Resume with {name}={saved[name]!r}; fields that may "
                    f"change: {sorted(GNSConfig.field_names() - set(RESUME_FIXED))}"
                )


#: Config fields a resume may not change, and why (``GNSConfig.check_resume``).
RESUME_FIXED: dict[str, str] = {
    "norm": "the saved noise and signal EMAs and pooled moments are in that geometry",
    "bias_correction": "the saved noise EMA was taken with or without the c4 correction",
    "pool_moments": "it decides whether the controller acts on the pooled noise or on the EMA "
    "of each measurement's noise",
    "pool_dof": "the saved pooled moments settled at that many degrees of freedom",
    "level_beta": "the saved pool holds shapes and a level (a float) or moments (None)",
    "ema_beta_noise": "the saved EMAs are bias-corrected with their own coefficients",
    "ema_beta_signal": "the saved EMAs are bias-corrected with their own coefficients",
}


def as_config(config: object, *, where: str = "attach()") -> GNSConfig:
    """``config`` as a ``GNSConfig``: one is returned as it is, a mapping goes through
    ``GNSConfig.from_dict`` (which validates every key and value); anything else is a
    ``TypeError``."""
    if isinstance(config, GNSConfig):
        return config
    if isinstance(config, Mapping):
        return GNSConfig.from_dict(config)
    raise TypeError(
        f"{where}: config must be a GNSConfig or a mapping of its fields (read with "
        f"GNSConfig.from_dict), got {type(config).__name__}: {config!r}"
    )


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum`` (and at most 2^53): a bool, a float
    (even 2.0) or a string is a ``TypeError``, an int out of range a ``ValueError``, each
    naming ``name``, the value and what is allowed."""
    allowed = f"an int >= {minimum} (at most 2**53)"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}); allowed: {allowed}")
    count = int(value)
    if not minimum <= count <= MAX_COUNT:
        raise ValueError(f"{name}={count!r}; allowed: {allowed}")
    return count


# pydantic's ValidationError already subclasses ValueError and prints the field, the input value
# and the constraint; this check keeps that promise visible if pydantic ever changes it.
assert issubclass(ValidationError, ValueError)
