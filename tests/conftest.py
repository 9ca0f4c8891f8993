"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """Build DeepSpeed's JIT ops (shared-memory comm, fused Adam) once, in this process: two
    ranks building them at once can crash. Skips when DeepSpeed is not installed."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load()
