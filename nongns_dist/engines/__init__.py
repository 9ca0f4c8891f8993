"""Runtimes that change accumulation counts on the fly."""

from __future__ import annotations

from nongns_dist.engines.core import StepEvents
from nongns_dist.engines.exit import exit_cleanly
from nongns_dist.engines.torch_native import GNSMonitor, MicroStep, attach

__all__ = ["GNSMonitor", "MicroStep", "StepEvents", "attach", "exit_cleanly"]
