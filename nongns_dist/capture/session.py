"""``MeasurementSession``: what one measuring step is, owned once for every backend.

The driver arms the session at a step boundary, the capture backend streams statistics into it
as reductions happen, the driver finishes it at the next boundary (the one all-reduce):

    driver:   session.arm(accumulation_steps)        # a measuring step begins
    capture:  session.add_coordinates(param, mean, sq_sum)        # l1 / l2 slices
              session.add_matrices(params, local, mean)           # nuclear, per bucket / unit
    driver:   estimate = session.finish()             # one all-reduce of the partial sums
              session.settle_pool(keep)               # staged pool updates kept or dropped

A failure in this rank's measurement math (an ``eigvalsh`` that does not converge, an out-of-memory
on the owner of a large matrix, any exception in the local formulas) must not leave the other
ranks waiting in the next collective until the backend's timeout. So every local computation runs
through ``guarded``: an exception is recorded, this rank skips the rest of the step's local math
but still takes part in every remaining collective of the step (with zeros), and the final
all-reduce carries one failure flag per rank. After it every rank raises ``MeasurementError``
naming the failing rank(s) and their exception (the failing rank's own is chained). The
gradient reduction itself is the engine's and is never skipped.

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
number of layers. (``capture.accumulator.SampleAccumulator``, for samples that arrive over
micro-steps, keeps its sums until the step's end instead: that memory grows with the model.)

Kept elsewhere, each in a module of its own: the pooled moments between steps
(``capture.pooling.RankPool``), the extra collectives (``capture.collectives``), the
micro-step accumulator (``capture.accumulator``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from nongns_dist.capture.collectives import (
    all_gather,
    exact_sum_travels,
    gram_triangle,
    group_rank_and_size,
    reduce_scatter_rows,
    reduce_scatter_segments,
    reduce_to_owners,
    triangle_to_gram,
    upper_triangle,
)
from nongns_dist.capture.plan import MeasurementPlan, TrackedParam
from nongns_dist.capture.pooling import RankPool
from nongns_dist.config import GNSConfig
from nongns_dist.estimators import (
    GNSEstimate,
    LayerEstimate,
    coordinate_parts,
    matrix_parts,
    noise_and_signal,
)
from nongns_dist.norms import as_matrix

__all__ = [
    "MeasurementError",
    "MeasurementSession",
    "SampleKind",
]

logger = logging.getLogger("nongns_dist")

SampleKind = Literal["rank", "micro"]

_T = TypeVar("_T")


class MeasurementError(RuntimeError):
    """The measurement of a step failed on some rank(s) of the data-parallel group. Raised on
    every rank at the end of that step (``MeasurementSession.finish``); ``ranks`` are the failing
    ranks in the group. The step's gradients were reduced as usual: only the measurement failed."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


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
        #: This rank's first exception in the step's local measurement math (``guarded``): the
        #: rank then sends zeros in the step's remaining collectives and fails it at ``finish``.
        self.failure: Exception | None = None
        #: The estimate ``finish`` produced, until ``take_estimate`` hands it to the driver.
        self._estimate: GNSEstimate | None = None
        #: Columns: noise and signal of this measurement; the pooled noise's parts
        #: (``estimators.pool_moment``: pooled moments or shapes, fresh entries, traces).
        self._partial: torch.Tensor | None = None
        #: Second moments pooled over measurements (``config.pool_moments``): this rank's l1
        #: coordinates and the matrices it owns. Keys: (param index, first coordinate, count) of
        #: a slice in this rank's layout, or (param index,) of an owned matrix.
        #: l2 (the Euclidean noise scale) is linear in the moments: pooling would change only
        #: the smoothing, so it keeps the paper's EMA of the noise (no pool).
        pooled = config.pool_moments and all(t.norm.pooled for t in plan.params)
        self.pool = RankPool(plan, config, self.device) if pooled else None
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

    def reduction(self, key: object = None) -> bool:
        """A capture hook's one duty: report each gradient reduction it sees; returns whether to
        measure it (the session is armed). Counts ``reductions`` (the driver tells a training
        step by it). ``key`` (a bucket, an FSDP unit; None for backends whose samples are
        micro-steps) is claimed on a measuring step: the same one twice means a second
        synchronised backward, whose gradients are not this step's per-rank samples: refused
        (``RuntimeError``) rather than mixed in."""
        self.reductions += 1
        if not self.armed:
            return False
        if key is not None:
            self._claim(key)
        return True

    def _claim(self, reduction: object) -> None:
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
        self._inverse_scale = None
        self.failure = None
        self._estimate = None
        if self.pool is not None:  # nothing of an abandoned measurement stays
            self.pool.begin(staged=self.loss_scale is not None)
        if self.num_samples < 2:
            self._partial = None
            return False
        self._partial = torch.zeros(
            len(self.plan.params), 5, dtype=torch.float64, device=self.device
        )
        return True

    def disarm(self) -> None:
        self._partial = None
        self.failure = None
        self._estimate = None
        if self.pool is not None:
            self.pool.abandon()

    def guarded(self, compute: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """``compute(*args, **kwargs)``: local measurement math of this rank (no collective
        inside). An exception is recorded as the step's failure and None returned; once the step
        has failed, nothing more is computed (None). The caller then sends zeros in place of
        what it would have sent, so the collectives of every rank stay matched until ``finish``
        reports the failure everywhere."""
        if self.failure is not None:
            return None
        try:
            return compute(*args, **kwargs)
        except Exception as exc:  # any: a rank that raises here leaves the others hanging
            self.failure = exc
            return None

    @property
    def failed(self) -> bool:
        """Whether this rank's measurement of the armed step has failed (see ``guarded``)."""
        return self.failure is not None

    def settle_pool(self, keep: bool) -> None:
        """After ``finish``: keep the measurement's staged pool updates, or drop them (a step
        the loss scaler skipped, a non-finite estimate). A no-op when nothing was staged."""
        if self.pool is not None:
            self.pool.settle(keep, self.num_samples - 1)

    def restart_pool(self) -> None:
        """Empty the pool (``MomentPool.restart``): the driver's call at the end of the warm-up.
        Moment mode keeps its pool: it has no bias ratio to protect."""
        if self.pool is not None:
            self.pool.restart()

    def _unscale(self) -> float:
        """1 / the loss scale of this step's backward (1.0 without scaling)."""
        if self._inverse_scale is None:
            scale = 1.0 if self.loss_scale is None else float(self.loss_scale())
            self._inverse_scale = 1.0 / scale
        return self._inverse_scale

    def finish(self) -> GNSEstimate:
        """The one all-reduce of per-parameter partial sums; ends the measuring step. A
        collective: every rank of the group calls it, failed or not. The estimate is also kept
        for ``take_estimate`` (a backend may finish before the optimizer step, the driver
        collects it when the step closes).

        Raises ``MeasurementError`` on every rank when any rank's local math failed: each rank
        adds its failure flag to the same all-reduce (one float per rank), so a failure costs
        no extra collective unless it happened (then one small gather of the messages)."""
        partial = self._table()
        if self.pool is not None:
            self.guarded(self.pool.fill_untouched, partial, self.num_samples - 1)
        self._partial = None
        failure, self.failure = self.failure, None
        flags = torch.zeros(self.world_size, dtype=partial.dtype, device=partial.device)
        if failure is not None:
            flags[self.rank] = 1.0
        packed = torch.cat([partial.reshape(-1), flags])
        if self.world_size > 1:
            dist.all_reduce(packed, group=self.group)
        packed = packed.cpu()  # sums and flags reach the host together, in one copy
        failed = [r for r, flag in enumerate(packed[partial.numel() :].tolist()) if flag]
        if failed:
            self._raise_failure(failed, failure)
        rows = packed[: partial.numel()].view(partial.shape)
        totals = rows.sum(0)
        noise, signal = noise_and_signal(float(totals[0]), float(totals[1]), self.plan.norm)
        pooled_noise = None
        if self.pool is not None:
            root = self.pool.pooled_root(float(totals[0]), totals[2:5].tolist())
            pooled_noise = noise_and_signal(root, 0.0, self.plan.norm)[0]
        layers = None
        if self.config.layer_breakdown:
            layers = {
                t.name: LayerEstimate(
                    t.norm.name, *noise_and_signal(float(row[0]), float(row[1]), t.norm)
                )
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
        self._estimate = estimate
        return estimate

    def take_estimate(self) -> GNSEstimate | None:
        """The estimate of the step that is closing, once: finished now if the step is still
        armed (a collective), the one ``finish`` kept if a backend finished it before the
        optimizer step, else None (the step did not measure)."""
        if self.armed:
            self.finish()
        estimate, self._estimate = self._estimate, None
        return estimate

    def _raise_failure(self, ranks: list[int], failure: Exception | None) -> None:
        """Raise ``MeasurementError`` on this rank, naming the failing ``ranks`` and their
        exceptions. The messages are all-gathered (every rank is here, since every rank saw the
        same flags) as fixed-width bytes on the session's device, like every other collective
        of the step: no object collective, which needs the backend's own device set up."""
        width = 400  # bytes of each rank's message
        text = "" if failure is None else f"{type(failure).__name__}: {failure}"
        mine = torch.zeros(width, dtype=torch.uint8, device=self.device)
        encoded = text.encode()[:width]
        if encoded:
            mine[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        everyone = mine
        if self.world_size > 1:
            everyone = torch.empty(self.world_size * width, dtype=torch.uint8, device=self.device)
            all_gather(everyone, mine, group=self.group)
        rows = everyone.view(self.world_size, width).cpu().tolist()
        messages = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]
        where = "; ".join(
            f"rank {r}: {messages[r] or 'see the error raised on that rank'}" for r in ranks
        )
        names = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)
        raise MeasurementError(
            f"nongns_dist: measuring the gradient noise scale failed on {names} of the "
            f"{self.world_size}-rank data-parallel group ({where}). This is raised "
            "on every rank at the end of the measuring step, before the optimizer update where "
            "nongns_dist sees it (the optimizer given to attach(), scaler.step(), DeepSpeed's "
            "engine.step()); the step's gradients were reduced as usual. Calling the step again "
            "on every rank applies it unmeasured; to train without measuring, set "
            "GNSConfig(enabled=False).",
            ranks,
        ) from failure

    def memory_bytes(self) -> int:
        """Bytes of tensors this session holds now: its pool (``RankPool.memory_bytes``);
        everything else of a step is freed by its end."""
        return 0 if self.pool is None else self.pool.memory_bytes()

    # -- checkpointing of the pooled moments (they are this rank's: one state per rank) ---------
    def pool_state(self) -> dict[str, Any] | None:
        """This rank's pooled moments, tagged with its rank and group size; None when not pooled."""
        return None if self.pool is None else self.pool.state(self.rank, self.world_size)

    def load_pool_state(self, state: dict[str, Any] | None) -> bool:
        """Continue from ``pool_state()`` (``RankPool.load``); returns whether it was loaded."""
        return self.pool is not None and self.pool.load(state, self.rank, self.world_size)

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
        offset and length share pooled moments from one measurement to the next. Local math
        only (``guarded``: a failure is recorded, not raised)."""
        self.guarded(self._add_coordinates, param, mean, sq_sum, offset)

    def _add_coordinates(
        self, param: TrackedParam, mean: torch.Tensor, sq_sum: torch.Tensor, offset: int
    ) -> None:
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
            noise, signal, var = coordinate_parts(
                piece_mean, piece_sq, self.num_samples, self.sample_size, norm,
                bias_correction=correct,
            )  # fmt: skip
            row = table[param.index]
            row[0] += noise.to(row.device)
            row[1] += signal.to(row.device)
            if self.pool is not None:  # l1 (l2 is never pooled)
                self.pool.add_slice(table, param, offset + start, var, dof)

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
        local: Sequence[torch.Tensor | None],
        mean: Sequence[torch.Tensor | None],
    ) -> None:
        """Finish matrices from this rank's sample ``local[i]`` of ``params[i]`` and the mean
        ``mean[i]`` (full matrices, on every rank). A collective: every rank passes the same
        ``params`` in the same order, failed or not (None in ``local`` / ``mean``: this rank's
        ``guarded`` copy of it failed; zeros are sent for it).

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
        local: Sequence[torch.Tensor | None],
        mean: Sequence[torch.Tensor | None],
        positions: list[int],
    ) -> None:
        def deviation_triangle(
            sample: torch.Tensor, centre: torch.Tensor, t: TrackedParam
        ) -> torch.Tensor:
            deviation = sample.reshape(t.shape).to(torch.float64, copy=True)
            deviation -= centre.reshape(t.shape)  # in place: one float64 temporary
            return gram_triangle(as_matrix(deviation))

        def triangles() -> Iterator[torch.Tensor]:
            for j, t in zip(positions, params, strict=True):
                sample, centre = local[j], mean[j]
                triangle = None
                if sample is not None and centre is not None:
                    triangle = self.guarded(deviation_triangle, sample, centre, t)
                # a failed rank still fills its part of the owners' reduce-scatter
                yield triangle if triangle is not None else self._zeros(t.triangle_size)

        owned = reduce_to_owners(
            params,
            [t.triangle_size for t in params],
            triangles(),
            world_size=self.world_size,
            rank=self.rank,
            group=self.group,
            device=self.device,
        )
        for j, t in zip(positions, params, strict=True):
            if t.index in owned:
                self.guarded(self._finish_owned, t, owned, mean[j], centred=True)

    def _zeros(self, numel: int) -> torch.Tensor:
        return torch.zeros(numel, dtype=torch.float64, device=self.device)

    def _finish_owned(
        self, param: TrackedParam, owned: dict[int, torch.Tensor], mean: torch.Tensor | None, *,
        centred: bool,
    ) -> None:  # fmt: skip
        """Owner: finish ``param`` from its summed Gram triangle, taken out of ``owned`` (so the
        received buffer is freed as soon as the matrix is rebuilt from it)."""
        if mean is None:
            raise RuntimeError(f"the mean of {param.name} is missing")  # a guarded copy failed
        gram_box = [triangle_to_gram(owned.pop(param.index), param.gram_size)]
        self._add_owned_matrix(param, gram_box, mean, centred=centred)

    def add_owned_matrix(
        self,
        param: TrackedParam,
        gram_sum: torch.Tensor,
        mean_grad: torch.Tensor,
        *,
        centred: bool,
    ) -> None:
        """Owner: finish ``param`` from the summed Gram (of deviations when ``centred``, else of
        the samples) and the mean gradient: two scalars into the table. Local math only
        (``guarded``: a failure is recorded, not raised). ``gram_sum`` is overwritten."""
        self.guarded(self._add_owned_matrix, param, [gram_sum], mean_grad, centred=centred)

    def _add_owned_matrix(
        self, param: TrackedParam, gram_box: list[torch.Tensor], mean_grad: torch.Tensor, *,
        centred: bool,
    ) -> None:  # fmt: skip
        """``gram_box``: a list holding the summed Gram, taken out here so that it is freed
        (overwritten by C_hat, then dropped) before the pool's own decomposition: the owner's
        m x m float64 temporaries (the Gram, G G^T, the eigensolver's copy) follow one another
        instead of stacking up."""
        inverse = self._unscale()
        grams = [gram_box.pop().to(torch.float64)]
        mean = as_matrix(mean_grad.detach().reshape(param.shape)).to(torch.float64)
        if inverse != 1.0:
            mean, grams[0] = mean * inverse, grams[0].mul_(inverse**2)
        grams.append(mean @ mean.T)
        del mean
        noise, signal, cov, floor = matrix_parts(
            grams, self.num_samples, self.sample_size, method=self.config.sqrt_trace_method,
            tol=self.config.sqrt_trace_tol, centered=centred,
        )  # fmt: skip
        row = self._table()[param.index]
        row[1] += signal.to(row)
        row[0] += noise.to(row)
        if self.pool is not None:
            trace, moment = cov.diagonal().sum(), upper_triangle(cov)
            del cov
            dof = self.num_samples - 1
            self.pool.add_matrix(self._table(), param, moment, dof, floor, trace=trace)
