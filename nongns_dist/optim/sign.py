"""Sign descent: the steepest-descent direction of the l_inf ball is sign(g); its dual is l_1."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["SignSGD", "Signum", "evaluate_closure"]


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The torch.optim closure protocol: re-evaluate the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_hyper(lr: float, weight_decay: float, momentum: float, nesterov: bool) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")


def _signum(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    for param, grad, buf in zip(params, grads, bufs, strict=True):
        if buf is None:
            update = grad
        else:
            buf.lerp_(grad, 1 - momentum)  # EMA momentum: the sign ignores the scale anyway
            update = grad.lerp(buf, momentum) if nesterov else buf
        if weight_decay:
            param.mul_(1 - lr * weight_decay)  # decoupled
        param.add_(torch.sign(update), alpha=-lr)


class Signum(Optimizer):
    """Signum (Bernstein et al. 2018): sign descent on an EMA of gradients.

    m <- beta m + (1 - beta) g;  u = (1 - beta) g + beta m if nesterov else m;
    p <- p (1 - lr wd) - lr sign(u). Parameter groups carry ``geometry="sign"``, which
    ``norm="auto"`` reads as the l_1 noise scale.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Signum(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        _check_hyper(lr, weight_decay, momentum, nesterov)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "geometry": "sign",
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _check_hyper(
            param_group.get("lr", self.defaults["lr"]),
            param_group.get("weight_decay", self.defaults["weight_decay"]),
            param_group.get("momentum", self.defaults["momentum"]),
            param_group.get("nesterov", self.defaults["nesterov"]),
        )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor | None] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                if group["momentum"] == 0.0:
                    bufs.append(None)
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                bufs.append(state["momentum_buffer"])
            _signum(
                params,
                grads,
                bufs,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
            )
        return loss


class SignSGD(Signum):
    """signSGD: p <- p (1 - lr wd) - lr sign(g). Signum without momentum (and without state)."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay, nesterov=False)
