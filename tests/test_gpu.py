"""GPU tier: the library and the training job on CUDA (NCCL). Every test here is skipped without
CUDA; the CPU side of the device plumbing (--device, --autocast) is in tests/test_train.py.

Each test compares the CUDA result with a reference: ``estimate_gns`` on the captured samples,
float64 ``eigvalsh``, the same optimizer step on the CPU, a CPU run of the same job."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch import checkpoints
from nongns_dist import GNSConfig, attach, estimate_gns
from nongns_dist.estimators import MomentPool
from nongns_dist.norms import sqrt_trace
from nongns_dist.optim import Muon, SpecSGD, muon_param_groups

from .float32_bounds import Float32Bound
from .test_ddp import MICRO, Net, _batch, _loss
from .test_norms import _numpy_sqrt_trace, _sample_covariance
from .test_optim import TinyLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")
REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"


@pytest.mark.parametrize("norm", ["l1", "l2", "nuclear"])
def test_one_process_estimate_equals_reference_on_cuda(norm: str) -> None:
    """tests/test_local.py's check with the model, batches and every capture buffer on the GPU."""
    torch.manual_seed(0)
    module = Net().to(CUDA)
    reference = copy.deepcopy(module)
    opt = Muon(muon_param_groups(module), lr=0.02, aux="adamw", aux_lr=1e-3)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False)
    monitor = attach(module, cfg, opt, micro_batch_size=MICRO, accumulation_steps=3)
    assert monitor.session is not None and monitor.session.device.type == CUDA.type
    norms = {t.name: t.norm.name for t in monitor.plan.params}
    pool = MomentPool.for_config(cfg)
    bound = Float32Bound(cfg.pool_dof)
    for step in range(3):
        reference.load_state_dict(module.state_dict())
        samples = []
        for micro in range(3):
            reference.zero_grad()
            x, y = (t.to(CUDA) for t in _batch(0, step, micro))
            _loss(reference, x, y).backward()
            samples.append(
                {n: p.grad.detach().double().clone() for n, p in reference.named_parameters()
                 if n in norms}
            )  # fmt: skip
        for micro in monitor.micro_steps():
            x, y = (t.to(CUDA) for t in _batch(0, step, micro.index))
            with micro:
                (_loss(module, x, y) / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
        want = estimate_gns(samples, MICRO, norms, pool=pool)
        tol = bound.step(samples, MICRO, norms, pool)  # tests/float32_bounds.py
        got = monitor.last_estimate
        assert got is not None
        assert got.noise == pytest.approx(want.noise, rel=tol.noise)
        assert got.signal == pytest.approx(want.signal, rel=tol.signal)
        if norm != "l2":
            assert got.pooled_noise == pytest.approx(want.pooled_noise, rel=tol.pooled_noise)


@pytest.mark.parametrize(("m", "k", "n", "decay"), [(256, 1024, 2, 2.0), (512, 512, 8, 3.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["eigh", "newton_schulz"])
def test_sqrt_trace_on_cuda_agrees_with_float64_eigvalsh(
    m: int, k: int, n: int, decay: float, dtype: torch.dtype, method: str
) -> None:
    """cuSOLVER eigvalsh and the matmul-only iteration (TF32 off: full float32 matmuls) against
    float64 LAPACK on the CPU."""
    cov = _sample_covariance(m, k, n, decay, seed=m + n)
    ref = _numpy_sqrt_trace(cov.numpy())
    tol = 1e-3
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        value = float(sqrt_trace(cov.to(CUDA, dtype), method, tol=tol))  # type: ignore[arg-type]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    # eigh: float32 rounds the small eigenvalues (~sqrt(eps) of the largest each); the
    # iteration is bounded by its tolerance
    bound = tol if method == "newton_schulz" else (1e-9 if dtype == torch.float64 else 1e-3)
    assert abs(value / ref - 1) <= bound


def _optimizer_steps(device: torch.device, kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyLM().double().to(device)
    if kind == "muon":
        opt: torch.optim.Optimizer = Muon(
            muon_param_groups(model), lr=0.02, ns_dtype=torch.float32, aux="adamw", aux_lr=1e-3
        )
    else:
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
        opt = SpecSGD(matrices, lr=0.02)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 11, (4, 6), generator=g).to(device)
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["muon", "specsgd"])
def test_spectral_optimizer_steps_on_cuda_match_the_cpu(kind: str) -> None:
    """Muon (float32 Newton-Schulz) and SpecSGD (exact SVD polar factor) on float64 weights:
    CUDA and CPU take the same steps up to float32 / cuSOLVER rounding."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_gpu = _optimizer_steps(CUDA, kind)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    on_cpu = _optimizer_steps(torch.device("cpu"), kind)
    for name, value in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], value, rtol=1e-5, atol=1e-6, msg=name)


TINY = [
    *("--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32"),
    *("--micro-batch", "2", "--initial-batch", "4", "--max-batch", "16"),
    *("--interval", "2", "--warmup-fraction", "0.1", "--sample-budget", "96"),
    *("--eval-every", "10", "--eval-batches", "2", "--corpus-mb", "0.5"),
]


def _train(nproc: int, out: Path, *flags: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), str(TRAIN), *TINY, "--out", str(out), *flags]  # fmt: skip
    result = subprocess.run(
        command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine",
    [["--engine", "ddp"], ["--engine", "fsdp2"], ["--engine", "deepspeed", "--zero-stage", "2"]],
)
def test_train_runs_on_cuda_with_nccl(tmp_path: Path, corpus_dir: Path, engine: list[str]) -> None:
    """The job on one GPU per process (2 processes when there are 2 GPUs; FSDP needs them), the
    same job with bf16 autocast, and (DDP) a CUDA checkpoint continued on the CPU."""
    nproc = 2 if torch.cuda.device_count() >= 2 else 1
    if nproc == 1 and engine[1] == "fsdp2":
        pytest.skip("FSDP needs 2 processes: one GPU here")
    flags = [*engine, "--corpus-dir", str(corpus_dir)]
    out = tmp_path / "cuda"
    summary = _train(nproc, out, *flags, "--device", "cuda", "--checkpoint-every", "4",
                     "--keep-checkpoints", "0")  # fmt: skip
    assert summary["args"]["device"] == "cuda" and summary["world_size"] == nproc
    assert 0 < summary["final_val_loss"] < 6.0  # log(256) = 5.5 at the start, plus slack
    bf16 = _train(nproc, tmp_path / "bf16", *flags, "--autocast", "bf16")  # auto: cuda
    assert bf16["args"]["device"] == "cuda"
    assert bf16["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=0.05)
    if engine[1] == "ddp":
        # the first checkpoint of the CUDA run, continued on the CPU (the later ones go)
        first = checkpoints.complete_checkpoints(out / "checkpoints")[0]
        resumed = _train(nproc, out, *flags, "--device", "cpu", "--resume", str(first),
                         "--checkpoint-every", "4", "--keep-checkpoints", "0")  # fmt: skip
        assert resumed["args"]["device"] == "cpu" and resumed["resumed_from"] == str(first)
        assert resumed["batch_trajectory"] == summary["batch_trajectory"]
        assert resumed["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-3)
        # and back: the CPU run's first checkpoint continued on CUDA
        first = checkpoints.complete_checkpoints(out / "checkpoints")[0]
        back = _train(nproc, out, *flags, "--device", "cuda", "--resume", str(first),
                      "--checkpoint-every", "4", "--keep-checkpoints", "0")  # fmt: skip
        assert back["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-3)
