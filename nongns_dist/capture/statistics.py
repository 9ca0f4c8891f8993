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

__all__ = [
    "Measurement",
    "MeasurementPlan",
    "SampleAccumulator",
    "TrackedParam",
    "reduce_scatter",
    "reduce_scatter_rows",
]


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
        return _gram_size(self.shape) if self.norm == "nuclear" else 0


def _gram_size(shape: torch.Size) -> int:
    """Rows of the matrix view of ``as_matrix``: the smaller of (out, in * kernel)."""
    return min(shape[0], shape.numel() // shape[0])


def reduce_scatter_rows(
    rows: list[torch.Tensor], world_size: int, group: dist.ProcessGroup | None
) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """Reduce-scatter several flat float32 tensors of one length together, asynchronously.

    Rank r receives, for every row, the sum over ranks of chunk r. Returns (work, received of
    shape (rows, chunk), the packed input to keep alive until the work completes, chunk).
    """
    numel = rows[0].numel()
    chunk = -(-numel // world_size)
    packed = torch.zeros(world_size, len(rows), chunk, dtype=torch.float32)
    for i, row in enumerate(rows):
        padded = torch.zeros(world_size * chunk, dtype=torch.float32)
        padded[:numel] = row
        packed[:, i] = padded.view(world_size, chunk)
    received = torch.empty(len(rows) * chunk, dtype=torch.float32)  # flat: gloo checks sizes
    work = reduce_scatter(received, packed.view(-1), group=group, async_op=True)
    return work, received.view(len(rows), chunk), packed, chunk


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
        # ZeRO-3 parameters are empty placeholders that carry their real shape in ds_shape
        shapes = [torch.Size(getattr(p, "ds_shape", p.shape)) for _, p, _ in measured]
        load = [0.0] * world_size
        owners: dict[int, int] = {}
        matrices = [i for i, (_, _, k) in enumerate(measured) if k == "nuclear"]

        def work(i: int) -> int:
            return _gram_size(shapes[i]) ** 3

        for i in sorted(matrices, key=lambda i: (-work(i), i)):
            owner = min(range(world_size), key=lambda r: (load[r], r))
            owners[i] = owner
            load[owner] += work(i)
        self.params = [
            TrackedParam(i, name, kind, shapes[i], owners.get(i))
            for i, (name, _, kind) in enumerate(measured)
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
        """Sum every matrix's Gram over ranks onto its owner only (upper triangles travel: the
        Grams are symmetric). Returns the full Grams this rank owns."""
        triangles = {}
        for t in self.plan.matrices:
            m = t.gram_size
            gram = self.local_grams.get(t.index)
            if gram is None:  # no gradient on this rank (unused parameter): a zero sample
                gram = torch.zeros(m, m, dtype=torch.float64)
            rows, cols = torch.triu_indices(m, m)
            triangles[t.index] = gram[rows, cols]
        owned = {}
        for index, upper in self.reduce_to_owners(triangles).items():
            m = self.plan.params[index].gram_size
            rows, cols = torch.triu_indices(m, m)
            gram = torch.zeros(m, m, dtype=torch.float64)
            gram[rows, cols] = upper
            gram[cols, rows] = upper
            owned[index] = gram
        return owned

    def reduce_to_owners(self, payload: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Sum one flat float64 tensor per matrix over ranks onto the matrix's owner only.

        One reduce-scatter over a buffer laid out owner by owner (each owner's chunk padded to
        the longest). Returns this rank's owned sums, by parameter index.
        """
        plan = self.plan
        chunks: list[list[torch.Tensor]] = [[] for _ in range(plan.world_size)]
        for t in plan.matrices:
            chunks[t.owner].append(payload[t.index])  # type: ignore[index]
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
            if t.owner == plan.rank:
                size = payload[t.index].numel()
                owned[t.index] = received[offset : offset + size]
                offset += size
        return owned

    def add_chunk_coordinates(
        self,
        spans: list[tuple[TrackedParam, int, int]],
        chunk: int,
        mean: torch.Tensor,
        squares: torch.Tensor,
    ) -> None:
        """Add this rank's chunk of a flat buffer that was reduce-scattered in R equal chunks.

        ``spans``: (param, start, end) of l1/l2 parameters in the flat buffer; ``mean`` and
        ``squares``: this rank's chunk of the mean gradient and of sum_s g_s^2.
        """
        lo = self.plan.rank * chunk
        for tracked, start, end in spans:
            a, b = max(start, lo), min(end, lo + chunk)
            if a < b:
                self.add_coordinates(tracked, mean[a - lo : b - lo], squares[a - lo : b - lo])

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


class SampleAccumulator:
    """This rank's samples of one measuring step, summed per parameter, then reduced once.

    For backends whose own reduction does not leave the mean where the statistics need it
    (ZeRO partitions the averaged gradient): each sample (a local mean gradient over
    ``sample_size`` examples) is added as it appears; ``finish`` then runs

    * one reduce-scatter of [S | Q] over all l1/l2 coordinates (S = sum_s g_s, Q = sum_s g_s^2):
      each rank sums the statistics of its 1/R of them;
    * one reduce of the float64 Grams (upper triangles) and one of the float64 sums of each
      matrix to its owner, who finishes it;
    * the one all-reduce of per-parameter partial sums.

    Costs on measuring steps only: S and Q (float32) of the measured vectors, S (float64) and the
    Gram of the measured matrices, kept until ``finish``.
    """

    def __init__(self, measurement: Measurement) -> None:
        self.measurement = measurement
        self.num_local_samples: dict[int, int] = {}
        self._coord_sums: dict[int, torch.Tensor] = {}
        self._coord_squares: dict[int, torch.Tensor] = {}
        self._matrix_sums: dict[int, torch.Tensor] = {}

    def add(self, param: TrackedParam, grad: torch.Tensor) -> None:
        """One sample of ``param``: its local gradient as a mean over ``sample_size`` examples."""
        i = param.index
        self.num_local_samples[i] = self.num_local_samples.get(i, 0) + 1
        if param.norm == "nuclear":
            grad64 = grad.detach().reshape(param.shape).double()
            self.measurement.add_local_gram(param, grad64)
            self._add(self._matrix_sums, i, grad64)
        else:
            flat = grad.detach().reshape(-1).float()
            self._add(self._coord_sums, i, flat)
            self._add(self._coord_squares, i, flat.square())

    @staticmethod
    def _add(store: dict[int, torch.Tensor], index: int, value: torch.Tensor) -> None:
        if index in store:
            store[index] += value
        else:
            store[index] = value.clone()

    def finish(self, *, layer_breakdown: bool = False) -> GNSEstimate:
        m = self.measurement
        plan = m.plan
        n = m.num_samples
        # -- coordinates: one flat buffer in plan order, reduce-scattered as [S | Q] rows
        spans, start = [], 0
        for t in plan.params:
            if t.norm != "nuclear":
                spans.append((t, start, start + t.shape.numel()))
                start += t.shape.numel()
        if spans:
            sums = torch.zeros(start, dtype=torch.float32)
            squares = torch.zeros(start, dtype=torch.float32)
            for t, a, b in spans:  # a parameter without gradient here is a zero sample
                if t.index in self._coord_sums:
                    sums[a:b] = self._coord_sums[t.index]
                    squares[a:b] = self._coord_squares[t.index]
            work, received, _packed, chunk = reduce_scatter_rows(
                [sums, squares], plan.world_size, m.group
            )
            work.wait()
            m.add_chunk_coordinates(spans, chunk, received[0] / n, received[1])
        # -- matrices: Grams and sums to their owners
        if plan.matrices:
            owned_grams = m.reduce_grams()
            payload = {
                t.index: self._matrix_sums.get(
                    t.index, torch.zeros(t.shape.numel(), dtype=torch.float64)
                ).reshape(-1)
                for t in plan.matrices
            }
            owned_sums = m.reduce_to_owners(payload)
            for t in plan.matrices:
                if t.index in owned_grams:
                    mean = (owned_sums[t.index] / n).view(t.shape)
                    m.add_owned_matrix(t, owned_grams[t.index], mean)
        return m.finish(layer_breakdown=layer_breakdown)
