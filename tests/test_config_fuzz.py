"""Property-based fuzzing of the config entry points: every value of every field either makes a
valid config that keeps it, or is a ValueError that names the field; nothing else escapes."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nongns_dist.deepspeed as nds
from nongns_dist import GNSConfig
from nongns_dist.config import MAX_COUNT

#: Anything a JSON file (or a careless caller) can put in a field.
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["l1", "l2", "nuclear", "auto", "eigh", "newton_schulz", "sqrt", "0.6", ""]),
    st.lists(st.integers(), max_size=2),
    st.lists(st.tuples(st.integers(-1, 50), st.integers(-1, 50)).map(list), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = sorted(GNSConfig.field_names())


def _valid(field: str, value: Any) -> bool:
    """An independent statement of what each field accepts (the config's docstrings)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_float = isinstance(value, float) and math.isfinite(value)
    if field in ("enabled", "adapt_batch_size", "bias_correction", "pool_moments",
                 "layer_breakdown", "check_consistency"):  # fmt: skip
        return isinstance(value, bool)
    if field == "norm":
        return value in ("l1", "l2", "nuclear", "auto")
    if field == "sqrt_trace_method":
        return value in ("eigh", "newton_schulz")
    if field == "lr_scaling":
        return value in ("sqrt", "linear", "none")
    if field == "sqrt_trace_tol":
        return (is_float or is_int) and 0 < value < 1
    if field == "theta":
        return (is_float or is_int) and 1e-3 <= value <= 1e3
    if field == "pool_dof":
        return (is_float or is_int) and 0 < value <= 1e6
    if field in ("ema_beta_noise", "ema_beta_signal"):
        return (is_float or is_int) and 0 <= value < 1
    if field == "level_beta":  # None: pool the moments themselves
        return value is None or ((is_float or is_int) and 0 <= value < 1)
    if field == "warmup_samples":
        return is_int and 0 <= value <= MAX_COUNT
    if field == "interval":
        return is_int and 0 < value <= MAX_COUNT
    if field in ("initial_batch_size", "max_batch_size"):
        return value is None or (is_int and 0 < value <= MAX_COUNT)
    if field == "batch_schedule":  # [[0, batch], [samples, batch], ...], samples increasing
        if value is None:
            return True
        pairs = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p) for p in value
        )
        if not pairs or not value:
            return False
        thresholds = [p[0] for p in value]
        return (
            thresholds[0] == 0
            and all(b > a for a, b in itertools.pairwise(thresholds))
            and all(0 < p[1] <= MAX_COUNT and p[0] <= MAX_COUNT for p in value)
        )
    raise AssertionError(f"no rule for {field}")


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_from_dict_keeps_valid_values_and_names_the_field_of_bad_ones(field, value):
    try:
        config = GNSConfig.from_dict({field: value})
    except ValueError as error:
        assert not _valid(field, value), f"{field}={value!r} refused: {error}"
        assert field in str(error)
    else:
        assert _valid(field, value), f"{field}={value!r} accepted"
        if field == "batch_schedule" and value is not None:  # JSON's lists read as tuples
            value = tuple(tuple(pair) for pair in value)
        assert getattr(config, field) == value


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS), value=VALUES)
def test_unknown_keys_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match="unknown key"):
        GNSConfig.from_dict({"norm": "l1", key: value})


@settings(max_examples=100, deadline=None)
@given(section=VALUES)
def test_deepspeed_section_of_any_shape_is_a_config_or_a_value_error(section):
    try:
        config = nds.read_section({"train_micro_batch_size_per_gpu": 1, "nongns": section})
    except ValueError:
        return
    assert config is None or isinstance(config, GNSConfig)
    assert section is None or isinstance(section, dict)
