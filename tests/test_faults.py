"""Faults inside a step: loss-scale overflows (GradScaler under DDP and in one process, DeepSpeed
fp16), a NaN loss on one rank, non-finite statistics on one rank. Whatever the fault, the batch
never changes on bad numbers, every rank closes the step the same way (``check_consistency``), a
step's samples are counted once, and the measurements that do happen still equal
``estimate_gns`` on the gathered local gradients (in unscaled units, with the pool continuing as
if the bad step had not been measured).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nongns_dist import GNSConfig, attach, estimate_gns
from nongns_dist.estimators import MomentPool

from .distributed import spawn
from .float32_bounds import Float32Bound

MICRO = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(rank, step, micro):
    g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    # rank-dependent shift: the ranks' gradients differ by more than noise
    return torch.randn(MICRO, 8, generator=g) + 0.3 * rank, torch.randn(MICRO, 4, generator=g)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _local_gradient(reference, module, batches, names):
    """This rank's mean gradient over ``batches``, recomputed without any wrapper in the model's
    dtype (the same kernels as the wrapped model, so the same bits: a power-of-two loss scale
    is exact), returned as float64 for the reference."""
    reference.load_state_dict(module.state_dict())
    reference.zero_grad()
    for x, y in batches:
        (_loss(reference, x, y) / len(batches)).backward()
    return {
        n: p.grad.detach().double().clone() for n, p in reference.named_parameters() if n in names
    }


def _relative_errors(got, want, tol):
    """(relative error, its tolerance) of noise, signal and pooled noise; ``tol`` from
    tests/float32_bounds.py."""
    return [
        (abs(got.noise / want.noise - 1), tol.noise),
        (abs(got.signal / want.signal - 1), tol.signal),
        (abs(got.pooled_noise / want.pooled_noise - 1), tol.pooled_noise),
    ]


def _within(errors):
    return all(error <= tol for error, tol in errors)


# -- MomentPool staging (no process group) ---------------------------------------------------------


def test_staged_pool_commit_equals_direct_update_and_rollback_restores():
    torch.manual_seed(0)
    first, second = torch.rand(10), torch.rand(10)
    direct, staged = MomentPool(target_dof=20.0), MomentPool(target_dof=20.0)
    for pool in (direct, staged):
        pool.update("a", first, 3)
    before = copy.deepcopy(staged.state_dict())
    staged.stage()
    staged.update("a", second, 3)
    staged.update("b", second, 3)  # a new entry, staged as well
    staged.rollback()
    assert staged.state_dict()["entries"].keys() == before["entries"].keys()
    assert torch.equal(staged.value("a"), before["entries"]["a"][0])
    staged.stage()
    got = staged.update("a", second, 3)
    staged.commit()
    want = direct.update("a", second, 3)
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    assert torch.equal(staged.value("a"), direct.value("a"))


# -- one process, GradScaler -----------------------------------------------------------------------


def test_one_process_grad_scaler_unscaled_and_overflow_closed_once():
    """One process: samples are micro-steps. Statistics in unscaled units at two different scales
    (the pool continues across them), the overflow step closed by scaler.step itself."""
    module = _model()
    reference = copy.deepcopy(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    cfg = GNSConfig(norm="l1", interval=1, adapt_batch_size=False)
    monitor = attach(module, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2,
                     grad_scaler=scaler)  # fmt: skip
    names = [t.name for t in monitor.plan.params]
    pool = MomentPool.for_config(cfg)
    bound = Float32Bound(cfg.pool_dof)
    scales = []
    for step in range(3):
        batches = [_batch(0, step, m) for m in range(2)]
        samples = [_local_gradient(reference, module, [b], names) for b in batches]
        scales.append(scaler.get_scale())
        for micro in monitor.micro_steps():
            x, y = batches[micro.index]
            if step == 1 and micro.is_last:
                x = x.clone()
                x[0, 0] = float("inf")
            scaler.scale(_loss(module, x, y) / micro.loss_divisor).backward()
        before = monitor.last_estimate
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 1:
            assert monitor.last_estimate is before, "the overflow step must not be measured"
            assert (monitor.skipped_steps, monitor.controller.num_updates) == (1, 1)
            assert monitor.controller.skipped == 0, "a skipped step is no rejected measurement"
            continue
        want = estimate_gns(samples, MICRO, "l1", pool=pool)
        tol = bound.step(samples, MICRO, dict.fromkeys(names, "l1"), pool)
        errors = _relative_errors(monitor.last_estimate, want, tol)
        assert _within(errors), (step, errors)
    assert scales == [2.0**12, 2.0**12, 2.0**11]  # the overflow halved the scale
    assert (monitor.step, monitor.samples) == (3, 3 * 2 * MICRO)  # each step counted once
    with pytest.raises(RuntimeError, match=r"scaler\.step"):
        monitor.step_done()


def test_step_done_cannot_close_a_step_twice():
    module = _model()
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    monitor = attach(module, GNSConfig(norm="l1", interval=1), opt, micro_batch_size=MICRO,
                     accumulation_steps=2)  # fmt: skip
    for micro in monitor.micro_steps():
        (_loss(module, *_batch(0, 0, micro.index)) / micro.loss_divisor).backward()
    with pytest.raises(RuntimeError, match="count it twice"):
        monitor.step_done()  # the optimizer closes applied steps
    monitor.step_done(applied=False)  # the loop skipped this update
    with pytest.raises(RuntimeError, match="already closed"):
        monitor.step_done(applied=False)
    opt.step()  # no backward since the close: not counted again
    assert (monitor.step, monitor.samples, monitor.skipped_steps) == (1, 2 * MICRO, 1)


# -- DDP, GradScaler -------------------------------------------------------------------------------


def _ddp_scaler_worker(rank, world_size, norm):
    module = _model()
    reference = copy.deepcopy(module)
    ddp = DDP(module, bucket_cap_mb=0.0004)  # several buckets: the overflow reaches only some
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, check_consistency=True)
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2,
                     grad_scaler=scaler)  # fmt: skip
    names = [t.name for t in monitor.plan.params]
    pool = MomentPool.for_config(cfg)
    bound = Float32Bound(cfg.pool_dof)
    out = {"errors": [], "scales": []}
    for step in range(3):
        batches = [_batch(rank, step, m) for m in range(2)]
        local = _local_gradient(reference, module, batches, names)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        out["scales"].append(scaler.get_scale())
        for micro in monitor.micro_steps():
            with micro:
                x, y = batches[micro.index]
                if step == 1 and rank == 0 and micro.is_last:
                    x = x.clone()
                    x[0, 0] = float("inf")  # NaN in the first layer's gradient only
                scaler.scale(_loss(ddp, x, y) / micro.loss_divisor).backward()
        before = monitor.last_estimate
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 1:
            out["overflow"] = (
                monitor.last_estimate is before,
                monitor.skipped_steps,
                monitor.controller.num_updates,
                monitor.controller.skipped,
                monitor.step,
                monitor.samples,
                monitor.batch_size,
            )
            continue
        want = estimate_gns(gathered, MICRO * 2, norm, pool=pool)  # pool: steps 0 and 2 only
        norms = {t.name: t.norm.name for t in monitor.plan.params}
        tol = bound.step(gathered, MICRO * 2, norms, pool)
        out["errors"].append(_relative_errors(monitor.last_estimate, want, tol))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("norm", ["l1", "nuclear"])
def test_ddp_grad_scaler_overflow_not_measured_and_counted_once(norm):
    batch = MICRO * 2 * 2
    for out in spawn(_ddp_scaler_worker, 2, norm):
        # not measured, not a rejected measurement, counted once, batch unchanged
        assert out["overflow"] == (True, 1, 1, 0, 2, 2 * batch, batch)
        assert out["scales"] == [2.0**10, 2.0**10, 2.0**9]
        # unscaled units at both scales, and the pool continued as if step 1 had not happened
        for errors in out["errors"]:
            assert _within(errors), errors


# -- DDP, NaN loss on one rank / non-finite statistics on one rank ---------------------------------


def _nan_loss_worker(rank, world_size):
    module = _model()
    ddp = DDP(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    # theta tiny: any finite measurement grows the batch at once
    cfg = GNSConfig(norm="l1", interval=1, theta=0.01, check_consistency=True)
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2)
    trace = []
    for step in range(2):
        for micro in monitor.micro_steps():
            with micro:
                x, y = _batch(rank, step, micro.index)
                loss = _loss(ddp, x, y) / micro.loss_divisor
                if step == 0 and rank == 1:
                    loss = loss * float("nan")
                loss.backward()
        if step == 0:
            opt.zero_grad()  # the loop drops the broken gradient; the optimizer still steps
        opt.step()
        opt.zero_grad()
        c = monitor.controller
        trace.append((c.skipped, c.num_updates, monitor.batch_size, monitor.samples,
                      monitor.last_estimate.is_finite))  # fmt: skip
    return trace


@pytest.mark.distributed
def test_nan_loss_on_one_rank_skips_measurement_everywhere():
    initial = MICRO * 2 * 2
    traces = spawn(_nan_loss_worker, 2)
    assert traces[0] == traces[1]
    (skipped, updates, batch, samples, finite), after = traces[0]
    assert (skipped, updates, batch, samples, finite) == (1, 0, initial, initial, False)
    # the next, finite measurement does grow the batch (so the first would have, had it counted)
    assert after[:2] == (1, 1) and after[2] > initial and after[3] == 2 * initial and after[4]


def _one_rank_statistics_worker(rank, world_size):
    torch.manual_seed(0)
    module = nn.Linear(8, 4)
    ddp = DDP(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    cfg = GNSConfig(norm="l1", interval=1, theta=0.01, check_consistency=True)
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO, accumulation_steps=1)
    trace = []
    for step in range(2):
        x, y = _batch(rank, step, 0)
        if step == 0 and rank == 0:
            # a finite gradient of ~1e19 on one coordinate of weight row 0: its mean is finite
            # (training goes on), its square overflows float32 on the rank that sums that slice
            x[:, 0] = 1e20
        for micro in monitor.micro_steps():
            with micro:
                (ddp(x)[:, 0] * y[:, 0]).mean().backward()
        partial_finite = bool(torch.isfinite(monitor.session._partial).all())
        gradient_finite = all(bool(torch.isfinite(p.grad).all()) for p in module.parameters())
        opt.step()
        opt.zero_grad()
        c = monitor.controller
        trace.append((partial_finite, gradient_finite, c.skipped, c.num_updates,
                      monitor.batch_size, monitor.samples))  # fmt: skip
    return trace


@pytest.mark.distributed
def test_nonfinite_statistics_on_one_rank_same_decision_everywhere():
    initial = MICRO * 2
    first, second = zip(*spawn(_one_rank_statistics_worker, 2), strict=True)
    # exactly one rank's own partial sums are non-finite; the gradient is finite everywhere
    assert sorted(t[0] for t in first) == [False, True]
    assert all(t[1] for t in first)
    # every rank rejects that measurement and keeps the batch; the next one counts everywhere
    assert {t[2:] for t in first} == {(1, 0, initial, initial)}
    assert len({t[2:] for t in second}) == 1
    assert second[0][2:4] == (1, 1) and second[0][4] > initial


# -- DeepSpeed fp16 -------------------------------------------------------------------------------


def _ds_fp16_worker(rank, world_size, stage):
    import nongns_dist.deepspeed as nds

    model = _model()
    reference = copy.deepcopy(model)
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
        "zero_optimization": {"stage": stage},
        "nongns": {"enabled": True, "norm": "l1", "interval": 1, "adapt_batch_size": False,
                   "check_consistency": True},
    }  # fmt: skip
    engine, *_ = nds.initialize(model=model, model_parameters=model.parameters(), config=config)
    plugin = engine.nongns
    names = [t.name for t in plugin.plan.params]
    pool = MomentPool.for_config(plugin.config)
    # fp16 gradients against a float64 recompute: the bound at fp16's unit roundoff
    bound = Float32Bound(plugin.config.pool_dof, unit=2.0**-11)
    reference.double()
    out = {"errors": [], "windows": [], "scales": []}
    for step, acc in enumerate([2, 3, 2]):
        plugin.set_accumulation_steps(acc)
        batches = [tuple(t.half() for t in _batch(rank, step, m)) for m in range(acc)]
        per_micro = [
            _local_gradient(reference, engine.module, [tuple(t.double() for t in b)], names)
            for b in batches
        ]
        local = (
            [{n: sum(g[n] for g in per_micro) / acc for n in names}]
            if plugin.sample_kind == "rank"
            else per_micro
        )
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        out["scales"].append(float(engine.optimizer.loss_scale))
        before, steps_before = plugin.last_estimate, engine.global_steps
        for micro, (x, y) in enumerate(batches):
            if step == 1 and rank == 0 and micro == 1:
                x = x.clone()
                x[0, 0] = float("inf")
            engine.backward(_loss(engine, x, y))
            engine.step()
        out["windows"].append((acc, engine.global_steps - steps_before, engine.was_step_applied()))
        if step == 1:
            out["overflow"] = (
                plugin.last_estimate is before,
                plugin.skipped_steps,
                engine.skipped_steps,
                plugin.controller.num_updates,
                plugin.controller.skipped,
                plugin.samples,
            )
            continue
        b = MICRO * acc if plugin.sample_kind == "rank" else MICRO
        samples = [s for r in gathered for s in r]
        want = estimate_gns(samples, b, "l1", pool=pool)
        tol = bound.step(samples, b, dict.fromkeys(names, "l1"), pool)
        out["errors"].append(_relative_errors(plugin.last_estimate, want, tol))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_fp16_overflow_not_measured_window_right(stage, deepspeed_ops):
    from deepspeed.accelerator import get_accelerator

    # Only the hardware feature decides (not a caught error, which could hide a real failure):
    # DeepSpeed's CPU accelerator refuses an fp16 config unless the CPU has fp16 kernels
    # (torch.ops.mkldnn._is_mkldnn_fp16_supported(): AVX-512 FP16 / AMX class).
    if not get_accelerator().is_fp16_supported():
        pytest.skip(
            f"DeepSpeed's {get_accelerator().device_name()} accelerator has no fp16 support here "
            "(on a CPU: torch.ops.mkldnn._is_mkldnn_fp16_supported() is False)"
        )
    for out in spawn(_ds_fp16_worker, 2, stage):
        # each window ran its micro-steps as one optimizer step; the overflow one was not applied
        assert out["windows"] == [(2, 1, True), (3, 1, False), (2, 1, True)]
        assert out["overflow"] == (True, 1, 1, 1, 0, MICRO * 2 * (2 + 3))
        assert out["scales"] == [256.0, 256.0, 128.0]
        # fp16 gradients vs a float64 recompute: rounding only (an unscaled statistic or a
        # loss divided by the wrong count would be off by orders of magnitude)
        for errors in out["errors"]:
            assert _within(errors), errors
