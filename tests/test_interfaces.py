"""The capture interface is what every backend implements (DeepSpeed's capture once
claimed a ``no_sync`` it could only raise in)."""

from __future__ import annotations

import inspect

import pytest

from nongns_dist.capture.base import GradientCapture, TorchCapture
from nongns_dist.capture.ddp import DDPCapture
from nongns_dist.capture.deepspeed import DeepSpeedCapture
from nongns_dist.capture.fsdp1 import FSDP1Capture
from nongns_dist.capture.fsdp2 import FSDP2Capture
from nongns_dist.capture.local import LocalCapture


def _methods(protocol: type) -> set[str]:
    return {
        name
        for klass in protocol.__mro__
        if klass not in (object,) and klass.__module__ == GradientCapture.__module__
        for name, value in vars(klass).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }


@pytest.mark.parametrize(
    ("backend", "protocol"),
    [
        (DDPCapture, TorchCapture),
        (FSDP1Capture, TorchCapture),
        (FSDP2Capture, TorchCapture),
        (LocalCapture, TorchCapture),
        (DeepSpeedCapture, GradientCapture),
    ],
)
def test_every_backend_implements_its_interface(backend, protocol):
    wanted = _methods(protocol)
    assert {"install", "flush", "discard", "remove", "plan_entries"} <= wanted
    missing = {name for name in wanted if not inspect.isfunction(getattr(backend, name, None))}
    assert not missing, f"{backend.__name__} lacks {sorted(missing)}"


def test_deepspeed_claims_no_no_sync():
    # DeepSpeed marks its own accumulation boundary: attach's driver never asks it to skip one
    assert "no_sync" in _methods(TorchCapture) and "no_sync" not in _methods(GradientCapture)
    assert not hasattr(DeepSpeedCapture, "no_sync")
