"""One-process capture: samples are the micro-steps of one optimizer step.

Without data parallelism there is one rank, and one rank's accumulated gradient is one sample:
no variance. But every micro-step's gradient is a sample of ``micro_batch_size`` examples
(DESIGN.md section 2, per-micro-step samples: n = accumulation steps). A tensor hook on each
measured parameter sees that gradient as backward produces it, before autograd adds it into
``.grad``; on measuring steps it goes to a ``SampleAccumulator`` (multiplied back by the loss
divisor of ``MicroStep``), which is flushed at the step boundary. Steps that do not measure run
no hook code beyond one check. A step with one micro-step has one sample and is not measured.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from nongns_dist.capture.accumulator import SampleAccumulator
from nongns_dist.capture.plan import PlanEntry, TrackedParam, module_plan_entries
from nongns_dist.capture.session import MeasurementSession, SampleKind

__all__ = ["LocalCapture"]


class LocalCapture:
    """The one-process backend: a plain ``nn.Module``, no process group."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.group: dist.ProcessGroup | None = None
        self.sample_kind: SampleKind = "micro"
        self.device = next(model.parameters()).device
        self.session: MeasurementSession | None = None
        self._handles: list[RemovableHandle] = []
        self._accumulator: SampleAccumulator | None = None
        self._samples: dict[int, int] = {}  # per parameter: samples added this measuring step

    # -- GradientCapture -----------------------------------------------------------------------
    def plan_entries(self, norm: str, optimizer: torch.optim.Optimizer | None) -> list[PlanEntry]:
        return module_plan_entries(self.model, norm, optimizer)

    def install(self, session: MeasurementSession) -> None:
        self.session = session
        for param, tracked in session.plan.tracked(self.model.named_parameters()):
            self._handles.append(param.register_hook(self._hook(tracked)))

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # nothing is reduced

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.session = None

    def discard(self) -> None:
        """Forget the samples of a step abandoned before its end."""
        self._samples = {}
        self._accumulator = None

    def flush(self) -> None:
        """At the boundary: the step's samples into the session (nothing when not measuring)."""
        session = self.session
        samples, self._samples = self._samples, {}
        if session is not None and session.armed:
            ran = max(samples.values(), default=0)
            if ran != session.accumulation_steps:
                raise RuntimeError(
                    f"a measuring step of {session.accumulation_steps} micro-steps ran {ran} "
                    "backward passes: each is a sample, so run exactly the micro-steps of "
                    "monitor.micro_steps()"
                )
            (self._accumulator or SampleAccumulator(session)).flush(self.device)
        self._accumulator = None

    # -- the hook --------------------------------------------------------------------------------
    def _hook(self, tracked: TrackedParam) -> Any:
        def hook(grad: torch.Tensor) -> None:
            session = self.session
            # a backward reached the parameters: a training step (measured when armed)
            if session is None or not session.reduction():
                return
            if self._accumulator is None:
                self._accumulator = SampleAccumulator(session)
            self._samples[tracked.index] = self._samples.get(tracked.index, 0) + 1
            accumulator = self._accumulator
            # MicroStep.loss_divisor divided the micro-batch's mean loss by the accumulation
            # count: undo it, so the sample is the micro-batch's mean gradient. (Guarded: a
            # failure is raised at the step's end, not in the middle of backward.)
            session.guarded(lambda: accumulator.add(tracked, grad * session.accumulation_steps))

        return hook
