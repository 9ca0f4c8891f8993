"""Hugging Face Accelerate: measure and adapt the batch inside a user's own accelerate loop.

    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    plugin = GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    monitor = nongns_dist.accelerate.attach(
        accelerator, model, optimizer, GNSConfig(norm="auto"), micro_batch_size=8
    )
    for batch in loader:                      # one micro-batch per iteration, as usual
        with accelerator.accumulate(model):   # no_sync except on the window's last micro-step
            accelerator.backward(loss_fn(model, batch))
            optimizer.step()                  # steps (and closes ours) at the window's end only
            optimizer.zero_grad()
        if monitor.samples >= budget:
            break

The loop stays the user's; what changes is ``accelerator.gradient_accumulation_steps``: each
time an optimizer step closes, the monitor's decision is written there and ``accelerator.step``
is reset, so the next window has exactly the decided micro-steps (accelerate syncs when
``step % num_steps == 0``: a count changed without the reset would end a window early or late).
accelerate divides each micro-step's loss by that count, so gradients stay window means.

Under DDP (and a single process) and FSDP2 (``fsdp_version: 2``) the monitor is
``nongns_dist.attach``'s, on the prepared model and the optimizer inside accelerate's wrapper
(the lr multiplier goes there; fp16's ``GradScaler`` is accelerate's own). State: every rank's
monitor state (controller, config, its pooled moments) is written by ``accelerator.save_state``
beside accelerate's files (``nongns_rank<r>.pt``) and read back by ``load_state``, through the
save/load pre-hooks, which run on every rank.

Under DeepSpeed the monitor is the DeepSpeed plugin on the prepared engine, its config the
argument or else the ``"nongns"`` section of the DeepSpeed config accelerate holds
(``accelerator.state.deepspeed_plugin.deepspeed_config``). accelerate marks the boundary and
calls ``engine.step()`` once per window; the plugin counts micro-steps where backward happens,
so it follows. Its state goes through DeepSpeed's own checkpoint (``save_state`` /
``load_state`` call ``engine.save_checkpoint`` / ``load_checkpoint``, which the plugin extends).

Refused, with a ``ValueError`` naming the setting: ``sync_with_dataloader=True`` (accelerate's
default: at the end of the data loader it closes a window early, so that step would have fewer
micro-steps than its batch; pass ``sync_with_dataloader=False``) and ``sync_each_batch=True``
(every micro-step reduces: no per-rank sample exists).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from nongns_dist.capture.collectives import group_rank_and_size
from nongns_dist.config import GNSConfig, as_config, check_count
from nongns_dist.engines.core import StepCore, StepEvents
from nongns_dist.engines.torch_native import attach as attach_model

__all__ = ["attach"]

logger = logging.getLogger("nongns_dist")


def attach(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: GNSConfig | Mapping[str, Any] | None = None,
    *,
    micro_batch_size: int,
) -> StepCore:
    """Measure the noise scale of ``model`` (as ``accelerator.prepare`` returned it) and adapt
    the accumulation count of ``accelerator``; returns the monitor (a ``GNSMonitor``, or under
    DeepSpeed the engine's plugin, ``engine.nongns``).

    ``optimizer``: the prepared one (accelerate's wrapper) or the one inside it. ``config``: a
    ``GNSConfig`` or a mapping of its fields; ``None`` reads the DeepSpeed config's
    ``"nongns"`` section (refused without DeepSpeed, or without the section).
    ``micro_batch_size``: examples per rank per micro-step (the data loader's batch size). The
    current ``accelerator.gradient_accumulation_steps`` is the first count unless the config
    names the first batch (``initial_batch_size``, ``batch_schedule``).
    """
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if config is None and deepspeed:
        from nongns_dist.deepspeed import read_section

        config = read_section(accelerator.state.deepspeed_plugin.deepspeed_config)
        if config is None:
            raise ValueError(
                "nongns_dist.accelerate.attach(config=None) reads the DeepSpeed config's "
                "'nongns' section, and it has none; allowed: a config argument, or the section"
            )
    if config is None:
        raise ValueError(
            "nongns_dist.accelerate.attach needs a config (a GNSConfig or a mapping of its "
            "fields, e.g. {'norm': 'auto'}); only under DeepSpeed is it read from the DeepSpeed "
            "config's 'nongns' section"
        )
    config = as_config(config, where="nongns_dist.accelerate.attach()")
    micro_batch_size = check_count("micro_batch_size", micro_batch_size)
    plugin = accelerator.gradient_state.plugin_kwargs
    if plugin.get("sync_with_dataloader", True):
        raise ValueError(
            "sync_with_dataloader=True (accelerate's default) ends an accumulation window early "
            "at the end of the data loader, so that optimizer step would run fewer micro-steps "
            "than its batch and its samples would be miscounted; allowed: Accelerator("
            "gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=..., "
            "sync_with_dataloader=False))"
        )
    if plugin.get("sync_each_batch", False):
        raise ValueError(
            "sync_each_batch=True reduces the gradient of every micro-step, so no rank keeps a "
            "per-rank sample of the window; allowed: sync_each_batch=False"
        )
    if deepspeed:
        return _attach_deepspeed(accelerator, model, config, micro_batch_size)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    named_first = config.initial_batch_size is not None or config.batch_schedule is not None
    scaler = accelerator.scaler
    monitor = attach_model(
        model,
        config,
        inner,
        micro_batch_size=micro_batch_size,
        accumulation_steps=None if named_first else accelerator.gradient_accumulation_steps,
        grad_scaler=scaler if scaler is not None and scaler.is_enabled() else None,
    )
    _Driver(accelerator, monitor)
    return monitor


def _attach_deepspeed(
    accelerator: Any, engine: Any, config: GNSConfig, micro_batch_size: int
) -> StepCore:
    from nongns_dist.engines.deepspeed import install

    plugin = install(engine, config, micro_batch_size=micro_batch_size)
    driver = _Driver(accelerator, plugin, checkpoints=False)  # DeepSpeed's checkpoint has it
    load = engine.load_checkpoint

    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        result = load(*args, **kwargs)
        driver.follow()  # the restored count, from the window that starts now
        return result

    engine.load_checkpoint = load_checkpoint
    return plugin


def rank_state_file(folder: str) -> str:
    """This rank's monitor state in a checkpoint folder (accelerate's ``save_state`` and the
    Trainer's ``checkpoint-N``): every rank writes its own, its pooled moments being its own."""
    return os.path.join(folder, f"nongns_rank{group_rank_and_size(None)[0]}.pt")


class _Driver:
    """Keeps accelerate's accumulation window equal to the monitor's count, and the monitor's
    state in accelerate's checkpoints."""

    def __init__(self, accelerator: Any, monitor: StepCore, *, checkpoints: bool = True) -> None:
        self.accelerator = accelerator
        self.monitor = monitor
        monitor.subscribe(self._closed)
        self.follow()
        if checkpoints:
            accelerator.register_save_state_pre_hook(self._save)
            accelerator.register_load_state_pre_hook(self._load)

    def follow(self) -> None:
        """The monitor's count for the next window, which starts now (a boundary)."""
        self.accelerator.gradient_accumulation_steps = self.monitor.accumulation_steps
        self.accelerator.step = 0

    def _closed(self, events: StepEvents) -> None:
        self.follow()

    def _save(self, models: Any, weights: Any, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        torch.save(self.monitor.state_dict(), rank_state_file(output_dir))

    def _load(self, models: Any, input_dir: str) -> None:
        file = rank_state_file(input_dir)
        if not os.path.exists(file):
            logger.warning(
                "nongns_dist: %s has no monitor state (%s): the batch schedule starts again",
                input_dir,
                os.path.basename(file),
            )
            return
        # weights_only: a file a user downloads cannot run code when it is opened
        self.monitor.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        self.follow()
