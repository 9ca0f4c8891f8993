"""Long runs of the main job: exact resume, SIGTERM, a lost rank under torchrun, elastic resume,
bad checkpoints. Real torchrun launches on gloo; the reference is always the uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from launch import checkpoints, cli
from nongns_dist import warmup_cosine

from .test_train import TINY, TORCHRUN, TRAIN, _records, _run

#: Signum grows the batch 4 -> 8 at step 9 and 8 -> 12 at step 11 (theta 0.5): a checkpoint
#: every 5 steps puts step 10 between two changes.
# theta and interval put a batch change on each side of the step-10 checkpoint (4 -> 8 at step
# 9, 8 -> 12 at step 11; checked in test_resume_continues_the_uninterrupted_run)
LONG = [*TINY, "--theta", "0.5", "--interval", "1", "--max-batch", "32", "--sample-budget", "320"]
EVERY = ["--checkpoint-every", "5", "--keep-checkpoints", "0"]


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in a directory of its own: train.py's default --out (runs/...) is relative to
    the working directory, and a newcomer's checkout holds the README's main job there (a
    finished run's checkpoints, which a fresh start beside them must refuse)."""
    monkeypatch.chdir(tmp_path)


def _flags(corpus_dir: Path, *extra: str) -> list[str]:
    return [*LONG, "--corpus-dir", str(corpus_dir), *extra]


def _torchrun(ranks: int, flags: list[str], out: Path, **kw: str) -> subprocess.CompletedProcess:
    return _run([*TORCHRUN, str(ranks), str(TRAIN), *flags, "--out", str(out)], out.parent, **kw)


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / checkpoints.step_name(step)


def _assert_same_records(records: list[dict], reference: list[dict]) -> None:
    """Same steps, samples, batches, lrs, losses and noise scales: resumed runs repeat the
    uninterrupted run bitwise here (measured: largest relative difference 0 on every key), so
    the tolerance is float64 rounding."""
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for mine, ref in zip(records, reference, strict=True):
        assert mine.keys() == ref.keys(), ref["step"]
        for key, value in ref.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-12, abs=1e-300), (ref["step"], key)
            else:
                assert mine[key] == value, (ref["step"], key)


def _assert_each_sample_once(records: list[dict]) -> None:
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    total = 0
    for r in records:
        total += r["batch_size"]
        assert r["samples"] == total, r["step"]


class _ReferenceRuns(dict[str, Path]):
    """engine -> the uninterrupted run's directory, run when a test first asks for it (a test
    of one engine does not wait for the others; DeepSpeed's tests request deepspeed_ops)."""

    def __init__(self, factory: pytest.TempPathFactory, corpus_dir: Path) -> None:
        super().__init__()
        self.factory, self.corpus_dir = factory, corpus_dir

    def __missing__(self, engine: str) -> Path:
        out = self.factory.mktemp("reference") / engine
        _torchrun(2, _flags(self.corpus_dir, *EVERY, "--engine", engine), out)
        self[engine] = out
        return out


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> dict[str, Path]:
    """The uninterrupted runs (DDP, FSDP2, DeepSpeed stage 0), a checkpoint every 5 steps."""
    return _ReferenceRuns(tmp_path_factory, corpus_dir)


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_resume_continues_the_uninterrupted_run(
    engine: str,
    tmp_path: Path,
    corpus_dir: Path,
    deepspeed_ops: None,
    reference_runs: dict[str, Path],
) -> None:
    reference = _records(reference_runs[engine])
    batches = {r["step"]: r["batch_size"] for r in reference}
    assert batches[8] < batches[10] < batches[12], "a batch change before and after step 10"
    out = tmp_path / "resumed"
    resume = ["--resume", str(_step_dir(reference_runs[engine], 10)), "--engine", engine]
    resume += ["--checkpoint-every", "5"]
    result = _torchrun(2, _flags(corpus_dir, *resume), out)
    # the batch the resumed run continues with: the one step 11 ran with
    assert "resumed from" in result.stdout and f"at step 10, batch {batches[11]}" in result.stdout
    # metrics.jsonl: the checkpoint run's records up to step 10, then this run's
    _assert_same_records(_records(out), reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] == reference[-1]["val_loss"]
    assert summary["batch_trajectory"] == [[0, 4], [8, 8], [10, 12]] == _trajectory(reference)
    # --keep-checkpoints 2 (the default): the last two of this run, the end included
    kept = checkpoints.complete_checkpoints(out / "checkpoints")
    last_multiple = (summary["steps"] - 1) // 5 * 5
    assert [p.name for p in kept] == [
        checkpoints.step_name(s) for s in (last_multiple, summary["steps"])
    ]
    # the same job resumed once more: it is complete, says so and exits 0 without writing
    finished = _torchrun(2, _flags(corpus_dir, "--engine", engine, "--resume", "auto"), out)
    assert "the run is complete" in finished.stdout
    assert json.loads((out / "summary.json").read_text()) == summary


def _trajectory(records: list[dict]) -> list[list[int]]:
    changes: list[list[int]] = []
    for r in records:
        if not changes or changes[-1][1] != r["batch_size"]:
            changes.append([r["step"] - 1, r["batch_size"]])
    return changes


def _launch(command: list[str], log: Path, token: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NONGNS_TEST_TOKEN": token}
    env.pop("WORLD_SIZE", None)
    with log.open("w") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _workers(token: str) -> dict[int, int]:
    """rank -> pid of the training processes started with NONGNS_TEST_TOKEN=token."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                   if "=" in item)  # fmt: skip
        if env.get("NONGNS_TEST_TOKEN") == token and "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


def _wait_for_steps(out: Path, steps: int, process: subprocess.Popen, log: Path) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, log.read_text()[-5000:]
        assert time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.01)


#: Long enough (~180 steps, a few seconds) that a signal sent at step 20 arrives mid-run.
FAULT_RUN = [*TINY, "--theta", "0.5", "--max-batch", "32", "--sample-budget", "3200"]


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> list[dict]:
    out = tmp_path_factory.mktemp("fault-reference") / "run"
    _torchrun(2, [*FAULT_RUN, "--corpus-dir", str(corpus_dir)], out)
    return _records(out)


@pytest.mark.distributed
def test_sigterm_saves_at_the_step_boundary_and_resume_auto_finishes(
    tmp_path: Path, corpus_dir: Path, fault_reference: list[dict]
) -> None:
    """What a scheduler's preemption sends: SIGTERM to every training process."""
    out, log, token = tmp_path / "run", tmp_path / "first.log", uuid.uuid4().hex
    command = [*TORCHRUN, "2", str(TRAIN), *FAULT_RUN, "--corpus-dir", str(corpus_dir)]
    command += ["--out", str(out), "--resume", "auto"]
    process = _launch(command, log, token)
    _wait_for_steps(out, 20, process, log)
    workers = _workers(token)
    assert sorted(workers) == [0, 1], workers
    for pid in workers.values():
        os.kill(pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-5000:]  # a clean exit
    stopped = _records(out)
    assert len(stopped) < len(fault_reference), "the signal came after the run had finished"
    saved = checkpoints.complete_checkpoints(out / "checkpoints")
    assert saved[-1] == _step_dir(out, stopped[-1]["step"])  # at the step it stopped after
    assert "SIGTERM: stopped after step" in log.read_text()
    assert not (out / "summary.json").exists()

    result = _run(command, tmp_path)  # the same command again
    assert f"at step {stopped[-1]['step']}" in result.stdout
    _assert_same_records(_records(out), fault_reference)


@pytest.mark.distributed
def test_a_lost_rank_restarts_from_the_last_checkpoint(
    tmp_path: Path, corpus_dir: Path, fault_reference: list[dict]
) -> None:
    """torchrun --max-restarts 1 and --resume auto; rank 1 is SIGKILLed after step 25."""
    out, log, token = tmp_path / "run", tmp_path / "torchrun.log", uuid.uuid4().hex
    command = [*TORCHRUN[:-1], "--max-restarts", "1", "--nproc-per-node", "2", str(TRAIN)]
    command += [*FAULT_RUN, "--corpus-dir", str(corpus_dir), "--out", str(out)]
    command += ["--resume", "auto", "--checkpoint-every", "10"]
    process = _launch(command, log, token)
    _wait_for_steps(out, 25, process, log)
    workers = _workers(token)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    assert process.wait(timeout=180) == 0, log.read_text()[-5000:]
    text = log.read_text()
    resumed_at = int(text.split("resumed from ")[1].split(" at step ")[1].split(",")[0])
    assert resumed_at >= 20 and resumed_at % 10 == 0, resumed_at
    records = _records(out)
    _assert_each_sample_once(records)
    _assert_same_records(records, fault_reference)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("ranks", "micro", "batch"),
    [
        (4, 2, 16),  # 2 -> 4 ranks: the checkpoint's 12 rounds up to a multiple of 8
        (1, 2, 12),  # 2 -> 1 rank: 12 is feasible; one process measures from micro-steps
        (2, 4, 16),  # another micro-batch: unit 8
    ],
)
def test_elastic_resume_converts_the_batch(
    ranks: int,
    micro: int,
    batch: int,
    tmp_path: Path,
    corpus_dir: Path,
    reference_runs: dict[str, Path],
) -> None:
    _check_elastic(reference_runs["ddp"], 15, ranks, micro, batch, tmp_path, corpus_dir, "ddp")


@pytest.mark.distributed
def test_elastic_resume_four_to_two_ranks(
    tmp_path: Path, corpus_dir: Path, reference_runs: dict[str, Path]
) -> None:
    four = tmp_path / "four"
    resume = ["--resume", str(_step_dir(reference_runs["ddp"], 10)), *EVERY]
    _torchrun(4, _flags(corpus_dir, *resume), four)  # 2 -> 4 at batch 8
    step = 15
    checkpoint = checkpoints.read_meta(_step_dir(four, step))
    assert checkpoint["world_size"] == 4
    _check_elastic(four, step, 2, 2, checkpoint["batch_size"], tmp_path, corpus_dir, "ddp")


@pytest.mark.distributed
def test_elastic_resume_deepspeed_two_to_one(
    tmp_path: Path, corpus_dir: Path, deepspeed_ops: None, reference_runs: dict[str, Path]
) -> None:
    _check_elastic(reference_runs["deepspeed"], 15, 1, 4, 12, tmp_path, corpus_dir, "deepspeed")


def _check_elastic(
    source: Path,
    step: int,
    ranks: int,
    micro: int,
    batch: int,
    tmp_path: Path,
    corpus_dir: Path,
    engine: str,
) -> None:
    """Resume ``source``'s checkpoint of ``step`` on ``ranks`` x ``micro``: the controller's
    samples and warm-up go on, the batch becomes ``batch``, the lr multiplier sqrt(batch / 4)."""
    checkpoint = _step_dir(source, step)
    meta = checkpoints.read_meta(checkpoint)
    out = tmp_path / f"elastic-{ranks}x{micro}"
    flags = ["--resume", str(checkpoint), "--micro-batch", str(micro), "--engine", engine]
    _torchrun(ranks, _flags(corpus_dir, *flags), out)
    records = _records(out)
    _assert_each_sample_once(records)
    # metrics.jsonl starts with the checkpoint run's records up to its step
    before = [r for r in records if r["step"] <= step]
    assert before == [r for r in _records(source) if r["step"] <= step]
    first = records[step]  # the first step on the new ranks
    assert first["samples"] == meta["samples"] + batch
    assert first["batch_size"] == batch and first["accumulation"] == batch // (micro * ranks)
    assert first["lr_multiplier"] == pytest.approx(math.sqrt(batch / 4))
    schedule = warmup_cosine(meta["samples"], 320, warmup_fraction=0.1)
    assert first["lr"] == pytest.approx(1e-3 * schedule * math.sqrt(batch / 4))
    assert all(r["batch_size"] >= batch for r in records[step:])  # never smaller afterwards
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == ranks and summary["samples"] >= 320


def _write_checkpoint(path: Path, **meta: object) -> Path:
    path.mkdir(parents=True)
    (path / "trainer.json").write_text(json.dumps({"format": checkpoints.FORMAT, **meta}))
    return path


def test_bad_resume_paths_and_contradicting_flags_are_clean_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(flags: list[str], world: int = 2) -> str:
        with pytest.raises(SystemExit) as exit_info:
            out = [] if "--out" in flags else ["--out", str(tmp_path / "out")]
            cli.parse_args([*flags, *out], world_size=world)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    saved = vars(cli.parse_args(["--out", str(tmp_path / "out")], world_size=2))
    good = _write_checkpoint(
        tmp_path / "run" / "checkpoints" / "step_00000010",
        step=10, samples=80, batch_size=24, world_size=2, micro_batch=4, zero_stage=None,
        args=saved,
    )  # fmt: skip
    args = cli.parse_args(["--resume", str(tmp_path / "run")], world_size=2)
    assert args.resume_from == str(good) and args.start_batch == 24
    args = cli.parse_args(["--resume", str(good)], world_size=4)  # unit 16: 24 -> 32
    assert args.start_batch == 32 and cli.gns_config(args).initial_batch_size == 32
    fresh = ["--resume", "auto", "--out", str(tmp_path / "out")]
    assert cli.parse_args(fresh, world_size=2).resume_from is None  # nothing saved yet
    message = error(["--out", str(tmp_path / "run")])  # a fresh start beside saved checkpoints
    assert "holds checkpoints of an earlier run (latest: step_00000010)" in message

    assert "no such file or directory" in error(["--resume", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint" in error(["--resume", str(tmp_path / "empty")])
    (tmp_path / "file.pt").write_bytes(b"\0")
    assert "train.py checkpoints are directories" in error(["--resume", str(tmp_path / "file.pt")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "trainer.json").write_text('{"format": "something else"}')
    assert "not a checkpoint of launch/train.py" in error(["--resume", str(foreign)])
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "trainer.json").write_text('{"format": "nongns')
    assert "unreadable" in error(["--resume", str(cut)])
    message = error(["--resume", str(good), "--seed", "1", "--theta", "0.3"])
    assert "--seed 0 (this run: 1)" in message and "--theta 0.65 (this run: 0.3)" in message
    zero1 = _write_checkpoint(
        tmp_path / "zero1",
        step=10, samples=80, batch_size=24, world_size=2, micro_batch=4, zero_stage=1,
        args={**saved, "engine": "deepspeed"},
    )  # fmt: skip
    assert "ZeRO-1 checkpoints hold one optimizer partition per rank" in error(
        ["--resume", str(zero1), "--engine", "deepspeed"], world=4
    )
    for flag in ("--checkpoint-every", "--keep-checkpoints"):
        assert f"{flag} must be >= 0" in error([flag, "-1"])


@pytest.mark.distributed
def test_a_truncated_checkpoint_is_a_clean_error_and_overwrites_nothing(
    tmp_path: Path, corpus_dir: Path, reference_runs: dict[str, Path]
) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    checkpoint = out / "checkpoints" / "step_00000010"
    source = _step_dir(reference_runs["ddp"], 10)
    shutil.copytree(source, checkpoint)
    model = checkpoint / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (out / "metrics.jsonl").write_text("kept as it is\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [*TORCHRUN, "2", str(TRAIN), *_flags(corpus_dir, "--out", str(out))]
    result = subprocess.run(
        [*command, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert f"cannot load checkpoint {checkpoint}" in result.stdout + result.stderr
    assert (out / "metrics.jsonl").read_text() == "kept as it is\n"


# -- another run's --out, broken checkpoints under --resume auto, a full disk ---------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _torchrun_fails(
    ranks: int, flags: list[str], out: Path, preexec_fn: Callable[[], None] | None = None
) -> str:
    """The job launched as ``_torchrun`` does it, expected to fail (not to hang: after 120 s
    torchrun and its workers are killed): its stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [*TORCHRUN, str(ranks), str(TRAIN), *flags, "--out", str(out)]
    process = subprocess.Popen(
        command,
        cwd=out.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
        start_new_session=True,  # its own process group: the workers go with it
    )
    try:
        text, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        text, _ = process.communicate()
        pytest.fail("the job hung:\n" + text[-5000:])
    assert process.returncode != 0, text[-3000:]
    return text


@pytest.mark.distributed
def test_resume_into_another_runs_out_is_refused_and_into_an_empty_one_forks(
    tmp_path: Path, corpus_dir: Path, reference_runs: dict[str, Path]
) -> None:
    """--resume A's checkpoint --out B: B holding another run's outputs is refused before
    anything is written (B used to get A's metrics.jsonl, lose its checkpoints after the step
    and its summary.json); into an empty B it is a fork: A's records up to the step, then the
    fork's, equal to the uninterrupted run, and A left as it was."""
    source = reference_runs["ddp"]
    other = tmp_path / "other"  # another run, finished: metrics, checkpoints, summary
    _torchrun(2, _flags(corpus_dir, "--seed", "1", "--sample-budget", "40"), other)
    other_files = _snapshot(other)
    for resume in (_step_dir(source, 10), source):  # a checkpoint; a run directory (its latest)
        said = _torchrun_fails(2, _flags(corpus_dir, "--resume", str(resume)), other)
        assert f"--out {other} holds another run's outputs (metrics.jsonl, summary.json, " in said
        assert "fork" in said and f"--resume {other}" in said  # the two ways on
        assert _snapshot(other) == other_files

    fork = tmp_path / "fork"
    fork.mkdir()  # empty
    source_files = _snapshot(source)
    result = _torchrun(2, _flags(corpus_dir, "--resume", str(_step_dir(source, 25))), fork)
    assert f"resumed from {_step_dir(source, 25)} at step 25" in result.stdout
    _assert_same_records(_records(fork), _records(source))
    assert json.loads((fork / "summary.json").read_text())["resumed_from"] == str(
        _step_dir(source, 25)
    )
    assert _snapshot(source) == source_files


@pytest.mark.distributed
def test_resume_auto_falls_back_to_the_newest_checkpoint_that_loads(
    tmp_path: Path, corpus_dir: Path, reference_runs: dict[str, Path]
) -> None:
    """A run whose two newest checkpoints are broken: step 15's trainer.json lost its "args"
    (skipped when the flags are checked) and step 10's model.pt is cut in half (skipped when it
    fails to load, the process group up). --resume auto warns about each, naming why, resumes
    from step 5 and ends like the uninterrupted run; step 10 named explicitly is an error that
    writes nothing."""
    source = reference_runs["ddp"]
    out = tmp_path / "run"
    shutil.copytree(source, out)
    for later in checkpoints.complete_checkpoints(out / "checkpoints")[3:]:
        shutil.rmtree(later)  # steps 5, 10, 15 left
    meta_file = _step_dir(out, 15) / "trainer.json"
    meta = json.loads(meta_file.read_text())
    del meta["args"]
    meta_file.write_text(json.dumps(meta))
    model = _step_dir(out, 10) / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    metrics = (out / "metrics.jsonl").read_bytes()

    explicit = _flags(corpus_dir, "--resume", str(_step_dir(out, 10)))
    assert f"cannot load checkpoint {_step_dir(out, 10)}" in _torchrun_fails(2, explicit, out)
    assert (out / "metrics.jsonl").read_bytes() == metrics

    result = _torchrun(2, _flags(corpus_dir, "--resume", "auto", *EVERY), out)
    text = result.stdout + result.stderr
    assert f"skipped {_step_dir(out, 15)}: {meta_file}: no 'args' field" in text
    assert f"skipped {_step_dir(out, 10)}: it does not load (RuntimeError: " in text
    assert f"resumed from {_step_dir(out, 5)} at step 5, batch 4" in result.stdout
    _assert_same_records(_records(out), _records(source))
    for step in (10, 15):  # the broken ones replaced by this run's own
        assert checkpoints.read_meta(_step_dir(out, step))["step"] == step


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("disk", "engine"), [("tmpfs", "ddp"), ("tmpfs", "deepspeed"), ("file-size-limit", "ddp")]
)
def test_a_full_disk_is_a_clean_error_that_keeps_the_last_checkpoint(
    disk: str,
    engine: str,
    tmp_path: Path,
    corpus_dir: Path,
    reference_runs: dict[str, Path],
    request: pytest.FixtureRequest,
) -> None:
    """A save that cannot be written stops the job on every rank with an error naming the
    checkpoint directory and the reason; the checkpoint before it stays as it was (its files
    byte for byte the uninterrupted run's, which writes the same bytes), and nothing of the
    failed save is left.

    tmpfs: a real full disk. A tmpfs of 1.5 checkpoints is mounted on tmp_path (root only:
    skipped where mount is refused); the run saves every 5 steps, step 5 fits, step 10's files
    get ENOSPC from the kernel. DeepSpeed writes its files by path, so torch's error there
    carries no errno ("is the disk full?"); the rank that failed inside save_checkpoint used to
    leave the others waiting in DeepSpeed's closing barrier for ever.
    file-size-limit: RLIMIT_FSIZE at half model.pt's size on torchrun and its workers, so that
    writes past it fail with EFBIG (Python ignores SIGXFSZ). Not a full disk: a write failing
    midway, which reaches train.py the same way (torch's opaque writer error with the OSError
    behind it) and runs without root. The run resumes from a copy of step 5, so that a
    checkpoint precedes the failing one."""
    if engine == "deepspeed":
        request.getfixturevalue("deepspeed_ops")
    reference = _step_dir(reference_runs[engine], 5)
    files = sorted(f.name for f in reference.iterdir() if f.name != "trainer.json")
    mounted = None
    try:
        if disk == "tmpfs":
            disk_dir = tmp_path / "disk"
            disk_dir.mkdir()
            size = sum(f.stat().st_size for f in reference.iterdir()) * 3 // 2
            mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk_dir)]
            if os.geteuid() != 0 or shutil.which("mount") is None:
                pytest.skip("mounting a tmpfs needs root")
            if subprocess.run(mount, capture_output=True).returncode:
                pytest.skip("mount -t tmpfs refused here")
            mounted = disk_dir
            out, flags, limit = mounted / "run", _flags(corpus_dir, *EVERY), None
        else:
            out = tmp_path / "run"
            shutil.copytree(reference, _step_dir(out, 5))
            shutil.copy(reference_runs[engine] / "metrics.jsonl", out)
            flags = _flags(corpus_dir, *EVERY, "--resume", "auto")
            limit = (reference / "model.pt").stat().st_size // 2  # metrics.jsonl stays below

        def limit_file_size() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        text = _torchrun_fails(2, [*flags, "--engine", engine], out, limit_file_size)
        assert f"cannot save checkpoint {_step_dir(out, 10)}" in text
        reasons = {
            ("tmpfs", "ddp"): "the disk is full ([Errno 28] No space left on device)",
            ("tmpfs", "deepspeed"): "the write failed, is the disk full? (RuntimeError: ",
            ("file-size-limit", "ddp"): "([Errno 27] File too large)",
        }
        assert reasons[disk, engine] in text
        assert f"the latest checkpoint {_step_dir(out, 5)} is as it was" in text
        assert sorted(os.listdir(out / "checkpoints")) == ["step_00000005"]  # no partial left
        for name in files:
            assert (_step_dir(out, 5) / name).read_bytes() == (reference / name).read_bytes()
        assert _records(out)[-1]["step"] == 10  # it stopped at the save that failed
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("args", None, "no 'args' field (train.py writes ["),
        ("step", "ten", "'step' is 'ten', expected int"),
        ("args", [], "'args' is [], expected dict"),
        ("zero_stage", "1", "'zero_stage' is '1', expected int or null"),
        ("world_size", 0, "'world_size' is 0, expected >= 1"),
    ],
)
def test_a_malformed_trainer_json_is_an_error_naming_the_file_and_the_field(
    field: str, value: object, message: str, tmp_path: Path
) -> None:
    """``python launch/train.py --resume CHECKPOINT`` whose trainer.json lacks a field (None
    here: removed) or has one of the wrong type: exit code 2 and the parser's message naming
    the file and the field (a missing "args" was a KeyError traceback), nothing written."""
    saved = vars(cli.parse_args(["--out", str(tmp_path / "run")], world_size=1))
    meta: dict[str, object] = dict(
        step=10, samples=80, batch_size=8, world_size=1, micro_batch=4, zero_stage=None, args=saved
    )
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    checkpoint = _write_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000010", **meta)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(TRAIN), "--resume", str(checkpoint)]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {checkpoint / 'trainer.json'}: {message}" in result.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]
