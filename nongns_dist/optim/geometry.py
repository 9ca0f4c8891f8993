"""Which norm measures the noise scale of which parameter: the dual of the optimizer's geometry.

Every optimizer in ``nongns_dist.optim`` writes ``geometry`` into its parameter groups:

    geometry    steepest descent in     noise-scale norm (the dual)
    sign        l_inf  (sign(g))        l1
    spectral    S_inf  (U V^T)          nuclear
    euclidean   l_2    (g)              l2

torch's own optimizers are mapped by class (AdamW -> sign, as in the paper); any group may
override with its own ``geometry`` key. Auxiliary groups of a hybrid (``auxiliary=True``, e.g.
Muon's AdamW group) are left out of ``auto`` when a spectral group exists, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["GEOMETRY_NORMS", "group_geometry", "group_norms", "parameter_norms"]

GEOMETRY_NORMS = {"sign": "l1", "spectral": "nuclear", "euclidean": "l2"}

# By class name so that optimizers of packages not imported here (DeepSpeed's fused and CPU
# Adam/Lion) resolve without importing them. Adam-type methods are sign-like (PAPER.md).
_CLASS_GEOMETRY = {
    "SGD": "euclidean",
    "Adam": "sign",
    "AdamW": "sign",
    "NAdam": "sign",
    "RAdam": "sign",
    "Adamax": "sign",
    "FusedAdam": "sign",
    "DeepSpeedCPUAdam": "sign",
    "FusedLion": "sign",
    "DeepSpeedCPULion": "sign",
    "Lion": "sign",
    "Muon": "spectral",  # torch.optim.Muon: 2-D parameters only
}


def group_geometry(optimizer: Optimizer, group: dict[str, Any]) -> str:
    """The geometry of one parameter group: its ``geometry`` key, else the optimizer class's.

    Groups flagged ``use_muon`` (DeepSpeed's MuonWithAuxAdam, and ours) are spectral when the
    flag is set and sign-like (Adam) otherwise."""
    geometry = group.get("geometry")
    if geometry is None and "use_muon" in group:
        geometry = "spectral" if group["use_muon"] else "sign"
    if geometry is None:
        geometry = _class_geometry(type(optimizer))
    if geometry not in GEOMETRY_NORMS:
        raise ValueError(
            f"unknown geometry {geometry!r} in a param group of {type(optimizer).__name__}; "
            f"allowed: {sorted(GEOMETRY_NORMS)}"
        )
    return geometry


def _class_geometry(cls: type) -> str:
    for klass in cls.__mro__:
        if klass.__name__ in _CLASS_GEOMETRY:
            return _CLASS_GEOMETRY[klass.__name__]
    raise ValueError(
        f"cannot tell the geometry of {cls.__name__}: set param_group['geometry'] to one of "
        f"{sorted(GEOMETRY_NORMS)}, or choose norm='l1', 'l2' or 'nuclear' explicitly"
    )


def group_norms(optimizer: Optimizer) -> list[str | None]:
    """``norm="auto"`` per parameter group; ``None`` leaves a group out of the estimate."""
    geometries = [group_geometry(optimizer, g) for g in optimizer.param_groups]
    has_spectral = "spectral" in geometries
    return [
        None if has_spectral and _auxiliary(group) else GEOMETRY_NORMS[geometry]
        for group, geometry in zip(optimizer.param_groups, geometries, strict=True)
    ]


def _auxiliary(group: dict[str, Any]) -> bool:
    return bool(group.get("auxiliary", "use_muon" in group and not group["use_muon"]))


def parameter_norms(
    optimizer: Optimizer | None, norm: str, parameters: Iterable[torch.Tensor] | None = None
) -> dict[torch.Tensor, str | None]:
    """Norm per parameter (keyed by the parameter object) for a config's ``norm``.

    ``auto`` follows ``group_norms(optimizer)``. An explicit ``l1``/``l2`` covers every parameter;
    ``nuclear`` covers parameters with >= 2 dims and leaves the rest out (the spectral estimate
    is defined for matrices). ``parameters`` (default: the optimizer's) bounds the result.
    """
    if norm == "auto":
        if optimizer is None:
            raise ValueError("norm='auto' needs the optimizer; pass optimizer= or pick a norm")
        result: dict[torch.Tensor, str | None] = {}
        for group, kind in zip(optimizer.param_groups, group_norms(optimizer), strict=True):
            for p in group["params"]:
                result[p] = kind if (kind != "nuclear" or p.dim() >= 2) else None
        if parameters is not None:
            wanted = set(map(id, parameters))
            result = {p: k for p, k in result.items() if id(p) in wanted}
        return result
    if norm not in GEOMETRY_NORMS.values():
        raise ValueError(f"norm must be 'l1', 'l2', 'nuclear' or 'auto', got {norm!r}")
    if parameters is None:
        if optimizer is None:
            raise ValueError("pass the parameters or the optimizer")
        parameters = [p for g in optimizer.param_groups for p in g["params"]]
    return {p: (norm if norm != "nuclear" or p.dim() >= 2 else None) for p in parameters}
