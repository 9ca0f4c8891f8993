"""DDP capture: a comm hook that is ``allreduce_hook`` on steps that do not measure and adds
gradient statistics on steps that do.

Per-rank samples (DESIGN.md section 2): the driver runs the micro-steps of one optimizer step
under ``no_sync`` except the last, so on the sync step each bucket holds this rank's gradient
accumulated over its local batch.

On a measuring step, for each bucket, before its gradients are overwritten by the average:
* matrices measured in the nuclear norm: the local gradient is copied;
* coordinates measured in l1/l2: their squares are REDUCE-SCATTERED (asynchronously), so each
  rank receives sum_r g_r^2 on 1/R of the bucket only;
* the bucket is averaged exactly like ``allreduce_hook``.
A bucket is finished (squares summed, Grams of G_r - G sent to owners and square-rooted there,
copies dropped) when the next bucket arrives, before that one is copied, or at the end of
backward: one bucket's copies are alive at a time, however many layers the model has.

A failure in this rank's measurement math (a copy, a Gram, a square-root trace) is recorded by
the session and the rank sends zeros in the remaining measurement collectives; the bucket's own
all-reduce always runs. The step then fails on every rank at ``session.finish``, which the
driver runs before the optimizer update.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nongns_dist.capture.collectives import exact_sum_travels
from nongns_dist.capture.plan import PlanEntry, TrackedParam, module_plan_entries
from nongns_dist.capture.session import MeasurementSession, SampleKind

__all__ = ["DDPCapture", "gns_allreduce_hook"]


class DDPCapture:
    """The DDP backend; also the comm hook's state (pickling drops the group and session)."""

    __slots__ = ("_records", "device", "group", "model", "sample_kind", "session", "tracked",
                 "world_size")  # fmt: skip

    def __init__(self, model: DistributedDataParallel, group: dist.ProcessGroup | None) -> None:
        # -- wiring ----------------------------------------------------------------------------
        self.model = model
        self.group: dist.ProcessGroup | None = group if group is not None else model.process_group
        self.world_size = dist.get_world_size(self.group)
        self.sample_kind: SampleKind = "rank"
        param = next(model.module.parameters())
        self.device = param.device
        self.session: MeasurementSession | None = None
        self.tracked: dict[int, TrackedParam] = {}  # id(param) -> plan entry
        # -- the measuring step in flight ------------------------------------------------------
        self._records: list[_BucketRecord] = []  # buckets not finished yet

    # -- GradientCapture -----------------------------------------------------------------------
    def plan_entries(self, norm: str, optimizer: torch.optim.Optimizer | None) -> list[PlanEntry]:
        return module_plan_entries(self.model.module, norm, optimizer)

    def install(self, session: MeasurementSession) -> None:
        self.session = session
        for param, tracked in session.plan.tracked(self.model.module.named_parameters()):
            self.tracked[id(param)] = tracked
        self.model.register_comm_hook(self, gns_allreduce_hook)

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return self.model.no_sync()

    def flush(self) -> None:
        """Nothing waits for the boundary: buckets / units are finished as they are reduced."""

    def discard(self) -> None:
        """Forget buckets of an abandoned step (normally finished at the end of backward)."""
        self._records = []

    def remove(self) -> None:
        """DDP cannot unregister a comm hook: this only stops measuring (build a new DDP)."""
        self.session = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("group", "session")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.group, self.session = None, None
        for k, v in state.items():
            setattr(self, k, v)

    # -- measuring -----------------------------------------------------------------------------
    def _capture(self, session: MeasurementSession, bucket: dist.GradBucket) -> _BucketRecord:
        if not self._records:
            # The first bucket of this backward: finish the rest at its end (after DDP's own
            # finalize callback, queued at the first gradient) and before clipping can run.
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        else:
            self._finish_buckets()  # the previous bucket's average has been launched: finish it
        buffer = bucket.buffer()
        record = _BucketRecord(buffer)
        start = 0
        # The flat buffer holds the bucket's parameters' gradients back to back, in order.
        for param in bucket.parameters():
            end = start + param.numel()
            tracked = self.tracked.get(id(param))
            if tracked is not None and tracked.norm.matrix:
                # kept until the average exists: the Gram is of the deviation G_r - G (None:
                # the copy failed, the session has the failure and this rank sends zeros)
                local = session.guarded(buffer[start:end].clone)
                record.matrices.append((tracked, start, end, local))
            elif tracked is not None:
                record.coords.append((tracked, start, end))
            start = end
        if record.coords:
            record.with_sum = exact_sum_travels(buffer.dtype)
            record.squares_work, record.received, record.squares, record.parts = (
                session.reduce_square_segments(buffer, [(a, b) for _, a, b in record.coords])
            )
        self._records.append(record)
        return record

    def _finish_buckets(self) -> None:
        session = self.session
        records, self._records = self._records, []
        if session is None or not session.armed:
            return
        for record in records:
            assert record.done is not None
            record.done.wait()  # the bucket's all-reduce: the buffer now holds the mean
            buffer = record.buffer
            if record.squares_work is not None:
                record.squares_work.wait()
                # the squares' send buffer (held by the record and the work): done with
                record.squares = record.squares_work = None
                received = record.received
                assert received is not None
                for (tracked, start, _), (offset, count, at) in zip(
                    record.coords, record.parts, strict=True
                ):
                    if count == 0 or session.failed:  # failed: no more local math
                        continue
                    mean = (
                        received[1, at : at + count] / self.world_size
                        if record.with_sum
                        else buffer[start + offset : start + offset + count]
                    )
                    session.add_coordinates(
                        tracked, mean, received[0, at : at + count], offset=offset
                    )
            if record.matrices:
                session.add_matrices(
                    [t for t, _, _, _ in record.matrices],
                    [local for _, _, _, local in record.matrices],
                    [buffer[start:end] for _, start, end, _ in record.matrices],
                )

    def _end_of_backward(self) -> None:
        if self._records and self.session is not None:
            self._finish_buckets()


class _BucketRecord:
    """What a measuring step remembers of one bucket until it is finished."""

    __slots__ = ("buffer", "coords", "done", "matrices", "parts", "received", "squares",
                 "squares_work", "with_sum")  # fmt: skip

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.coords: list[tuple[TrackedParam, int, int]] = []  # l1/l2: (param, start, end)
        # nuclear: (param, start, end, this rank's gradient copied before the all-reduce, or
        # None where the copy failed)
        self.matrices: list[tuple[TrackedParam, int, int, torch.Tensor | None]] = []
        self.parts: list[tuple[int, int, int]] = []  # this rank's slice of each coords entry
        self.with_sum = False
        # ``squares`` stays referenced until its work completes: gloo reads it asynchronously
        self.squares: torch.Tensor | None = None
        self.received: torch.Tensor | None = None
        self.squares_work: Any = None
        self.done: torch.futures.Future[torch.Tensor] | None = None


def gns_allreduce_hook(
    state: DDPCapture, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook: ``allreduce_hook`` plus, on measuring steps, gradient statistics."""
    session = state.session
    record = None
    if session is not None and session.reduction(("ddp bucket", bucket.index())):
        record = state._capture(session, bucket)
    tensor = bucket.buffer()
    tensor.div_(state.world_size)  # as allreduce_hook: divide first (fp16 overflow)
    future = dist.all_reduce(tensor, group=state.group, async_op=True).get_future()
    done = future.then(lambda fut: fut.value()[0])
    if record is not None:
        record.done = done
    return done


# DDP's register_comm_hook compares these annotations with the real objects; postponed
# evaluation (``from __future__ import annotations``) would leave strings there.
gns_allreduce_hook.__annotations__ = {
    "state": DDPCapture,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
