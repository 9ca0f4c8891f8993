"""launch/benchmarks/estimator_tracking.py: its population is the run's plan with the library's
normalisation, its 'paper' column is the paper's estimator, and the script runs end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.benchmarks import estimator_tracking as tracking
from launch.benchmarks.estimator_accuracy import Geometry, population_noise
from launch.llama import Llama, LlamaConfig

from .test_data import TEST_CORPUS_MB

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "benchmarks" / "estimator_tracking.py"
TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--eval-batches", "2"]
OPTIMIZER_ARGS = {"lr": 0.01, "weight_decay": 0.0, "ns_dtype": "float32", "aux_lr": 0.003}


def _tiny_gradients() -> tuple[Llama, torch.Tensor, dict[str, slice], dict[str, torch.Size]]:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    columns, shapes, start = {}, {}, 0
    for name, p in model.named_parameters():
        columns[name], shapes[name] = slice(start, start + p.numel()), p.shape
        start += p.numel()
    grads = torch.randn(40, start) * torch.rand(start)  # per-coordinate scales
    return model, grads, columns, shapes


@pytest.mark.parametrize(
    ("optimizer", "norm", "key"), [("signum", "l1", "l1"), ("muon", "auto", "nuclear")]
)
def test_population_is_the_run_plan(optimizer: str, norm: str, key: str) -> None:
    """Signum l1 measures every parameter in l1, Muon under auto the Muon group's matrices in
    nuclear (its auxiliary group left out): estimator_accuracy's population noise of each."""
    model, grads, columns, shapes = _tiny_gradients()
    plan = tracking.measured_plan(model, {"optimizer": optimizer, "norm": norm, **OPTIMIZER_ARGS})
    assert plan.kind == key
    expected = population_noise(grads, Geometry(model, columns, shapes))[key]
    noise = tracking.plan_noise(grads, columns, shapes, plan)
    assert noise == pytest.approx(expected, rel=1e-9)


def test_population_is_what_estimate_gns_estimates() -> None:
    """Gaussian per-example gradients: simulated measurements of b = 4 examples average to the
    population's (b = 1) noise, l1 with c4 at n = 8 and 32, l2; l1 without c4 reads c4(7)^2."""
    grads = torch.randn(4000, 64) * torch.linspace(0.1, 2.0, 64)
    check = tracking.check_normalisation(grads, 400, np.random.default_rng(0))
    assert check["l1 n=8"] == pytest.approx(1.0, abs=0.03)
    assert check["l1 n=32"] == pytest.approx(1.0, abs=0.03)
    assert check["l2 n=8"] == pytest.approx(1.0, abs=0.03)
    assert check["l1 n=8 no c4"] / check["l1 n=8"] == pytest.approx(tracking.c4_dof(7) ** 2)


def test_paper_series_is_the_bias_corrected_ema() -> None:
    records = [{"noise_raw": x} for x in (4.0, 2.0, 1.0)]
    ema = tracking.paper_series(records, 0.5)
    assert ema[0] == pytest.approx(2.0)  # the first measurement itself, bias-corrected
    assert ema[1] == pytest.approx((0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (1 - 0.81))


def _script(flags: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def _paper_column(output: str, section: str) -> list[str]:
    block = output.split(f"### {section}")[1].split("trajectory")[0]
    return [row.split("|")[4].strip() for row in block.splitlines() if re.match(r"\| \d+%", row)]


@pytest.mark.slow
@pytest.mark.distributed
def test_script_end_to_end(tmp_path: Path, corpus_dir: Path) -> None:
    """Two tiny runs (Signum l1, Muon), their tables and the normalisation check; then --reuse
    with --paper-run: no run repeated, the populations read back, and the paper run's own
    noise_raw gives the same 'paper' column as noise_raw x c4(1)^2."""
    flags = ["--budget", "64", "--population", "8", "--check-draws", "4", "--intervals", "2"]
    flags += ["--out", "runs"]
    train = [*TINY, "--corpus-dir", str(corpus_dir), "--corpus-mb", str(TEST_CORPUS_MB)]
    first = _script([*flags, "--", *train], tmp_path)
    for section in (
        "signum, --norm l1, --estimator pooled, interval 2",
        "muon, --norm auto, --estimator pooled, interval 2",
    ):
        assert f"### {section}" in first
        assert len(_paper_column(first, section)) == 4
    assert "the same 12 parameters as the run's pool state" in first
    assert "the same 7 parameters as the run's pool state" in first
    assert "normalisation check (checkpoint step 4" in first
    assert "nan" not in first.split("total wall time")[0].split("### signum")[1].split("traj")[0]

    again = _script(
        [*flags, "--reuse", "--paper-run", "--geometries", "signum:l1", "--", *train], tmp_path
    )
    assert again.count("reused,") == 1  # the pooled run; the paper run is new
    assert "of noise_raw of the --estimator paper run signum-l1-paper-i2" in again
    assert "(cached)" in again
    section = "signum, --norm l1, --estimator pooled, interval 2"
    assert _paper_column(again, section) == _paper_column(first, section)
