"""DeepSpeed capture: read each local gradient at the reduction entry point of the ZeRO stage.

Hook points (DeepSpeed 0.16-0.19, DESIGN.md section 4):

    stage 0  engine.allreduce_gradients()                    at the boundary: per-rank samples
    stage 1  optimizer.reduce_ready_partitions_and_remove_grads(param, i)   boundary: per rank
    stage 2  optimizer.reduce_ready_partitions_and_remove_grads(param, i)   every micro-step
    stage 3  optimizer.reduce_ready_partitions_and_remove_grads(param)      every micro-step

A per-rank sample is the gradient accumulated over the step (DeepSpeed divides each micro-step's
loss by the accumulation count, so it is already a mean over micro x accumulation examples); a
per-micro-step sample is multiplied back by the accumulation count. fp16 loss scales are divided
out. The wrappers only read gradients: on steps that do not measure they call straight through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from nongns_dist.capture.statistics import MeasurementPlan, TrackedParam

__all__ = ["check_supported", "install_capture"]

#: (tracked parameter, local gradient as a mean over the sample's examples)
AddSample = Callable[[TrackedParam, torch.Tensor], None]


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
    if problems:
        raise NotImplementedError(
            "nongns_dist cannot see the gradient reductions with: " + "; ".join(problems)
        )


def _loss_scale(engine: Any) -> float:
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


def install_capture(
    engine: Any,
    plan: MeasurementPlan,
    *,
    measuring: Callable[[], bool],
    accumulation_steps: Callable[[], int],
    add_sample: AddSample,
) -> str:
    """Wrap the engine's reduction entry point; returns ``"rank"`` or ``"micro"`` (the kind of
    sample it produces)."""
    stage = int(engine.zero_optimization_stage())
    module = engine.module

    if stage == 0:
        original = _require(engine, "allreduce_gradients", 0)

        def allreduce_gradients(*args: Any, **kwargs: Any) -> Any:
            if measuring() and engine.is_gradient_accumulation_boundary():
                scale = _loss_scale(engine)
                for param in module.parameters():
                    tracked = plan.tracked(param)
                    if tracked is not None and param.grad is not None:
                        add_sample(tracked, param.grad / scale)
            return original(*args, **kwargs)

        engine.allreduce_gradients = allreduce_gradients
        return "rank"

    optimizer = engine.optimizer
    if stage in (1, 2):
        original = _require(optimizer, "reduce_ready_partitions_and_remove_grads", 2)
        per_micro = stage == 2

        def reduce_ready(param: torch.Tensor, i: int, *args: Any, **kwargs: Any) -> Any:
            tracked = plan.tracked(param)
            if tracked is not None and measuring():
                grad = optimizer.get_gradient_for_reduction(param)
                if grad is not None:
                    factor = (accumulation_steps() if per_micro else 1) / _loss_scale(engine)
                    add_sample(tracked, grad * factor)
            return original(param, i, *args, **kwargs)

        optimizer.reduce_ready_partitions_and_remove_grads = reduce_ready
        return "micro" if per_micro else "rank"

    if stage == 3:
        original = _require(optimizer, "reduce_ready_partitions_and_remove_grads", 1)

        def reduce_ready_3(param: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            tracked = plan.tracked(param)
            if tracked is not None and measuring() and param.grad is not None:
                add_sample(tracked, param.grad * (accumulation_steps() / _loss_scale(engine)))
            return original(param, *args, **kwargs)

        optimizer.reduce_ready_partitions_and_remove_grads = reduce_ready_3
        return "micro"

    raise NotImplementedError(f"ZeRO stage {stage} is not supported")
