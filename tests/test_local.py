"""One process, no process group: samples are the micro-steps of a step (capture/local.py)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist

from nongns_dist import GNSConfig, StepEvents, attach, estimate_gns
from nongns_dist.estimators import MomentPool

from .float32_bounds import Float32Bound
from .test_ddp import MICRO, Net, _batch, _loss, _make_optimizer


def _run(norm: str, acc: int, steps: int = 3, **config):
    torch.manual_seed(0)
    module = Net()
    reference = copy.deepcopy(module)
    opt = _make_optimizer("muon" if norm == "auto" else "signum", module)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, layer_breakdown=True, **config)
    monitor = attach(module, cfg, opt, micro_batch_size=MICRO, accumulation_steps=acc)
    norms = {t.name: t.norm.name for t in monitor.plan.params}
    pool = MomentPool.for_config(cfg)
    bound = Float32Bound(cfg.pool_dof)
    results = []
    for step in range(steps):
        reference.load_state_dict(module.state_dict())
        samples = []  # each micro-step's gradient: the mean over its micro-batch, no division
        for micro in range(acc):
            reference.zero_grad()
            _loss(reference, *_batch(0, step, micro)).backward()
            samples.append(
                {n: p.grad.detach().double().clone() for n, p in reference.named_parameters()
                 if n in norms}
            )  # fmt: skip
        for micro in monitor.micro_steps():
            with micro:
                (_loss(module, *_batch(0, step, micro.index)) / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
        expected = estimate_gns(samples, MICRO, norms, layer_breakdown=True, pool=pool)
        results.append((monitor.last_estimate, expected, bound.step(samples, MICRO, norms, pool)))
        if (step + 1) * acc * MICRO == cfg.warmup_samples:  # the warm-up ends with this step
            pool.restart()
            bound = Float32Bound(cfg.pool_dof)
    return monitor, results


@pytest.mark.parametrize("norm", ["l1", "l2", "nuclear", "auto"])
def test_one_process_estimate_equals_reference_on_micro_step_gradients(norm):
    assert not dist.is_initialized()
    monitor, results = _run(norm, acc=3)
    assert monitor.session is not None and monitor.session.sample_kind == "micro"
    for got, want, tol in results:  # tolerances: tests/float32_bounds.py
        assert (got.num_samples, got.sample_size) == (3, MICRO)
        assert got.noise == pytest.approx(want.noise, rel=tol.noise)
        assert got.signal == pytest.approx(want.signal, rel=tol.signal)
        if norm == "l2":  # linear in the moments: not pooled
            assert got.pooled_noise is None and want.pooled_noise is None
        else:
            assert got.pooled_noise == pytest.approx(want.pooled_noise, rel=tol.pooled_noise)
        for name, layer in want.layers.items():
            assert got.layers[name].noise == pytest.approx(layer.noise, rel=tol.layers[name][0])
    assert monitor.step == 3 and monitor.samples == 3 * 3 * MICRO


def test_one_process_grows_its_batch():
    torch.manual_seed(0)
    module = Net()
    opt = _make_optimizer("signum", module)
    cfg = GNSConfig(norm="l1", interval=1, theta=0.05, max_batch_size=8 * MICRO)
    monitor = attach(module, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2)
    lrs = []
    for step in range(4):
        for micro in monitor.micro_steps():
            with micro:
                (_loss(module, *_batch(0, step, micro.index)) / micro.loss_divisor).backward()
        lrs.append((monitor.batch_size, monitor.controller.lr_multiplier))
        opt.step()
        opt.zero_grad()
    assert monitor.batch_size == 8 * MICRO  # the cap: theta 0.05 asks for far more
    assert all(m == pytest.approx((b / (2 * MICRO)) ** 0.5) for b, m in lrs)


def test_every_closed_step_reaches_on_events_with_what_it_ran_with():
    """attach(on_events=): one StepEvents per closed step; "measured" agrees with the
    controller's schedule and the monitor's own estimate; the batch grows, so what a step ran
    with differs from the decision it ends with."""
    torch.manual_seed(0)
    module = Net()
    opt = _make_optimizer("signum", module)
    cfg = GNSConfig(norm="l1", interval=2, theta=0.05, max_batch_size=8 * MICRO)
    seen: list[StepEvents] = []
    monitor = attach(
        module, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2, on_events=seen.append
    )
    expected = []
    for step in range(5):
        ran = (monitor.batch_size, monitor.accumulation_steps, monitor.controller.lr_multiplier)
        measures, before = monitor.controller.is_measurement_step, monitor.last_estimate
        for micro in monitor.micro_steps():
            with micro:
                (_loss(module, *_batch(0, step, micro.index)) / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
        events = seen[-1]
        assert len(seen) == step + 1
        assert (events.batch_size, events.accumulation_steps, events.lr_multiplier) == ran
        assert (events.step, events.samples) == (monitor.step, monitor.samples)
        assert events.measured == measures == (monitor.last_estimate is not before)
        assert events.estimate is (monitor.last_estimate if measures else None)
        assert events.decision is monitor.last_decision and events.applied
        expected.append(measures)
        tags = {tag for tag, _, x in events.scalars() if x == monitor.samples}
        assert ("Train/nongns/gns_raw" in tags) == measures
    assert expected == [True, False, True, False, True]
    assert seen[-1].batch_size > seen[0].batch_size  # it grew, and the events say so


def test_one_process_with_one_micro_step_warns_and_does_not_measure(caplog):
    with caplog.at_level(logging.WARNING, logger="nongns_dist"):
        monitor, _ = _run("l1", acc=1, steps=0)
    assert "accumulation_steps >= 2" in caplog.text
    module = monitor.model
    for micro in monitor.micro_steps():
        with micro:
            _loss(module, *_batch(0, 0, 0)).backward()
    monitor.optimizer.step()
    assert monitor.last_estimate is None and monitor.step == 1


def test_one_process_refuses_more_backward_passes_than_micro_steps():
    torch.manual_seed(0)
    module = Net()
    opt = _make_optimizer("signum", module)
    monitor = attach(module, GNSConfig(norm="l1", interval=1), opt, micro_batch_size=MICRO,
                     accumulation_steps=2)  # fmt: skip
    for micro in range(3):  # one more than the monitor's 2: n would be wrong
        (_loss(module, *_batch(0, 0, micro)) / 2).backward()
    with pytest.raises(RuntimeError, match="backward passes"):
        opt.step()
    assert monitor.step == 0


def _steps(module, monitor, opt, steps):
    for step in steps:
        for micro in monitor.micro_steps():
            with micro:
                (_loss(module, *_batch(0, step, micro.index)) / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("norm", ["l1", "nuclear"])
def test_pooled_moments_resume_from_the_monitor_state(norm):
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False)

    def fresh(weights=None):
        torch.manual_seed(0)
        module = Net()
        if weights is not None:
            module.load_state_dict(weights)
        opt = _make_optimizer("signum", module)
        return module, attach(module, cfg, opt, micro_batch_size=MICRO, accumulation_steps=2), opt

    module, monitor, opt = fresh()
    _steps(module, monitor, opt, [0, 1])
    state, weights = copy.deepcopy(monitor.state_dict()), copy.deepcopy(module.state_dict())
    assert state["pool"]["params"] == [t.name for t in monitor.plan.params]
    _steps(module, monitor, opt, [2])
    resumed, restarted = fresh(weights), fresh(weights)
    resumed[1].load_state_dict(state)
    for run in (resumed, restarted):
        _steps(*run, [2])
    want = monitor.last_estimate
    got, cold = resumed[1].last_estimate, restarted[1].last_estimate
    assert got.noise == pytest.approx(want.noise, rel=1e-12)  # the same step's gradients
    assert got.pooled_noise == pytest.approx(want.pooled_noise, rel=1e-12)
    assert cold.pooled_noise != pytest.approx(want.pooled_noise, rel=1e-3)  # the pool matters
    other = copy.deepcopy(state)
    other["pool"]["rank"] = 1  # another rank's moments: refused, the pool restarts
    module, monitor, opt = fresh(weights)
    monitor.load_state_dict(other)
    _steps(module, monitor, opt, [2])
    assert monitor.last_estimate.pooled_noise == pytest.approx(cold.pooled_noise, rel=1e-12)


@pytest.mark.parametrize("norm", ["l1", "nuclear"])
def test_the_pool_restarts_when_the_warm_up_ends(norm):
    """The driver empties the pool at the step that ends the warm-up (GNSConfig.warmup_samples):
    what follows equals estimate_gns with its pool restarted there, and differs from a pool
    that kept the warm-up's measurements."""
    _, results = _run(norm, acc=3, steps=5, warmup_samples=2 * 3 * MICRO)
    for step, (got, want, tol) in enumerate(results):  # tolerances: tests/float32_bounds.py
        assert got.pooled_noise == pytest.approx(want.pooled_noise, rel=tol.pooled_noise), step
    # the same run without a warm-up: its pool keeps every measurement
    _, unrestarted = _run(norm, acc=3, steps=5)
    assert results[2][0].pooled_noise != pytest.approx(unrestarted[2][0].pooled_noise, rel=1e-6)
    assert results[1][0].pooled_noise == pytest.approx(unrestarted[1][0].pooled_noise, rel=1e-12)
