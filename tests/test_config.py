from __future__ import annotations

import json
import typing

import pytest

from nongns_dist import GNSConfig
from nongns_dist.config import RESUME_FIXED, NormName, as_config, check_count
from nongns_dist.norms import NORMS

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
    ("level_beta", 1.0),
    ("level_beta", -0.1),
    ("level_beta", "0.8"),
    ("sqrt_trace_method", "svd"),
    ("sqrt_trace_tol", 0.0),
    ("sqrt_trace_tol", 1.5),
    ("layer_breakdown", 0),
    ("interval", 0),
    ("interval", 2.5),
    ("theta", 0.0),
    ("theta", -0.6),
    ("theta", "0.6"),
    ("theta", 1e-200),  # theta^2 underflows float64: a division by zero later
    ("theta", 9.99e-4),  # below the documented 1e-3
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
    ("batch_schedule", [[8, 64]]),  # does not start at 0
    ("batch_schedule", [[0, 64], [0, 128]]),  # thresholds do not increase
    ("batch_schedule", "0:64"),
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
    # theta: the paper's 0.6 calibrated to the library's estimator (README "Theta")
    assert (cfg.theta, cfg.interval, cfg.ema_beta_noise, cfg.ema_beta_signal) == (
        0.65,
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


def test_theta_bounds_are_inclusive_and_documented():
    assert GNSConfig(theta=1e-3).theta == 1e-3
    assert GNSConfig(theta=1e3).theta == 1e3
    for bad in (1e-200, 1e-150, 9.99e-4, 0.0):
        with pytest.raises(ValueError, match=r"theta[\s\S]*greater than or equal to 0\.001"):
            GNSConfig(theta=bad)
    with pytest.raises(ValueError, match=r"theta[\s\S]*less than or equal to 1000"):
        GNSConfig(theta=1e3 * (1 + 1e-12))


def test_as_config_takes_a_config_or_a_mapping():
    cfg = GNSConfig(norm="l1")
    assert as_config(cfg) is cfg
    assert as_config({"norm": "l1"}) == cfg
    with pytest.raises(ValueError, match="intervall"):
        as_config({"intervall": 5})
    with pytest.raises(TypeError, match=r"attach\(\): config must be a GNSConfig or a mapping"):
        as_config("l1")


@pytest.mark.parametrize(
    ("value", "error"),
    [("2", TypeError), (2.0, TypeError), (True, TypeError), (None, TypeError), (0, ValueError),
     (-1, ValueError), (2**53 + 1, ValueError)],
)  # fmt: skip
def test_check_count_names_the_argument_and_the_value(value, error):
    with pytest.raises(error, match=rf"world_size={value!r}.*allowed: an int >= 1"):
        check_count("world_size", value)


def test_check_count_accepts_integral_types():
    import numpy as np

    assert check_count("n", 3) == 3 and type(check_count("n", np.int64(3))) is int
    assert check_count("n", 0, minimum=0) == 0


def test_check_resume_refuses_estimator_defining_fields_and_allows_the_rest():
    cfg = GNSConfig(norm="l1", max_batch_size=64)
    changed = {
        "norm": "nuclear", "bias_correction": False, "pool_moments": False, "pool_dof": 10.0,
        "ema_beta_noise": 0.5, "ema_beta_signal": 0.5, "level_beta": None,
    }  # fmt: skip
    assert set(changed) == set(RESUME_FIXED)
    for field, value in changed.items():
        saved = {**cfg.to_dict(), field: value}
        with pytest.raises(
            ValueError, match=rf"{field}={value!r}.*{field}={getattr(cfg, field)!r}"
        ):
            cfg.check_resume(saved)
    allowed = {
        "enabled": False, "adapt_batch_size": False, "interval": 7, "theta": 1.2,
        "warmup_samples": 9, "initial_batch_size": 16, "max_batch_size": None,
        "lr_scaling": "linear", "sqrt_trace_method": "newton_schulz", "sqrt_trace_tol": 0.01,
        "layer_breakdown": True, "check_consistency": True, "batch_schedule": ((0, 8), (64, 16)),
    }  # fmt: skip
    assert set(allowed) | set(changed) == GNSConfig.field_names()
    cfg.check_resume({**cfg.to_dict(), **allowed})
    cfg.check_resume(None)  # a state saved without its config
    cfg.check_resume({"norm": "l1"})  # an older config without the newer fields
    with pytest.raises(ValueError, match="mapping"):
        cfg.check_resume("l1")  # type: ignore[arg-type]


def test_the_config_names_every_registered_norm_and_auto():
    assert typing.get_args(NormName) == (*NORMS, "auto")
