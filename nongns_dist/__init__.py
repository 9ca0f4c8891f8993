"""nongns_dist: adaptive batch sizes from non-Euclidean gradient noise scales.

Layers (each uses only those above it; see the project's DESIGN notes):

1. ``norms``, ``estimators``: pure math (dual norms, sqrt-traces, GNS from sufficient statistics)
2. ``controller``: the batch-size rule, same decision on every rank
3. ``capture``: per-backend hooks that turn gradient reductions into sufficient statistics
4. ``engines``: runtimes that change accumulation counts on the fly (torch-native, DeepSpeed)
5. ``optim``: optimizers that declare their geometry (Signum, signSGD, specSGD, Muon)
"""

from __future__ import annotations

from nongns_dist.capture.session import MeasurementError
from nongns_dist.config import GNSConfig
from nongns_dist.controller import (
    BatchDecision,
    BatchSizeController,
    feasible_batch_size,
    lr_multiplier,
    resume_batch_size,
    warmup_cosine,
)
from nongns_dist.engines import GNSMonitor, MicroStep, StepEvents, attach, exit_cleanly
from nongns_dist.estimators import GNSEstimate, LayerEstimate, estimate_gns

__all__ = [
    "BatchDecision",
    "BatchSizeController",
    "GNSConfig",
    "GNSEstimate",
    "GNSMonitor",
    "LayerEstimate",
    "MeasurementError",
    "MicroStep",
    "StepEvents",
    "attach",
    "estimate_gns",
    "exit_cleanly",
    "feasible_batch_size",
    "lr_multiplier",
    "resume_batch_size",
    "warmup_cosine",
]

__version__ = "0.1.0"
