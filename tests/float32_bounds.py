"""Tolerances for "the distributed estimate equals ``estimate_gns``", derived from the float32
error of what the capture computes, instead of a constant tuned on one CPU.

The captured local gradients equal the reference's bit for bit (the same float32 kernels on the
same inputs); what differs is arithmetic. The reference works in float64 from the gathered
samples. The session works in float32 where it follows the paper's scheme (u = 2^-24 below):

* coordinates (l1, l2): squares g_s^2, their reduce-scatter sum Q, the reduced mean g, then
  sigma^2 = b/(n-1) (Q - n g^2). Q and n g^2 carry relative errors of a few u, and the
  subtraction cancels wherever the samples agree: the error of sigma_i^2 is bounded by
  b/(n-1) (6n + 4) u Q_i (squares: u; the sum of n: (n-1) u; n g^2 from the rounded mean:
  (2n + 3) u Q_i, using |g| sum_s |g_s| <= Q and n g^2 <= Q; the subtraction: u Q_i), however
  small sigma_i^2 itself is. Each sqrt then moves by at most min(sqrt(d), d / sqrt(s)) for an
  error d of a variance s; sums of N terms add (log2 N + 2) u.
* matrices (nuclear): centred float64 Grams of deviations from the float32-rounded mean G'; the
  rounding D = G' - G (|D| <= u sum_s |G_s| elementwise) adds the PSD term b n/(n-1) D D^T to C,
  which moves tr C^{1/2} by at most tr (b n/(n-1) D D^T)^{1/2} <= sqrt(b n m/(n-1)) ||D||_F
  (m rows; Rotfel'd's trace inequality, then Cauchy-Schwarz), and ||G||_* by at most
  sqrt(m) ||D||_F; the float64 eigensolver adds 1e-12 relative.
* pooled moments: EMAs of those per-coordinate variances (float32) and matrices (float64); the
  error bounds are pooled with the same weights (a second ``MomentPool``), plus 3 u per update
  for the float32 EMA of an l1 moment; the l1 and nuclear parts are bounded apart (the l1 part
  carries c4 of the pool's degrees of freedom) and the pooled noise gets the larger.

With ``unit`` = 2^-11 the same bound covers samples that are fp16 gradients compared with a
float64 recompute: each fp16 element carries a few units of rounding, a perturbation of g_s
that moves sigma_i^2 by at most about 2 k u Q_i for k units, inside the (6n + 4) u Q_i term.

Layers then add before squaring (l1, nuclear) or add squared (l2). The bounds are first order
in u, a factor 2 is kept on top for the second-order terms and the rounding of the final sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from nongns_dist.estimators import MomentPool
from nongns_dist.norms import as_matrix

U32 = 2.0**-24  # unit roundoff of float32
SAFETY = 2.0  # second-order terms and the rounding of the final sums


@dataclass
class Tolerance:
    """Relative tolerances of one measurement: totals, pooled noise and each layer's."""

    noise: float
    signal: float
    pooled_noise: float
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (noise, signal)


def _squared(rel_root: float) -> float:
    """Relative error of x^2 from a relative error of x."""
    return (1.0 + rel_root) ** 2 - 1.0


def _sqrt_sum_error(variance: torch.Tensor, error: torch.Tensor) -> float:
    """Bound on |sum_i sqrt(v_i + d_i) - sum_i sqrt(v_i)| for |d_i| <= error_i (v_i + d_i
    clamped at 0, as the estimators do)."""
    root = variance.clamp_min(0).sqrt()
    tight = torch.where(root > 0, error / root.clamp_min(1e-300), torch.inf)
    return float(torch.minimum(error.sqrt(), tight).sum())


class Float32Bound:
    """Derives the tolerance of each measurement of a run; ``step`` once per measurement,
    after ``estimate_gns`` updated the reference ``pool`` (when there is one)."""

    def __init__(self, target_dof: float | None = None, *, unit: float = U32) -> None:
        #: unit roundoff of the arithmetic (and of the samples, where they were rounded)
        self.unit = unit
        #: error bounds pooled with the same weights as the reference pool's entries
        self.errors = MomentPool(target_dof=target_dof) if target_dof is not None else None
        self.measurements = 0
        #: level-and-bias mode: (shape, error) per entry as pooled BEFORE this measurement
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: level-and-bias mode: the largest relative error of a root that entered the level / D
        self._entered = 0.0

    def step(
        self,
        samples: Sequence[Mapping[str, torch.Tensor]],
        sample_size: int,
        norms: Mapping[str, str | None],
        pool: MomentPool | None = None,
    ) -> Tolerance:
        n, b = len(samples), sample_size
        u = self.unit
        self.measurements += 1
        layers: dict[str, tuple[float, float]] = {}
        root_err = root_total = 0.0  # l1 / nuclear: sums of dual norms, before squaring
        sq_err = sq_total = 0.0  # l2: sums of squared terms
        signal_root_err = signal_root = 0.0
        signal_sq_err = signal_sq = 0.0
        # what the pooled noise is made of, per entry: (kind, error bound of its moment, raw
        # root, raw root error); nuclear's moment error is the trace of its perturbation
        entries: dict[str, tuple[str, torch.Tensor, float, float]] = {}
        trace = trace_err = 0.0
        for name, norm in norms.items():
            if norm is None:
                continue
            stack = torch.stack([s[name].double() for s in samples])  # (n, *shape)
            if norm == "nuclear":
                if stack[0].dim() < 2:
                    continue
                mats = torch.stack([as_matrix(g) for g in stack])
                mean = mats.mean(0)
                rows = mean.shape[0]
                dev = mats - mean
                cov = b / (n - 1) * torch.einsum("sij,skj->ik", dev, dev)
                root = float(torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().sum())
                nuclear = float(torch.linalg.svdvals(mean).sum())
                rounding = u * float(mats.abs().sum(0).norm())  # ||D||_F
                perturbation = b * n / (n - 1) * rounding**2  # tr of b n/(n-1) D D^T
                noise_e = math.sqrt(rows * perturbation) + 1e-12 * root
                signal_e = math.sqrt(rows) * rounding + 1e-12 * nuclear
                layers[name] = (_squared(noise_e / root) if root else 0.0,
                                _squared(signal_e / nuclear) if nuclear else 0.0)  # fmt: skip
                root_err, root_total = root_err + noise_e, root_total + root
                signal_root_err, signal_root = signal_root_err + signal_e, signal_root + nuclear
                entries[name] = ("nuclear", torch.tensor([perturbation]), root, noise_e)
                trace += float(cov.diagonal().sum())
                trace_err += perturbation
                continue
            flat = stack.reshape(n, -1)
            count = flat.shape[1]
            g = flat.mean(0)
            squares = flat.square().sum(0)
            variance = b / (n - 1) * (flat - g).square().sum(0)
            var_err = b / (n - 1) * (6 * n + 4) * u * squares
            sum_u = (math.log2(max(count, 1)) + 2) * u
            g_err = u * flat.abs().sum(0)  # the reduced mean's rounding
            if norm == "l2":
                noise = float(variance.sum())
                noise_e = float(var_err.sum()) + sum_u * noise
                signal = float(g.square().sum())
                signal_e = float((2 * g.abs() * g_err + g_err.square()).sum()) + sum_u * signal
                layers[name] = (noise_e / noise if noise else 0.0,
                                signal_e / signal if signal else 0.0)  # fmt: skip
                sq_err, sq_total = sq_err + noise_e, sq_total + noise
                signal_sq_err, signal_sq = signal_sq_err + signal_e, signal_sq + signal
                continue
            root = float(variance.clamp_min(0).sqrt().sum())
            noise_e = _sqrt_sum_error(variance, var_err) + sum_u * root
            l1 = float(g.abs().sum())
            signal_e = float(g_err.sum()) + sum_u * l1
            layers[name] = (_squared(noise_e / root) if root else 0.0,
                            _squared(signal_e / l1) if l1 else 0.0)  # fmt: skip
            root_err, root_total = root_err + noise_e, root_total + root
            signal_root_err, signal_root = signal_root_err + signal_e, signal_root + l1
            entries[name] = ("l1", var_err, root, noise_e)
            trace += float(variance.sum())
            trace_err += float(var_err.sum())
        if sq_total:  # l2
            noise_rel = sq_err / sq_total
            signal_rel = signal_sq_err / signal_sq if signal_sq else 0.0
        else:
            noise_rel = _squared(root_err / root_total) if root_total else 0.0
            signal_rel = _squared(signal_root_err / signal_root) if signal_root else 0.0
        pooled_rel = 0.0
        if pool is not None and self.errors is not None and entries:
            root_rel = root_err / root_total if root_total else 0.0
            pooled_rel = self._pooled(pool, entries, n, trace, trace_err, root_rel)
        return Tolerance(
            noise=SAFETY * noise_rel,
            signal=SAFETY * signal_rel,
            pooled_noise=SAFETY * _squared(pooled_rel),
            layers={k: (SAFETY * a, SAFETY * s) for k, (a, s) in layers.items()},
        )

    def _pooled(
        self,
        pool: MomentPool,
        entries: Mapping[str, tuple[str, torch.Tensor, float, float]],
        n: int,
        trace: float,
        trace_err: float,
        root_rel: float,
    ) -> float:
        """Relative error bound of the pooled noise's root. Moment mode: the reference pool's
        stored EMAs of this measurement on, with error bounds EMA-ed alike. Level-and-bias
        mode, level x S / D: S from the shapes pooled before this measurement (fresh entries:
        this measurement's own part over sqrt(T)), plus T's relative error; the level and D
        are EMAs (positive weights) of each measurement's root (relative error ``root_rel``)
        and root / sqrt(T), so each is off by at most the largest relative error of what
        entered it: the running maximum of root_rel + T's relative error, once for each."""
        assert self.errors is not None
        u = self.unit
        # each kind apart: the l1 part carries c4 of the pool's dof, nuclear's does not; fresh
        # parts are in other units than pooled shapes: bound each group and take the largest
        err: dict[tuple[str, bool], float] = {}
        tot: dict[tuple[str, bool], float] = {}
        level_mode = pool.level_beta is not None
        for name, (kind, moment_err, raw_root, raw_err) in entries.items():
            if level_mode:
                before = self._before.get(name)
                if before is None:  # fresh: this measurement's own part
                    e, r, group = raw_err, raw_root, (kind, True)
                else:
                    e, r = _stored_error(kind, *before, self.measurements, u)
                    group = (kind, False)
                self.errors.update(name, moment_err / trace if trace > 0 else moment_err, n - 1)
                self._before[name] = (pool.value(name).double().clone(),
                                      self.errors.value(name).clone())  # fmt: skip
            else:
                self.errors.update(name, moment_err, n - 1)
                e, r = _stored_error(kind, pool.value(name).double(), self.errors.value(name),
                                     self.measurements, u)  # fmt: skip
                group = (kind, False)
            err[group] = err.get(group, 0.0) + e
            tot[group] = tot.get(group, 0.0) + r
        rel = max((err[k] / tot[k] for k in tot if tot[k] > 0), default=0.0)
        if level_mode and trace > 0:
            self._entered = max(self._entered, root_rel + trace_err / trace)
            rel += trace_err / trace + 2 * self._entered  # S's 1 / sqrt(T); the level and D
        return rel


def _stored_error(
    kind: str, stored: torch.Tensor, stored_err: torch.Tensor, measurements: int, u: float
) -> tuple[float, float]:
    """(error bound, value) of an entry's root from its stored EMA and EMA-ed error bound
    (the same weights, so comparable whatever their common scale)."""
    if kind == "nuclear":
        # the pooled perturbation's trace bounds its sqrt-trace through Cauchy-Schwarz
        rows = stored.shape[0]
        root = float(torch.linalg.eigvalsh(stored).clamp_min(0).sqrt().sum())
        return math.sqrt(rows * float(stored_err.sum())) + 1e-12 * root, root
    stored = stored.reshape(-1)
    stored_err = stored_err + 3 * measurements * u * stored.abs()  # float32 EMA updates
    root = float(stored.clamp_min(0).sqrt().sum())
    sum_u = (math.log2(max(stored.numel(), 1)) + 2) * u
    return _sqrt_sum_error(stored, stored_err) + sum_u * root, root
