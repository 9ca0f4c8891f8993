"""Capture: turn gradient reductions into sufficient statistics, one module per backend.

``plan`` (who is measured in which norm, matrix owners), ``session`` (one measuring step: the
sample rule, the partial sums, streaming to owners, the one all-reduce), ``pooling`` (this
rank's pooled moments between steps), ``accumulator`` (samples that arrive over micro-steps),
``collectives`` (the extra reductions), ``base`` (the backend interface); ``ddp``, ``fsdp1``,
``fsdp2``, ``local``, ``deepspeed``: one backend each.
"""

from __future__ import annotations

from nongns_dist.capture.accumulator import SampleAccumulator
from nongns_dist.capture.plan import MeasurementPlan, TrackedParam
from nongns_dist.capture.session import MeasurementSession

__all__ = ["MeasurementPlan", "MeasurementSession", "SampleAccumulator", "TrackedParam"]
