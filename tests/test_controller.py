from __future__ import annotations

import dataclasses
import json
import math
import random
from types import SimpleNamespace

import pytest

from nongns_dist import (
    BatchSizeController,
    GNSConfig,
    feasible_batch_size,
    lr_multiplier,
    resume_batch_size,
    warmup_cosine,
)


def est(noise: float, signal: float) -> SimpleNamespace:
    return SimpleNamespace(noise=noise, signal=signal)


def test_hand_computed_trace_of_algorithm_1():
    """theta = 0.5, F = 2, bN = bM = 0.5, warm-up 16 samples, micro 2 x 2 ranks (unit 4),
    B0 = 8, cap 40. Every number below is worked out by hand from PAPER.md Algorithm 1."""
    cfg = GNSConfig(
        norm="l1", theta=0.5, interval=2, ema_beta_noise=0.5, ema_beta_signal=0.5,
        warmup_samples=16, initial_batch_size=8, max_batch_size=40, lr_scaling="sqrt",
    )  # fmt: skip
    c = BatchSizeController(cfg, micro_batch_size=2, world_size=2)
    assert (c.batch_size, c.accumulation_steps, c.lr_multiplier) == (8, 2, 1.0)

    # step 0 measures: N = 0.5*8 = 4, M = 0.5*1 = 0.5; N/M = 8; target 8/0.25 = 32,
    # but only 8 samples are done (< 16 warm-up): batch stays
    assert c.is_measurement_step
    d = c.update(est(8.0, 1.0))
    assert d.target_batch_size == pytest.approx(32.0)
    assert (d.batch_size, d.changed, c.samples) == (8, False, 8)
    # step 1 does not measure
    assert not c.is_measurement_step
    assert c.update().batch_size == 8 and c.samples == 16
    # step 2: N = 0.5*4 + 0.5*4 = 4, M = 0.5*0.5 + 0.5*2 = 1.25; N/M = 3.2; target 12.8
    # -> feasible 12 (3 accumulation steps of 4); 24 samples >= 16: it grows
    assert c.is_measurement_step
    d = c.update(est(4.0, 2.0))
    assert d.target_batch_size == pytest.approx(12.8)
    assert (d.batch_size, d.accumulation_steps, d.changed) == (12, 3, True)
    assert d.lr_multiplier == pytest.approx(math.sqrt(12 / 8))
    c.update()  # step 3: 12 samples
    assert c.samples == 8 + 8 + 8 + 12
    # step 4: N = 2 + 50 = 52, M = 0.625 + 0.5 = 1.125; target 52/1.125/0.25 = 184.9 -> cap 40
    d = c.update(est(100.0, 1.0))
    assert d.target_batch_size == pytest.approx(52 / 1.125 / 0.25)
    assert (d.batch_size, d.accumulation_steps) == (40, 10)
    c.update()
    # step 6: a tiny target never shrinks the batch
    d = c.update(est(0.01, 100.0))
    assert d.target_batch_size < 8 and d.batch_size == 40 and not d.changed
    c.update()
    # step 8: a non-finite measurement is skipped: EMAs, batch and count untouched
    before = c.state_dict()
    d = c.update(est(math.nan, 1.0))
    after = c.state_dict()
    assert d.batch_size == 40 and d.target_batch_size is None
    assert after["num_updates"] == before["num_updates"] and after["skipped"] == 1
    assert after["noise_ema"] == before["noise_ema"]


def test_bias_corrected_ema_equals_paper_ratio_with_equal_betas():
    cfg = GNSConfig(norm="l1", interval=1, theta=1.0)
    c = BatchSizeController(cfg, micro_batch_size=1, world_size=1)
    raw_n = raw_m = 0.0
    for noise, signal in [(5.0, 2.0), (9.0, 1.0), (3.0, 4.0)]:
        raw_n = 0.9 * raw_n + 0.1 * noise
        raw_m = 0.9 * raw_m + 0.1 * signal
        d = c.update(est(noise, signal))
        assert d.target_batch_size == pytest.approx(raw_n / raw_m, rel=1e-12)


def test_measure_only_mode_never_changes_batch():
    cfg = GNSConfig(norm="l1", interval=1, adapt_batch_size=False)
    c = BatchSizeController(cfg, micro_batch_size=4, world_size=2)
    for _ in range(5):
        d = c.update(est(1e6, 1.0))
    assert d.batch_size == 8 and d.target_batch_size is not None


def test_feasible_rounding_and_cap():
    assert feasible_batch_size(100.0, unit=16, current=32) == 96
    assert feasible_batch_size(15.9, unit=16, current=32) == 32  # never below current
    assert feasible_batch_size(1000.0, unit=16, current=32, maximum=200) == 192  # cap rounded down
    assert feasible_batch_size(math.inf, unit=16, current=32, maximum=200) == 192
    assert feasible_batch_size(math.inf, unit=16, current=32) == 32  # no cap: keep
    with pytest.raises(ValueError, match="multiple"):
        feasible_batch_size(100.0, unit=16, current=40)


def test_lr_multiplier_and_schedule():
    assert lr_multiplier(256, 64, "sqrt") == 2.0
    assert lr_multiplier(256, 64, "linear") == 4.0
    assert lr_multiplier(256, 64, "none") == 1.0
    with pytest.raises(ValueError, match="lr_scaling"):
        lr_multiplier(256, 64, "cube")
    assert warmup_cosine(0, 1000) == 0.0
    assert warmup_cosine(75, 1000) == pytest.approx(0.5)
    assert warmup_cosine(150, 1000) == pytest.approx(1.0)
    assert warmup_cosine(575, 1000) == pytest.approx(0.5)
    assert warmup_cosine(1000, 1000) == pytest.approx(0.0)
    assert warmup_cosine(5000, 1000) == pytest.approx(0.0)
    assert warmup_cosine(1000, 1000, final_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        warmup_cosine(0, 0)


def test_state_dict_round_trip_mid_run_continues_identically():
    cfg = GNSConfig(norm="l1", interval=3, theta=0.6, warmup_samples=50, max_batch_size=512)
    rng = random.Random(0)
    stream = [est(rng.uniform(1, 400), rng.uniform(0.5, 2)) for _ in range(60)]

    def drive(c, steps):
        out = []
        for e in steps:
            out.append(c.update(e if c.is_measurement_step else None))
        return out

    ref = BatchSizeController(cfg, micro_batch_size=4, world_size=2)
    full = drive(ref, stream)

    first = BatchSizeController(cfg, micro_batch_size=4, world_size=2)
    drive(first, stream[:25])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints may go through JSON
    resumed = BatchSizeController(cfg, micro_batch_size=4, world_size=2)
    resumed.load_state_dict(state)
    assert drive(resumed, stream[25:]) == full[25:]
    assert resumed.state_dict() == ref.state_dict()
    assert len({d.batch_size for d in full}) > 2, "the stream must make the batch grow"


@pytest.mark.parametrize(
    ("micro", "world", "maximum", "batch"),
    [
        (4, 4, None, 32),  # 2 -> 4 ranks: 24 rounds up to a multiple of 16
        (4, 1, None, 24),  # 2 -> 1 rank: 24 is feasible as it is
        (2, 2, None, 24),  # another micro-batch, same ranks
        (8, 4, None, 32),  # unit 32
        (4, 4, 40, 32),  # the cap (40 -> 32) allows the rounded batch
        (4, 4, 20, 16),  # the cap wins over "never smaller": 20 -> 16 < 24
    ],
)
def test_elastic_resume_converts_the_unit(micro, world, maximum, batch):
    cfg = GNSConfig(norm="l1", interval=2, theta=0.6)
    first = BatchSizeController(cfg, micro_batch_size=4, world_size=2)  # unit 8, B0 = 8
    for _ in range(6):  # target noise / (theta^2 signal) = 24.5 -> batch 24
        first.update(est(0.36 * 24.5, 1.0) if first.is_measurement_step else None)
    assert first.batch_size == 24 and first.num_updates == 3
    state = json.loads(json.dumps(first.state_dict()))
    cfg = dataclasses.replace(cfg, max_batch_size=maximum)
    resumed = BatchSizeController(cfg, micro_batch_size=micro, world_size=world)
    resumed.load_state_dict(state)
    assert resumed.batch_size == batch
    assert resumed.accumulation_steps == batch // (micro * world)
    assert resumed.unit == micro * world
    for key in ("step", "samples", "noise_ema", "signal_ema", "num_updates", "pooled_noise"):
        assert getattr(resumed, key) == getattr(first, key), key
    assert resumed.ema() == first.ema()
    assert resumed.initial_batch_size == 8  # the lr multiplier's reference is the run's B0
    assert resumed.lr_multiplier == pytest.approx(math.sqrt(batch / 8))
    assert resume_batch_size(24, unit=micro * world, maximum=maximum) == batch


def test_construction_and_load_errors():
    with pytest.raises(ValueError, match="multiple"):
        BatchSizeController(GNSConfig(initial_batch_size=10), micro_batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="initial_batch_size"):
        BatchSizeController(
            GNSConfig(initial_batch_size=16), micro_batch_size=4, world_size=2, accumulation_steps=3
        )
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchSizeController(GNSConfig(max_batch_size=8), micro_batch_size=4, world_size=4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchSizeController(GNSConfig(), micro_batch_size=0, world_size=2)
    c = BatchSizeController(GNSConfig(), micro_batch_size=4, world_size=2, accumulation_steps=3)
    assert c.batch_size == 24
    with pytest.raises(ValueError, match="no batch is feasible"):  # 12 < one step of 4 x 4
        resume_batch_size(24, unit=16, maximum=12)
    with pytest.raises(ValueError, match="missing keys"):
        c.load_state_dict({"step": 1})


@pytest.mark.parametrize(
    ("value", "error"),
    [("2", TypeError), (2.5, TypeError), (2.0, TypeError), (True, TypeError), (0, ValueError),
     (-2, ValueError)],
)  # fmt: skip
@pytest.mark.parametrize("argument", ["micro_batch_size", "world_size", "accumulation_steps"])
def test_counts_are_positive_ints(argument, value, error):
    kwargs = {"micro_batch_size": 2, "world_size": 2, argument: value}
    with pytest.raises(error, match=rf"{argument}={value!r}.*allowed: an int >= 1"):
        BatchSizeController(GNSConfig(), **kwargs)


def test_config_must_be_a_gns_config():
    with pytest.raises(TypeError, match=r"GNSConfig \(GNSConfig.from_dict reads a mapping\)"):
        BatchSizeController({"norm": "l1"}, micro_batch_size=2, world_size=2)  # type: ignore[arg-type]


def _grown(maximum=64):
    cfg = GNSConfig(norm="l1", interval=1, theta=0.6, max_batch_size=maximum)
    ctrl = BatchSizeController(cfg, micro_batch_size=4, world_size=2)  # unit 8, B0 = 8
    ctrl.update(est(0.36 * 100, 1.0))  # target 100 -> the cap
    assert ctrl.batch_size == maximum
    return cfg, json.loads(json.dumps(ctrl.state_dict()))


@pytest.mark.parametrize(("maximum", "batch"), [(16, 16), (30, 24), (64, 64), (None, 64)])
def test_a_lower_max_batch_size_on_resume_caps_the_batch_for_the_same_unit(maximum, batch):
    cfg, state = _grown()
    resumed = BatchSizeController(
        dataclasses.replace(cfg, max_batch_size=maximum), micro_batch_size=4, world_size=2
    )
    resumed.load_state_dict(state)
    assert resumed.batch_size == batch and resumed.accumulation_steps == batch // 8
    assert resumed.initial_batch_size == 8 and resumed.lr_multiplier == math.sqrt(batch / 8)
    assert resumed.step == 1 and resumed.num_updates == 1  # the rest is the checkpoint's
    # the same rule as an elastic resume (another unit): the cap wins
    assert resume_batch_size(64, unit=8, maximum=maximum) == batch
    if maximum is not None:  # and it stays capped: the next decisions respect it
        resumed.update(est(0.36 * 1000, 1.0))
        assert resumed.batch_size == batch


def test_a_raised_max_batch_size_on_resume_lets_the_batch_grow():
    cfg, state = _grown(maximum=16)
    resumed = BatchSizeController(
        dataclasses.replace(cfg, max_batch_size=64), micro_batch_size=4, world_size=2
    )
    resumed.load_state_dict(state)
    assert resumed.batch_size == 16
    resumed.update(est(0.36 * 100, 1.0))
    assert resumed.batch_size == 64


def test_a_subnormal_signal_at_the_smallest_theta_is_no_division_by_zero():
    ctrl = BatchSizeController(
        GNSConfig(norm="l1", interval=1, theta=1e-3, max_batch_size=64, ema_beta_signal=0.0),
        micro_batch_size=4,
        world_size=2,
    )
    ctrl.update(est(1.0, 1e-320))  # theta^2 * signal underflows to 0: an infinite target
    assert ctrl.batch_size == 64 and ctrl.last_target == math.inf
