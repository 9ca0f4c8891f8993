"""What launch/train.py logs: rank 0's metrics.jsonl (one record per optimizer step:
``step_record``) and TensorBoard events, and the trajectory of the global batch for
summary.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from launch import checkpoints
from nongns_dist import StepEvents


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf/nan


def step_record(events: StepEvents, seq_len: int, lr: float, train_loss: float) -> dict[str, Any]:
    """The metrics.jsonl record of the optimizer step the monitor just closed, from the
    ``StepEvents`` it emitted (what the step ran with; its estimate when it measured) and what
    the loop adds: the ``lr`` it ran with and its ``train_loss``. val_loss is the caller's."""
    record: dict[str, Any] = {
        "step": events.step,
        "samples": events.samples,
        "tokens": events.samples * seq_len,
        "batch_size": events.batch_size,
        "accumulation": events.accumulation_steps,
        "lr": lr,
        "lr_multiplier": events.lr_multiplier,
        "train_loss": train_loss,
    }
    estimate = events.estimate
    if events.measured and estimate is not None:
        # raw: this measurement alone; pooled: the noise the controller acts on
        pooled = estimate.pooled
        record |= {
            "gns_raw": finite_or_none(estimate.gns),
            "noise_raw": finite_or_none(estimate.noise),
            "signal": finite_or_none(estimate.signal),
            "gns_pooled": None if pooled is None else finite_or_none(pooled.gns),
            "noise_pooled": None if pooled is None else finite_or_none(pooled.noise),
            "target_batch_size": events.decision.target_batch_size,
        }
    return record


def records_until(metrics: Path, step: int) -> list[str]:
    """The lines of ``metrics`` (metrics.jsonl) of steps <= ``step``; a line cut short by a
    killed job is dropped."""
    if not metrics.is_file():
        return []
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    return kept


class RunLog:
    """Rank 0's outputs: metrics.jsonl (flushed per step), TensorBoard when importable, and the
    trajectory of the global batch. Other ranks hold a disabled one, so call sites need no ifs.

    TensorBoard's x-axis is samples seen, so runs with different batch trajectories line up."""

    def __init__(self, out: Path, enabled: bool, resume: Path | None = None) -> None:
        """``resume``: the checkpoint the run continues from. metrics.jsonl then keeps the
        records up to its step (from the checkpoint's run directory, which may be ``out``)
        and drops later ones, which a run killed after the checkpoint had written."""
        self.enabled = enabled
        self.batch_trajectory: list[tuple[int, int]] = []
        self._jsonl = None
        self._tb: Any = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume is not None:
            # of this run's later steps (another --out is new or empty: resume_point)
            (out / "summary.json").unlink(missing_ok=True)
            step = checkpoints.read_meta(resume)["step"]
            # a checkpoint kept outside a run directory brings no records
            run = checkpoints.run_directory(resume)
            kept = records_until(run / "metrics.jsonl", step) if run is not None else []
            for line in kept:
                record = json.loads(line)
                self.batch(record["step"] - 1, record["batch_size"])
        tmp = out / "metrics.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, out / "metrics.jsonl")
        self._jsonl = (out / "metrics.jsonl").open("a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.say("tensorboard is not installed: TensorBoard logging skipped (metrics.jsonl)")
        else:
            # purge_step: events past the checkpoint's samples (x-axis) are dropped on a resume
            purge = json.loads(kept[-1])["samples"] + 1 if kept else None
            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge)

    def say(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def batch(self, step: int, batch_size: int) -> None:
        """Note the batch a step runs with; the trajectory keeps the changes (steps completed
        before the first step with that batch, batch)."""
        if not self.batch_trajectory or self.batch_trajectory[-1][1] != batch_size:
            self.batch_trajectory.append((step, batch_size))

    def write(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "samples", "tokens") and value is not None:
                    self._tb.add_scalar(key, value, global_step=record["samples"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
