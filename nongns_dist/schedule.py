"""The batch schedule a run learned, exported so that a later run can replay it without measuring.

A run's schedule is where its global batch changed: ``[(samples, batch), ...]``, the first at 0,
each meaning "from the step that starts after ``samples`` samples, the global batch is
``batch``". It is read from the main job's metrics.jsonl (each record: the ``samples`` after
the step and the ``batch_size`` it ran with), or from ``StepEvents`` of any engine
(``from_events``), and written as:

* ``megatron``: Megatron-LM's ``--step-batch-size-schedule "T0:BS0 T1:BS1 ..."``, thresholds in
  tokens (Megatron reads them as tokens when ``--seq-length`` is set, as in every GPT run) or
  in samples without a sequence length;
* ``olmo-core``: the fields of OLMo-core's ``BatchSizeSchedulerCallback`` (``batch_sizes`` in
  tokens, ``schedule`` as token ``Duration``s). OLMo-core changes a batch only by an integer
  factor, so a batch that is not one (16 -> 24) is rounded DOWN to the largest integer multiple
  of the previous batch below it, and dropped when that is the previous batch itself; each such
  change is listed in ``notes``;
* ``nongns``: ``{"batch_schedule": [[samples, batch], ...]}``, a ``GNSConfig`` field: put it in
  the ``"nongns"`` section of a DeepSpeed JSON (or ``GNSConfig(batch_schedule=...)`` for
  ``attach``) and the plugin replays the batch, the accumulation count and the lr multiplier,
  measuring only to log.

    python -m nongns_dist.schedule runs/ddp-signum-adaptive/metrics.jsonl --format megatron
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nongns_dist.config import GNSConfig

__all__ = [
    "from_events",
    "from_records",
    "megatron",
    "nongns_section",
    "olmo_core",
    "read_file",
    "read_metrics",
    "sequence_length",
]

Schedule = list[tuple[int, int]]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (one JSON object per line; blank lines skipped). A line
    that is not a JSON object is a ``ValueError`` naming the file and the line."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: a JSON object was expected")
        records.append(record)
    return records


def from_records(records: Iterable[Mapping[str, Any]]) -> Schedule:
    """The schedule of metrics.jsonl records (``samples`` after each step, ``batch_size`` it
    ran with), in step order. Records must cover the run from its first step without a gap:
    each step starts where the one before ended (``ValueError`` otherwise)."""
    schedule: Schedule = []
    consumed = 0
    for record in records:
        try:
            samples, batch = int(record["samples"]), int(record["batch_size"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"a record needs integer 'samples' and 'batch_size', got {dict(record)!r}"
            ) from None
        start = samples - batch
        if start != consumed or batch < 1:
            raise ValueError(
                f"step {record.get('step')}: it started after {start} samples, the steps "
                f"before it consumed {consumed}: the records must be one run's, complete and "
                "in order (a resumed run keeps the steps before its checkpoint)"
            )
        if not schedule or schedule[-1][1] != batch:
            schedule.append((start, batch))
        consumed = samples
    if not schedule:
        raise ValueError("no step in the records: nothing to export")
    return schedule


def from_events(events: Iterable[Any]) -> Schedule:
    """The schedule of ``StepEvents`` (``attach(on_events=...)``, ``monitor.subscribe``)."""
    return from_records(
        {"step": e.step, "samples": e.samples, "batch_size": e.batch_size} for e in events
    )


def sequence_length(records: Sequence[Mapping[str, Any]]) -> int | None:
    """Tokens per sample, when the records carry ``tokens`` (the main job's do)."""
    for record in records:
        tokens, samples = record.get("tokens"), record.get("samples")
        if isinstance(tokens, int) and isinstance(samples, int) and samples > 0:
            if tokens % samples:
                raise ValueError(f"tokens {tokens} is not a multiple of samples {samples}")
            return tokens // samples
    return None


def megatron(schedule: Schedule, seq_len: int | None = None) -> str:
    """``--step-batch-size-schedule``'s value: thresholds in tokens with ``seq_len`` (how
    Megatron reads them when ``--seq-length`` is set), else in samples; batches in samples."""
    scale = seq_len or 1
    return " ".join(f"{samples * scale}:{batch}" for samples, batch in schedule)


def olmo_core(schedule: Schedule, seq_len: int) -> tuple[dict[str, Any], list[str]]:
    """(OLMo-core ``BatchSizeSchedulerCallback`` fields, notes): batch sizes and thresholds in
    tokens. Each batch becomes the largest integer multiple of the previous batch at or below
    it (OLMo-core's rule); a change that rounds to the previous batch is dropped. The notes
    say what was rounded or dropped."""
    batches: list[int] = []
    starts: list[int] = []
    notes: list[str] = []
    for samples, batch in schedule:
        if batches:
            previous = batches[-1] // seq_len
            feasible = (
                batch // previous * previous if batch > previous else _divisor(previous, batch)
            )
            if feasible != batch:
                notes.append(
                    f"at {samples} samples: batch {batch} -> {feasible} (OLMo-core changes a "
                    f"batch by an integer factor only; previous {previous})"
                )
            if feasible == previous:
                notes.append(f"at {samples} samples: no change left, dropped")
                continue
            batch = feasible
        batches.append(batch * seq_len)
        starts.append(samples * seq_len)
    return {
        "batch_sizes": batches,
        "schedule": [{"value": start, "unit": "tokens"} for start in starts],
    }, notes


def _divisor(previous: int, batch: int) -> int:
    """The largest divisor of ``previous`` at or below ``batch`` (a decrease)."""
    return max(d for d in range(1, batch + 1) if previous % d == 0)


def nongns_section(schedule: Schedule) -> dict[str, Any]:
    """The ``"nongns"`` section entry that replays the schedule (``GNSConfig.batch_schedule``)."""
    return {"batch_schedule": [[samples, batch] for samples, batch in schedule]}


def read_file(path: str | Path) -> tuple[tuple[int, int], ...]:
    """The schedule in a JSON file as ``--format nongns`` writes it (``{"batch_schedule": ...}``,
    or the list alone), checked as ``GNSConfig`` checks it (``ValueError`` otherwise)."""

    value = json.loads(Path(path).read_text())
    if isinstance(value, dict):
        value = value.get("batch_schedule")
    schedule = GNSConfig.from_dict({"batch_schedule": value}).batch_schedule
    if schedule is None:
        raise ValueError(f"{path} holds no batch_schedule")
    return schedule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nongns_dist.schedule",
        description="Export the batch schedule a run learned (its metrics.jsonl) for Megatron-LM, "
        "OLMo-core or a replay by this library (DeepSpeed's 'nongns' section, GNSConfig).",
    )
    parser.add_argument("metrics", help="the run's metrics.jsonl")
    parser.add_argument("--format", choices=["megatron", "olmo-core", "nongns"], default="nongns")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sample (default: from the records' 'tokens'; needed for olmo-core)",
    )
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.metrics)
        schedule = from_records(records)
        seq_len = args.seq_len or sequence_length(records)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.format == "megatron":
        print(megatron(schedule, seq_len))
    elif args.format == "olmo-core":
        if seq_len is None:
            parser.error("olmo-core counts tokens: pass --seq-len (the records carry none)")
        fields, notes = olmo_core(schedule, seq_len)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(json.dumps(fields))
    else:
        print(json.dumps(nongns_section(schedule)))


if __name__ == "__main__":
    main()
