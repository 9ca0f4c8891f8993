"""Spectral descent: the steepest-descent direction of the spectral-norm ball is U V^T; its dual
is the nuclear norm. ``SpecSGD`` is plain spectral descent; ``Muon`` is the hybrid practitioners
run: ``torch.optim.Muon`` on hidden 2-D matrices, AdamW (or Signum) on everything else."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import Optimizer, ParamsT

from nongns_dist.norms import NUCLEAR, muon_quintic, polar_factor
from nongns_dist.optim.sign import Signum, evaluate_closure

__all__ = ["HEAD_NAMES", "Muon", "SpecSGD", "muon_param_groups"]


class SpecSGD(Optimizer):
    """specSGD (Carlson et al. 2015; Bernstein & Newhouse 2024): p <- p (1 - lr wd) - lr U V^T
    of the gradient, conv weights viewed as (out, in * k * k).

    ``polar="svd"`` is exact; ``polar="newton_schulz"`` runs Muon's quintic then the convergent
    cubic until U V^T changes by at most ``polar_tol`` (matmuls only). Groups carry
    ``geometry="spectral"`` (nuclear-norm noise scale under ``norm="auto"``).

    Example::

        >>> opt = SpecSGD([torch.nn.Parameter(torch.randn(8, 16))], lr=0.02)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        polar: Literal["svd", "newton_schulz"] = "svd",
        polar_tol: float = 1e-4,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if polar not in ("svd", "newton_schulz"):
            raise ValueError(f"polar must be 'svd' or 'newton_schulz', got {polar!r}")
        if not 0.0 < polar_tol < 1.0:
            raise ValueError(f"polar_tol must be in (0, 1), got {polar_tol}")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "polar": polar,
            "polar_tol": polar_tol,
            "geometry": "spectral",
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not NUCLEAR.covers(p.shape):  # the spectral geometry's update needs a matrix
                    raise ValueError(
                        f"SpecSGD updates matrices only; got a parameter of shape {tuple(p.shape)}"
                        " (put vectors in another optimizer, or use nongns_dist.optim.Muon)"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.reshape(p.shape[0], -1)
                work = grad if grad.dtype == torch.float64 else grad.float()
                update = polar_factor(work, group["polar"], tol=group["polar_tol"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.view_as(p).to(p.dtype), alpha=-group["lr"])
        return loss


#: Last name components of modules treated as the output head (left to the auxiliary optimizer).
HEAD_NAMES = frozenset({"lm_head", "head", "output", "output_layer", "classifier"})


def muon_param_groups(
    model: nn.Module, *, head_names: Iterable[str] = HEAD_NAMES
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters the way Muon is run in practice.

    Muon: 2-D weights of hidden layers. Auxiliary optimizer: everything else: 1-D parameters
    (norm gains, biases), embeddings (``nn.Embedding`` weights, and heads tied to them), the
    output head (a module whose last name component is in ``head_names``), and conv kernels
    (``torch.optim.Muon`` takes 2-D parameters only). Frozen parameters are left out.

    Returns groups for ``nongns_dist.optim.Muon``:
    ``[{"params": [...], "use_muon": True}, {"params": [...], "use_muon": False}]``.
    """
    heads = frozenset(head_names)
    aux_ids: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.rsplit(".", 1)[-1] in heads:
            aux_ids.update(id(p) for p in module.parameters(recurse=False))
    muon: list[nn.Parameter] = []
    aux: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():  # deduplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if p.dim() == 2 and id(p) not in aux_ids else aux).append(p)
    groups = [{"params": muon, "use_muon": True}, {"params": aux, "use_muon": False}]
    return [g for g in groups if g["params"]]


class Muon(Optimizer):
    """Hybrid Muon: ``torch.optim.Muon`` on the ``use_muon`` groups, AdamW or Signum on the rest.

    The two inner optimizers own the SAME group dicts and state as this one, so a scheduler that
    writes ``param_groups[i]["lr"]``, ``state_dict()``/``load_state_dict()`` and ``zero_grad()``
    cover both. Muon groups carry ``geometry="spectral"``; auxiliary groups carry
    ``geometry="sign"`` and ``auxiliary=True``: ``norm="auto"`` measures the nuclear-norm noise
    scale on the Muon group only, as the paper does.

    ``params``: groups from ``muon_param_groups(model)`` (each with ``use_muon``; per-group
    overrides such as ``lr`` are kept), or plain parameters, split by ``ndim == 2``.

    ``ns_dtype``: the Newton-Schulz precision. ``torch.bfloat16`` (default) runs torch's own
    Muon step, bit for bit. CPUs without bfloat16 matrix units run it 12x to 90x slower than
    float32 (launch/benchmarks/muon_ns_dtype.py), so ``torch.float32`` runs the same update
    (momentum, Nesterov, quintic, shape lr adjustment, decoupled decay, same state keys) in
    float32.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> opt = Muon(muon_param_groups(model), lr=0.02, aux="adamw", aux_lr=3e-4)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype = torch.bfloat16,
        aux: Literal["adamw", "signum"] = "adamw",
        aux_lr: float = 3e-4,
        aux_betas: tuple[float, float] = (0.9, 0.95),
        aux_eps: float = 1e-8,
        aux_momentum: float = 0.9,
        aux_weight_decay: float = 0.0,
    ) -> None:
        if aux not in ("adamw", "signum"):
            raise ValueError(f"aux must be 'adamw' or 'signum', got {aux!r}")
        if ns_dtype not in (torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(
                f"ns_dtype must be torch.bfloat16, torch.float32 or torch.float64, got {ns_dtype}"
            )
        self.ns_dtype = ns_dtype
        groups: list[Any] = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [
                {"params": [p for p in groups if p.dim() == 2], "use_muon": True},
                {"params": [p for p in groups if p.dim() != 2], "use_muon": False},
            ]
        for i, g in enumerate(groups):
            if not isinstance(g, dict) or "use_muon" not in g:
                raise ValueError(
                    f"param group {i} needs a 'use_muon' key; build groups with "
                    "muon_param_groups(model) or pass plain parameters"
                )
        groups = [g for g in groups if list(g["params"])]
        muon_groups = [_without(g, "use_muon") for g in groups if g["use_muon"]]
        aux_groups = [_without(g, "use_muon") for g in groups if not g["use_muon"]]
        if not muon_groups:
            raise ValueError("Muon got no matrix parameters (no group with use_muon=True)")

        self._muon = torch.optim.Muon(
            muon_groups,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        for g in self._muon.param_groups:
            g.update(use_muon=True, geometry="spectral")
        self._aux: Optimizer | None = None
        if aux_groups:
            if aux == "adamw":
                self._aux = torch.optim.AdamW(
                    aux_groups,
                    lr=aux_lr,
                    betas=aux_betas,
                    eps=aux_eps,
                    weight_decay=aux_weight_decay,
                )
            else:
                self._aux = Signum(
                    aux_groups, lr=aux_lr, momentum=aux_momentum, weight_decay=aux_weight_decay
                )
            for g in self._aux.param_groups:
                g.update(use_muon=False, geometry="sign", auxiliary=True)
        self._initialising = True
        all_groups = self._muon.param_groups + (self._aux.param_groups if self._aux else [])
        super().__init__(all_groups, {"lr": lr})
        self._initialising = False
        self._link_inner()

    def _link_inner(self) -> None:
        # One list of group dicts and one state dict, seen by the outer and both inner optimizers.
        self._muon.param_groups = [g for g in self.param_groups if g["use_muon"]]
        self._muon.state = self.state
        if self._aux is not None:
            self._aux.param_groups = [g for g in self.param_groups if not g["use_muon"]]
            self._aux.state = self.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_initialising", False):
            raise NotImplementedError(
                "nongns_dist.optim.Muon fixes its groups at construction; build a new one with "
                "all groups"
            )
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._link_inner()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        if self.ns_dtype == torch.bfloat16:
            self._muon.step()
        else:
            for group in self._muon.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        _muon_update(p, self.state[p], group, self.ns_dtype)
        if self._aux is not None:
            self._aux.step()
        return loss


def _muon_update(
    p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype
) -> None:
    """torch.optim.Muon's update of one matrix (momentum, Nesterov, quintic, lr adjusted by
    shape, decoupled decay) with the Newton-Schulz iteration in ``dtype``."""
    grad = p.grad
    assert grad is not None
    if grad.ndim != 2 or grad.is_sparse:  # torch's Muon refuses these too
        raise ValueError(f"Muon needs dense 2-D gradients, got shape {tuple(grad.shape)}")
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    buf = state["momentum_buffer"]
    momentum = group["momentum"]
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if group["nesterov"] else buf
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=group["eps"])
    x = muon_quintic(x, group["ns_steps"], tuple(group["ns_coefficients"]))
    if tall:
        x = x.T
    rows, cols = p.shape[:2]
    fn = group["adjust_lr_fn"]
    if fn is None or fn == "original":
        ratio = math.sqrt(max(1.0, rows / cols))
    elif fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(x.to(p.dtype), alpha=-group["lr"] * ratio)


def _without(group: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != key}
