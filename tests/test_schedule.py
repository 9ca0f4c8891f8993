"""The batch schedule a run learned: exported (Megatron, OLMo-core, the "nongns" section) and
replayed by the controller, by the DeepSpeed plugin and by the main job, which then takes the
same steps with the same batches, lr and losses as the run that learned it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nongns_dist import BatchSizeController, GNSConfig
from nongns_dist import schedule as sched

from .test_train import COMPARED, TORCHRUN, TRAIN, _records, _run

RECORDS = [  # what metrics.jsonl says: samples after each step, the batch it ran with
    {"step": 1, "samples": 8, "tokens": 256, "batch_size": 8},
    {"step": 2, "samples": 16, "tokens": 512, "batch_size": 8},
    {"step": 3, "samples": 32, "tokens": 1024, "batch_size": 16},
    {"step": 4, "samples": 56, "tokens": 1792, "batch_size": 24},
    {"step": 5, "samples": 80, "tokens": 2560, "batch_size": 24},
    {"step": 6, "samples": 128, "tokens": 4096, "batch_size": 48},
]


def test_the_schedule_is_where_the_batch_changed_and_exports_in_three_forms():
    schedule = sched.from_records(RECORDS)
    assert schedule == [(0, 8), (16, 16), (32, 24), (80, 48)]
    assert sched.sequence_length(RECORDS) == 32
    # Megatron: thresholds in tokens with a sequence length, in samples without
    assert sched.megatron(schedule, 32) == "0:8 512:16 1024:24 2560:48"
    assert sched.megatron(schedule) == "0:8 16:16 32:24 80:48"
    # OLMo-core: tokens, and a batch changes by an integer factor only (24 after 16: 16, gone)
    fields, notes = sched.olmo_core(schedule, 32)
    assert fields == {
        "batch_sizes": [256, 512, 1536],
        "schedule": [
            {"value": 0, "unit": "tokens"},
            {"value": 512, "unit": "tokens"},
            {"value": 2560, "unit": "tokens"},
        ],
    }
    assert any("24 -> 16" in n for n in notes) and any("dropped" in n for n in notes)
    # the library's own replay: a GNSConfig field, as the DeepSpeed "nongns" section holds it
    section = json.loads(json.dumps(sched.nongns_section(schedule)))
    assert GNSConfig.from_dict(section).batch_schedule == tuple(schedule)


def test_records_of_another_run_or_with_a_gap_are_refused():
    with pytest.raises(ValueError, match="one run's, complete and in order"):
        sched.from_records([RECORDS[0], RECORDS[2]])
    with pytest.raises(ValueError, match="'samples' and 'batch_size'"):
        sched.from_records([{"step": 1, "samples": 8}])
    with pytest.raises(ValueError, match="nothing to export"):
        sched.from_records([])


def test_the_command_line_reads_metrics_jsonl(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))

    def export(*flags: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "nongns_dist.schedule", str(metrics), *flags]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    assert export("--format", "megatron").stdout.strip() == "0:8 512:16 1024:24 2560:48"
    assert json.loads(export().stdout) == {"batch_schedule": [[0, 8], [16, 16], [32, 24], [80, 48]]}
    olmo = export("--format", "olmo-core")
    assert json.loads(olmo.stdout)["batch_sizes"] == [256, 512, 1536] and "note:" in olmo.stderr
    metrics.write_text("not json\n")
    bad = export()
    assert bad.returncode == 2 and "line 1: not JSON" in bad.stderr


def test_the_controller_replays_the_schedule_and_rounds_it_as_a_resume_does():
    config = GNSConfig(batch_schedule=((0, 8), (16, 16), (32, 24), (80, 48)), max_batch_size=40)
    ctrl = BatchSizeController(config, micro_batch_size=4, world_size=2)
    seen = [ctrl.batch_size]
    for _ in range(6):
        ctrl.update(None)  # no measurement: the schedule alone moves the batch
        seen.append(ctrl.batch_size)
    # 8 8 | 16 after 16 samples | 24 after 32 | 24, 24 | 48 capped to 40 after 80
    assert seen == [8, 8, 16, 24, 24, 40, 40]
    assert ctrl.lr_multiplier == pytest.approx((40 / 8) ** 0.5)
    # another unit (micro x ranks = 16): each batch the smallest multiple at or above it
    other = BatchSizeController(
        GNSConfig(batch_schedule=config.batch_schedule), micro_batch_size=4, world_size=4
    )
    batches = [other.batch_size]
    for _ in range(4):
        other.update(None)
        batches.append(other.batch_size)
    # after 16, 32, 64, 96 samples: 16 -> 16, 24 -> 32, still 24 -> 32, 48
    assert batches == [16, 16, 32, 32, 48]
    with pytest.raises(ValueError, match="batch_schedule starts at 8"):
        BatchSizeController(config, micro_batch_size=4, world_size=2, accumulation_steps=2)
    with pytest.raises(ValueError, match="adapt_batch_size"):
        GNSConfig(batch_schedule=((0, 8),), adapt_batch_size=False)


def test_a_measurement_does_not_move_a_replayed_batch():
    class Huge:  # a noise scale that would ask for the cap at once
        noise, signal = 1e9, 1e-9

    ctrl = BatchSizeController(
        GNSConfig(batch_schedule=((0, 8),), theta=0.1), micro_batch_size=4, world_size=2
    )
    decision = ctrl.update(Huge())
    assert decision.batch_size == 8 and not decision.changed
    assert decision.target_batch_size is not None and decision.target_batch_size > 1e10


@pytest.mark.slow
@pytest.mark.distributed
def test_the_main_job_replays_what_it_learned(tmp_path: Path):
    learned = tmp_path / "learned"
    _run([*TORCHRUN, "2", str(TRAIN), *COMPARED, "--out", str(learned)], cwd=tmp_path)
    records = _records(learned)
    schedule = sched.from_records(records)
    assert len(schedule) >= 2  # the batch grew: there is something to replay
    file = tmp_path / "schedule.json"
    file.write_text(json.dumps(sched.nongns_section(schedule)))
    replayed = tmp_path / "replayed"
    flags = [*COMPARED, "--batch-schedule", str(file), "--theta", "100"]  # theta: unused now
    _run([*TORCHRUN, "2", str(TRAIN), *flags, "--out", str(replayed)], cwd=tmp_path)
    again = _records(replayed)
    keys = ("step", "samples", "batch_size", "accumulation", "lr", "lr_multiplier", "train_loss")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in records]
    assert again[-1]["val_loss"] == records[-1]["val_loss"]


def test_the_main_job_refuses_a_schedule_it_cannot_replay(tmp_path: Path):
    file = tmp_path / "schedule.json"
    file.write_text(json.dumps({"batch_schedule": [[0, 4], [16, 8]]}))  # COMPARED starts at 4
    command = [sys.executable, str(TRAIN), *COMPARED, "--batch-schedule", str(file)]
    for extra, match in (
        (["--batch-mode", "constant"], "--batch-mode constant keeps it"),
        (["--initial-batch", "8"], "drop --initial-batch"),
    ):
        result = subprocess.run(
            [*command, *extra], capture_output=True, text=True, cwd=tmp_path, check=False
        )
        assert result.returncode == 2 and match in result.stderr, result.stderr[-2000:]
    file.write_text(json.dumps({"batch_schedule": [[4, 8]]}))
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "must start at 0" in result.stderr


def test_the_file_the_exporter_writes_is_what_a_replay_reads(tmp_path: Path):
    file = tmp_path / "schedule.json"
    file.write_text(json.dumps(sched.nongns_section([(0, 8), (16, 16)])))
    assert sched.read_file(file) == ((0, 8), (16, 16))
    file.write_text(json.dumps({"other": 1}))
    with pytest.raises(ValueError, match="holds no batch_schedule"):
        sched.read_file(file)
