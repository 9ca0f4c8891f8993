"""``nongns_dist.accelerate.attach`` in a user's own accelerate loop, with the real accelerate on
2 gloo ranks (DDP): the estimate equals ``estimate_gns`` on the gathered local gradients, a
measure-only run trains bit for bit like a plain one, the batch grows with every optimizer step
seeing exactly its micro-steps (replicas identical), and ``save_state`` / ``load_state``
continue exactly."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from nongns_dist import GNSConfig, estimate_gns
from nongns_dist.estimators import MomentPool

from .distributed import spawn
from .float32_bounds import Float32Bound
from .test_ddp import MICRO, Net, _batch, _loss, _make_optimizer

accelerate = pytest.importorskip("accelerate", reason="the hf extra (pip install -e '.[hf]')")
pytestmark = pytest.mark.distributed


def _accelerator(num_steps: int, **plugin):
    # the ranks' process group exists already (tests/distributed.py): accelerate joins it
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    kwargs = {"num_steps": num_steps, "sync_with_dataloader": False, **plugin}
    return Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(**kwargs))


def _prepared(num_steps: int, seed: int = 0, kind: str = "signum", **plugin):
    torch.manual_seed(seed)
    module = Net()
    reference = copy.deepcopy(module)
    accelerator = _accelerator(num_steps, **plugin)
    optimizer = _make_optimizer(kind, module)
    model, optimizer = accelerator.prepare(module, optimizer)
    return accelerator, model, optimizer, reference


def _window(accelerator, model, optimizer, rank: int, step: int, count: int) -> int:
    """One optimizer step's micro-batches through the user's accumulate loop; returns how many
    micro-steps ran before the optimizer stepped."""
    for micro in range(count):
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, *_batch(rank, step, micro)))
            stepped = accelerator.sync_gradients
            optimizer.step()
            optimizer.zero_grad()
        if stepped:
            return micro + 1
    raise AssertionError(f"no optimizer step after {count} micro-steps")


def _equality_worker(rank, world, norm, acc):
    from nongns_dist.accelerate import attach

    kind = "muon" if norm == "auto" else "signum"
    accelerator, model, optimizer, reference = _prepared(acc, kind=kind)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False)
    monitor = attach(accelerator, model, optimizer, cfg, micro_batch_size=MICRO)
    norms = {t.name: t.norm.name for t in monitor.plan.params}
    pool, bound = MomentPool.for_config(cfg), Float32Bound(cfg.pool_dof)
    results = []
    for step in range(3):
        reference.load_state_dict(model.module.state_dict())
        reference.zero_grad()
        for micro in range(acc):  # accelerate divides each micro-step's loss by the count
            (_loss(reference, *_batch(rank, step, micro)) / acc).backward()
        local = {n: p.grad.detach().double() for n, p in reference.named_parameters() if n in norms}
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        assert _window(accelerator, model, optimizer, rank, step, acc) == acc
        expected = estimate_gns(gathered, MICRO * acc, norms, pool=pool)
        results.append(
            (monitor.last_estimate, expected, bound.step(gathered, MICRO * acc, norms, pool))
        )
    return results


@pytest.mark.parametrize(("norm", "acc"), [("l1", 2), ("auto", 3), ("l2", 1)])
def test_estimate_equals_reference_on_gathered_local_gradients(norm, acc):
    for got, want, tol in spawn(_equality_worker, 2, norm, acc)[0]:  # tolerances: float32_bounds
        assert (got.num_samples, got.sample_size) == (2, MICRO * acc)
        assert got.noise == pytest.approx(want.noise, rel=tol.noise)
        assert got.signal == pytest.approx(want.signal, rel=tol.signal)
        if want.pooled_noise is not None:
            assert got.pooled_noise == pytest.approx(want.pooled_noise, rel=tol.pooled_noise)


def _bit_identity_worker(rank, world):
    from nongns_dist.accelerate import attach

    runs = []
    for attached in (False, True):
        accelerator, model, optimizer, _ = _prepared(2)
        if attached:  # measure only: every step measures, the batch stays
            cfg = GNSConfig(norm="l1", interval=1, adapt_batch_size=False)
            attach(accelerator, model, optimizer, cfg, micro_batch_size=MICRO)
        for step in range(4):
            _window(accelerator, model, optimizer, rank, step, 2)
        runs.append([p.detach().clone() for p in model.parameters()])
        accelerator.free_memory()
    return all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_measure_only_trains_bit_for_bit_like_plain_accelerate():
    assert spawn(_bit_identity_worker, 2) == [True, True]


def _growth_worker(rank, world, checkpoint):
    from nongns_dist.accelerate import attach

    cfg = GNSConfig(norm="l1", interval=1, theta=0.05, max_batch_size=MICRO * world * 4)
    accelerator, model, optimizer, _ = _prepared(1)
    monitor = attach(accelerator, model, optimizer, cfg, micro_batch_size=MICRO)
    trace = []
    for step in range(6):
        planned = monitor.accumulation_steps
        ran = _window(accelerator, model, optimizer, rank, step, planned)
        trace.append((planned, ran, accelerator.gradient_accumulation_steps, monitor.samples))
        if step == 2:
            accelerator.save_state(checkpoint)
            saved = (monitor.state_dict()["controller"], [p.clone() for p in model.parameters()])
    # replicas identical: no step applied an unreduced gradient
    mine = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    identical = all(torch.equal(mine, other) for other in everyone)
    after = monitor.controller.state_dict()
    # a fresh accelerator and model continue from the checkpoint exactly
    accelerator2, model2, optimizer2, _ = _prepared(1, seed=1)
    monitor2 = attach(accelerator2, model2, optimizer2, cfg, micro_batch_size=MICRO)
    accelerator2.load_state(checkpoint)
    resumed = (monitor2.controller.state_dict(), list(model2.parameters()))
    same_state = resumed[0] == saved[0] and all(
        torch.equal(a, b) for a, b in zip(resumed[1], saved[1], strict=True)
    )
    trace2 = []
    for step in range(3, 6):
        planned = monitor2.accumulation_steps
        ran = _window(accelerator2, model2, optimizer2, rank, step, planned)
        trace2.append((planned, ran, accelerator2.gradient_accumulation_steps, monitor2.samples))
    continued = monitor2.controller.state_dict() == after and all(
        torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True)
    )
    return trace, trace2, identical, same_state, continued


def test_the_batch_grows_every_step_runs_its_micro_steps_and_save_state_resumes(tmp_path):
    trace, trace2, identical, same_state, continued = spawn(
        _growth_worker, 2, str(tmp_path / "checkpoint")
    )[0]
    assert identical, "replicas differ: a step applied an unreduced gradient"
    assert all(planned == ran for planned, ran, _, _ in trace)
    # accelerate's count follows the decision taken when each step closed
    assert [count for _, _, count, _ in trace[:-1]] == [planned for planned, *_ in trace[1:]]
    assert trace[-1][0] > trace[0][0] == 1, f"the batch did not grow: {trace}"
    samples = 0
    for planned, _, _, seen in trace:
        samples += planned * MICRO * 2
        assert seen == samples
    assert same_state, "load_state did not restore the monitor and the model"
    assert trace2 == trace[3:] and continued, "the resumed run does not continue exactly"


def _refusal_worker(rank, world):
    from nongns_dist.accelerate import attach

    messages = []
    for plugin in ({"sync_with_dataloader": True}, {"sync_each_batch": True}):
        accelerator, model, optimizer, _ = _prepared(2, **plugin)
        try:
            attach(accelerator, model, optimizer, {"norm": "l1"}, micro_batch_size=MICRO)
        except ValueError as error:
            messages.append(str(error))
    accelerator, model, optimizer, _ = _prepared(2)
    try:
        attach(accelerator, model, optimizer, None, micro_batch_size=MICRO)
    except ValueError as error:
        messages.append(str(error))
    return messages


def test_what_accelerate_cannot_do_with_a_changing_count_is_refused():
    messages = spawn(_refusal_worker, 2)[0]
    assert len(messages) == 3
    assert "sync_with_dataloader=False" in messages[0]
    assert "sync_each_batch=False" in messages[1]
    assert "needs a config" in messages[2]


# -- DeepSpeed under accelerate (ZeRO-2: per-micro-step samples) ----------------------------------


def _ds_prepared(section: dict, acc: int = 1):
    """accelerate's DeepSpeed on CPU: an engine and the data the loops below feed it."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, GradientAccumulationPlugin

    from .test_deepspeed import MICRO as DS_MICRO
    from .test_deepspeed import _model

    config = {
        "train_micro_batch_size_per_gpu": DS_MICRO,
        "gradient_accumulation_steps": acc,
        "zero_optimization": {"stage": 2},
        "nongns": section,
    }
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=acc, sync_with_dataloader=False
        ),
    )
    module = _model()
    reference = copy.deepcopy(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-2)
    engine, optimizer = accelerator.prepare(module, optimizer)
    return accelerator, engine, optimizer, reference, DS_MICRO


def _ds_window(accelerator, engine, optimizer, rank, step, count):
    from .test_deepspeed import _batch as ds_batch

    before = engine.global_steps
    for micro in range(count):
        with accelerator.accumulate(engine):
            x, y = ds_batch(rank, step, micro)
            accelerator.backward(((engine(x) - y) ** 2).mean())
            optimizer.step()
            optimizer.zero_grad()
    return engine.global_steps - before


def _ds_worker(rank, world, checkpoint, resume):
    from nongns_dist.accelerate import attach

    from .test_deepspeed import _batch as ds_batch

    section = {"norm": "l1", "interval": 1, "theta": 0.05, "max_batch_size": 8 * world}
    accelerator, engine, optimizer, reference, micro = _ds_prepared(section)
    monitor = attach(accelerator, engine, optimizer, micro_batch_size=micro)  # config: the JSON's
    assert engine.nongns is monitor and monitor.config.theta == 0.05
    norms = {t.name: t.norm.name for t in monitor.plan.params}
    pool, bound = MomentPool.for_config(monitor.config), Float32Bound(monitor.config.pool_dof)
    first = 0
    if resume:
        accelerator.load_state(checkpoint)
        first = 3
    trace, errors = [], []
    for step in range(first, 6):
        count = monitor.accumulation_steps
        if not resume and count == 1:  # the reference of a one-micro-step window: 2 ranks
            reference.load_state_dict(engine.module.state_dict())
            reference.zero_grad()
            x, y = ds_batch(rank, step, 0)
            ((reference(x) - y) ** 2).mean().backward()
            local = {n: p.grad.double() for n, p in reference.named_parameters() if n in norms}
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
        steps = _ds_window(accelerator, engine, optimizer, rank, step, count)
        if not resume and count == 1:
            want = estimate_gns(gathered, micro, norms, pool=pool)
            tol = bound.step(gathered, micro, norms, pool)
            got = monitor.last_estimate
            errors.append((got.noise / want.noise - 1, tol.noise, got.signal / want.signal - 1,
                           tol.signal))  # fmt: skip
        trace.append((count, steps, accelerator.gradient_accumulation_steps, monitor.samples))
        if step == 2 and not resume:
            accelerator.save_state(checkpoint)
    mine = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    identical = all(torch.equal(mine, other) for other in everyone)
    return trace, errors, identical, monitor.controller.state_dict(), mine


def test_deepspeed_under_accelerate_follows_its_boundary_and_resumes(deepspeed_ops, tmp_path):
    """ZeRO-2 started by accelerate, the config from the DeepSpeed JSON's "nongns" section:
    accelerate marks the boundary and steps once per window; every window runs exactly the
    decided micro-steps, the estimates of the one-micro-step windows equal estimate_gns on the
    gathered local gradients, the batch grows, replicas stay identical, and load_state (through
    DeepSpeed's checkpoint) continues exactly."""
    checkpoint = str(tmp_path / "checkpoint")
    trace, errors, identical, state, params = spawn(_ds_worker, 2, checkpoint, False)[0]
    assert identical
    assert all(steps == 1 for _, steps, _, _ in trace), f"one optimizer step per window: {trace}"
    assert [count for _, _, count, _ in trace[:-1]] == [count for count, *_ in trace[1:]]
    assert trace[-1][0] > trace[0][0] == 1, f"the batch did not grow: {trace}"
    assert errors and all(abs(en) <= tn and abs(es) <= ts for en, tn, es, ts in errors), errors
    samples = 0
    for count, _, _, seen in trace:
        samples += count * 2 * 2  # micro 2 x 2 ranks per micro-step
        assert seen == samples
    trace2, _, identical2, state2, params2 = spawn(_ds_worker, 2, checkpoint, True)[0]
    assert identical2 and trace2 == trace[3:] and state2 == state
    assert torch.equal(params, params2), "the resumed run does not continue exactly"
