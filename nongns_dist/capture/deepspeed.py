"""DeepSpeed capture: read each local gradient at the reduction entry point of the ZeRO stage.

Hook points (DeepSpeed 0.16-0.19, DESIGN.md section 4):

    stage 0  engine.allreduce_gradients()                    at the boundary: per-rank samples
    stage 1  optimizer.reduce_ready_partitions_and_remove_grads(param, i)   boundary: per rank
    stage 2  optimizer.reduce_ready_partitions_and_remove_grads(param, i)   every micro-step
    stage 3  optimizer.reduce_ready_partitions_and_remove_grads(param)      every micro-step

A per-rank sample is the gradient accumulated over the step (DeepSpeed divides each micro-step's
loss by the accumulation count, so it is already a mean over micro x accumulation examples); a
per-micro-step sample is multiplied back by the accumulation count. The convention is the
optimizer's: the window's gradient is a mean, whoever divided the loss. A driver that calls
``engine.backward(loss, scale_wrt_gas=False)`` divides it itself (accelerate, the Trainer), so
the samples are read the same way; a loop that sums its micro-steps scales noise and signal by
the same count squared, and the noise scale, their ratio, not at all.
fp16 gradients carry the loss scale: the session divides it out (``loss_scale`` here is what
the plugin gives it). The wrappers only read gradients: on steps that do not measure they call
straight through.

Failures: this rank's measurement math (reading a sample in, the statistics at the boundary) is
``guarded`` by the session; the rank then sends zeros in the boundary's collectives, and
``flush`` finishes the session right there, before DeepSpeed's optimizer step, so a failure on
one rank raises ``MeasurementError`` on every rank before any of them applies the update.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from nongns_dist.capture.accumulator import SampleAccumulator
from nongns_dist.capture.plan import (
    PlanEntry,
    TrackedParam,
    check_measurable_module,
    plan_entries,
)
from nongns_dist.capture.session import MeasurementSession, SampleKind
from nongns_dist.optim.geometry import group_norms

__all__ = ["DeepSpeedCapture", "basic_optimizer", "check_supported", "loss_scale"]


def check_supported(engine: Any) -> None:
    """Raise for configurations whose gradients bypass the hooked entry points."""
    problems = []
    if getattr(engine, "is_deepcompile_active", lambda: False)():
        problems.append("DeepCompile (reduces inside the compiled graph)")
    if getattr(engine, "zenflow", False):
        problems.append("ZenFlow (selective, asynchronous updates)")
    if getattr(engine.optimizer, "_coalesce_grad_reduction", False):
        problems.append("coalesce_grad_reduction (one deferred reduction)")
    if (
        getattr(engine, "zero_cpu_offload", lambda: False)()
        or getattr(engine, "zero_offload_param", lambda: False)()
    ):
        problems.append("ZeRO offload (not tested with the plugin)")
    if getattr(engine, "pipeline_parallelism", False):
        problems.append("pipeline parallelism")
    if not getattr(engine, "managed_gradient_accumulation", lambda: True)():
        problems.append("managed_gradient_accumulation=false")
    if int(getattr(engine, "sequence_parallel_size", 1) or 1) > 1:
        problems.append("sequence parallelism (ranks of one sequence are not samples)")
    if problems:
        raise NotImplementedError(
            "nongns_dist cannot see the gradient reductions with: " + "; ".join(problems)
        )


def basic_optimizer(engine: Any) -> torch.optim.Optimizer:
    # ZeRO wraps the user's (or DeepSpeed's) optimizer; the wrapper shares its param_groups
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer


def _module_groups(engine: Any) -> list[list[torch.Tensor]]:
    """Module parameters per optimizer group (ZeRO keeps them beside its flat partitions)."""
    for attr in ("bit16_groups", "fp16_groups"):
        groups = getattr(engine.optimizer, attr, None)
        if groups is not None:
            return [list(g) for g in groups]
    return [list(g["params"]) for g in basic_optimizer(engine).param_groups]


def loss_scale(engine: Any) -> float:
    """The fp16 loss scale the engine's backward multiplies the loss by (1.0 without fp16)."""
    if not engine.fp16_enabled():
        return 1.0
    scale = getattr(engine.optimizer, "loss_scale", None)
    return float(scale if scale is not None else getattr(engine.optimizer, "cur_scale", 1.0))


def _require(obj: Any, name: str, params: int) -> Callable[..., Any]:
    method = getattr(obj, name, None)
    if method is None or len(inspect.signature(method).parameters) < params:
        import deepspeed

        raise RuntimeError(
            f"{type(obj).__name__}.{name} with {params} argument(s) is the hook point of "
            f"nongns_dist, and DeepSpeed {deepspeed.__version__} does not have it; supported: "
            "DeepSpeed 0.16 to 0.19"
        )
    return method


class DeepSpeedCapture:
    """The DeepSpeed backend: wraps the reduction entry point of the engine's ZeRO stage."""

    def __init__(self, engine: Any) -> None:
        check_supported(engine)
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in (0, 1, 2, 3):
            raise NotImplementedError(f"ZeRO stage {self.stage} is not supported")
        # ZeRO-2/3 reduce every micro-step: one sample per (rank, micro-step)
        self.sample_kind: SampleKind = "micro" if self.stage >= 2 else "rank"
        self.group = engine.data_parallel_group
        self.device = torch.device(engine.device)
        self.session: MeasurementSession | None = None
        self._accumulator: SampleAccumulator | None = None
        self._tracked: dict[int, TrackedParam] = {}

    # -- GradientCapture -----------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def plan_entries(
        self, norm: str, optimizer: torch.optim.Optimizer | None = None
    ) -> list[PlanEntry]:
        """ZeRO's optimizer holds flat partitions: ``auto`` reads the module parameters of each
        group from the ZeRO wrapper (``bit16_groups``); ZeRO-3 parameters are empty
        placeholders that carry their real shape in ``ds_shape``."""
        check_measurable_module(self.engine.module)  # sparse embeddings, no trainable parameter
        kinds = None
        if norm == "auto":
            kinds = {
                id(p): kind
                for params, kind in zip(
                    _module_groups(self.engine), group_norms(basic_optimizer(self.engine)),
                    strict=True,
                )
                for p in params
            }  # fmt: skip
        named = self.named_parameters()
        shapes = {id(p): torch.Size(p.ds_shape) for _, p in named if hasattr(p, "ds_shape")}
        return plan_entries(named, norm, kinds, shape_of=shapes)

    def remove(self) -> None:
        self.session = None

    def install(self, session: MeasurementSession) -> None:
        """Start feeding ``session`` whenever it is armed."""
        self.session = session
        for param, tracked in session.plan.tracked(self.named_parameters()):
            self._tracked[id(param)] = tracked
        self._wrap_entry_point()

    def flush(self) -> None:
        """At the boundary, before the optimizer step: reduce this step's samples into the
        session and finish it (collectives; a no-op on steps that do not measure). Finishing
        here, not when the step closes after DeepSpeed's update, makes a failure on any rank
        raise on every rank before the update (the estimate waits in the session for the
        plugin's ``close_step``)."""
        session = self.session
        accumulator, self._accumulator = self._accumulator, None
        if session is not None and session.armed:
            (accumulator or SampleAccumulator(session)).flush(self.device)
            session.finish()

    def discard(self) -> None:
        """Forget the samples of a step abandoned before its boundary."""
        self._accumulator = None

    # -- the hook points -----------------------------------------------------------------------
    def _add(self, param: torch.Tensor, grad: torch.Tensor | None, factor: float) -> None:
        tracked = self._tracked.get(id(param))
        session = self.session
        if tracked is None or grad is None or session is None or not session.reduction():
            return
        if self._accumulator is None:
            self._accumulator = SampleAccumulator(session)
        accumulator = self._accumulator
        # float32 first: a scaled fp16 gradient times the accumulation count can overflow fp16.
        # Guarded: a failure is raised on every rank at the boundary, not here in backward.
        session.guarded(lambda: accumulator.add(tracked, grad.float() * factor))

    def _undivide(self) -> int:
        # each micro-step's loss was divided by the accumulation count of the step the session
        # was armed for (by DeepSpeed, or by the driver with scale_wrt_gas=False)
        return self.session.accumulation_steps if self.session is not None else 1

    def _measuring(self) -> bool:
        return self.session is not None and self.session.armed

    def _wrap_entry_point(self) -> None:
        engine = self.engine
        module = engine.module
        if self.stage == 0:
            original = _require(engine, "allreduce_gradients", 0)

            def allreduce_gradients(*args: Any, **kwargs: Any) -> Any:
                if self._measuring() and engine.is_gradient_accumulation_boundary():
                    for param in module.parameters():
                        self._add(param, param.grad, 1.0)
                return original(*args, **kwargs)

            engine.allreduce_gradients = allreduce_gradients
            return

        optimizer = engine.optimizer
        if self.stage in (1, 2):
            original = _require(optimizer, "reduce_ready_partitions_and_remove_grads", 2)
            per_micro = self.stage == 2

            def reduce_ready(param: torch.Tensor, i: int, *args: Any, **kwargs: Any) -> Any:
                if self._measuring() and id(param) in self._tracked:
                    factor = self._undivide() if per_micro else 1
                    self._add(param, optimizer.get_gradient_for_reduction(param), factor)
                return original(param, i, *args, **kwargs)

            optimizer.reduce_ready_partitions_and_remove_grads = reduce_ready
            return

        original = _require(optimizer, "reduce_ready_partitions_and_remove_grads", 1)

        def reduce_ready_3(param: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._measuring():
                self._add(param, param.grad, self._undivide())
            return original(param, *args, **kwargs)

        optimizer.reduce_ready_partitions_and_remove_grads = reduce_ready_3
