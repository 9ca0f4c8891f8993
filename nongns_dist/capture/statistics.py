"""What every capture backend shares: which parameters are measured in which norm, who owns
each matrix, the per-parameter partial-sum table, the Gram reduction to owners, and the ONE
final all-reduce that turns a measuring step into a ``GNSEstimate``.

A backend only has to say, per measuring step, "here are my coordinates of parameter i:
mean and sum of squares" (``add_coordinates``) and "here is my local Gram of matrix i"
(``add_local_gram``), then call ``finish``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nongns_dist.estimators import (
    GNSEstimate,
    LayerEstimate,
    combined_norm,
    coordinate_partial_sums,
    finish,
    gram_partial_sums,
)
from nongns_dist.norms import as_matrix

__all__ = ["Measurement", "MeasurementPlan", "TrackedParam", "reduce_scatter"]


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> Any:
    """Reduce-scatter of one flat tensor; torch 2.13 renamed reduce_scatter_tensor (deprecated
    there) to reduce_scatter_single. Looked up per call, so wrappers of torch.distributed see it."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


logger = logging.getLogger("nongns_dist")


@dataclass(frozen=True)
class TrackedParam:
    """A parameter that enters the estimate."""

    index: int  # row in the partial-sum table
    name: str
    norm: str  # l1, l2 or nuclear
    shape: torch.Size
    owner: int | None = None  # nuclear only: the rank that reduces and finishes its Gram

    @property
    def gram_size(self) -> int:
        return (
            min(self.shape[0], self.shape.numel() // self.shape[0]) if self.norm == "nuclear" else 0
        )


class MeasurementPlan:
    """Fixed per attach: the measured parameters, their norms, and matrix owners.

    Owners balance the eigen/Newton-Schulz work (m^3) across ranks, greedily from the largest,
    with ties broken by parameter order so every rank computes the same plan.
    """

    def __init__(
        self,
        named_norms: list[tuple[str, torch.Tensor, str | None]],
        world_size: int,
        rank: int,
    ) -> None:
        self.world_size = world_size
        self.rank = rank
        measured = [(n, p, k) for n, p, k in named_norms if k is not None]
        self.norm = combined_norm([k for _, _, k in measured])  # raises on l2 + dual mixes
        load = [0.0] * world_size
        owners: dict[int, int] = {}
        matrices = [(i, p) for i, (_, p, k) in enumerate(measured) if k == "nuclear"]
        for i, p in sorted(matrices, key=lambda ip: (-(min(as_matrix(ip[1]).shape) ** 3), ip[0])):
            owner = min(range(world_size), key=lambda r: (load[r], r))
            owners[i] = owner
            load[owner] += min(as_matrix(p).shape) ** 3
        self.params = [
            TrackedParam(i, name, kind, p.shape, owners.get(i))
            for i, (name, p, kind) in enumerate(measured)
        ]
        self.tensors = [p for _, p, _ in measured]
        self.by_id = {id(p): self.params[i] for i, (_, p, _) in enumerate(measured)}
        self.matrices = [t for t in self.params if t.norm == "nuclear"]

    def tracked(self, param: torch.Tensor) -> TrackedParam | None:
        return self.by_id.get(id(param))


class Measurement:
    """Sufficient statistics of one measuring step, reduced to one estimate.

    ``num_samples`` (n) and ``sample_size`` (b) follow DESIGN.md section 2: per-rank samples
    give n = ranks, b = local examples; per-micro-step samples give n = ranks x micro-steps.
    """

    def __init__(
        self,
        plan: MeasurementPlan,
        num_samples: int,
        sample_size: int,
        *,
        bias_correction: bool,
        sqrt_trace_method: str,
        sqrt_trace_tol: float,
        group: dist.ProcessGroup | None,
        centered_grams: bool = False,
    ) -> None:
        self.plan = plan
        self.num_samples = num_samples
        self.sample_size = sample_size
        self.bias_correction = bias_correction
        self.sqrt_trace_method = sqrt_trace_method
        self.sqrt_trace_tol = sqrt_trace_tol
        self.group = group
        #: Local Grams are of deviations G_s - G (backends where the mean is known first).
        self.centered_grams = centered_grams
        self.partial = torch.zeros(len(plan.params), 2, dtype=torch.float64)
        self.local_grams: dict[int, torch.Tensor] = {}

    # -- coordinates (l1, l2) -----------------------------------------------------------------
    def add_coordinates(
        self, param: TrackedParam, mean: torch.Tensor, sq_sum: torch.Tensor
    ) -> None:
        """This rank's slice of ``param``: the mean gradient and the sum of squared samples."""
        if mean.numel() == 0:
            return
        noise, signal = coordinate_partial_sums(
            mean.float(),
            sq_sum.float(),
            self.num_samples,
            self.sample_size,
            param.norm,  # type: ignore[arg-type]
            bias_correction=self.bias_correction,
        )
        self.partial[param.index, 0] += noise
        self.partial[param.index, 1] += signal

    # -- matrices (nuclear) -------------------------------------------------------------------
    def add_local_gram(self, param: TrackedParam, local_grad: torch.Tensor) -> None:
        """Add G_s G_s^T of one of this rank's samples (or of its deviation G_s - G when the
        measurement is ``centered_grams``).

        In float64: tr(C^{1/2}) takes square roots of eigenvalues, and a float32 Gram turns the
        zero eigenvalues of a rank-deficient C (local batch < m) into +-1e-7 lambda_max, whose
        roots add ~3e-4 relative each. Measuring steps only; the upper triangle travels.
        """
        mat = as_matrix(local_grad.detach()).double()
        gram = mat @ mat.T
        if param.index in self.local_grams:  # several samples on this rank (micro-steps)
            self.local_grams[param.index] += gram
        else:
            self.local_grams[param.index] = gram

    def reduce_grams(self) -> dict[int, torch.Tensor]:
        """Sum every matrix's Gram over ranks onto its owner only.

        One reduce-scatter over a buffer laid out owner by owner (each owner's chunk padded to
        the longest), carrying the upper triangles only (the Grams are symmetric). Returns the
        full Grams this rank owns.
        """
        plan = self.plan
        chunks: list[list[torch.Tensor]] = [[] for _ in range(plan.world_size)]
        for t in plan.matrices:
            m = t.gram_size
            gram = self.local_grams.get(t.index)
            if gram is None:  # no gradient on this rank (unused parameter): a zero sample
                gram = torch.zeros(m, m, dtype=torch.float64)
            rows, cols = torch.triu_indices(m, m)
            chunks[t.owner].append(gram[rows, cols])  # type: ignore[index]
        flat = [torch.cat(c) if c else torch.zeros(0, dtype=torch.float64) for c in chunks]
        width = max(f.numel() for f in flat)
        if width == 0:
            return {}
        send = torch.zeros(plan.world_size, width, dtype=torch.float64)
        for r, f in enumerate(flat):
            send[r, : f.numel()] = f
        received = torch.empty(width, dtype=torch.float64)
        if plan.world_size > 1:
            reduce_scatter(received, send.view(-1), group=self.group)
        else:
            received.copy_(send[0])
        owned: dict[int, torch.Tensor] = {}
        offset = 0
        for t in plan.matrices:
            if t.owner != plan.rank:
                continue
            m = t.gram_size
            rows, cols = torch.triu_indices(m, m)
            upper = received[offset : offset + rows.numel()]
            offset += rows.numel()
            gram = torch.zeros(m, m, dtype=torch.float64)
            gram[rows, cols] = upper
            gram[cols, rows] = upper
            owned[t.index] = gram
        return owned

    def add_owned_matrix(
        self, param: TrackedParam, gram_sum: torch.Tensor, mean_grad: torch.Tensor
    ) -> None:
        """Owner: finish matrix ``param`` from the summed Gram and the mean gradient."""
        mean = as_matrix(mean_grad.detach()).to(torch.float64)
        noise, signal = gram_partial_sums(
            gram_sum.to(torch.float64),
            mean @ mean.T,
            self.num_samples,
            self.sample_size,
            method=self.sqrt_trace_method,  # type: ignore[arg-type]
            tol=self.sqrt_trace_tol,
            centered=self.centered_grams,
        )
        self.partial[param.index, 0] += noise
        self.partial[param.index, 1] += signal

    # -- the one all-reduce ---------------------------------------------------------------------
    def finish(self, *, layer_breakdown: bool = False) -> GNSEstimate:
        if self.plan.world_size > 1:
            dist.all_reduce(self.partial, group=self.group)
        totals = self.partial.sum(0)
        noise, signal = finish(float(totals[0]), float(totals[1]), self.plan.norm)
        layers = None
        if layer_breakdown:
            layers = {
                t.name: LayerEstimate(t.norm, *finish(float(row[0]), float(row[1]), t.norm))
                for t, row in zip(self.plan.params, self.partial, strict=True)
            }
        estimate = GNSEstimate(
            norm=self.plan.norm,
            noise=noise,
            signal=signal,
            num_samples=self.num_samples,
            sample_size=self.sample_size,
            layers=layers,
        )
        if not estimate.is_finite:
            logger.warning("non-finite gradient statistics: measurement skipped, batch unchanged")
        return estimate
