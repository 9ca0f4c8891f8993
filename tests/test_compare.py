"""The comparison script: its step-reduction arithmetic, and one tiny end-to-end comparison."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.compare import Run, median_reduction

from .test_train import TINY

REPO = Path(__file__).resolve().parent.parent


def _run(evals: list[tuple[int, float]]) -> Run:
    run = Run(Path("."), [])
    run.records = [{"step": s, "val_loss": v} for s, v in evals]
    run.summary = {"final_val_loss": evals[-1][1], "steps": evals[-1][0]}
    return run


def test_steps_to_target_and_median_reduction() -> None:
    small = _run([(10, 3.0), (20, 2.5), (30, 2.4), (40, 2.45)])
    assert small.best == 2.4 and small.final == 2.45 and small.steps_to(small.best) == 30
    fast = _run([(5, 2.6), (10, 2.39), (15, 2.3)])
    never = _run([(5, 2.6), (10, 2.41)])
    assert fast.steps_to(2.4) == 10 and never.steps_to(2.4) == math.inf
    reductions = [1 - fast.steps_to(2.4) / 30, 1 - never.steps_to(2.4) / 30, 0.5]
    assert median_reduction(reductions) == "50.0% (2/3 reached)"
    assert median_reduction([0.25, 0.75]) == "50.0%"
    assert median_reduction([-math.inf, -math.inf, 0.1]) == "not reached (1/3 reached)"


@pytest.mark.distributed
@pytest.mark.slow
def test_tiny_comparison_end_to_end(tmp_path: Path) -> None:
    """Tuning on seed 0, one reported seed, the four modes; a second call reuses every run."""
    out = tmp_path / "cmp"
    flags = ["--optimizers", "signum", "--seeds", "1", "--lr-grid", "1", "--theta-grid", "0.3",
             "--euclidean-theta-grid", "0.2", "--small-batch", "4", "--eval-every", "2",
             "--out", str(out)]  # fmt: skip
    owned = {"--initial-batch", "--eval-every", "--eval-batches"}  # compare.py sets these
    tiny = [a for i, a in enumerate(TINY) if a not in owned and TINY[i - 1] not in owned]
    train_flags = ["--", *tiny, "--sample-budget", "64", "--corpus-dir", str(tmp_path / "corpus")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(REPO / "launch" / "compare.py"), *flags]
    first = subprocess.run([*command, *train_flags], env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["signum"]
    assert set(results["steps"]) == {"small", "large", "euclidean", "non_euclidean"}
    assert results["steps"]["small"] == [16] and results["steps"]["large"] == [4]
    assert results["theta"] == {"euclidean": 0.2, "non_euclidean": 0.3}
    assert "| signum |" in (out / "table.md").read_text()

    again = subprocess.run([*command, "--report-only", *train_flags], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "] run " in first.stdout and "torch.distributed.run" in first.stdout
    assert "] run " not in again.stdout  # every run reused
    assert json.loads((out / "results.json").read_text())["signum"] == results

    clash = subprocess.run([*command, "--", "--theta", "0.5"], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert clash.returncode != 0 and "--theta" in clash.stderr
