"""Capture: turn gradient reductions into sufficient statistics, one module per backend."""

from __future__ import annotations

from nongns_dist.capture.statistics import CommCounter, Measurement, MeasurementPlan, TrackedParam

__all__ = ["CommCounter", "Measurement", "MeasurementPlan", "TrackedParam"]
