"""The batch controller's learning-rate multiplier, applied so that it composes with schedulers."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["LRMultiplier"]


class LRMultiplier:
    """Multiply every group's ``lr`` by ``value`` for the duration of ``optimizer.step()`` only.

    A scheduler owns ``param_group["lr"]`` between steps: closed-form ones (LambdaLR, OneCycle)
    rewrite it from ``base_lrs``, chainable ones (StepLR, ExponentialLR) scale what is there. A
    multiplier baked into ``lr`` would be erased by the first kind and compounded by the second,
    so this one is applied by a step pre-hook and the exact previous value is put back by a
    post-hook: the step uses scheduler_lr * value, and the scheduler never sees the multiplier.
    With ``value == 1`` nothing is touched.

    Example::

        >>> mult = LRMultiplier(optimizer)
        >>> mult.value = decision.lr_multiplier
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.value = 1.0
        self._saved: list[Any] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._scale),
            optimizer.register_step_post_hook(self._restore),
        ]

    def _scale(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self.value == 1.0:
            return
        self._saved = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self._saved, strict=True):
            group["lr"] = lr * self.value

    def _restore(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is None:
            return
        for group, lr in zip(optimizer.param_groups, self._saved, strict=True):
            group["lr"] = lr
        self._saved = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
