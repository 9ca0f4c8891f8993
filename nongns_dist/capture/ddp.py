"""DDP capture: a comm hook that measures on every F-th optimizer step and is the default
all-reduce otherwise.

Per-rank samples (DESIGN.md section 2): the driver runs the micro-steps of one optimizer step
under ``no_sync`` except the last, so on the sync step each bucket holds this rank's gradient
accumulated over its local batch: n = ranks, b = micro-batch x accumulation steps.

On a measuring step, for each bucket, before its gradients are overwritten by the average:
* matrices measured in the nuclear norm: the local gradient is copied; when the bucket's
  average G arrives (its all-reduce callback) the Gram of the deviation G_r - G is formed in
  float64 and the copy dropped, so only buckets in flight hold copies;
* coordinates measured in l1/l2: their squares are REDUCE-SCATTERED (asynchronously), so each
  rank receives sum_r g_r^2 on 1/R of the bucket only;
* the bucket is averaged exactly like ``allreduce_hook``.
At the end of backward (an autograd callback: after DDP has written the averaged gradients and
before the user can clip them) each rank sums its slices, owners finish their matrices, and one
all-reduce of the per-parameter partial sums yields the estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from nongns_dist.capture.statistics import (
    Measurement,
    MeasurementPlan,
    TrackedParam,
    reduce_scatter_rows,
)
from nongns_dist.estimators import GNSEstimate

__all__ = ["DDPCaptureState", "gns_allreduce_hook"]


class DDPCaptureState:
    """All mutable state of the hook (pickling drops the process group, as PowerSGD's does)."""

    __slots__ = (
        "_buckets",
        "_measurement",
        "layer_breakdown",
        "make_measurement",
        "measure_now",
        "on_estimate",
        "plan",
        "process_group",
        "world_size",
    )

    def __init__(
        self,
        process_group: dist.ProcessGroup | None,
        plan: MeasurementPlan,
        *,
        measure_now: Callable[[], bool],
        make_measurement: Callable[[], Measurement],
        on_estimate: Callable[[GNSEstimate], None],
        layer_breakdown: bool = False,
    ) -> None:
        # -- wiring: set once by attach() -------------------------------------------------------
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.plan = plan
        self.measure_now = measure_now  # is the current optimizer step a measuring one?
        self.make_measurement = make_measurement
        self.on_estimate = on_estimate
        self.layer_breakdown = layer_breakdown
        # -- internal state of the measuring step in flight --------------------------------------
        self._measurement: Measurement | None = None
        self._buckets: list[_BucketRecord] = []

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("process_group",)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.process_group = None
        for k, v in state.items():
            setattr(self, k, v)

    # -- measuring ----------------------------------------------------------------------------
    def _begin(self) -> Measurement:
        if self._measurement is None:
            self._measurement = self.make_measurement()
            self._buckets = []
            # Runs after DDP's own finalize callback (queued at the first gradient of backward).
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        return self._measurement

    def _capture(self, bucket: dist.GradBucket) -> _BucketRecord:
        buffer = bucket.buffer()
        record = _BucketRecord(self._begin(), buffer)
        start = 0
        # The flat buffer holds the bucket's parameters' gradients back to back, in order
        # (``bucket.gradients()`` are p.grad themselves unless gradient_as_bucket_view).
        for param in bucket.parameters():
            end = start + param.numel()
            tracked = self.plan.tracked(param)
            if tracked is not None and tracked.norm == "nuclear":
                # kept until the average exists: the Gram is of the deviation G_r - G (below)
                record.matrices.append((tracked, start, end, buffer[start:end].clone()))
            elif tracked is not None:
                record.coords.append((tracked, start, end))
            start = end
        if record.coords:
            # Squares of the local gradient, reduce-scattered: rank r gets the sum over ranks of
            # chunk r of the bucket, and will sum the statistics of that chunk only. Below float32
            # the all-reduced mean is too coarse for Q - n g^2, so the float32 local gradient
            # travels in the same call and rank r gets an exact sum S on its chunk as well.
            local = buffer.float()
            record.with_sum = buffer.dtype not in (torch.float32, torch.float64)
            rows = [local.square(), local] if record.with_sum else [local.square()]
            record.squares_work, record.received, record.squares, record.chunk = (
                reduce_scatter_rows(rows, self.world_size, self.process_group)
            )
        self._buckets.append(record)
        return record

    def _finish(self) -> None:
        measurement, records = self._measurement, self._buckets
        self._measurement, self._buckets = None, []
        if measurement is None:
            return
        rank = dist.get_rank(self.process_group)
        means: dict[int, torch.Tensor] = {}
        for record in records:
            # Wait for this bucket's all-reduce and its callback (which formed the centred
            # Grams): DDP queues its finalize callback after this one, so p.grad is not set yet.
            assert record.done is not None
            record.done.wait()
            buffer = record.buffer  # now the mean gradient
            for tracked, start, end in record.matrix_spans:
                means[tracked.index] = buffer[start:end].view(tracked.shape)
            if record.squares_work is None:
                continue
            record.squares_work.wait()
            assert record.received is not None
            lo = rank * record.chunk
            # this rank's chunk of the mean: the exact float32 sums below float32, else the
            # averaged bucket
            mean = (
                record.received[1] / self.world_size
                if record.with_sum
                else buffer[lo : lo + record.chunk]
            )
            measurement.add_chunk_coordinates(record.coords, record.chunk, mean, record.received[0])
        if self.plan.matrices:
            owned = measurement.reduce_grams()
            for tracked in self.plan.matrices:
                if tracked.index in owned:
                    mean_matrix = means.get(tracked.index, torch.zeros(tracked.shape))
                    measurement.add_owned_matrix(tracked, owned[tracked.index], mean_matrix)
        self.on_estimate(measurement.finish(layer_breakdown=self.layer_breakdown))

    def _centre(self, record: _BucketRecord) -> None:
        """All-reduce callback: Grams of the deviations G_r - G, then drop the local copies.

        sum_r (G_r - G)(G_r - G)^T is PSD with no cancellation and equals
        sum_r G_r G_r^T - n G G^T up to n d d^T, d the rounding of the averaged G.
        """
        for tracked, start, end, local in record.matrices:
            mean = record.buffer[start:end].view(tracked.shape)
            record.measurement.add_local_gram(
                tracked, local.view(tracked.shape).double() - mean.double()
            )
            record.matrix_spans.append((tracked, start, end))
        record.matrices.clear()


class _BucketRecord:
    """What a measuring step remembers of one bucket until the end of backward."""

    __slots__ = ("buffer", "chunk", "coords", "done", "matrices", "matrix_spans", "measurement",
                 "received", "squares", "squares_work", "with_sum")  # fmt: skip

    def __init__(self, measurement: Measurement, buffer: torch.Tensor) -> None:
        self.measurement = measurement
        self.buffer = buffer
        self.coords: list[tuple[TrackedParam, int, int]] = []  # l1/l2: (param, start, end)
        # nuclear: (param, start, end, this rank's gradient copied before the all-reduce)
        self.matrices: list[tuple[TrackedParam, int, int, torch.Tensor]] = []
        # ... and what is left of them once the all-reduce callback dropped the copies
        self.matrix_spans: list[tuple[TrackedParam, int, int]] = []
        self.chunk = 0
        self.with_sum = False
        # ``squares`` stays referenced until its work completes: gloo reads it asynchronously
        self.squares: torch.Tensor | None = None
        self.received: torch.Tensor | None = None
        self.squares_work: Any = None
        self.done: torch.futures.Future[torch.Tensor] | None = None


def gns_allreduce_hook(
    state: DDPCaptureState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook: ``allreduce_hook`` plus, on measuring steps, gradient statistics."""
    record = state._capture(bucket) if state.measure_now() else None
    tensor = bucket.buffer()
    tensor.div_(state.world_size)  # as allreduce_hook: divide first (fp16 overflow)
    future = dist.all_reduce(tensor, group=state.process_group, async_op=True).get_future()
    if record is None:
        return future.then(lambda fut: fut.value()[0])

    def centre(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        state._centre(record)
        return fut.value()[0]

    record.done = future.then(centre)
    return record.done


# DDP's register_comm_hook compares these annotations with the real objects; postponed
# evaluation (``from __future__ import annotations``) would leave strings there.
gns_allreduce_hook.__annotations__ = {
    "state": DDPCaptureState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
