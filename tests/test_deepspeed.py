"""The DeepSpeed plugin on real engines (gloo, CPU, 2 processes), ZeRO stages 0-3."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import nongns_dist.deepspeed as nds
from nongns_dist import GNSConfig, estimate_gns
from nongns_dist.estimators import MomentPool
from nongns_dist.optim import Signum

from .distributed import spawn
from .float32_bounds import Float32Bound

pytestmark = pytest.mark.distributed
deepspeed = pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = 2


@pytest.fixture(scope="module", autouse=True)
def built_ops(deepspeed_ops):
    """Every test here starts DeepSpeed engines in spawned ranks."""


def _config(stage, acc=2, **nongns):
    """A shipped ds_configs/zero<stage>_adamw.json, shrunk for the tests."""
    with open(os.path.join(ROOT, "ds_configs", f"zero{stage}_adamw.json")) as f:
        config = json.load(f)
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=acc)
    config["optimizer"]["params"]["lr"] = 1e-3
    config["nongns"] = {"enabled": True, "norm": "l1", "interval": 1, "adapt_batch_size": False,
                        **nongns}  # fmt: skip
    return config


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(rank, step, micro):
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    return torch.randn(MICRO, 8, generator=g) + 0.3 * rank, torch.randn(MICRO, 4, generator=g)


def _engine(config, plugin=True):
    model = _model()
    init = nds.initialize if plugin else deepspeed.initialize
    engine, *_ = init(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _full_state(engine):
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().clone() for p in params]


def _train(engine, rank, accumulation, first_step=0):
    """Run optimizer steps of the given micro-step counts; return micro-steps per step."""
    counts = []
    for step, acc in enumerate(accumulation, start=first_step):
        before = engine.global_steps
        for micro in range(acc):
            x, y = _batch(rank, step, micro)
            engine.backward(((engine(x) - y) ** 2).mean())
            engine.step()
        counts.append((acc, engine.global_steps - before))
    return counts


def _equality(rank, world, stage, norm):
    engine = _engine(_config(stage, acc=2, norm=norm, layer_breakdown=True))
    plugin = engine.nongns
    reference = _model()
    kinds = {t.name: t.norm.name for t in plugin.plan.params}
    pool = MomentPool.for_config(plugin.config)
    bound = Float32Bound(plugin.config.pool_dof)
    errors = []
    for step in range(2):
        reference.load_state_dict(
            dict(zip(reference.state_dict(), _full_state(engine), strict=True))
        )
        micro_grads = []
        for micro in range(2):
            reference.zero_grad()
            x, y = _batch(rank, step, micro)
            ((reference(x) - y) ** 2).mean().backward()
            micro_grads.append(
                {n: p.grad.double().clone() for n, p in reference.named_parameters() if n in kinds}
            )
        per_rank = plugin.sample_kind == "rank"
        local = (
            [{n: (micro_grads[0][n] + micro_grads[1][n]) / 2 for n in kinds}]
            if per_rank
            else micro_grads
        )
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        samples = [s for r in gathered for s in r]
        sample_size = MICRO * (2 if per_rank else 1)
        want = estimate_gns(samples, sample_size, kinds, pool=pool)
        tol = bound.step(samples, sample_size, kinds, pool)
        _train(engine, rank, [2], first_step=step)
        got = plugin.last_estimate
        errors.append(
            [
                (abs(got.noise / want.noise - 1), tol.noise),
                (abs(got.signal / want.signal - 1), tol.signal),
                (abs(got.pooled_noise / want.pooled_noise - 1), tol.pooled_noise),
            ]
        )
    return plugin.sample_kind, errors


@pytest.mark.parametrize(
    ("stage", "norm"), [(0, "l1"), (1, "l1"), (2, "l1"), (3, "l1"), (0, "nuclear"), (3, "nuclear")]
)
def test_estimate_equals_reference_on_gathered_samples(stage, norm):
    kind, errors = spawn(_equality, 2, stage, norm)[0]
    assert kind == ("rank" if stage < 2 else "micro")
    for step in errors:  # (relative error, tolerance from tests/float32_bounds.py)
        assert all(error <= tol for error, tol in step), step


def _identity_and_sequence(rank, world, stage, checkpoint_dir):
    # 1. attached and measuring every step (measuring only reads gradients): same parameters
    plain, ours = _engine(_config(stage), plugin=False), _engine(_config(stage))
    _train(plain, rank, [2, 2, 2])
    _train(ours, rank, [2, 2, 2])
    identical = all(
        torch.equal(a, b) for a, b in zip(_full_state(plain), _full_state(ours), strict=True)
    )
    # 2. a requested accumulation sequence gives exactly those micro-steps per optimizer step
    engine = _engine(_config(stage, adapt_batch_size=False))
    sequence, seen = [2, 3, 3, 1, 4], []
    for acc in sequence:
        engine.nongns.set_accumulation_steps(acc)
        # the override's step runs with the multiplier of its own batch (B0: 2 micro-steps)
        assert engine.nongns.lr_multiplier.value == pytest.approx((acc / 2) ** 0.5)
        seen += _train(engine, rank, [acc])
    samples = engine.nongns.samples
    # 3. save at step k, load in a fresh engine: batch, multiplier and EMAs continue identically
    cfg = _config(stage, acc=1, adapt_batch_size=True, theta=0.1, interval=2, max_batch_size=16)
    first = _engine(cfg)
    for _ in range(3):  # the count is read step by step: the batch grows on the way
        _train(first, rank, [first.nongns.accumulation_steps])
    first.save_checkpoint(checkpoint_dir, tag="k")
    trace_a = []
    for _ in range(4):
        _train(first, rank, [first.nongns.accumulation_steps])
        trace_a.append(first.nongns.controller.state_dict())
    second = _engine(cfg)
    second.load_checkpoint(checkpoint_dir, tag="k")
    trace_b = []
    for _ in range(4):
        _train(second, rank, [second.nongns.accumulation_steps])
        trace_b.append(second.nongns.controller.state_dict())
    # 4. a save between micro-steps would lose the accumulated gradients: refused
    refused = first.nongns.accumulation_steps == 1  # nothing to lose with one micro-step
    x, y = _batch(rank, 9, 0)
    first.backward(((first(x) - y) ** 2).mean())
    first.step()
    try:
        first.save_checkpoint(checkpoint_dir, tag="mid")
    except RuntimeError:
        refused = True
    return identical, seen, samples, trace_a, trace_b, refused


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bit_identity_accumulation_sequence_and_resume(stage, tmp_path):
    identical, seen, samples, trace_a, trace_b, refused = spawn(
        _identity_and_sequence, 2, stage, str(tmp_path)
    )[0]
    assert refused, "a save between micro-steps must be refused"
    assert identical, "parameters differ from plain DeepSpeed"
    assert seen == [(2, 1), (3, 1), (3, 1), (1, 1), (4, 1)], "micro-steps per optimizer step"
    assert samples == (2 + 3 + 3 + 1 + 4) * MICRO * 2
    assert trace_a == trace_b
    assert (
        trace_a[-1]["batch_size"] > trace_a[0]["batch_size"] or trace_a[0]["batch_size"] > MICRO * 2
    ), "the resumed run must carry a grown batch"


def _client_signum(rank, world):
    model = _model()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "nongns": {"enabled": True, "norm": "auto", "interval": 1}}  # fmt: skip
    engine, *_ = nds.initialize(
        model=model, optimizer=Signum(model.parameters(), lr=1e-3), config=config
    )
    _train(engine, rank, [1, 1])
    return engine.nongns.last_estimate.norm, engine.nongns.plan.norm


def test_client_optimizer_and_auto_geometry():
    assert spawn(_client_signum, 2)[0] == ("l1", "l1")


# -- the "nongns" section --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "match"),
    [({"enabled": True, "theta": -1}, "theta"), ({"enabled": True, "intervall": 5}, "intervall"),
     ({"norm": "spectral"}, "norm"), ({"enabled": "yes"}, "enabled"), ("on", "mapping")],
)  # fmt: skip
def test_bad_section_raises_before_deepspeed_starts(section, match):
    with pytest.raises(ValueError, match=match):
        nds.initialize(model=nn.Linear(2, 2), config={"train_batch_size": 2, "nongns": section})


def test_disabled_or_absent_section_returns_deepspeed_objects():
    assert nds.read_section({"train_batch_size": 2}) is None
    assert nds.read_section({"nongns": {"enabled": False}}) == GNSConfig(enabled=False)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))))
def test_shipped_configs_load(path):
    section = nds.read_section(path)
    assert section is not None and section.enabled
    with open(path) as f:
        config = json.load(f)
    assert config["zero_optimization"]["stage"] in (0, 1, 2, 3)
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(copy.deepcopy(config))  # DeepSpeed's own validation of the rest


def test_configs_shipped():
    assert len(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))) >= 8


class _EventSink:
    """Stands in for DeepSpeed's monitor (TensorBoard/CSV writers) to read the events back."""

    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events += events


def _builtin_muon_and_logging(rank, world):
    # DeepSpeed's Muon torch.compile's its Newton-Schulz; on CPUs inductor's generated code was
    # not reliable across kernel paths (measured: with ATen's AVX2 kernels every step came out
    # non-finite, in plain DeepSpeed too; a standalone call aborted with heap corruption under
    # AVX-512). What is tested here is the plugin's geometry and events, so run it eagerly: the
    # same math.
    torch._dynamo.config.disable = True
    with open(os.path.join(ROOT, "ds_configs", "zero2_muon.json")) as f:
        config = json.load(f)
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=2)
    config["nongns"].update(interval=1, warmup_samples=0)
    model = _model()
    engine, *_ = nds.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.monitor = _EventSink()
    _train(engine, rank, [2, engine.nongns.accumulation_steps])
    measured = sorted(t.name for t in engine.nongns.plan.params)
    return engine.nongns.last_estimate.norm, measured, sorted({e[0] for e in engine.monitor.events})


def test_deepspeed_muon_auto_geometry_and_monitor_events():
    norm, measured, events = spawn(_builtin_muon_and_logging, 2)[0]
    assert norm == "nuclear"  # DeepSpeed's Muon: the use_muon matrices, the Adam group left out
    assert measured == ["0.weight", "2.weight"]
    names = ("gns_raw", "noise_raw", "signal", "gns_pooled", "noise_pooled")
    assert {f"Train/nongns/{name}" for name in names} <= set(events)
    assert {"Train/nongns/global_batch", "Train/nongns/lr_multiplier"} <= set(events)


def _replay(rank, world):
    unit = MICRO * world
    schedule = [[0, unit], [2 * unit, 3 * unit]]  # 1 micro-step, then 3 from 2 units of samples
    engine = _engine(_config(2, acc=2, adapt_batch_size=True, batch_schedule=schedule))
    seen = []
    for _ in range(4):  # the loop reads the count the plugin decided, step by step
        seen += _train(engine, rank, [engine.nongns.accumulation_steps])
    return seen, engine.gradient_accumulation_steps(), engine.nongns.samples


def test_the_plugin_replays_a_batch_schedule_from_the_json():
    """ZeRO-2, the schedule in the "nongns" section: the engine's own count (2) gives way to
    the schedule's first batch, and each optimizer step runs exactly the scheduled micro-steps."""
    seen, engine_acc, samples = spawn(_replay, 2)[0]
    assert seen == [(1, 1), (1, 1), (3, 1), (3, 1)]
    assert engine_acc == 3 and samples == (1 + 1 + 3 + 3) * MICRO * 2


def _driven(rank, world, stage):
    """The same windows run by DeepSpeed's own loop (backward and step per micro-step) and by a
    driver as accelerate or the Trainer drive it (step once per window; here the loss divided
    by the driver, with scale_wrt_gas=False)."""
    out = []
    for driver in (False, True):
        engine = _engine(_config(stage, acc=2))
        for step in range(3):
            for micro in range(2):
                x, y = _batch(rank, step, micro)
                loss = ((engine(x) - y) ** 2).mean()
                if driver:
                    engine.backward(loss / 2, scale_wrt_gas=False)
                else:
                    engine.backward(loss)
                    engine.step()
            if driver:
                engine.step()
        estimate = engine.nongns.last_estimate
        out.append((engine.global_steps, engine.nongns.samples, estimate.noise, estimate.signal,
                    _full_state(engine)))  # fmt: skip
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_a_driver_that_steps_once_per_window_and_divides_the_loss_itself(stage):
    (own, driven) = spawn(_driven, 2, stage)[0]
    assert own[:2] == driven[:2] == (3, 3 * 2 * MICRO * 2)
    # the same gradients up to the rounding of where the loss is divided (float32; a few ulps
    # of each micro-step's gradient, 1e-5 relative is ~100 of them)
    assert driven[2] == pytest.approx(own[2], rel=1e-5) and driven[3] == pytest.approx(
        own[3], rel=1e-5
    )
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(own[4], driven[4], strict=True)
    )
