"""The interface every capture backend implements (one file per backend, nothing else).

A backend turns one engine's gradient reduction into statistics for a ``MeasurementSession``:
it names the parameters as the plan sees them, says what one sample is, installs its hook
(every hook's one duty towards the session: ``session.reduction(key)``), and, for the
torch-native driver, gives a way to accumulate micro-steps without reducing.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.distributed as dist

from nongns_dist.capture.plan import PlanEntry
from nongns_dist.capture.session import MeasurementSession, SampleKind

__all__ = ["GradientCapture", "TorchCapture"]


class GradientCapture(Protocol):
    #: What one sample is: a rank's accumulated gradient, or one micro-step's.
    sample_kind: SampleKind
    #: The data-parallel group whose ranks are the samples (statistics are reduced over it).
    group: dist.ProcessGroup | None
    #: Where the gradients, and so every capture buffer, live.
    device: torch.device

    def plan_entries(self, norm: str, optimizer: torch.optim.Optimizer | None) -> list[PlanEntry]:
        """(cleaned name, full shape, norm or None) of every trainable parameter, with
        ``plan.plan_entries`` (``norm="auto"`` reads the optimizer's groups)."""
        ...

    def install(self, session: MeasurementSession) -> None:
        """Start feeding ``session``. Every hook, at each gradient reduction it sees (a bucket,
        an FSDP unit, a parameter's gradient), calls ``session.reduction(key)`` once, and
        measures that reduction only if it returns True (the session is armed): it counts the
        step's reductions (how the torch-native driver tells a training step from an optimizer
        step without one) and refuses a second synchronised backward in a measuring step.
        Otherwise the engine's default reduction runs, unchanged."""
        ...

    def flush(self) -> None:
        """At the step boundary, before the session finishes: hand over samples kept until then
        (backends whose samples arrive over micro-steps); a no-op for the others."""
        ...

    def discard(self) -> None:
        """Forget what a step abandoned before its boundary kept (its micro-steps were not all
        run): the next step starts clean."""
        ...

    def remove(self) -> None:
        """Undo ``install`` where the engine allows it."""
        ...


class TorchCapture(GradientCapture, Protocol):
    """A capture driven by the torch-native accumulation driver (``attach``), which decides
    which micro-steps reduce. (DeepSpeed marks its own boundary: its capture has no
    ``no_sync``.)"""

    def no_sync(self) -> contextlib.AbstractContextManager[object]:
        """Accumulate this micro-step's gradient locally, without reducing it."""
        ...
