"""Optimizers that declare their geometry, and the mapping from geometry to noise-scale norm."""

from __future__ import annotations

from nongns_dist.optim.geometry import (
    GEOMETRY_NORMS,
    group_geometry,
    group_norms,
)
from nongns_dist.optim.lr import LRMultiplier
from nongns_dist.optim.sign import SignSGD, Signum
from nongns_dist.optim.spectral import HEAD_NAMES, Muon, SpecSGD, muon_param_groups

__all__ = [
    "GEOMETRY_NORMS",
    "HEAD_NAMES",
    "LRMultiplier",
    "Muon",
    "SignSGD",
    "Signum",
    "SpecSGD",
    "group_geometry",
    "group_norms",
    "muon_param_groups",
]
