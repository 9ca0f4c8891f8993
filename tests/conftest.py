"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache directory of test_data.py's session corpus (built once, whichever runs first)."""
    from launch.data import build_stdlib_corpus

    from .test_data import TEST_CORPUS_MB

    cache = tmp_path_factory.getbasetemp() / "corpus"
    build_stdlib_corpus(cache, TEST_CORPUS_MB)
    return cache
