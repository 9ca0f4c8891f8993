"""Gradient noise scale from sufficient statistics. Pure math: no torch.distributed here.

A measurement has n samples g_s of a mean gradient, each over b examples (DESIGN.md section 2).
From S = sum_s g_s (mean g = S/n) and Q = sum_s g_s^2 per coordinate:

    sigma_hat_i^2 = b/(n-1) * (Q_i - n g_i^2)          (clamped at 0: rounding only)

and per 2-D parameter (``norms.as_matrix``: rows < columns; a square one transposed), from
A = sum_s G_s G_s^T:

    C_hat = b/(n-1) * (A - n G G^T)

Every norm reduces to two ADDITIVE partial sums, so distributed code can add them across
slices, parameters and ranks in one all-reduce and only then finish:

    norm     noise part                 signal part       finish
    l2       sum sigma_hat_i^2          sum g_i^2         as is
    l1       sum sigma_hat_i / c4(n)    sum |g_i|         square both
    nuclear  tr(C_hat^{1/2})            tr((GG^T)^{1/2})  square both

l1 and nuclear parts may be added together (the dual norm of a product of l_inf and spectral
balls is the sum of the duals: PAPER.md "sum the per-layer norms first, then square"); l2 may not
be mixed with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from nongns_dist.norms import (
    NORMS,
    Norm,
    SqrtTraceMethod,
    as_matrix,
    c4_dof,
    norm_named,
    sqrt_trace,
)

__all__ = [
    "GNSEstimate",
    "LayerEstimate",
    "MomentPool",
    "check_dense_real",
    "coordinate_parts",
    "estimate_gns",
    "matrix_parts",
    "noise_and_signal",
    "noise_from_variance",
    "pool_moment",
    "pooled_noise_part",
    "pooled_root",
    "sample_covariance",
    "sample_variance",
    "settle",
]

#: A norm by name (``"l1"``, ``"l2"``, ``"nuclear"``) or as its registry entry.
EstimateNorm = Norm | Literal["l1", "l2", "nuclear"]
#: Parameters mapped to ``None`` are left out of the estimate (e.g. Muon's AdamW group).
NormSpec = str | Norm | Mapping[str, str | Norm | None]


@dataclass(frozen=True)
class LayerEstimate:
    """Noise and signal of one parameter alone, already finished (squared for l1/nuclear)."""

    norm: str
    noise: float
    signal: float

    @property
    def gns(self) -> float:
        return _ratio(self.noise, self.signal)


@dataclass(frozen=True)
class GNSEstimate:
    """One measurement of the gradient noise scale.

    ``noise`` and ``signal`` are the finished (already squared, for l1 and nuclear) population
    estimates; ``gns = noise / signal`` is the critical batch size in examples.
    ``num_samples`` is n, ``sample_size`` is b (examples per sample).
    ``pooled_noise``: the noise from second moments pooled over this and earlier measurements
    (``GNSConfig.pool_moments``), what the batch controller acts on; ``None`` when not pooled.
    ``noise`` is always this measurement's own estimate, the one ``estimate_gns`` computes.
    """

    norm: str
    noise: float
    signal: float
    num_samples: int
    sample_size: int
    layers: Mapping[str, LayerEstimate] | None = field(default=None, compare=False)
    pooled_noise: float | None = field(default=None, compare=False)

    @property
    def gns(self) -> float:
        return _ratio(self.noise, self.signal)

    @property
    def pooled(self) -> GNSEstimate | None:
        """The pooled noise over this measurement's signal, or ``None`` when not pooled."""
        if self.pooled_noise is None:
            return None
        return GNSEstimate(
            self.norm, self.pooled_noise, self.signal, self.num_samples, self.sample_size
        )

    @property
    def is_finite(self) -> bool:
        return math.isfinite(self.noise) and math.isfinite(self.signal)


def _ratio(noise: float, signal: float) -> float:
    if signal > 0:
        return noise / signal
    return math.inf if noise > 0 else math.nan


def _check_counts(num_samples: int, sample_size: int) -> None:
    if num_samples < 2:
        raise ValueError(f"a noise estimate needs num_samples >= 2, got {num_samples}")
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1 example per sample, got {sample_size}")


def sample_variance(
    mean: torch.Tensor, sq_sum: torch.Tensor, num_samples: int, sample_size: int
) -> torch.Tensor:
    """Per-coordinate single-example variance b/(n-1) * (Q - n g^2), clamped at 0."""
    _check_counts(num_samples, sample_size)
    var = (sq_sum - num_samples * mean * mean) * (sample_size / (num_samples - 1))
    return var.clamp_min(0)


def noise_from_variance(
    var: torch.Tensor, norm: EstimateNorm, dof: float, *, bias_correction: bool = True
) -> torch.Tensor:
    """Additive noise part of per-coordinate variances ``var`` estimated with ``dof`` degrees of
    freedom (n - 1 for one measurement): sum var (l2) or sum sqrt(var) / c4 (l1), float64."""
    kind = _coordinate_norm(norm)
    if not kind.squared:
        return var.sum(dtype=torch.float64)
    noise = var.sqrt().sum(dtype=torch.float64)
    return noise / c4_dof(dof) if bias_correction else noise


def signal_part(mean: torch.Tensor, norm: EstimateNorm) -> torch.Tensor:
    """Additive signal part of the mean gradient: sum g^2 (l2) or sum |g| (l1), float64."""
    if not _coordinate_norm(norm).squared:
        return mean.square().sum(dtype=torch.float64)
    return mean.abs().sum(dtype=torch.float64)


def _coordinate_norm(norm: EstimateNorm) -> Norm:
    kind = norm_named(norm)
    if kind.matrix:
        raise ValueError(f"coordinate statistics need a coordinate norm, got {kind.name!r}")
    return kind


def coordinate_parts(
    mean: torch.Tensor,
    sq_sum: torch.Tensor,
    num_samples: int,
    sample_size: int,
    norm: EstimateNorm,
    *,
    bias_correction: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coordinate norms' kernel: (noise part, signal part, per-coordinate variances) of
    these coordinates, the parts additive over slices, parameters and ranks.

    ``mean`` is g = S/n and ``sq_sum`` is Q, any matching shape (a whole parameter or a slice).
    Sums accumulate in float64 whatever the input dtype. ``estimate_gns`` and the measurement
    session both call it; the variances are what the pool keeps.
    """
    var = sample_variance(mean, sq_sum, num_samples, sample_size)
    noise = noise_from_variance(var, norm, num_samples - 1, bias_correction=bias_correction)
    return noise, signal_part(mean, norm), var


def sample_covariance(
    gram_sum: torch.Tensor,
    mean_gram: torch.Tensor,
    num_samples: int,
    sample_size: int,
    *,
    gram_dtype: torch.dtype | None = None,
    centered: bool = False,
    overwrite: bool = False,
) -> tuple[torch.Tensor, float]:
    """(C_hat, resolution) of one matrix from its Grams (see ``gram_partial_sums``).

    The resolution is the size below which an eigenvalue of C_hat is rounding: the rounding of
    A, at most eps ||A||_F (Weyl; the Frobenius norm bounds the spectral one and costs no
    decomposition), scaled like C_hat. ``overwrite``: C_hat may be formed in ``gram_sum``'s
    storage (a caller done with the Gram saves one m x m temporary; same values).
    """
    _check_counts(num_samples, sample_size)
    eps = torch.finfo(gram_dtype or gram_sum.dtype).eps
    factor = sample_size / (num_samples - 1)
    floor = eps * float(torch.linalg.matrix_norm(gram_sum)) * factor
    if not centered:
        return (gram_sum - num_samples * mean_gram).mul_(factor), floor
    return (gram_sum.mul_(factor) if overwrite else gram_sum * factor), floor


def matrix_parts(
    grams: list[torch.Tensor],
    num_samples: int,
    sample_size: int,
    *,
    method: SqrtTraceMethod = "eigh",
    tol: float = 1e-3,
    centered: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The matrix norm's kernel: (tr(C_hat^{1/2}), ||G||_*, C_hat, its resolution) of one
    matrix parameter (``as_matrix`` view), float64 parts.

    ``grams`` is ``[A, G G^T]``: A = sum_s G_s G_s^T (``centered=True``: already
    sum_s (G_s - G)(G_s - G)^T, no cancellation) and the mean's Gram, both float64. They are
    taken out of the list, and A is overwritten by C_hat: with no other reference held, the
    m x m temporaries follow one another (the mean's Gram is freed before the decomposition
    of C_hat) instead of stacking up on the rank that finishes the matrix. ``estimate_gns``
    and the measurement session both call it.
    """
    mean_gram = grams.pop()
    gram_sum = grams.pop()
    signal = mean_signal(mean_gram, method, tol=tol)
    cov, floor = sample_covariance(
        gram_sum, mean_gram, num_samples, sample_size, centered=centered, overwrite=True
    )
    del gram_sum, mean_gram
    noise = sqrt_trace(cov, method, tol=tol, floor=floor).to(torch.float64)
    return noise, signal, cov, floor


def mean_signal(
    mean_gram: torch.Tensor,
    method: SqrtTraceMethod = "eigh",
    *,
    tol: float = 1e-3,
    gram_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """||G||_* = tr((G G^T)^{1/2}) from the mean's Gram, float64."""
    eps = torch.finfo(gram_dtype or mean_gram.dtype).eps
    floor = eps * float(torch.linalg.matrix_norm(mean_gram))
    return sqrt_trace(mean_gram, method, tol=tol, floor=floor).to(torch.float64)


def pooled_noise_part(
    pooled: torch.Tensor,
    norm: EstimateNorm,
    dof: float,
    floor: float = 0.0,
    *,
    method: SqrtTraceMethod = "eigh",
    tol: float = 1e-3,
    bias_correction: bool = True,
) -> torch.Tensor:
    """Additive noise part of a pooled moment (``MomentPool.update``'s result): for l1, the
    per-coordinate variances, sum sqrt / c4(dof); for nuclear, the covariance, tr(C^{1/2})
    with eigenvalues at or below ``floor`` counted as zero. float64. NaN when nothing finite has
    entered the pool yet (``dof`` NaN), without a decomposition of the placeholder."""
    kind = norm_named(norm)
    if not kind.pooled:
        raise ValueError(f"{kind.name} is linear in the moments: nothing of it is pooled")
    if math.isnan(dof):
        return torch.tensor(math.nan, dtype=torch.float64, device=pooled.device)
    if kind.matrix:
        return sqrt_trace(pooled, method, tol=tol, floor=floor).to(torch.float64)
    return noise_from_variance(pooled, kind, dof, bias_correction=bias_correction)


def pool_moment(
    pool: MomentPool,
    key: Hashable,
    moment: torch.Tensor,
    norm: EstimateNorm,
    dof: float,
    floor: float = 0.0,
    *,
    trace: torch.Tensor | float,
    unpack: Callable[[torch.Tensor], torch.Tensor] | None = None,
    method: SqrtTraceMethod = "eigh",
    tol: float = 1e-3,
    bias_correction: bool = True,
) -> torch.Tensor:
    """One entry's contribution to the pooled noise, as three float64 numbers to be summed
    over entries (and ranks) and finished by ``pooled_root``: [part from pooled moments or
    shapes, part of a fresh entry (shape-and-level mode), the entry's trace]. ``moment`` is this
    measurement's (l1: per-coordinate variances; nuclear: the covariance, or its upper triangle
    with ``unpack`` rebuilding the matrix); ``trace`` its trace (the sum of its variances)."""
    out = torch.zeros(3, dtype=torch.float64, device=moment.device)
    unpack = unpack or (lambda value: value)
    if pool.level_beta is None:  # moment mode: the pooled moment is in absolute units
        pooled, pooled_dof, pooled_floor = pool.update(key, moment, dof, floor=floor)
        out[0] = pooled_noise_part(
            unpack(pooled), norm, pooled_dof, pooled_floor, method=method, tol=tol,
            bias_correction=bias_correction,
        )  # fmt: skip
        return out
    value, value_dof, value_floor, fresh = pool.add(key, moment, dof, floor=floor)
    out[1 if fresh else 0] = pooled_noise_part(
        unpack(value), norm, value_dof, value_floor, method=method, tol=tol,
        bias_correction=bias_correction,
    )  # fmt: skip
    out[2] = trace
    return out


def pooled_root(pool: MomentPool, root: float, parts: Sequence[float]) -> float:
    """The pooled noise before squaring. ``root``: this measurement's own noise before
    squaring (the summed noise parts); ``parts``: ``pool_moment``'s three sums. In moment mode
    the first part. In level-and-bias mode the level (a short EMA of the measurements' roots,
    this one included) x the bias ratio S / D: S is the root of the pooled SHAPES (shape
    parts, plus each fresh entry's part over sqrt(T), T this measurement's total trace), D the
    EMA, with the shapes' weights, of each measurement's root / sqrt(T) (this one's when the
    pool holds none yet, so a first measurement reads as itself)."""
    shaped, fresh, trace = (float(x) for x in parts)
    if pool.level_beta is None:
        return shaped
    level = pool.level_after(root)
    if not trace > 0:
        return level
    shape = shaped + fresh / math.sqrt(trace)
    base = pool.base_before(root / math.sqrt(trace))
    return level * shape / base if base > 0 else level


def settle(pool: MomentPool, trace: float, root: float, dof: float, keep: bool) -> None:
    """End a measurement in the pool: keep it (moment mode: commit a staged update;
    level-and-bias mode: fold the held moments, normalised by ``trace``, and the measurement's
    ``root`` with its ``dof``) or drop it."""
    if pool.level_beta is None:
        if keep:
            pool.commit()
        else:
            pool.rollback()
    elif keep:
        pool.close(trace, root, dof)
    else:
        pool.drop()


def noise_and_signal(
    noise_part: float, signal_part: float, norm: str | Norm
) -> tuple[float, float]:
    """Turn summed partial sums into (noise, signal): squared for the norms whose parts are
    norms (l1, nuclear and their sum ``l1+nuclear``), as they are for l2."""
    names = norm.name if isinstance(norm, Norm) else norm
    if all(norm_named(name).squared for name in names.split("+")):
        return noise_part**2, signal_part**2
    return noise_part, signal_part


def combined_norm(norms: Sequence[str | Norm]) -> str:
    """Name of the geometry a set of per-parameter norms adds up to (see module docstring):
    the one norm, or the squared ones joined by ``+`` in registry order (``l1+nuclear``)."""
    kinds = {norm_named(n) for n in norms}
    if not kinds:
        raise ValueError("no parameter is left in the estimate")
    linear = sorted(k.name for k in kinds if not k.squared)
    if linear and len(kinds) > 1:
        raise ValueError(
            f"{linear[0]} cannot be mixed with {sorted(k.name for k in kinds if k.squared)} in "
            "one estimate: the Euclidean noise scale sums variances, the dual norms sum "
            "standard deviations"
        )
    return "+".join(name for name, n in NORMS.items() if n in kinds)


class MomentPool:
    """EMA of centred second moments across measurements, so square roots see pooled samples.

    tr(C_hat^{1/2}) and sum_i sigma_hat_i are concave in the second moments: from n samples they
    read low (nuclear: ~0.4 of the population at n = 2 on real gradients). Averaging the
    moments BEFORE the square root, per coordinate (sigma_hat_i^2) and per matrix (C_hat), gives
    each square root many more degrees of freedom than n - 1. The paper averages the finished
    noise scalar instead (``GNSConfig.pool_moments=False``).

    The EMA weight of a new moment is ``weight(dof)``: with ``target_dof`` (the library's mode,
    ``GNSConfig.pool_dof``) 2 dof / (target + dof), so the pool settles at ``target_dof``
    degrees of freedom whatever each measurement's; with ``beta``, a fixed 1 - beta. Entries are
    keyed by the caller (a parameter slice, a matrix) and bias-corrected by their own weights:
    pooled = EMA / (sum of the weights). Each also tracks its effective degrees of freedom,
    1 / sum_j (w_j^2 / dof_j) with normalised weights w_j (Satterthwaite), for the l1 c4
    correction. A moment with a non-finite value is not added at all (a host sync per update).

    ``stage()`` holds the updates of one measurement apart until ``commit()`` (or drops them on
    ``rollback()``), for a step that may turn out skipped after its moments were streamed in
    (an fp16 overflow found by the loss scaler): the cost is one more copy of each updated entry
    until the step closes.

    Level-and-bias mode (``level_beta`` set; the library's default, ``GNSConfig.level_beta``):
    pooling absolute moments makes the pooled noise LAG in a live run (a fresh model's noise is
    ~40x the later level and stayed in the pool for hundreds of measurements), and pooling
    moment SHAPES (moments / their total trace) lags too: in the main job the l1 noise grows
    4.5x from 25% to 100% of the run while the trace stays flat, so what moves is the shape.
    What a long pool is needed for is only the BIAS of the square root at this n (a root of
    n - 1 degrees of freedom reads low: l1 with c4 ~0.75 of the population at n = 2 on heavy-
    tailed gradients, nuclear ~0.4), and that bias moves slowly. So the pooled root is

        level x S / D

    with the level a short EMA (coefficient ``level_beta``) of each measurement's own root
    (the sum of its noise parts, what ``estimate_gns`` squares into ``noise``), S the root of
    the pooled shapes (each measurement's moments divided by its own total trace T, all-reduced:
    one scalar for the whole model, so nothing depends on how entries are sliced over ranks,
    pooled with the weights above) and D the EMA, with the same weights, of each
    measurement's root / sqrt(T): S / D is how much a root of pool_dof degrees of freedom
    exceeds one of n - 1 on the same measurements. A measurement reads the shapes and D
    pooled BEFORE it and the level including it; its moments are held by ``add`` and folded in
    by ``close(T, root, dof)`` once T is known, after the one all-reduce (``drop`` /
    ``rollback`` forget them). ``restart()`` empties the pool (the driver calls it at the end
    of the warm-up, ``GNSConfig.warmup_samples``: a fresh model's shapes inflate S / D).
    """

    def __init__(
        self,
        beta: float | None = None,
        *,
        target_dof: float | None = None,
        level_beta: float | None = None,
    ) -> None:
        if (beta is None) == (target_dof is None):
            raise ValueError("give a MomentPool either beta or target_dof")
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"pool beta must be in [0, 1), got {beta}")
        if target_dof is not None and not target_dof > 0:
            raise ValueError(f"pool target_dof must be > 0, got {target_dof}")
        if level_beta is not None and not 0.0 <= level_beta < 1.0:
            raise ValueError(f"pool level_beta must be in [0, 1), got {level_beta}")
        self.beta = beta
        self.target_dof = target_dof
        #: Shape-and-level mode (``add`` / ``close``) when set: the EMA coefficient of the level.
        self.level_beta = level_beta
        self._entries: dict[Hashable, _PoolEntry] = {}
        #: Updated entries of the measurement in flight, while staged (None: updates in place).
        self._staged: dict[Hashable, _PoolEntry] | None = None
        # -- level-and-bias mode -----------------------------------------------------------------
        self.level_ema = 0.0  # short EMA of the measurements' roots, not bias-corrected
        self.level_weight = 0.0  # the sum of its weights
        self.base_ema = 0.0  # EMA of root / sqrt(T) with the shapes' weights (D), likewise
        self.base_weight = 0.0
        #: This measurement's moments, folded into the shapes by ``close``: key -> (moment, dof,
        #: floor).
        self._pending: dict[Hashable, tuple[torch.Tensor, float, float]] = {}

    @classmethod
    def for_config(cls, config: Any) -> MomentPool:
        """The pool a ``GNSConfig`` asks for (``pool_dof``, ``level_beta``): what the
        measurement session keeps, and what a reference ``estimate_gns(..., pool=)`` must get
        to compute the same pooled noise."""
        return cls(target_dof=config.pool_dof, level_beta=config.level_beta)

    # -- level-and-bias mode --------------------------------------------------------------------
    def add(
        self, key: Hashable, moment: torch.Tensor, dof: float, *, floor: float = 0.0
    ) -> tuple[torch.Tensor, float, float, bool]:
        """Level-and-bias mode: hold this measurement's ``moment`` of entry ``key`` until
        ``close``, and return what its pooled noise part is taken from: (the entry's pooled
        SHAPE from earlier measurements, its effective dof, its floor relative to the level,
        False), or, for an entry seen for the first time, (``moment`` itself, ``dof``,
        ``floor``, True): a fresh entry's part is this measurement's own, in absolute units.

        ``pooled_root`` adds the shape parts and each fresh part / sqrt(trace) into S."""
        assert self.level_beta is not None, "add() is the level-and-bias mode's"
        self._pending[key] = (moment, dof, floor)
        entry = self._entries.get(key)
        if entry is None or entry.weight == 0 or entry.value.shape != moment.shape:
            return moment, dof, floor, True
        weight = entry.weight
        return entry.value / weight, weight**2 / entry.inverse_dof, entry.floor / weight, False

    def level_after(self, root: float) -> float:
        """The bias-corrected level once this measurement's ``root`` has entered it (nothing is
        changed)."""
        assert self.level_beta is not None
        keep = self.level_beta
        weight = keep * self.level_weight + (1.0 - keep)
        return (keep * self.level_ema + (1.0 - keep) * root) / weight

    def base_before(self, value: float) -> float:
        """D: the bias-corrected EMA of root / sqrt(T) over the measurements kept so far, or
        ``value`` (this measurement's) when there are none."""
        return self.base_ema / self.base_weight if self.base_weight > 0 else value

    def close(self, trace: float, root: float, dof: float) -> None:
        """Keep this measurement: fold each held moment, divided by the measurement's total
        ``trace`` (the sum of every entry's trace, all-reduced), into its entry's shape, its
        ``root`` into the level and root / sqrt(trace) into D (with the shapes' weight for
        ``dof``). A trace or root that is not finite leaves everything alone; a zero trace
        (nothing to normalise by) leaves the shapes and D alone."""
        assert self.level_beta is not None
        pending, self._pending = self._pending, {}
        if not (math.isfinite(trace) and math.isfinite(root)):
            return
        keep = self.level_beta
        self.level_ema = keep * self.level_ema + (1.0 - keep) * root
        self.level_weight = keep * self.level_weight + (1.0 - keep)
        if trace <= 0:
            return
        alpha = self.weight(dof)
        self.base_ema = (1.0 - alpha) * self.base_ema + alpha * root / math.sqrt(trace)
        self.base_weight = (1.0 - alpha) * self.base_weight + alpha
        for key, (moment, entry_dof, floor) in pending.items():
            self._fold(self._entries, key, moment / trace, entry_dof, floor / trace)

    def restart(self) -> None:
        """Forget every measurement (entries, level, D): the pool starts again."""
        self._entries = {}
        self._staged = None
        self._pending = {}
        self.level_ema = self.level_weight = self.base_ema = self.base_weight = 0.0

    def drop(self) -> None:
        """Forget this measurement's held moments (a skipped step, a non-finite estimate)."""
        self._pending = {}

    def _fold(
        self,
        store: dict[Hashable, _PoolEntry],
        key: Hashable,
        moment: torch.Tensor,
        dof: float,
        floor: float,
    ) -> _PoolEntry:
        """EMA step of entry ``key`` in ``store`` (a new entry when absent or of another shape);
        a moment with a non-finite value is not added."""
        alpha = self.weight(dof)
        keep = 1.0 - alpha
        entry = store.get(key)
        if entry is None or entry.value.shape != moment.shape:
            entry = store[key] = _PoolEntry(torch.zeros_like(moment))
        if bool(torch.isfinite(moment).all()) and math.isfinite(floor):
            entry.value.mul_(keep).add_(moment, alpha=alpha)
            entry.weight = keep * entry.weight + alpha
            entry.inverse_dof = keep**2 * entry.inverse_dof + alpha**2 / dof
            entry.floor = keep * entry.floor + alpha * floor
        return entry

    def weight(self, dof: float) -> float:
        """The EMA weight of a new moment with ``dof`` degrees of freedom: 1 - beta, or, with a
        ``target_dof``, the weight 2 dof / (target + dof) at which the pool settles at
        target_dof degrees of freedom whatever each measurement's (1 when it alone has more)."""
        if self.target_dof is None:
            assert self.beta is not None
            return 1.0 - self.beta
        return min(1.0, 2.0 * dof / (self.target_dof + dof))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries or (self._staged is not None and key in self._staged)

    def __len__(self) -> int:
        return len(self._entries)

    def entry_keys(self) -> list[Hashable]:
        return list(self._entries)

    def value(self, key: Hashable) -> torch.Tensor:
        """Entry ``key``'s EMA as stored (not bias-corrected)."""
        return self._entries[key].value

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)
        if self._staged is not None:
            self._staged.pop(key, None)

    def update(
        self, key: Hashable, moment: torch.Tensor, dof: float, *, floor: float = 0.0
    ) -> tuple[torch.Tensor, float, float]:
        """Add one measurement's ``moment`` (estimated with ``dof`` degrees of freedom; ``floor``
        its rounding resolution) to entry ``key``; returns the bias-corrected pooled moment, its
        effective degrees of freedom and its pooled floor."""
        assert self.level_beta is None, "update() is the moment mode's (see add / close)"
        staged = self._staged
        store = staged if staged is not None else self._entries
        if staged is not None and key not in staged and key in self._entries:
            old = self._entries[key]  # copy on first write
            staged[key] = replace(old, value=old.value.clone())
        entry = self._fold(store, key, moment, dof, floor)
        if entry.weight == 0:  # nothing finite has entered yet
            return torch.full_like(entry.value, math.nan), math.nan, math.nan
        weight = entry.weight
        return entry.value / weight, weight**2 / entry.inverse_dof, entry.floor / weight

    def stage(self) -> None:
        """Hold the following updates apart from the pool until ``commit`` / ``rollback``."""
        if self._staged is None:
            self._staged = {}

    def commit(self) -> None:
        """Make the staged updates part of the pool."""
        if self._staged is not None:
            self._entries.update(self._staged)
        self._staged = None

    def rollback(self) -> None:
        """Drop the staged updates: the pool is as it was at ``stage`` (shape-and-level mode:
        drop the held moments)."""
        self._staged = None
        self._pending = {}

    def state_dict(self) -> dict[str, Any]:
        """The entries on the CPU (a checkpoint loads on any device), and the weighting."""
        return {
            "beta": self.beta,
            "target_dof": self.target_dof,
            "level_beta": self.level_beta,
            "level": (self.level_ema, self.level_weight),
            "base": (self.base_ema, self.base_weight),
            "entries": {
                key: (e.value.cpu().clone(), e.weight, e.inverse_dof, e.floor)
                for key, e in self._entries.items()
            },
        }

    def load_state_dict(
        self, state: Mapping[str, Any], device: torch.device | str | None = None
    ) -> None:
        """Continue from ``state_dict()``, entries moved to ``device``; this pool's own
        weighting (beta / target_dof) stays, so a changed config applies from now on. A state
        of the other mode (moments vs shapes: ``level_beta`` set in one and not the other), or
        of the earlier shape-and-level pool (no ``base``), is a ``ValueError``: its entries
        mean something else."""
        if (state.get("level_beta") is None) != (self.level_beta is None):
            raise ValueError(
                f"pool state of level_beta={state.get('level_beta')!r} cannot continue a pool "
                f"of level_beta={self.level_beta!r}: one pools moments, the other shapes"
            )
        if self.level_beta is not None and "base" not in state:
            raise ValueError(
                "pool state of an earlier shape-and-level pool (a level of traces, no bias "
                "ratio) cannot continue this level-and-bias pool"
            )
        self.level_ema, self.level_weight = state.get("level", (0.0, 0.0))
        self.base_ema, self.base_weight = state.get("base", (0.0, 0.0))
        self._pending = {}
        self._entries = {
            key: _PoolEntry(value.to(device, copy=True), weight, inverse_dof, floor)
            for key, (value, weight, inverse_dof, floor) in state["entries"].items()
        }

    def memory_bytes(self) -> int:
        """Bytes of the tensors the pool holds: its entries (between measurements, all of it)
        and, while a measurement is in flight, its held moments (``add``, until ``close``) or
        staged copies (``stage``, until ``commit``)."""
        held = [e.value for e in self._entries.values()]
        held += [e.value for e in (self._staged or {}).values()]
        held += [moment for moment, _, _ in self._pending.values()]
        return sum(t.numel() * t.element_size() for t in held)


@dataclass
class _PoolEntry:
    value: torch.Tensor  # EMA of the moment, not yet bias-corrected
    weight: float = 0.0  # 1 - beta^k: the sum of the EMA's weights
    inverse_dof: float = 0.0  # sum of squared weights / dof (Satterthwaite)
    floor: float = 0.0  # EMA of the moments' rounding resolutions


def check_dense_real(name: str, tensor: torch.Tensor) -> None:
    """Refuse a gradient the estimate cannot take: a sparse one (its variance would need the
    rows no sample touched) or a complex one (casting it to float64 would drop the imaginary
    part, silently). ``ValueError`` naming the parameter, what it is and what is allowed."""
    if tensor.layout != torch.strided:
        raise ValueError(
            f"{name or 'samples'}: a {tensor.layout} gradient cannot be measured; allowed: "
            "dense (strided) real floating-point gradients (convert with .to_dense())"
        )
    if tensor.is_complex():
        raise ValueError(
            f"{name or 'samples'}: dtype {tensor.dtype} is complex, and the noise scale is "
            "defined for real gradients only (a float64 cast would drop the imaginary part); "
            "allowed: real floating-point gradients (measure torch.view_as_real(g) as its own "
            "real parameter if that is the geometry you mean)"
        )


def _as_named_samples(
    samples: torch.Tensor | Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    if isinstance(samples, torch.Tensor):
        check_dense_real("", samples)
        if samples.dim() < 2:
            raise ValueError(
                f"a tensor of samples must have shape (n, ...), got {tuple(samples.shape)}"
            )
        return {"": samples.detach().to(torch.float64)}
    if len(samples) == 0:
        raise ValueError("samples is empty")
    names = list(samples[0])
    for i, sample in enumerate(samples):
        if list(sample) != names:
            raise ValueError(f"sample {i} has parameters {list(sample)}, sample 0 has {names}")
        for name in names:
            check_dense_real(f"sample {i}, parameter {name!r}", sample[name])
    return {
        name: torch.stack([s[name].detach().to(torch.float64) for s in samples]) for name in names
    }


def _resolve_norms(
    names: Sequence[str], shapes: Mapping[str, torch.Size], norm: NormSpec
) -> dict[str, Norm]:
    """Norm per measured parameter. Empty parameters (0 elements, e.g. (0, 5)) are left out
    under every norm, as the plan leaves them out (``capture.plan.plan_entries``): they add
    zero to every noise and signal sum and have no matrix to take a covariance of."""
    empty = {n for n in names if shapes[n][1:].numel() == 0}
    chosen = _resolve_norms_of(names, shapes, norm)
    chosen = {n: k for n, k in chosen.items() if n not in empty}
    if not chosen and empty:
        raise ValueError(
            f"norm={norm!r} leaves no non-empty parameter to measure (empty ones, with 0 "
            f"elements, are left out: {sorted(empty)})"
        )
    return chosen  # none at all: combined_norm says so


def _resolve_norms_of(
    names: Sequence[str], shapes: Mapping[str, torch.Size], norm: NormSpec
) -> dict[str, Norm]:
    """(``shapes`` are of the stacked samples: a parameter's own shape is ``shape[1:]``.)"""
    if isinstance(norm, (str, Norm)):
        if norm == "auto":
            raise ValueError(
                "norm='auto' needs an optimizer to read the geometry from; estimate_gns takes "
                "'l1', 'l2', 'nuclear' or a mapping name -> norm"
            )
        kind = norm_named(norm, also=["a mapping"])
        # one norm for every parameter it covers (the spectral estimate: matrices only)
        chosen = {n: kind for n in names if kind.covers(shapes[n][1:])}
        if not chosen:
            raise ValueError(
                f"norm={kind.name!r} needs at least one parameter with >= {kind.min_dims} dims"
            )
        return chosen
    unknown = sorted(set(norm) - set(names))
    if unknown:
        raise ValueError(f"norm mapping names parameters not in samples: {unknown}")
    chosen = {}
    for name in names:
        if norm.get(name) is None:
            continue
        kind = norm_named(norm[name], also=["None"])
        if not kind.covers(shapes[name][1:]):
            raise ValueError(kind.shape_error(repr(name), shapes[name][1:]))
        chosen[name] = kind
    return chosen


def estimate_gns(
    samples: torch.Tensor | Sequence[Mapping[str, torch.Tensor]],
    sample_size: int,
    norm: NormSpec,
    *,
    bias_correction: bool = True,
    layer_breakdown: bool = False,
    sqrt_trace_method: SqrtTraceMethod = "eigh",
    pool: MomentPool | None = None,
) -> GNSEstimate:
    """Reference noise-scale estimate from n local mean gradients, in float64.

    ``samples``: a tensor of shape (n, ...) or a list of n dicts name -> tensor; each sample is a
    mean gradient over ``sample_size`` examples. ``norm``: ``"l1"``, ``"l2"``, ``"nuclear"``
    (matrix parameters only; conv weights are flattened) or a mapping name -> norm/None.
    ``pool``: add this measurement's second moments to it (keyed by parameter name) and return
    the pooled noise as well (``GNSEstimate.pooled_noise``); call once per measurement with the
    same pool (and ``pool.restart()`` where the driver restarts it: at the end of the warm-up).
    Not for l2, which is linear in the moments (its pooled noise stays ``None``).
    Every distributed path in this package must agree with this function.

    Example::

        >>> g = torch.randn(8, 1000) + 0.1      # 8 ranks, each a mean over 16 examples
        >>> est = estimate_gns(g, sample_size=16, norm="l1")
        >>> est.num_samples, est.gns > 0
        (8, True)
    """
    named = _as_named_samples(samples)
    num_samples = next(iter(named.values())).shape[0]
    _check_counts(num_samples, sample_size)
    norms = _resolve_norms(list(named), {n: t.shape for n, t in named.items()}, norm)
    total = combined_norm(list(norms.values()))
    dof = num_samples - 1
    if not all(kind.pooled for kind in norms.values()):
        pool = None  # linear in the moments: nothing to pool (MeasurementSession does the same)

    layers: dict[str, LayerEstimate] = {}
    noise_part = signal_part_sum = 0.0
    pooled_parts = torch.zeros(3, dtype=torch.float64)
    for name, kind in norms.items():
        stack = named[name]
        if kind.matrix:
            mats = torch.stack([as_matrix(g) for g in stack])
            mean = mats.mean(0)
            deviations = mats - mean
            grams = [torch.einsum("sik,sjk->ij", deviations, deviations), mean @ mean.T]
            noise_t, signal_t, cov, floor = matrix_parts(
                grams, num_samples, sample_size, method=sqrt_trace_method, centered=True
            )
            if pool is not None:
                pooled_parts += pool_moment(
                    pool, name, cov, kind, dof, floor, trace=cov.diagonal().sum(),
                    method=sqrt_trace_method,
                )  # fmt: skip
        else:
            noise_t, signal_t, var = coordinate_parts(
                stack.mean(0), stack.square().sum(0), num_samples, sample_size, kind,
                bias_correction=bias_correction,
            )  # fmt: skip
            if pool is not None:  # l1 here: l2 is never pooled
                pooled_parts += pool_moment(
                    pool, name, var, kind, dof, trace=var.sum(), bias_correction=bias_correction
                )
        noise_part += float(noise_t)
        signal_part_sum += float(signal_t)
        if layer_breakdown:
            layer_noise, layer_signal = noise_and_signal(float(noise_t), float(signal_t), kind)
            layers[name] = LayerEstimate(kind.name, layer_noise, layer_signal)

    noise, signal = noise_and_signal(noise_part, signal_part_sum, total)
    pooled_noise = None
    if pool is not None:
        pooled_noise = noise_and_signal(
            pooled_root(pool, noise_part, pooled_parts.tolist()), 0.0, total
        )[0]
        finite = all(math.isfinite(v) for v in (noise, signal, pooled_noise))
        settle(pool, float(pooled_parts[2]), noise_part, dof, keep=finite)
    return GNSEstimate(
        norm=total,
        noise=noise,
        signal=signal,
        num_samples=num_samples,
        sample_size=sample_size,
        layers=layers if layer_breakdown else None,
        pooled_noise=pooled_noise,
    )
