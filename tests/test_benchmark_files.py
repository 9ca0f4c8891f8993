"""Files the benchmarks read: loaded with ``weights_only=True`` (tensors and plain containers, no
code run while reading), and a file that fails is refused with an error naming it. The
checkpoint is a real one of the main job; the script runs as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import checkpoints

from .test_train import REPO, TINY, TORCHRUN, TRAIN, _run

ESTIMATOR = REPO / "launch" / "benchmarks" / "estimator_accuracy.py"
#: The smallest measurement: four windows, one (n, b), two measurements.
SMALL = ["--population", "4", "--samples", "2", "--sizes", "1"]
SMALL += ["--sequences", "1", "--measurements", "2"]


class _RunsCode:
    """Unpickled by a full unpickler, it creates a file: what a cache from elsewhere could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """A short one-process run of the main job: its checkpoint is the script's input."""
    out = tmp_path_factory.mktemp("estimator") / "run"
    flags = [*TINY, "--sample-budget", "8", "--corpus-dir", str(corpus_dir), "--out", str(out)]
    _run([*TORCHRUN, "1", str(TRAIN), *flags], cwd=out.parent)
    return out


def _estimator(flags: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ESTIMATOR), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.distributed
def test_estimator_accuracy_cache_is_read_weights_only(run_dir: Path, tmp_path: Path) -> None:
    """--cache: written, then read back with weights_only=True (the same population noise); a
    cache that would run code when unpickled, or one of the first format (pickled slice
    objects), is refused naming the file, and runs nothing."""
    cache = tmp_path / "grads.pt"
    flags = ["--checkpoint", str(run_dir), *SMALL, "--cache", str(cache)]
    written = _estimator(flags, tmp_path)
    assert written.returncode == 0, written.stderr[-3000:]
    read = _estimator(flags, tmp_path)
    assert read.returncode == 0, read.stderr[-3000:]
    assert f"read from {cache}" in read.stdout

    def noise(result: subprocess.CompletedProcess) -> str:
        return next(line for line in result.stdout.splitlines() if "population noise" in line)

    assert noise(read) == noise(written)

    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pt"
    torch.save(_RunsCode(marker), hostile)
    old = tmp_path / "old-format.pt"
    torch.save((torch.zeros(4, 3), {"w": slice(0, 3)}, {"w": torch.Size([3])}), old)
    for bad in (hostile, old):
        result = _estimator([*flags[:-1], str(bad)], tmp_path)
        assert result.returncode == 1
        assert f"--cache: cannot load {bad} (weights_only=True" in result.stderr
        assert "Unsupported global" in result.stderr
    assert not marker.exists()


@pytest.mark.distributed
def test_estimator_accuracy_refuses_a_checkpoint_that_does_not_load(
    run_dir: Path, tmp_path: Path
) -> None:
    """model.pt cut in half: an error naming the file, not a traceback."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    last = checkpoints.complete_checkpoints(copy / "checkpoints")[-1]
    model = last / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    result = _estimator(["--checkpoint", str(copy), *SMALL], tmp_path)
    assert result.returncode == 1
    assert f"--checkpoint: cannot load {model} (weights_only=True" in result.stderr
    assert "Traceback" not in result.stderr
