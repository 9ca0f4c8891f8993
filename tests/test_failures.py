"""Failures that must stop a step on every rank before any update, never hang it.

* A ``micro_steps()`` loop left early (a ``break``, an exhausted data loader): all but the last
  micro-step skip the gradient reduction, so the optimizer would apply local, unreduced
  gradients (replicas diverge) and count samples never trained on. The optimizer given to
  ``attach`` (or ``scaler.step``, ``step_done``) raises instead, before a parameter changes.
* An exception in ONE rank's measurement math (``eigvalsh`` on the owner of a matrix, the l1
  variance formula, reading a ZeRO-2 micro-step sample in backward): the other ranks would wait in
  the next collective until the backend's timeout. Every rank raises ``MeasurementError`` naming
  the failing rank, before the optimizer update, and training can go on afterwards.

Real gloo process groups, real DDP / FSDP1 / FSDP2 / DeepSpeed; only the failing rank's local
math is patched. Each worker lowers its process group's timeout and sets an alarm, so a
regression fails in seconds instead of hanging for gloo's default 30 minutes.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.distributed_c10d import _set_pg_timeout
from torch.nn.parallel import DistributedDataParallel as DDP

import nongns_dist.capture.session as session_module
from nongns_dist import GNSConfig, attach
from nongns_dist.capture.accumulator import SampleAccumulator
from nongns_dist.capture.session import MeasurementError

from .distributed import spawn

MICRO = 3
#: A collective that waits longer than this fails (gloo's default is 30 minutes).
GROUP_TIMEOUT = timedelta(seconds=30)
#: A rank still running after this many seconds is killed (SIGALRM): the test fails.
ALARM_S = 150
#: How long the failing step may take on every rank (a hang would last GROUP_TIMEOUT).
FAST_S = 15.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    # two matrices of different sizes: rank 0 owns the 16x8 Gram, rank 1 the 4x16 one
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    return torch.randn(MICRO, 8, generator=g) + 0.3 * rank, torch.randn(MICRO, 4, generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _local(p: torch.Tensor) -> torch.Tensor:
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def _params(model: nn.Module) -> list[torch.Tensor]:
    """This rank's parameters (its shards under FSDP)."""
    return [_local(p) for p in model.parameters()]


def _unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _time_limits(*groups: dist.ProcessGroup | None) -> None:
    """Short collective timeouts and a hard stop: a hang fails the test instead of stalling it."""
    for group in groups:
        _set_pg_timeout(GROUP_TIMEOUT, group)
    signal.alarm(ALARM_S)


def _step(model: nn.Module, monitor, opt, rank: int, step: int) -> None:
    for micro in monitor.micro_steps():
        with micro:
            (_loss(model, *_batch(rank, step, micro.index)) / micro.loss_divisor).backward()
    opt.step()
    opt.zero_grad()


# -- M1: a micro_steps() loop left early ---------------------------------------------------------


def _left_early(model: nn.Module, monitor, rank: int, how: str) -> None:
    if how == "break":
        for micro in monitor.micro_steps():
            with micro:
                (_loss(model, *_batch(rank, 0, micro.index)) / micro.loss_divisor).backward()
            break  # after the first of 2 micro-steps
    else:  # the data loader runs out: one micro-batch for a step of 2
        loader = iter([_batch(rank, 0, 0)])
        for micro, (x, y) in zip(monitor.micro_steps(), loader, strict=False):
            with micro:
                (_loss(model, x, y) / micro.loss_divisor).backward()


def _ddp_left_early_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _time_limits(None)
    module = _model()
    ddp = DDP(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    cfg = GNSConfig(norm="l1", interval=1, adapt_batch_size=False, check_consistency=True)
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2)
    # torch.distributed.checkpoint's zero-lr step on a fresh optimizer (no backward): allowed,
    # not a training step
    get_optimizer_state_dict(ddp, opt)
    out: dict = {"init_step": (monitor.step, monitor.samples)}
    for how in ("break", "loader"):
        before = _params(module)
        _left_early(ddp, monitor, rank, how)
        with pytest.raises(RuntimeError, match=r"after 1 of the 2 micro-steps") as info:
            opt.step()
        after = _params(module)
        out[how] = (_unchanged(before, after), after, str(info.value))
        opt.zero_grad()  # drop the partial step, as the message says
    _step(ddp, monitor, opt, rank, 1)  # a full step next: counted once, measured
    out["after"] = (monitor.step, monitor.samples, monitor.last_estimate is not None)
    signal.alarm(0)
    return out


@pytest.mark.distributed
def test_ddp_loop_left_early_is_refused_on_every_rank_before_the_update():
    results = spawn(_ddp_left_early_worker, 2)
    for out in results:
        assert out["init_step"] == (0, 0)
        for how in ("break", "loader"):
            unchanged, _, message = out[how]
            assert unchanged, f"{how}: the optimizer applied unreduced gradients"
            assert "replicas diverge" in message and "set_batch_size" in message
        # the dropped partial steps left nothing behind: one full step, counted once
        assert out["after"] == (1, 2 * 2 * MICRO, True)
    for how in ("break", "loader"):
        first, second = (out[how][1] for out in results)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("how", ["break", "loader"])
def test_one_process_loop_left_early_is_refused_before_the_update(how):
    module = _model()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    monitor = attach(module, GNSConfig(norm="l1", interval=1), opt, micro_batch_size=MICRO,
                     accumulation_steps=2)  # fmt: skip
    before = _params(module)
    monitor.lr_multiplier.value = 2.0  # as after a batch increase
    _left_early(module, monitor, 0, how)
    with pytest.raises(RuntimeError, match=r"after 1 of the 2 micro-steps") as info:
        opt.step()
    assert "never trained on" in str(info.value)
    assert _unchanged(before, _params(module))
    assert (monitor.step, monitor.samples) == (0, 0)
    # refused before the multiplier's own pre-hook: the learning rate is not left multiplied
    assert opt.param_groups[0]["lr"] == 0.1
    monitor.lr_multiplier.value = 1.0
    opt.zero_grad()
    _step(module, monitor, opt, 0, 1)  # the abandoned micro-step's sample is not in this one
    assert (monitor.step, monitor.samples) == (1, 2 * MICRO)
    assert monitor.last_estimate is not None and monitor.last_estimate.num_samples == 2


def test_grad_scaler_step_refuses_a_loop_left_early():
    module = _model()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    monitor = attach(module, GNSConfig(norm="l1", interval=1), opt, micro_batch_size=MICRO,
                     accumulation_steps=2, grad_scaler=scaler)  # fmt: skip
    before = _params(module)
    for micro in monitor.micro_steps():
        with micro:
            scaler.scale(_loss(module, *_batch(0, 0, micro.index)) / 2).backward()
        break
    with pytest.raises(RuntimeError, match=r"after 1 of the 2 micro-steps"):
        scaler.step(opt)
    assert _unchanged(before, _params(module))
    assert (monitor.step, monitor.skipped_steps, scaler.get_scale()) == (0, 0, 2.0**8)


def test_step_done_refuses_a_loop_left_early_without_an_optimizer():
    module = _model()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)  # not given to attach: nothing hooked
    monitor = attach(module, GNSConfig(norm="l1", interval=1), micro_batch_size=MICRO,
                     accumulation_steps=2)  # fmt: skip
    _left_early(module, monitor, 0, "break")
    for applied in (True, False):
        with pytest.raises(RuntimeError, match=r"after 1 of the 2 micro-steps"):
            monitor.step_done(applied=applied)
    assert (monitor.step, monitor.samples) == (0, 0)
    opt.zero_grad()
    for micro in monitor.micro_steps():
        with micro:
            (_loss(module, *_batch(0, 1, micro.index)) / micro.loss_divisor).backward()
    opt.step()
    monitor.step_done()
    assert (monitor.step, monitor.samples) == (1, 2 * MICRO)
    assert monitor.last_estimate is not None


# -- M2: an exception in one rank's measurement math ---------------------------------------------


def _injected(*args, **kwargs):
    raise torch.linalg.LinAlgError("injected: linalg.eigvalsh failed to converge")


def _injected_runtime(*args, **kwargs):
    raise RuntimeError("injected failure in the measurement math")


#: what fails, as (object, attribute, replacement)
_TARGETS = {
    # the owner's square-root traces (nuclear)
    "eigvalsh": (torch.linalg, "eigvalsh", _injected),
    # the l1/l2 variance formula on this rank's slice
    "variance": (session_module, "coordinate_parts", _injected_runtime),
    # reading a per-micro-step sample in, during backward (ZeRO-2, one process)
    "sample": (SampleAccumulator, "_add_sample", _injected_runtime),
}


@contextlib.contextmanager
def _fails_on(rank: int, failing_rank: int, target: str) -> Iterator[None]:
    """Make ``target`` raise in this process when it is ``failing_rank`` (local math only: the
    collectives stay real)."""
    owner, name, replacement = _TARGETS[target]
    original = owner.__dict__[name]
    if rank == failing_rank:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _wrap(module: nn.Module, engine: str) -> nn.Module:
    if engine == "ddp":
        return DDP(module)
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(
            module, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            device_id=torch.device("cpu"),
        )  # fmt: skip
    from torch.distributed.fsdp import fully_shard

    for child in module:
        if isinstance(child, nn.Linear):
            fully_shard(child)
    return fully_shard(module)


def _failure_worker(rank: int, world_size: int, engine: str, norm: str, target: str) -> dict:
    _time_limits(None)
    model = _wrap(_model(), engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, check_consistency=True)
    monitor = attach(model, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2)
    out: dict = {"owned": len(monitor.plan.owned())}
    before = _params(model)
    start = time.monotonic()
    with _fails_on(rank, 1, target):
        try:
            _step(model, monitor, opt, rank, 0)
        except MeasurementError as exc:
            out["error"] = (str(exc), exc.ranks, repr(exc.__cause__))
    out["seconds"] = time.monotonic() - start
    out["params"] = _params(model)
    out["unchanged"] = _unchanged(before, out["params"])
    # training goes on: the step again applies the update unmeasured, the next one measures
    opt.step()
    opt.zero_grad()
    out["retried"] = (monitor.step, monitor.last_estimate is None)
    _step(model, monitor, opt, rank, 1)
    estimate = monitor.last_estimate
    out["next"] = (monitor.step, estimate is not None and estimate.is_finite)
    signal.alarm(0)
    return out


def _check_failure(results: list[dict], original: str, *, replicated: bool) -> None:
    for rank, out in enumerate(results):
        assert "error" in out, f"rank {rank} did not raise MeasurementError"
        message, ranks, cause = out["error"]
        assert ranks == [1] and "failed on rank 1 of the 2-rank" in message, message
        assert original in message, message  # rank 0 names rank 1's exception too
        assert (original in cause) == (rank == 1), cause  # chained on the failing rank only
        assert out["seconds"] < FAST_S, f"rank {rank} took {out['seconds']:.1f} s"
        assert out["unchanged"], f"rank {rank} applied an update after the failure"
        assert out["retried"] == (1, True) and out["next"] == (2, True), out
    if replicated:
        first, second = (out["params"] for out in results)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("engine", "norm", "target"),
    [
        ("ddp", "nuclear", "eigvalsh"),
        ("ddp", "l1", "variance"),
        ("fsdp2", "nuclear", "eigvalsh"),
        ("fsdp1", "l1", "variance"),
    ],
)
def test_failure_on_one_rank_raises_on_every_rank_without_hanging(engine, norm, target):
    results = spawn(_failure_worker, 2, engine, norm, target)
    if target == "eigvalsh":
        assert results[1]["owned"] >= 1  # rank 1 owns a matrix: its eigvalsh runs
    original = "failed to converge" if target == "eigvalsh" else "injected failure"
    _check_failure(results, original, replicated=engine == "ddp")


def _ds_failure_worker(rank: int, world_size: int, norm: str, target: str) -> dict:
    import nongns_dist.deepspeed as nds

    _time_limits(None)
    model = _model()
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 2},
        "nongns": {"enabled": True, "norm": norm, "interval": 1, "adapt_batch_size": False,
                   "check_consistency": True},
    }  # fmt: skip
    engine, *_ = nds.initialize(model=model, model_parameters=model.parameters(), config=config)
    _time_limits(engine.data_parallel_group)
    plugin = engine.nongns
    out: dict = {"owned": len(plugin.plan.owned())}

    def window(step: int) -> None:
        for micro in range(2):
            engine.backward(_loss(engine, *_batch(rank, step, micro)))
            engine.step()

    before = _params(engine.module)
    start = time.monotonic()
    with _fails_on(rank, 1, target):
        try:
            window(0)
        except MeasurementError as exc:
            out["error"] = (str(exc), exc.ranks, repr(exc.__cause__))
    out["seconds"] = time.monotonic() - start
    out["params"] = _params(engine.module)
    out["unchanged"] = _unchanged(before, out["params"])
    engine.step()  # the boundary step again: applied, unmeasured
    out["retried"] = (plugin.step, plugin.last_estimate is None)
    window(1)
    estimate = plugin.last_estimate
    out["next"] = (plugin.step, estimate is not None and estimate.is_finite)
    signal.alarm(0)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize(("norm", "target"), [("nuclear", "eigvalsh"), ("l1", "sample")])
def test_deepspeed_failure_on_one_rank_raises_on_every_rank(norm, target, deepspeed_ops):
    results = spawn(_ds_failure_worker, 2, norm, target)
    if target == "eigvalsh":
        assert results[1]["owned"] >= 1
    original = "failed to converge" if target == "eigvalsh" else "injected failure"
    _check_failure(results, original, replicated=True)


def test_one_process_failure_raises_at_the_step_not_in_backward(monkeypatch):
    module = _model()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    monitor = attach(module, GNSConfig(norm="nuclear", interval=1), opt, micro_batch_size=MICRO,
                     accumulation_steps=2)  # fmt: skip
    before = _params(module)
    monkeypatch.setattr(SampleAccumulator, "_add_sample", _injected_runtime)
    for micro in monitor.micro_steps():  # backward completes: the failure waits for the step
        with micro:
            (_loss(module, *_batch(0, 0, micro.index)) / micro.loss_divisor).backward()
    with pytest.raises(MeasurementError, match="failed on rank 0 of the 1-rank") as info:
        opt.step()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "injected failure" in str(info.value.__cause__)
    assert _unchanged(before, _params(module))
    monkeypatch.undo()
    opt.step()  # again: applied, unmeasured
    opt.zero_grad()
    assert (monitor.step, monitor.last_estimate) == (1, None)
    _step(module, monitor, opt, 0, 1)
    assert monitor.step == 2 and monitor.last_estimate is not None
