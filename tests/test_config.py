from __future__ import annotations

import json

import pytest

from nongns_dist import GNSConfig

BAD_VALUES = [
    ("enabled", 1),
    ("adapt_batch_size", "yes"),
    ("norm", "l3"),
    ("norm", None),
    ("bias_correction", "true"),
    ("pool_moments", 1),
    ("pool_dof", 0.0),
    ("pool_dof", float("nan")),
    ("pool_dof", 1e7),
    ("sqrt_trace_method", "svd"),
    ("sqrt_trace_tol", 0.0),
    ("sqrt_trace_tol", 1.5),
    ("layer_breakdown", 0),
    ("interval", 0),
    ("interval", 2.5),
    ("theta", 0.0),
    ("theta", -0.6),
    ("theta", "0.6"),
    ("ema_beta_noise", 1.0),
    ("ema_beta_noise", -0.1),
    ("ema_beta_signal", 1.2),
    ("warmup_samples", -1),
    ("warmup_samples", 1.5),
    ("initial_batch_size", 0),
    ("initial_batch_size", 64.0),
    ("max_batch_size", -8),
    ("lr_scaling", "cube"),
    ("check_consistency", "no"),
]


def test_every_field_has_a_bad_value_case():
    assert {f for f, _ in BAD_VALUES} == GNSConfig.field_names()


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_invalid_value_raises_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=field) as excinfo:
        GNSConfig(**{field: value})
    assert repr(value) in str(excinfo.value) or str(value) in str(excinfo.value)
    # the JSON path reports the same
    with pytest.raises(ValueError, match=field):
        GNSConfig.from_dict({field: value})


def test_cross_field_bounds():
    with pytest.raises(ValueError, match="max_batch_size"):
        GNSConfig(initial_batch_size=64, max_batch_size=32)


def test_unknown_key_and_bad_section():
    with pytest.raises(ValueError, match="thetaa"):
        GNSConfig.from_dict({"thetaa": 0.6})
    with pytest.raises(ValueError, match="mapping"):
        GNSConfig.from_dict([("theta", 0.6)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GNSConfig("l1")  # type: ignore[misc]  # keyword-only


def test_defaults_follow_the_paper_and_round_trip_json():
    cfg = GNSConfig()
    assert (cfg.theta, cfg.interval, cfg.ema_beta_noise, cfg.ema_beta_signal) == (
        0.6,
        100,
        0.9,
        0.9,
    )
    assert cfg.lr_scaling == "sqrt" and cfg.bias_correction
    section = json.loads(json.dumps(GNSConfig(norm="nuclear", initial_batch_size=64).to_dict()))
    assert GNSConfig.from_dict(section) == GNSConfig(norm="nuclear", initial_batch_size=64)
    # JSON numbers: an int where a float is expected is fine
    assert GNSConfig.from_dict({"theta": 1}).theta == 1


def test_frozen():
    cfg = GNSConfig()
    with pytest.raises(AttributeError):
        cfg.theta = 0.3  # type: ignore[misc]
