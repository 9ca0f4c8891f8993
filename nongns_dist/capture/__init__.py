"""Capture: turn gradient reductions into sufficient statistics, one module per backend.

``plan`` (who is measured in which norm, matrix owners), ``session`` (the sample rule, the
partial sums, streaming to owners, the one all-reduce), ``collectives`` (the extra reductions),
``base`` (the backend interface); ``ddp``, ``fsdp1``, ``fsdp2``, ``deepspeed``: one backend
each.
"""

from __future__ import annotations

from nongns_dist.capture.plan import MeasurementPlan, TrackedParam
from nongns_dist.capture.session import MeasurementSession, SampleAccumulator

__all__ = ["MeasurementPlan", "MeasurementSession", "SampleAccumulator", "TrackedParam"]
