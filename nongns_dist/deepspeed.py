"""``nongns_dist.deepspeed.initialize``: ``deepspeed.initialize`` plus adaptive batch sizes,
switched on from the JSON config.

    {
      "train_micro_batch_size_per_gpu": 8,
      "gradient_accumulation_steps": 1,
      "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
      "zero_optimization": {"stage": 2},
      "nongns": {"enabled": true, "norm": "auto", "interval": 100, "theta": 0.6}
    }

    engine, optimizer, dataloader, scheduler = nongns_dist.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")
    engine.nongns.last_estimate, engine.nongns.batch_size    # the plugin, when enabled

DeepSpeed ignores unknown top-level keys, so the "nongns" section rides along in the same file;
it is validated by ``GNSConfig.from_dict`` before DeepSpeed starts (a bad key or value is a
``ValueError`` naming it). Without the section, or with ``"enabled": false``, DeepSpeed's objects
come back untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from nongns_dist.config import GNSConfig

__all__ = ["initialize", "read_section"]

SECTION = "nongns"


def read_section(config: Any) -> GNSConfig | None:
    """The validated "nongns" section of a DeepSpeed config (dict or JSON path), or None."""
    if config is None:
        return None
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, Mapping):
        raise ValueError(f"a DeepSpeed config must be a dict or a JSON path, got {type(config)}")
    section = config.get(SECTION)
    return None if section is None else GNSConfig.from_dict(section)


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """Same arguments and 4-tuple as ``deepspeed.initialize``; the engine gets ``.nongns``."""
    import deepspeed

    from nongns_dist.engines.deepspeed import DeepSpeedGNSPlugin

    config = kwargs.get("config", kwargs.get("config_params"))
    if config is None and kwargs.get("args") is not None:
        config = getattr(kwargs["args"], "deepspeed_config", None)
    gns = read_section(config)  # fail before DeepSpeed spends time starting
    result = deepspeed.initialize(*args, **kwargs)
    if gns is not None and gns.enabled:
        engine = result[0]
        engine.nongns = DeepSpeedGNSPlugin(engine, gns)
    return result
