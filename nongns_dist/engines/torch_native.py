"""torch-native runtime: ``attach`` a monitor to a DDP or FSDP model and drive accumulation on
the fly.

    monitor = attach(ddp_model, GNSConfig(norm="auto", interval=100), optimizer,
                     micro_batch_size=8)
    while monitor.samples < budget:
        for micro in monitor.micro_steps():        # as many as the controller decided
            with micro:                            # no_sync() except on the last micro-step
                loss = loss_fn(ddp_model(x), y) / micro.loss_divisor
                loss.backward()
        optimizer.step()                           # runs with lr x multiplier, then the
        optimizer.zero_grad()                      # step closes: samples counted, batch decided

Decisions come only from all-reduced numbers, so every rank takes the same one
(``check_consistency=True`` verifies it with one tiny all-gather per step).

Two errors are raised before the optimizer applies the update (by a step pre-hook on the
optimizer given to attach, or in ``scaler.step``), on every rank: a ``micro_steps()`` loop left
early (its gradients are local, not reduced: a ``RuntimeError`` saying how to end on a shorter
step), and a measurement that failed on some rank (``MeasurementError`` naming the rank; the
others would otherwise wait in the next collective until the backend's timeout).

With fp16 and a ``torch.amp.GradScaler`` (or FSDP's ``ShardedGradScaler``), give it to attach:

    monitor = attach(ddp_model, config, optimizer, micro_batch_size=8, grad_scaler=scaler)
    ...                                            # micro-steps: scaler.scale(loss).backward()
    scaler.step(optimizer)                         # closes the step, applied or skipped
    scaler.update()

Statistics are then divided by the scale the backward ran with, and a step whose update the
scaler skipped (inf/NaN gradients) is closed by ``scaler.step`` itself: samples counted, not
measured, batch unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from nongns_dist.capture.base import TorchCapture
from nongns_dist.capture.collectives import group_rank_and_size
from nongns_dist.capture.ddp import DDPCapture
from nongns_dist.capture.fsdp2 import FSDP2Capture
from nongns_dist.capture.local import LocalCapture
from nongns_dist.capture.plan import check_measurable_module
from nongns_dist.config import GNSConfig, as_config, check_count
from nongns_dist.controller import BatchDecision
from nongns_dist.engines.core import StepCore, StepEvents

__all__ = ["GNSMonitor", "MicroStep", "attach"]

logger = logging.getLogger("nongns_dist")

#: What attach() takes in a group of several ranks (in one process: also a plain module).
_SUPPORTED = (
    "DistributedDataParallel, a fully_shard-ed module (FSDP2) or a FullyShardedDataParallel root"
)


class MicroStep:
    """One micro-step of an optimizer step; ``with micro:`` skips the gradient reduction
    (``no_sync``) unless it is the last. ``on_done(micro)`` is called when its ``with`` block
    ends without an exception (the monitor counts finished micro-steps by it)."""

    def __init__(
        self,
        index: int,
        accumulation_steps: int,
        context: contextlib.AbstractContextManager[Any],
        on_done: Callable[[MicroStep], None] | None = None,
    ) -> None:
        self.index = index
        self.accumulation_steps = accumulation_steps
        self.is_last = index == accumulation_steps - 1
        #: Divide the micro-batch mean loss by this so the step's gradient is a mean over the batch.
        self.loss_divisor = accumulation_steps
        #: Whether its ``with`` block was entered.
        self.entered = False
        self._context = context
        self._on_done = on_done

    def __enter__(self) -> MicroStep:
        self.entered = True
        self._context.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._context.__exit__(exc_type, exc, tb)
        if exc_type is None and self._on_done is not None:
            self._on_done(self)


class GNSMonitor(StepCore):
    """Measurement, controller and accumulation driver of one model. Build with ``attach``."""

    def __init__(
        self,
        model: nn.Module,
        config: GNSConfig,
        optimizer: torch.optim.Optimizer | None,
        capture: TorchCapture,
        *,
        micro_batch_size: int,
        accumulation_steps: int | None,
        grad_scaler: torch.amp.GradScaler | None = None,
        on_events: Callable[[StepEvents], None] | None = None,
    ) -> None:
        if grad_scaler is not None and optimizer is None:
            raise ValueError("attach(grad_scaler=...) needs the optimizer the scaler steps")
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.process_group = capture.group
        self._reductions_at_close = 0
        self._in_scaler_step = False  # inside grad_scaler.step(): it closes the step
        #: (micro-steps finished, of how many) of the step whose micro_steps() loop is running
        #: and not finished; None between steps. An update is refused while it is set.
        self._unfinished: tuple[int, int] | None = None
        self._micro_token: object = None  # which micro_steps() loop is the step's
        # Registered before the lr multiplier's hooks (hooks run in that order): a refused step
        # raises before the multiplier is put into the learning rate.
        self._pre_hook = (
            optimizer.register_step_pre_hook(self._before_optimizer_step)
            if optimizer is not None
            else None
        )
        self.lr_multiplier = None
        try:
            super().__init__(
                config, capture, micro_batch_size=micro_batch_size,
                accumulation_steps=accumulation_steps, norm_optimizer=optimizer,
                lr_optimizer=optimizer, on_events=on_events,
            )  # fmt: skip
            self.capture: TorchCapture = capture  # (the driver's no_sync is its own duty)
            self.measuring_allowed = lambda: not self._needs_synced_first_step()
            if grad_scaler is not None and grad_scaler.is_enabled():
                if self.session is not None:
                    # read on the first statistics of a measuring step: during its backward,
                    # before scaler.update() can change the scale
                    self.session.loss_scale = grad_scaler.get_scale
                self._wrap_scaler_step(grad_scaler)
            self.start()
        except BaseException:  # leave the user's optimizer as it was given
            if self._pre_hook is not None:
                self._pre_hook.remove()
            if self.lr_multiplier is not None:
                self.lr_multiplier.remove()
            raise
        self._step_hook = (
            optimizer.register_step_post_hook(self._after_optimizer_step)
            if optimizer is not None
            else None
        )

    def micro_steps(self) -> Iterator[MicroStep]:
        """The micro-steps of the next optimizer step, with the count the controller decided.

        Run all of them before the optimizer step: all but the last skip the gradient
        reduction, so a loop left early (a ``break``, an exhausted data loader) leaves local,
        unreduced gradients, and the optimizer given to ``attach`` (or ``scaler.step``,
        ``step_done``) then raises instead of applying them. A micro-step counts as run when
        its ``with`` block ends without an exception, or, used without ``with``, when the loop
        moves past it. To end on a shorter step, call ``set_batch_size`` before its loop; to
        drop a partial step, ``optimizer.zero_grad()`` and start the next loop (the partial
        step's samples and statistics are dropped)."""
        if self._unfinished is not None:
            self._abandon_step()
        accumulation = self.controller.accumulation_steps
        sync_all = self._needs_synced_first_step()
        token = object()
        self._micro_token, self._unfinished = token, (0, accumulation)

        def done(micro: MicroStep) -> None:
            self._micro_step_done(token, micro)

        for i in range(accumulation):
            last = i == accumulation - 1
            context = contextlib.nullcontext() if last or sync_all else self.capture.no_sync()
            micro = MicroStep(i, accumulation, context, on_done=done)
            yield micro
            if not micro.entered:  # used without ``with``: the loop body has run
                done(micro)

    def _micro_step_done(self, token: object, micro: MicroStep) -> None:
        if token is not self._micro_token or self._unfinished is None:
            return  # a micro-step of an abandoned or closed step
        finished, total = self._unfinished
        self._unfinished = None if micro.is_last else (max(finished, micro.index + 1), total)

    def _abandon_step(self) -> None:
        """A new micro_steps() loop while the last one is unfinished: that step is dropped."""
        assert self._unfinished is not None
        finished, total = self._unfinished
        logger.info(
            "nongns_dist: step %d dropped after %d of its %d micro-steps (a new micro_steps() "
            "loop began): its samples and statistics are discarded; clear its gradients "
            "(optimizer.zero_grad()) if they are still there", self.controller.step, finished,
            total,
        )  # fmt: skip
        self._unfinished = None
        self.capture.discard()
        if self.session is not None:
            self._reductions_at_close = self.session.reductions
        self.arm()  # the measurement starts again with the new loop

    def _check_micro_steps(self) -> None:
        """Raise if the step's micro-steps were not all run: before any update is applied."""
        if self._unfinished is None:
            return
        finished, total = self._unfinished
        if self.world_size > 1:
            what = (
                "its gradients were not reduced across the ranks (all but the last micro-step "
                "skip the reduction), so this update would make the replicas diverge"
            )
        else:
            what = (
                f"the step would count {total * self.micro_batch_size} samples and the batch "
                "schedule would move on samples that were never trained on"
            )
        raise RuntimeError(
            f"nongns_dist: optimizer step after {finished} of the {total} micro-steps of "
            f"monitor.micro_steps() (the loop was left early: a break, an exhausted data loader, "
            f"an exception): {what}. The update was refused before it changed any parameter. "
            "Run every micro-step the monitor yields. To end on a shorter step, call "
            f"monitor.set_batch_size(n) (n a multiple of {self.controller.unit} = micro batch x "
            "ranks) before that step's monitor.micro_steps(); to drop this partial step, call "
            "optimizer.zero_grad() and start the next step with monitor.micro_steps()."
        )

    def _needs_synced_first_step(self) -> bool:
        # torch's DDP with static_graph=True records the graph on its first iteration and hits an
        # internal assert if that iteration ran under no_sync (reproduced without this library).
        # So the first step syncs every micro-step: the same training gradient, but the buckets
        # then do not hold per-rank samples, and that step is not measured.
        return bool(getattr(self.model, "static_graph", False)) and self.controller.step == 0

    # -- the step boundary ------------------------------------------------------------------------
    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._in_scaler_step:
            return  # scaler.step() made these checks before it began
        self._before_update()

    def _before_update(self) -> None:
        """Before the optimizer applies an update: every micro-step ran (else raise), and the
        measurement is finished, so a failure on any rank raises on every rank now, while no
        parameter has changed. Nothing to do for a step without a gradient reduction (the
        zero-lr step torch.distributed.checkpoint takes on a fresh optimizer)."""
        self._check_micro_steps()
        if self.session is not None and self._reduced_since_close():
            self.capture.flush()  # samples kept until the boundary (one process)
            self.finish_measurement()

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._in_scaler_step:
            return  # the scaler's step closes it, knowing whether the update was applied
        if not self._reduced_since_close():
            # No gradient was reduced since the last step: not a training step. This is what
            # torch.distributed.checkpoint's get/set_optimizer_state_dict do to a fresh
            # optimizer (a zero-lr step on zero gradients); counting it would add a batch of
            # samples that was never trained on.
            logger.debug("optimizer.step() without a gradient reduction: step not counted")
            return
        self._close(applied=True)

    def _wrap_scaler_step(self, scaler: torch.amp.GradScaler) -> None:
        """``scaler.step(optimizer)`` closes the step: it is the one call that knows whether the
        update ran. (Its own optimizer.step() is not called on an overflow, so the optimizer's
        post-hook alone would miss that step; fused optimizers are called either way.)"""
        found_inf = getattr(scaler, "_found_inf_per_device", None)
        if found_inf is None:
            raise RuntimeError(
                f"{type(scaler).__name__} has no _found_inf_per_device (torch "
                f"{torch.__version__}): nongns_dist reads the skip decision there; supported: "
                "torch 2.9 to 2.13"
            )
        original = scaler.step

        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if optimizer is not self.optimizer:
                return original(optimizer, *args, **kwargs)
            # before the scaler unscales or steps: an update on a step whose micro-steps were
            # not all run, or whose measurement failed on some rank, is refused on every rank
            # (the optimizer's own pre-hook would miss the overflow steps the scaler skips)
            self._check_micro_steps()
            if not self._reduced_since_close():
                raise RuntimeError(
                    "scaler.step() on a step that was already closed (monitor.step_done()); "
                    "with attach(grad_scaler=...) the scaler closes every step"
                )
            self._before_update()
            self._in_scaler_step = True
            try:
                result = original(optimizer, *args, **kwargs)
            finally:
                self._in_scaler_step = False
            # the scaler's own test: any inf/NaN found while unscaling (the same on every rank:
            # DDP's gradients are all-reduced, ShardedGradScaler all-reduces the flag)
            skipped = sum(float(v.item()) for v in found_inf(optimizer).values()) > 0
            self._close(applied=not skipped)
            return result

        scaler.step = step  # type: ignore[method-assign]

    def _reduced_since_close(self) -> bool:
        session = self.session
        return session is None or session.reductions != self._reductions_at_close

    def _close(self, *, applied: bool) -> BatchDecision:
        if self.session is not None:
            self._reductions_at_close = self.session.reductions
            self.capture.flush()  # samples kept until the boundary (one process)
        return self.close_step(applied=applied)

    def step_done(self, *, applied: bool = True) -> BatchDecision:
        """Close the optimizer step by hand: count its samples, feed a measurement to the
        controller and apply its decision (accumulation count, lr multiplier). ``applied=False``
        for a step whose update you skipped (samples counted, not measured, batch unchanged).

        Only where nothing else closes steps: with the optimizer given to ``attach`` its step
        closes applied steps (``step_done()`` raises; ``step_done(applied=False)`` is for a step
        you skip without calling it), with ``grad_scaler=`` the scaler closes every step
        (``step_done`` raises). A step is closed at most once: a second close without a backward
        in between raises."""
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            raise RuntimeError(
                "attach(grad_scaler=...): scaler.step(optimizer) closes every step, skipped "
                "ones too; do not call step_done()"
            )
        if applied and self.optimizer is not None:
            raise RuntimeError(
                "the optimizer given to attach() closes each applied step in its step(); "
                "step_done() would count it twice (step_done(applied=False) closes a step "
                "whose optimizer.step() you skip)"
            )
        self._check_micro_steps()
        if not self._reduced_since_close():
            raise RuntimeError("this step is already closed: no backward ran since the last close")
        # finishing here raises a failed measurement on every rank; without the optimizer
        # given to attach() that is after your optimizer.step(): give it to attach() to have
        # the failure (and a loop left early) refused before the update
        self._before_update()
        return self._close(applied=applied)

    def detach(self) -> None:
        """Remove the optimizer hooks and stop measuring (DDP and FSDP cannot unregister their
        comm hooks: those stay, as the default reduction)."""
        if self.lr_multiplier is not None:
            self.lr_multiplier.remove()
        if self._step_hook is not None:
            self._step_hook.remove()
        if self._pre_hook is not None:
            self._pre_hook.remove()
        if self.grad_scaler is not None and "step" in vars(self.grad_scaler):
            del self.grad_scaler.step  # the class's step again
        self.capture.remove()
        self.session = None


def _capture_for(model: nn.Module, process_group: dist.ProcessGroup | None) -> TorchCapture:
    if isinstance(model, DistributedDataParallel):
        return DDPCapture(model, process_group)
    if isinstance(model, FSDPModule):
        return FSDP2Capture(model, process_group)
    if isinstance(model, FullyShardedDataParallel):
        from nongns_dist.capture.fsdp1 import FSDP1Capture

        return FSDP1Capture(model, process_group)
    if any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__):
        raise TypeError("attach() got a DeepSpeed engine: use nongns_dist.deepspeed.initialize")
    ranks = group_rank_and_size(process_group)[1]
    if ranks == 1:
        return LocalCapture(model)  # one process: per-micro-step samples
    raise TypeError(
        f"attach() supports {_SUPPORTED}; got a plain {type(model).__name__} in a process group "
        f"of {ranks} ranks: wrap it first, or pass a process_group of one rank to measure this "
        "process alone"
    )


def attach(
    model: nn.Module,
    config: GNSConfig | Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    micro_batch_size: int,
    accumulation_steps: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    on_events: Callable[[StepEvents], None] | None = None,
) -> GNSMonitor:
    """Measure the noise scale of ``model`` and adapt its batch; returns the ``GNSMonitor``.

    ``model``: a ``DistributedDataParallel``, a ``fully_shard``-ed root module (FSDP2, HSDP on a
    2-D mesh), a ``FullyShardedDataParallel`` root (FSDP1), or a plain module in one process
    (no process group, or one of one rank): its samples are then the micro-steps of each step,
    so it measures on steps with ``accumulation_steps >= 2``. ``config``: a ``GNSConfig``, or a
    mapping of its fields (e.g. ``{"norm": "l1"}``), read with ``GNSConfig.from_dict``, which
    validates it (unknown keys and bad values are ``ValueError``); anything else is a
    ``TypeError``. ``optimizer``: needed for ``norm="auto"``; when given, its steps close the
    monitor's steps and receive the lr multiplier.
    ``micro_batch_size``: examples per rank per micro-step. ``accumulation_steps``: the initial
    count (else from ``config.initial_batch_size``, else 1); both ints >= 1 (a bool, a float or
    a string is a ``TypeError``). ``process_group``: the data-parallel group (default: the
    wrapper's). ``grad_scaler``: the ``torch.amp.GradScaler`` (or ``ShardedGradScaler``) that
    scales the loss; needs ``optimizer``. Statistics are then in unscaled gradient units and
    ``scaler.step(optimizer)`` closes each step, applied or skipped. ``on_events``: called as
    each step closes with its ``StepEvents`` (what it ran with, whether it measured and what,
    the decision; ``.scalars()`` in DeepSpeed's monitor form), the one record every engine
    emits (``monitor.subscribe`` adds more sinks).

    Refused with a ``ValueError`` before anything is hooked: a model without parameters or
    without one that requires grad, a trainable parameter with a sparse gradient
    (``nn.Embedding(sparse=True)``) or a complex dtype. Empty parameters (0 elements) are not
    measured (they add nothing to any norm); the rest of the model is.
    """
    config = as_config(config)
    micro_batch_size = check_count("micro_batch_size", micro_batch_size)
    if accumulation_steps is not None:
        accumulation_steps = check_count("accumulation_steps", accumulation_steps)
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() needs an nn.Module as model, got {type(model).__name__}")
    if getattr(model, "_nongns_monitor", None) is not None:
        raise RuntimeError("a GNSMonitor is already attached to this model")
    # DDP's wrapped module: its names are the plan's (no ``module.`` prefix)
    check_measurable_module(model.module if isinstance(model, DistributedDataParallel) else model)
    monitor = GNSMonitor(
        model,
        config,
        optimizer,
        _capture_for(model, process_group),
        micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps,
        grad_scaler=grad_scaler,
        on_events=on_events,
    )
    model._nongns_monitor = monitor  # type: ignore[assignment]
    return monitor
