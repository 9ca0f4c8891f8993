"""Capture: turn gradient reductions into sufficient statistics, one module per backend."""

from __future__ import annotations

from nongns_dist.capture.statistics import Measurement, MeasurementPlan, TrackedParam

__all__ = ["Measurement", "MeasurementPlan", "TrackedParam"]
