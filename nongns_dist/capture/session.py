"""``MeasurementSession``: what one measuring step is, owned once for every backend.

The driver arms the session at a step boundary, the capture backend streams statistics into it
as reductions happen, the driver finishes it at the next boundary (the one all-reduce):

    driver:   session.arm(accumulation_steps)        # a measuring step begins
    capture:  session.add_coordinates(param, mean, sq_sum)        # l1 / l2 slices
              session.add_matrices(params, local, mean)           # nuclear, per bucket / unit
    driver:   estimate = session.finish()             # one all-reduce of the partial sums
              session.settle_pool(keep)               # staged pool updates kept or dropped

Loss scaling (fp16): an engine whose gradients are scaled sets ``loss_scale``, a callable that
returns the scale the armed step's backward ran with (read once, on the first statistics of the
step). Statistics are divided by it where they enter the table (the mean by the scale, squares
and Grams by its square), so pooled moments of steps with different scales are in one unit. A
scaled step can also turn out skipped after its statistics were streamed in (the scaler finds an
overflow only after backward), so the pool's updates are then staged until the step closes.

Sample rule (DESIGN.md section 2), decided here and nowhere else:

    sample_kind  samples n               examples per sample b
    "rank"       ranks                   micro-batch x accumulation steps
    "micro"      ranks x accumulation    micro-batch

Matrices are finished as they arrive: each rank forms the float64 Gram of its deviation from
the mean, the upper triangles go to the matrix's owner only (``reduce_to_owners``), the owner
takes both square-root traces and keeps two scalars. Extra memory is bounded by
``triangle_budget`` float64 elements per reduction plus one matrix's temporaries, whatever the
number of layers. (``SampleAccumulator``, for samples that arrive over micro-steps, keeps its
sums until the step's end instead: that memory does grow with the model.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from nongns_dist.capture.collectives import (
    gram_triangle,
    reduce_scatter_rows,
    reduce_scatter_segments,
    reduce_to_owners,
    triangle_to_gram,
    upper_triangle,
)
from nongns_dist.capture.plan import MeasurementPlan, TrackedParam
from nongns_dist.config import GNSConfig
from nongns_dist.estimators import (
    GNSEstimate,
    LayerEstimate,
    MomentPool,
    finish,
    mean_signal,
    noise_from_variance,
    pooled_noise_part,
    sample_covariance,
    sample_variance,
    signal_part,
)
from nongns_dist.norms import as_matrix, sqrt_trace

__all__ = [
    "MeasurementSession",
    "SampleAccumulator",
    "SampleKind",
    "exact_sum_travels",
    "group_rank_and_size",
]

logger = logging.getLogger("nongns_dist")

SampleKind = Literal["rank", "micro"]


def exact_sum_travels(dtype: torch.dtype) -> bool:
    """Below float32 the reduced mean is too coarse for Q - n g^2: the float32 local gradient
    then travels with its squares, so each rank gets an exact sum S of its chunk as well."""
    return dtype not in (torch.float32, torch.float64)


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) without torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class MeasurementSession:
    """The n/b rule, the partial-sum table, the owner reductions and the final all-reduce of one
    data-parallel group. Built once per ``attach``; armed for each measuring step."""

    def __init__(
        self,
        plan: MeasurementPlan,
        config: GNSConfig,
        *,
        group: dist.ProcessGroup | None,
        micro_batch_size: int,
        sample_kind: SampleKind,
        device: torch.device | str = "cpu",
        triangle_budget: int = 1 << 20,
    ) -> None:
        # -- wiring ----------------------------------------------------------------------------
        self.plan = plan
        self.config = config
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        if (plan.rank, plan.world_size) != (self.rank, self.world_size):
            raise ValueError(
                f"the plan is for rank {plan.rank} of {plan.world_size}, the group has rank "
                f"{self.rank} of {self.world_size}"
            )
        self.micro_batch_size = micro_batch_size
        self.sample_kind: SampleKind = sample_kind
        self.device = torch.device(device)
        #: float64 elements of Gram triangles per owner reduction (memory bound, 8 MB).
        self.triangle_budget = triangle_budget
        #: coordinates per evaluation of the l1/l2 formula (its temporaries: ~4 MB each).
        self.coordinate_piece = 1 << 20
        # -- the measuring step in flight --------------------------------------------------------
        self.num_samples = 0
        self.sample_size = 0
        self.accumulation_steps = 0
        #: Gradient reductions seen by backends that count them (DDP, FSDP; every step,
        #: measuring or not): the driver tells a training step from an optimizer.step() without
        #: backward by it.
        self.reductions = 0
        self._claimed: set[object] = set()  # reductions already measured in this step
        #: Columns: noise and signal of this measurement, noise of the pooled moments.
        self._partial: torch.Tensor | None = None
        #: Second moments pooled over measurements (``config.pool_moments``): this rank's l1
        #: coordinates and the matrices it owns. Keys: (param index, first coordinate, count) of
        #: a slice in this rank's layout, or (param index,) of an owned matrix.
        #: l2 (the Euclidean noise scale) is linear in the moments: pooling would change only
        #: the smoothing, so it keeps the paper's EMA of the noise (no pool).
        pooled = config.pool_moments and plan.norm != "l2"
        self.pool = MomentPool(target_dof=config.pool_dof) if pooled else None
        self._slices: dict[int, list[tuple[int, int, int]]] = {}
        self._touched: set[Hashable] = set()  # pool entries this measurement updated
        #: The loss scale of the armed step's backward (None: gradients are not scaled).
        self.loss_scale: Callable[[], float] | None = None
        self._inverse_scale: float | None = None  # 1 / loss_scale(), read once per step

    # -- the sample rule -------------------------------------------------------------------------
    def sample_counts(self, accumulation_steps: int) -> tuple[int, int]:
        """(n, b) of a measuring step with this many micro-steps."""
        if self.sample_kind == "micro":
            return self.world_size * accumulation_steps, self.micro_batch_size
        return self.world_size, self.micro_batch_size * accumulation_steps

    def can_measure(self, accumulation_steps: int) -> bool:
        return self.sample_counts(accumulation_steps)[0] >= 2

    @property
    def can_ever_measure(self) -> bool:
        """Whether some accumulation count gives the 2 samples a variance needs."""
        return self.sample_kind == "micro" or self.world_size >= 2

    def claim(self, reduction: object) -> None:
        """A per-rank backend reports that it measures ``reduction`` (a bucket, an FSDP unit).
        The same one twice in one measuring step means a second synchronised backward, whose
        gradients are not this step's per-rank samples: refused rather than mixed in."""
        if reduction in self._claimed:
            raise RuntimeError(
                "a measuring step ran more than one synchronised backward; run the micro-steps "
                "through monitor.micro_steps() so that all but the last skip the gradient sync"
            )
        self._claimed.add(reduction)

    # -- driver side -----------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        return self._partial is not None

    def arm(self, accumulation_steps: int) -> bool:
        """Begin a measuring step of ``accumulation_steps`` micro-steps; False (not armed) when
        it would have fewer than the 2 samples a variance needs."""
        self.num_samples, self.sample_size = self.sample_counts(accumulation_steps)
        self.accumulation_steps = accumulation_steps
        self._claimed.clear()
        self._touched.clear()
        self._inverse_scale = None
        if self.pool is not None:
            self.pool.rollback()  # nothing of an abandoned measurement stays
        if self.num_samples < 2:
            self._partial = None
            return False
        if self.pool is not None and self.loss_scale is not None:
            self.pool.stage()
        self._partial = torch.zeros(
            len(self.plan.params), 3, dtype=torch.float64, device=self.device
        )
        return True

    def disarm(self) -> None:
        self._partial = None
        if self.pool is not None:
            self.pool.rollback()

    def settle_pool(self, keep: bool) -> None:
        """After ``finish``: keep the measurement's staged pool updates, or drop them (a step
        the loss scaler skipped, a non-finite estimate). A no-op when nothing was staged."""
        if self.pool is not None:
            if keep:
                self.pool.commit()
            else:
                self.pool.rollback()

    def _unscale(self) -> float:
        """1 / the loss scale of this step's backward (1.0 without scaling)."""
        if self._inverse_scale is None:
            scale = 1.0 if self.loss_scale is None else float(self.loss_scale())
            self._inverse_scale = 1.0 / scale
        return self._inverse_scale

    def finish(self) -> GNSEstimate:
        """The one all-reduce of per-parameter partial sums; ends the measuring step."""
        partial = self._table()
        if self.pool is not None:
            self._pool_untouched(partial)
        self._partial = None
        if self.world_size > 1:
            dist.all_reduce(partial, group=self.group)
        rows = partial.cpu()
        totals = rows.sum(0)
        noise, signal = finish(float(totals[0]), float(totals[1]), self.plan.norm)
        pooled_noise = None
        if self.pool is not None:
            pooled_noise = finish(float(totals[2]), 0.0, self.plan.norm)[0]
        layers = None
        if self.config.layer_breakdown:
            layers = {
                t.name: LayerEstimate(t.norm, *finish(float(row[0]), float(row[1]), t.norm))
                for t, row in zip(self.plan.params, rows, strict=True)
            }
        estimate = GNSEstimate(
            norm=self.plan.norm,
            noise=noise,
            signal=signal,
            num_samples=self.num_samples,
            sample_size=self.sample_size,
            layers=layers,
            pooled_noise=pooled_noise,
        )
        return estimate

    # -- checkpointing of the pooled moments (they are this rank's: one state per rank) ---------
    def pool_state(self) -> dict[str, Any] | None:
        """This rank's pooled moments, tagged with its rank and group size; None when not pooled."""
        if self.pool is None:
            return None
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "params": [t.name for t in self.plan.params],  # what the entries' indices mean
            **self.pool.state_dict(),
        }

    def load_pool_state(self, state: dict[str, Any] | None) -> bool:
        """Continue from ``pool_state()`` of the same rank in a group of the same size; anything
        else (another rank's state, another world size, none) restarts the pool, with a warning.
        Returns whether the state was loaded."""
        if self.pool is None:
            return False
        names = [t.name for t in self.plan.params]
        if state is not None and state["params"] != names:
            state, where = None, "taken with other measured parameters"
        elif state is not None and (state["rank"], state["world_size"]) != (
            self.rank, self.world_size,
        ):  # fmt: skip
            where = f"rank {state['rank']} of {state['world_size']}"
            state = None
        else:
            where = "none"
        if state is None:
            logger.warning(
                "nongns_dist: no pooled moments for rank %d of %d in the checkpoint (%s): the "
                "pool restarts (it reads low until it holds pool_dof degrees of freedom)",
                self.rank, self.world_size, where,
            )  # fmt: skip
            self.pool = MomentPool(target_dof=self.config.pool_dof)
            self._slices = {}
            return False
        self.pool.load_state_dict(state, self.device)
        self._slices = {}
        for key in self.pool.entry_keys():
            if isinstance(key, tuple) and len(key) == 3:  # a coordinate slice
                self._slices.setdefault(key[0], []).append(key)
        return True

    def _pool_untouched(self, table: torch.Tensor) -> None:
        """Pooled entries this measurement did not reach (a parameter without gradient on this
        step: FSDP2 leaves unused ones out of its reduce-scatter) take a zero moment, as a
        gradient of zeros would give, so the pooled noise covers every measured parameter."""
        assert self.pool is not None
        for key in self.pool.entry_keys():
            if key in self._touched:
                continue
            param = self.plan.params[key[0]]  # type: ignore[index]
            zero = torch.zeros_like(self.pool.value(key))
            pooled, dof, floor = self.pool.update(key, zero, self.num_samples - 1)
            self._add_pooled(table, param, pooled, dof, floor)

    def _add_pooled(
        self, table: torch.Tensor, param: TrackedParam, pooled: torch.Tensor, dof: float,
        floor: float,
    ) -> None:  # fmt: skip
        if param.norm == "nuclear":  # the pool keeps the upper triangle: half the state
            pooled = triangle_to_gram(pooled, param.gram_size)
        row = table[param.index]
        row[2] += pooled_noise_part(
            pooled, param.norm, dof, floor, method=self.config.sqrt_trace_method,
            tol=self.config.sqrt_trace_tol, bias_correction=self.config.bias_correction,
        ).to(row)  # fmt: skip

    def _table(self) -> torch.Tensor:
        if self._partial is None:
            raise RuntimeError("no measuring step is armed (MeasurementSession.arm)")
        return self._partial

    # -- capture side: coordinates (l1, l2) --------------------------------------------------------
    def add_coordinates(
        self, param: TrackedParam, mean: torch.Tensor, sq_sum: torch.Tensor, offset: int = 0
    ) -> None:
        """This rank's slice of ``param``: the mean gradient g and Q = sum_s g_s^2. Zero padding
        adds nothing (its variance and |g| are 0), so padded shards may be passed as they are.
        ``offset`` places the slice in this rank's layout of ``param``: slices with the same
        offset and length share pooled moments from one measurement to the next."""
        table = self._table()
        norm = param.norm
        dof = self.num_samples - 1
        correct = self.config.bias_correction
        inverse = self._unscale()
        mean, sq_sum = mean.reshape(-1), sq_sum.reshape(-1)
        # in pieces: the formula's temporaries stay small whatever the slice's size
        for start in range(0, mean.numel(), self.coordinate_piece):
            end = min(start + self.coordinate_piece, mean.numel())
            piece_mean, piece_sq = mean[start:end].float(), sq_sum[start:end].float()
            if inverse != 1.0:
                piece_mean, piece_sq = piece_mean * inverse, piece_sq * inverse**2
            var = sample_variance(piece_mean, piece_sq, self.num_samples, self.sample_size)
            row = table[param.index]
            row[0] += noise_from_variance(var, norm, dof, bias_correction=correct).to(row.device)  # type: ignore[arg-type]
            row[1] += signal_part(piece_mean, norm).to(row.device)  # type: ignore[arg-type]
            if self.pool is not None:  # l1 (l2 is never pooled)
                key = self._slice_key(param.index, offset + start, end - start)
                self._touched.add(key)
                self._add_pooled(table, param, *self.pool.update(key, var, dof))

    def _slice_key(self, index: int, first: int, count: int) -> tuple[int, int, int]:
        """Pool key of a slice; a slice that overlaps another of the same parameter (a backend
        whose layout changed) replaces it. DDP's per-parameter segments and FSDP's shards keep
        their layout, so this is a guard, not the common case."""
        key = (index, first, count)
        assert self.pool is not None
        if key not in self.pool:
            kept = []
            for old in self._slices.get(index, []):
                if old[1] < first + count and first < old[1] + old[2]:
                    self.pool.discard(old)
                else:
                    kept.append(old)
            self._slices[index] = [*kept, key]
        return key

    def add_coordinate_chunk(
        self,
        spans: Sequence[tuple[TrackedParam, int, int]],
        lo: int,
        mean: torch.Tensor,
        squares: torch.Tensor,
    ) -> None:
        """This rank's chunk ``[lo, lo + len(mean))`` of a flat buffer holding the parameters of
        ``spans`` (param, start, end); ``mean`` and ``squares`` are the chunk's g and Q."""
        hi = lo + mean.numel()
        for tracked, start, end in spans:
            a, b = max(start, lo), min(end, hi)
            if a < b:
                self.add_coordinates(
                    tracked, mean[a - lo : b - lo], squares[a - lo : b - lo], offset=a - start
                )

    def reduce_squares(
        self, local: torch.Tensor, *, shard_group: dist.ProcessGroup | None = None
    ) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
        """Start the reduce-scatter of the squares of a flat local gradient, in the chunks the
        gradient itself is reduce-scattered in, over ``shard_group`` (None: the session's group;
        HSDP passes its shard group). Row 1 of what is received is the exact float32 sum of the
        gradient where ``exact_sum_travels(local.dtype)``. Returns (work, received rows, packed
        input to keep alive until the work completes, chunk)."""
        group = self.group if shard_group is None else shard_group
        rows = [local, local] if exact_sum_travels(local.dtype) else [local]
        return reduce_scatter_rows(rows, group_rank_and_size(group)[1], group, square=(0,))

    def reduce_square_segments(
        self, local: torch.Tensor, segments: Sequence[tuple[int, int]]
    ) -> tuple[Any, torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
        """As ``reduce_squares`` for a backend whose every rank gets the whole mean (DDP): only
        the ``segments`` (the measured l1/l2 parameters) travel, each split evenly over the
        ranks, so a parameter's slice on a rank stays the same when buckets are rebuilt (its
        pooled moments go on). Returns (work, received, packed, parts), parts as
        ``segment_parts``."""
        rows = [local, local] if exact_sum_travels(local.dtype) else [local]
        return reduce_scatter_segments(
            rows, segments, self.world_size, self.rank, self.group, square=(0,)
        )

    # -- capture side: matrices (nuclear) ---------------------------------------------------------
    def add_matrices(
        self,
        params: Sequence[TrackedParam],
        local: Sequence[torch.Tensor],
        mean: Sequence[torch.Tensor],
    ) -> None:
        """Finish matrices from this rank's sample ``local[i]`` of ``params[i]`` and the mean
        ``mean[i]`` (full matrices, on every rank). A collective: every rank passes the same
        ``params`` in the same order.

        sum_r (G_r - G)(G_r - G)^T is formed in float64 from deviations, so it is PSD with no
        cancellation; with a rounded mean G' it gains only n (G - G')(G - G')^T, second order.
        (float32 Grams turn the zero eigenvalues of a rank-deficient C into +-1e-7 lambda_max,
        whose square roots add ~3e-4 relative each.)
        """
        batch: list[int] = []
        size = 0
        for i, t in enumerate(params):
            if batch and size + t.triangle_size > self.triangle_budget:
                self._finish_matrices([params[j] for j in batch], local, mean, batch)
                batch, size = [], 0
            batch.append(i)
            size += t.triangle_size
        if batch:
            self._finish_matrices([params[j] for j in batch], local, mean, batch)

    def _finish_matrices(
        self,
        params: list[TrackedParam],
        local: Sequence[torch.Tensor],
        mean: Sequence[torch.Tensor],
        positions: list[int],
    ) -> None:
        def triangles() -> Iterator[torch.Tensor]:
            for j, t in zip(positions, params, strict=True):
                deviation = local[j].reshape(t.shape).to(torch.float64, copy=True)
                deviation -= mean[j].reshape(t.shape)  # in place: one float64 temporary
                yield gram_triangle(as_matrix(deviation))

        owned = reduce_to_owners(
            params,
            [t.triangle_size for t in params],
            triangles(),
            world_size=self.world_size,
            rank=self.rank,
            group=self.group,
            device=local[positions[0]].device,
        )
        for j, t in zip(positions, params, strict=True):
            if t.index in owned:
                gram = triangle_to_gram(owned.pop(t.index), t.gram_size)
                self.add_owned_matrix(t, gram, mean[j], centred=True)

    def add_owned_matrix(
        self,
        param: TrackedParam,
        gram_sum: torch.Tensor,
        mean_grad: torch.Tensor,
        *,
        centred: bool,
    ) -> None:
        """Owner: finish ``param`` from the summed Gram (of deviations when ``centred``, else of
        the samples) and the mean gradient: two scalars into the table."""
        inverse = self._unscale()
        mean = as_matrix(mean_grad.detach().reshape(param.shape)).to(torch.float64)
        if inverse != 1.0:
            mean, gram_sum = mean * inverse, gram_sum * inverse**2
        mean_gram = mean @ mean.T
        method, tol = self.config.sqrt_trace_method, self.config.sqrt_trace_tol
        cov, floor = sample_covariance(
            gram_sum.to(torch.float64), mean_gram, self.num_samples, self.sample_size,
            centered=centred,
        )  # fmt: skip
        row = self._table()[param.index]
        row[0] += sqrt_trace(cov, method, tol=tol, floor=floor).to(row)
        row[1] += mean_signal(mean_gram, method, tol=tol).to(row)
        if self.pool is not None:
            key = (param.index,)
            self._touched.add(key)
            pooled = self.pool.update(key, upper_triangle(cov), self.num_samples - 1, floor=floor)
            self._add_pooled(self._table(), param, *pooled)


class SampleAccumulator:
    """This rank's samples of one measuring step, summed per parameter, reduced at the end.

    For backends whose reduction does not leave the mean where the statistics need it, or whose
    samples arrive over several micro-steps (ZeRO partitions the averaged gradient; ZeRO-2/3
    reduce every micro-step): each sample (a local mean gradient over the session's
    ``sample_size`` examples) is added as it appears; ``flush`` then runs

    * one reduce-scatter of [S | Q] over all l1/l2 coordinates (S = sum_s g_s, Q = sum_s g_s^2);
    * one owner reduction of the float64 Grams (upper triangles) and one of the float64 sums of
      each matrix; the owner finishes it (uncentred: the mean is known only at the end).

    Costs on measuring steps only: S and Q (float32) of the measured vectors, S (float64) and the
    Gram of the measured matrices, kept until ``flush``.
    """

    def __init__(self, session: MeasurementSession) -> None:
        self.session = session
        self._coord_sums: dict[int, torch.Tensor] = {}
        self._coord_squares: dict[int, torch.Tensor] = {}
        self._matrix_sums: dict[int, torch.Tensor] = {}
        self._grams: dict[int, torch.Tensor] = {}

    def add(self, param: TrackedParam, grad: torch.Tensor) -> None:
        """One sample of ``param``: its local gradient as a mean over ``sample_size`` examples."""
        i = param.index
        if param.norm == "nuclear":
            grad64 = grad.detach().reshape(param.shape).to(torch.float64)
            mat = as_matrix(grad64)
            self._add(self._grams, i, mat @ mat.T)
            self._add(self._matrix_sums, i, grad64.reshape(-1))
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

    def flush(self, device: torch.device) -> None:
        """Reduce everything added into the session (a collective: every rank calls it)."""
        s = self.session
        plan = s.plan
        n = s.num_samples
        # -- coordinates: one flat buffer in plan order, reduce-scattered as [S | Q] rows
        spans, start = [], 0
        for t in plan.params:
            if t.norm != "nuclear":
                spans.append((t, start, start + t.shape.numel()))
                start += t.shape.numel()
        if spans:
            sums = torch.zeros(start, dtype=torch.float32, device=device)
            squares = torch.zeros(start, dtype=torch.float32, device=device)
            for t, a, b in spans:  # a parameter without gradient here is a zero sample
                if t.index in self._coord_sums:
                    sums[a:b] = self._coord_sums[t.index]
                    squares[a:b] = self._coord_squares[t.index]
            work, received, _packed, chunk = reduce_scatter_rows(
                [sums, squares], s.world_size, s.group
            )
            work.wait()
            s.add_coordinate_chunk(spans, s.rank * chunk, received[0] / n, received[1])
        # -- matrices: Grams and sums to their owners
        matrices = plan.matrices
        if matrices:

            def zeros(size: int) -> torch.Tensor:
                return torch.zeros(size, dtype=torch.float64, device=device)

            def triangles() -> Iterator[torch.Tensor]:
                for t in matrices:
                    gram = self._grams.get(t.index)
                    if gram is None:  # no gradient on this rank (unused parameter): zeros
                        yield zeros(t.triangle_size)
                    else:
                        yield upper_triangle(gram)

            common = {"world_size": s.world_size, "rank": s.rank, "group": s.group}
            owned_grams = reduce_to_owners(
                matrices, [t.triangle_size for t in matrices], triangles(), device=device,
                **common,  # type: ignore[arg-type]
            )  # fmt: skip
            owned_sums = reduce_to_owners(
                matrices,
                [t.shape.numel() for t in matrices],
                (self._matrix_sums.get(t.index, zeros(t.shape.numel())) for t in matrices),
                device=device,
                **common,  # type: ignore[arg-type]
            )
            for t in matrices:
                if t.index in owned_grams:
                    gram = triangle_to_gram(owned_grams[t.index], t.gram_size)
                    s.add_owned_matrix(t, gram, owned_sums[t.index] / n, centred=False)
        self._coord_sums.clear()
        self._coord_squares.clear()
        self._matrix_sums.clear()
        self._grams.clear()
