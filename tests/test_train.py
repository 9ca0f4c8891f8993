"""The training job end to end: real torchrun launches on gloo, the two-node script, bad flags."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import checkpoints, cli, runtimes, train
from launch.llama import Llama

from .test_data import TEST_CORPUS_MB

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
TINY = [
    *("--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32"),
    *("--micro-batch", "2", "--initial-batch", "4", "--max-batch", "16"),
    *("--interval", "2", "--warmup-fraction", "0.1", "--sample-budget", "240"),
    *("--eval-every", "10", "--eval-batches", "2", "--corpus-mb", str(TEST_CORPUS_MB)),
]
#: The job the engine comparisons run: SGD, a batch that grows (theta 0.1), and three validation
#: micro-batches on two ranks (the collective forwards of FSDP and ZeRO-3 must not hang on the
#: uneven split).
COMPARED = [*TINY, "--optimizer", "sgd", "--theta", "0.1", "--eval-batches", "3"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in a directory of its own: train.py's default --out (runs/...) is relative to
    the working directory, and a newcomer's checkout holds the README's main job there (a
    finished run's checkpoints, which a fresh start beside them must refuse)."""
    monkeypatch.chdir(tmp_path)


def _run(
    command: list[str], cwd: Path, timeout: float = 120, **env_extra: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _checkpoint(out: Path, name: str = "model.pt") -> dict:
    """A file of the run's last checkpoint (model.pt; rank00000.pt: rank 0's monitor state)."""
    last = checkpoints.complete_checkpoints(out / "checkpoints")[-1]
    return torch.load(last / name, weights_only=True)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


Run = tuple[dict, list[dict]]  # summary.json, metrics.jsonl


def _train_run(out: Path, flags: list[str]) -> Run:
    _run([*TORCHRUN, "2", str(TRAIN), *flags, "--out", str(out)], cwd=out.parent)
    return json.loads((out / "summary.json").read_text()), _records(out)


def _assert_reproduces(name: str, run: Run, reference: Run, noise_rel: float | None) -> None:
    """Same batch schedule, losses to 1e-5; noise, signal and noise scale to ``noise_rel``."""
    (summary, records), (ref_summary, ref_records) = run, reference
    assert summary["batch_trajectory"] == ref_summary["batch_trajectory"], name
    assert [r["batch_size"] for r in records] == [r["batch_size"] for r in ref_records], name
    for mine, ref in zip(records, ref_records, strict=True):
        for key in ("train_loss", "val_loss"):
            if key in ref:
                assert mine[key] == pytest.approx(ref[key], rel=1e-5), (name, ref["step"], key)
        if noise_rel is not None and ref.get("gns_raw") is not None:
            for key in ("gns_raw", "noise_raw", "signal", "gns_pooled", "noise_pooled"):
                if ref[key] is None:  # l2 (SGD here) is not pooled
                    assert mine[key] is None, (name, ref["step"], key)
                    continue
                assert mine[key] == pytest.approx(ref[key], rel=noise_rel), (name, ref["step"], key)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[Path, Run]:
    """The DDP run of COMPARED, the reference of the engine comparisons."""
    out = tmp_path_factory.mktemp("reference") / "ddp"
    return out, _train_run(out, [*COMPARED, "--corpus-dir", str(corpus_dir)])


@pytest.mark.distributed
def test_adaptive_run_on_two_ranks_grows_the_batch(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "run"
    flags = [*TINY, "--theta", "0.1", "--corpus-dir", str(corpus_dir), "--out", str(out)]
    result = _run([*TORCHRUN, "2", str(TRAIN), *flags], cwd=tmp_path)

    summary = json.loads((out / "summary.json").read_text())
    trajectory = summary["batch_trajectory"]
    assert trajectory[0] == [0, 4] and len(trajectory) >= 2, trajectory
    assert all(b1 < b2 for (_, b1), (_, b2) in itertools.pairwise(trajectory))
    assert trajectory[-1][1] <= 16
    assert summary["samples"] >= 240 and summary["world_size"] == 2
    assert "batch trajectory" in result.stdout and "final validation loss" in result.stdout

    records = _records(out)
    assert [r["step"] for r in records] == list(range(1, summary["steps"] + 1))
    assert records[-1]["samples"] == summary["samples"]
    assert records[-1]["val_loss"] == pytest.approx(summary["final_val_loss"])
    measured = [r for r in records if "gns_raw" in r]
    assert len(measured) == pytest.approx(summary["steps"] / 2, abs=1)  # --interval 2
    # The lr multiplier follows the batch: sqrt(B / B0) with B0 = 4.
    for r in records:
        assert r["lr_multiplier"] == pytest.approx((r["batch_size"] / 4) ** 0.5)
        assert r["accumulation"] * 2 * 2 == r["batch_size"]
    # The loop trains at all.
    assert records[-1]["val_loss"] < records[0]["train_loss"]
    # TensorBoard events exactly when the optional extra is installed, and a note when it is not.
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert (out / "tensorboard").is_dir() == has_tensorboard
    assert ("tensorboard is not installed" in result.stdout + result.stderr) != has_tensorboard

    last = checkpoints.complete_checkpoints(out / "checkpoints")[-1]
    assert last.name == checkpoints.step_name(summary["steps"])  # the end of the run is saved
    # The last step's decision is kept for a resume, even if no step ran with it.
    monitor = _checkpoint(out, "rank00000.pt")["monitor"]
    assert monitor["controller"]["batch_size"] >= trajectory[-1][1]
    assert checkpoints.read_meta(last)["args"]["optimizer"] == "signum"
    args = cli.parse_args([*flags, "--resume", "auto"], world_size=2)  # its last checkpoint
    model = Llama(cli.model_config(args, vocab_size=256))
    model.load_state_dict(_checkpoint(out)["model"])


@pytest.mark.distributed
def test_two_nodes_local_script_constant_batch_muon(tmp_path: Path, corpus_dir: Path) -> None:
    """Two torchrun agents as two nodes; constant batch still measures (nuclear, for Muon)."""
    out = tmp_path / "two"
    flags = [*TINY, "--optimizer", "muon", "--batch-mode", "constant"]
    flags += ["--sample-budget", "80", "--corpus-dir", str(corpus_dir), "--out", str(out)]
    _run(["bash", str(REPO / "launch" / "two_nodes_local.sh"), *flags], cwd=tmp_path)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_trajectory"] == [[0, 4]]
    records = _records(out)
    assert {r["batch_size"] for r in records} == {4}
    assert any(r.get("gns_raw") is not None for r in records)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--initial-batch", "6"], "not a multiple of --micro-batch x world size"),
        (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["--theta", "-1"], "theta"),
        (["--max-batch", "4"], "max_batch_size"),
        (["--heads", "3"], "n_heads=3"),
        (["--data", "no/such/file.txt"], "no such file"),
        (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
        (["--zero-stage", "2"], "need --engine deepspeed"),
        (["--fsdp-strategy", "NO_SHARD", "--engine", "fsdp2"], "--fsdp-strategy needs --engine"),
        (["--engine", "fsdp2", "--optimizer", "muon"], "Newton-Schulz orthogonalises whole"),
        (["--engine", "fsdp1", "--optimizer", "specsgd"], "cannot run under --engine fsdp1"),
    ],
)
def test_bad_flags_are_clean_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(flags, world_size=2)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _train_py(flags: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python launch/train.py FLAGS`` as a user types it (one process, no torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(TRAIN), *flags]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--optimizer", "adamw", "--aux-lr", "0.01"],
            "error: --aux-lr applies to --optimizer muon or specsgd only (their non-matrix "
            "parameters, their Newton-Schulz), not adamw: drop it",
        ),
        # given at its default value: still a flag that does nothing for signum
        (["--ns-dtype", "float32"], "--ns-dtype applies to --optimizer muon or specsgd only"),
        (
            ["--optimizer", "sgd", "--estimator", "paper"],
            "--estimator chooses how l1 and nuclear noise is pooled and bias-corrected; --norm "
            "auto with --optimizer sgd (l2) is linear in the moments",
        ),
        (["--norm", "l2", "--estimator", "pooled"], "; --norm l2 is linear in the moments"),
        (
            ["--data", "TEXT", "--corpus-mb", "1", "--corpus-dir", "elsewhere"],
            "--corpus-mb applies to --data stdlib only, not --data TEXT; --corpus-dir applies "
            "to --data stdlib only, not --data TEXT: drop them",
        ),
        (["--val-fraction", "0.1"], "the stdlib corpus holds out whole files of its own"),
        (
            ["--data", "BIN", "--val-bin", "BIN", "--val-fraction", "0.1"],
            "--val-fraction splits the tail of a --data file; --val-bin is the validation set",
        ),
        (["--fsdp-strategy", "NO_SHARD"], "--fsdp-strategy needs --engine fsdp1"),
        (["--zero-stage", "0"], "--zero-stage and --ds-config need --engine deepspeed"),
    ],
)
def test_flags_that_would_do_nothing_are_errors(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    """A flag the chosen optimizer, data source, norm or engine does not use would be ignored
    silently: it is a parser error (exit code 2) naming the flag and what it needs, before any
    process group or output exists."""
    files = {"TEXT": tmp_path / "text.txt", "BIN": tmp_path / "tokens.bin"}
    files["TEXT"].write_bytes(b"some text to train on\n" * 200)
    files["BIN"].write_bytes(bytes(range(256)) * 16)
    for name, file in files.items():
        flags = [str(file) if f == name else f for f in flags]
        message = message.replace(name, str(file))
    result = _train_py([*flags, "--out", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_flags_for_the_chosen_optimizer_and_data_are_accepted(tmp_path: Path) -> None:
    """The same flags where they act: no error."""
    text, tokens = tmp_path / "text.txt", tmp_path / "tokens.bin"
    text.write_bytes(b"some text to train on\n" * 200)
    tokens.write_bytes(bytes(range(256)) * 16)
    for flags in (
        ["--optimizer", "muon", "--aux-lr", "0.01", "--ns-dtype", "bfloat16"],
        ["--optimizer", "specsgd", "--aux-lr", "0.01", "--estimator", "paper"],
        ["--optimizer", "sgd", "--norm", "l1", "--estimator", "paper"],
        ["--data", str(text), "--val-fraction", "0.1"],
        ["--data", str(tokens), "--val-bin", str(tokens)],
        ["--corpus-mb", "1", "--corpus-dir", str(tmp_path / "corpus")],
        ["--engine", "fsdp1", "--fsdp-strategy", "NO_SHARD"],
        ["--engine", "deepspeed", "--zero-stage", "1"],
    ):
        cli.parse_args([*flags, "--out", str(tmp_path / "out")], world_size=2)


def test_help_describes_the_job_and_offers_every_engine() -> None:
    """--help's description is the first paragraph of train.py's docstring, and --engine offers
    exactly the runtimes there are (the CLI names them without importing the engines)."""
    assert train.__doc__ is not None
    first = train.__doc__.split("\n\n")[0]
    assert " ".join(cli.DESCRIPTION.split()) == " ".join(first.split())
    assert tuple(runtimes.RUNTIMES) == cli.ENGINES


def test_single_process_fsdp_is_refused_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.parse_args([], world_size=1).engine == "ddp"  # one process: the plain module
    with pytest.raises(SystemExit):
        cli.parse_args(["--engine", "fsdp2"], world_size=1)
    assert "one process runs with --engine ddp" in capsys.readouterr().err


def test_device_flags_resolve_and_refuse_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    """--device auto picks CUDA when torch finds it; --device cuda without it is a parser error
    naming the fix; --autocast bf16 is accepted on either device."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cli.parse_args([], world_size=2).device == expected  # the default: auto
    assert cli.parse_args(["--device", "cpu"], world_size=2).device == "cpu"
    args = cli.parse_args(["--device", "cpu", "--autocast", "bf16"], world_size=2)
    assert (args.device, args.autocast) == ("cpu", "bf16")
    assert (
        "device" in checkpoints.RESUME_MAY_CHANGE
        and "autocast" not in checkpoints.RESUME_MAY_CHANGE
    )
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args(["--device", "cuda"], world_size=2)
        assert exit_info.value.code == 2
        assert "--device cuda: torch finds no CUDA device" in capsys.readouterr().err
        assert runtimes.training_device(args) == torch.device("cpu")


@pytest.mark.distributed
def test_bf16_autocast_on_the_cpu_trains_close_to_float32(tmp_path: Path, corpus_dir: Path) -> None:
    """One process, --device cpu: the bf16-autocast run trains to the float32 run's loss (the
    forward differs in its last bits, so the losses are not equal), and the run notes it."""
    flags = [*TINY, "--sample-budget", "96", "--corpus-dir", str(corpus_dir), "--device", "cpu"]
    runs = {}
    for mode in ("none", "bf16"):
        out = tmp_path / mode
        result = _run(
            [*TORCHRUN, "1", str(TRAIN), *flags, "--autocast", mode, "--out", str(out)],
            cwd=tmp_path,
        )
        runs[mode] = json.loads((out / "summary.json").read_text()), _records(out)
        assert ("(bf16 autocast)" in result.stdout) == (mode == "bf16")
    (fp32, _), (bf16, bf16_records) = runs["none"], runs["bf16"]
    assert bf16["args"]["autocast"] == "bf16" and bf16["args"]["device"] == "cpu"
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], rel=0.02)
    assert bf16["final_val_loss"] != fp32["final_val_loss"]
    assert any("gns_raw" in r for r in bf16_records)  # measured from bf16-forward gradients


def test_deepspeed_config_flags_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(flags: list[str]) -> str:
        with pytest.raises(SystemExit):
            cli.parse_args(flags, world_size=2)
        return capsys.readouterr().err

    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "gradient_clipping": 1.0}))
    staged = tmp_path / "staged.json"
    staged.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": False}}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    ds = ["--engine", "deepspeed"]
    assert "['optimizer', 'gradient_clipping']" in error([*ds, "--ds-config", str(owned)])
    assert "contradicts --ds-config's stage 1" in error(
        [*ds, "--ds-config", str(staged), "--zero-stage", "2"]
    )
    assert "broken.json" in error([*ds, "--ds-config", str(broken)])
    assert "--ds-config need --engine deepspeed" in error(["--ds-config", str(staged)])
    assert "needs --zero-stage 0" in error([*ds, "--optimizer", "muon", "--zero-stage", "2"])

    args = cli.parse_args([*ds, "--ds-config", str(staged), "--initial-batch", "16"], 2)
    config = cli.deepspeed_config(args, world_size=2)
    assert config["zero_optimization"] == {"stage": 1} and config["bf16"] == {"enabled": False}
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 0.0
    assert config["zero_allow_untested_optimizer"] is True
    assert config["nongns"] == cli.gns_config(args).to_dict()


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_engine_reproduces_the_ddp_run(
    tmp_path: Path, corpus_dir: Path, deepspeed_ops: None, ddp_run: tuple[Path, Run]
) -> None:
    """The same job on DeepSpeed stage 0, ZeRO-2 and ZeRO-3: the reference is the DDP run.

    Stage 0 measures per-rank samples like DDP, so losses, noise scales and batches agree;
    ZeRO-2/3 measure per-micro-step samples (a different, valid estimate), so there the
    trajectory is pinned by the losses and the batch schedule."""
    _, reference = ddp_run
    assert len(reference[0]["batch_trajectory"]) >= 2  # the batch grew
    runs = {}
    for stage in ("0", "2", "3"):
        flags = [*COMPARED, "--corpus-dir", str(corpus_dir), "--engine", "deepspeed"]
        runs[stage] = _train_run(tmp_path / f"zero{stage}", [*flags, "--zero-stage", stage])
        _assert_reproduces(f"zero{stage}", runs[stage], reference, 1e-6 if stage == "0" else None)
    assert checkpoints.complete_checkpoints(tmp_path / "zero3" / "checkpoints")
    assert runs["3"][0]["parameters"] == reference[0]["parameters"]  # counted before ZeRO-3


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_engines_reproduce_the_ddp_run(
    tmp_path: Path, corpus_dir: Path, ddp_run: tuple[Path, Run]
) -> None:
    """FSDP2 (fully_shard per block, then the root) and FSDP1 (FULL_SHARD) against DDP.

    Every rank builds the same weights from --seed and draws its windows from (seed, rank, step),
    so each rank's gradient is its DDP twin's, and FSDP's reduce-scatter averages the two ranks
    as DDP's all-reduce does: losses, noise scales and batches agree (bitwise on two gloo ranks),
    and so do the full state dicts written on rank 0. With clipping the global norm is summed in
    another order (per shard, then across ranks): the clip factor differs in the last bits, and
    the noise scale, a difference of near-equal sums, drifts from the DDP run (1e-6 after 9
    steps, 2e-5 after 19 on the full budget), so the clipped runs are short (7 steps)."""
    ddp_out, reference = ddp_run
    ddp_checkpoint = _checkpoint(ddp_out)
    ddp_state = _checkpoint(ddp_out, "rank00000.pt")["monitor"]["controller"]
    flags = [*COMPARED, "--corpus-dir", str(corpus_dir)]
    clipped = [*flags, "--grad-clip", "0.5", "--sample-budget", "64"]
    clipped_reference = _train_run(tmp_path / "ddp-clipped", clipped)
    for engine in ("fsdp2", "fsdp1"):
        out = tmp_path / engine
        run = _train_run(out, [*flags, "--engine", engine])
        _assert_reproduces(engine, run, reference, 1e-5)
        assert run[0]["engine"] == engine and run[0]["parameters"] == reference[0]["parameters"]

        checkpoint = _checkpoint(out)
        assert checkpoint["model"].keys() == ddp_checkpoint["model"].keys()
        for key, value in ddp_checkpoint["model"].items():  # full tensors, the plain names
            torch.testing.assert_close(checkpoint["model"][key], value, rtol=1e-5, atol=1e-7)
        momenta = checkpoint["optimizer"]["state"]  # the full state, keyed by parameter name
        assert momenta.keys() == ddp_checkpoint["model"].keys()
        assert momenta["lm_head.weight"]["momentum_buffer"].shape == (256, 32)
        state = _checkpoint(out, "rank00000.pt")["monitor"]["controller"]
        assert state.keys() == ddp_state.keys()
        for key, value in ddp_state.items():  # pooled_noise is None: l2 (SGD) is not pooled
            assert state[key] == (value if value is None else pytest.approx(value, rel=1e-5)), key
        run = _train_run(tmp_path / f"{engine}-clipped", [*clipped, "--engine", engine])
        _assert_reproduces(f"{engine} clipped", run, clipped_reference, 1e-5)


@pytest.mark.distributed
def test_deepspeed_launcher_script(tmp_path: Path, corpus_dir: Path, deepspeed_ops: None) -> None:
    """DeepSpeed's launcher (it appends --local_rank=N) on one node, ZeRO-1."""
    out = tmp_path / "ds"
    flags = [*TINY, "--sample-budget", "80", "--zero-stage", "1"]
    flags += ["--corpus-dir", str(corpus_dir), "--out", str(out)]
    with socket.socket() as s:  # a free port for the launcher's rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = str(REPO / "launch" / "deepspeed_launcher.sh")
    _run(["bash", script, *flags], cwd=tmp_path, MASTER_PORT=port)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 2
    assert summary["samples"] >= 80 and checkpoints.complete_checkpoints(out / "checkpoints")
