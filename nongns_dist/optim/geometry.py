"""Which norm measures the noise scale of which parameter: the dual of the optimizer's geometry.

Every optimizer in ``nongns_dist.optim`` writes ``geometry`` into its parameter groups:

    geometry    steepest descent in     noise-scale norm (the dual)
    sign        l_inf  (sign(g))        l1
    spectral    S_inf  (U V^T)          nuclear
    euclidean   l_2    (g)              l2

torch's own optimizers are mapped by class (AdamW -> sign, as in the paper); any group may
override with its own ``geometry`` key. Auxiliary groups of a hybrid (``auxiliary=True``, e.g.
Muon's AdamW group) are left out of ``auto`` when a spectral group exists, as in the paper.
Which PARAMETERS of a group a norm then covers (nuclear: matrices only) is the norm's own rule
(``nongns_dist.norms.Norm.covers``), applied by the plan (``capture.plan.plan_entries``).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from nongns_dist.norms import NORMS

__all__ = ["GEOMETRY_NORMS", "group_geometry", "group_norms"]

#: Geometry -> the name of its dual norm, from the norm registry.
GEOMETRY_NORMS = {norm.geometry: name for name, norm in NORMS.items()}

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
