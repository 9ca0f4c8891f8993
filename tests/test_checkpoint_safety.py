"""Untrusted DeepSpeed checkpoints: DeepSpeed unpickles its files with
``torch.load(weights_only=False)``, so a crafted file runs code on ``engine.load_checkpoint``.
``check_checkpoint`` opens them with ``weights_only=True`` first; the plugin's load calls it.
A crafted file is refused with its name and its code does not run (a marker file it would
create stays absent); genuine checkpoints of ZeRO 0-3, fp32 and bf16, still load."""

from __future__ import annotations

import contextlib
import glob
import os
import pickle

import pytest
import torch
from torch import nn

import nongns_dist.deepspeed as nds

from .distributed import spawn

deepspeed = pytest.importorskip("deepspeed")

MICRO = 2


class Payload:
    """Unpickling it runs code: here, it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _craft(file, marker, raw=False):
    """Replace ``file`` by its own content plus an object that runs code when unpickled."""
    state = {}
    if os.path.exists(file):
        with torch.serialization.safe_globals(nds._safe_globals(())):
            state = torch.load(file, map_location="cpu", weights_only=True)
    state["payload"] = Payload(marker)
    if raw:  # a plain pickle, not torch's zip format
        with open(file, "wb") as f:
            pickle.dump(state, f, protocol=2)
    else:
        torch.save(state, file)


def _assert_payload_live(file, marker):
    """The refusal meant something: DeepSpeed's unrestricted load of the same file runs its
    code (a raw pickle runs it, then fails torch's format check)."""
    assert not os.path.exists(marker)
    with contextlib.suppress(RuntimeError):
        torch.load(file, map_location="cpu", weights_only=False)
    assert os.path.exists(marker)


# -- check_checkpoint on files ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True], ids=["torch zip", "raw pickle"])
def test_crafted_file_refused_by_name_without_running(tmp_path, raw):
    tag_dir = tmp_path / "ckpt" / "global_step3"
    tag_dir.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step3\n")
    torch.save({"module": {"w": torch.ones(2)}}, tag_dir / "zero_pp_rank_0_optim_states.pt")
    crafted = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, crafted)
    assert nds.check_checkpoint(tmp_path / "ckpt") == [
        str(crafted), str(tag_dir / "zero_pp_rank_0_optim_states.pt")
    ]  # fmt: skip
    marker = str(tmp_path / "marker")
    _craft(str(crafted), marker, raw=raw)
    for tag in (None, "global_step3"):  # through the latest file, and by name
        with pytest.raises(nds.UnsafeCheckpointError) as info:
            nds.check_checkpoint(str(tmp_path / "ckpt"), tag)
        assert str(crafted) in str(info.value) and "weights_only=True" in str(info.value)
        assert not os.path.exists(marker), "the crafted file's code ran"
    _assert_payload_live(str(crafted), marker)


def test_tag_resolution_follows_deepspeed(tmp_path):
    (tmp_path / "a").mkdir()
    torch.save({"x": 1}, tmp_path / "a" / "mp_rank_00_model_states.pt")
    (tmp_path / "u").mkdir()
    torch.save({"x": 2}, tmp_path / "u" / "mp_rank_00_model_states.pt")
    assert nds.check_checkpoint(tmp_path) == []  # no latest file: DeepSpeed loads nothing
    assert nds.check_checkpoint(tmp_path, "missing") == []  # no such tag: nor here
    (tmp_path / "latest").write_text("a")
    (tmp_path / "latest_universal").write_text("u")
    assert nds.check_checkpoint(tmp_path) == [str(tmp_path / "a" / "mp_rank_00_model_states.pt")]
    got = nds.check_checkpoint(tmp_path, universal=True)
    assert got == [str(tmp_path / "u" / "mp_rank_00_model_states.pt")]
    # sub-folders too (a universal checkpoint keeps one per parameter)
    (tmp_path / "u" / "zero" / "0.weight").mkdir(parents=True)
    torch.save({"param": torch.ones(1)}, tmp_path / "u" / "zero" / "0.weight" / "fp32.pt")
    assert len(nds.check_checkpoint(tmp_path, "u")) == 2


def test_user_classes_allowed_explicitly(tmp_path):
    (tmp_path / "t").mkdir()
    torch.save({"client": _UserState(3)}, tmp_path / "t" / "mp_rank_00_model_states.pt")
    with pytest.raises(nds.UnsafeCheckpointError, match="_UserState"):
        nds.check_checkpoint(tmp_path, "t")
    assert len(nds.check_checkpoint(tmp_path, "t", safe_globals=(_UserState,))) == 1


class _UserState:
    def __init__(self, n):
        self.n = n


# -- real engines (gloo, CPU, 2 processes) --------------------------------------------------------


def _engine(stage, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": stage},
        "nongns": {"enabled": True, "norm": "l1", "interval": 1, "adapt_batch_size": False},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    engine, *_ = nds.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _full_state(engine):
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().float().clone() for p in params]


def _save_load_and_crafted(rank, world, stage, directory, marker):
    import torch.distributed as dist

    out = {}
    for dtype in ("fp32", "bf16"):
        load_dir = os.path.join(directory, dtype)
        engine = _engine(stage, dtype)
        x = torch.randn(MICRO, 8, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        engine.save_checkpoint(load_dir, tag="good")  # writes the latest file too
        fresh = _engine(stage, dtype)
        path, _ = fresh.load_checkpoint(load_dir)  # the plugin checks every file first
        same = all(
            torch.equal(a, b) for a, b in zip(_full_state(engine), _full_state(fresh), strict=True)
        )
        files = sorted(os.path.basename(f) for f in nds.check_checkpoint(load_dir))
        out[dtype] = (path is not None, same, fresh.nongns.samples, files)
    # the model-states file of the fp32 checkpoint replaced by a crafted one
    load_dir = os.path.join(directory, "fp32")
    crafted = sorted(glob.glob(os.path.join(load_dir, "good", "*model_states.pt")))[0]
    if rank == 0:
        _craft(crafted, marker)
    dist.barrier()
    victim = _engine(stage, "fp32")
    try:
        victim.load_checkpoint(load_dir)
    except nds.UnsafeCheckpointError as exc:
        out["refused"] = str(exc)
    out["crafted"] = crafted
    out["marker"] = os.path.exists(marker)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_plugin_refuses_crafted_checkpoint_and_loads_genuine(stage, tmp_path, deepspeed_ops):
    marker = str(tmp_path / "marker")
    for out in spawn(_save_load_and_crafted, 2, stage, str(tmp_path / "ckpt"), marker):
        for dtype in ("fp32", "bf16"):
            loaded, same, samples, files = out[dtype]
            assert loaded and same, (dtype, "a genuine checkpoint must load, identical")
            assert samples == MICRO * 2, dtype  # the plugin's state came back too
            assert any("model_states" in f for f in files), files
            if stage > 0:  # the optimizer partitions, checked too
                assert sum("optim_states" in f for f in files) == 2, files
        assert "refused" in out, "the crafted checkpoint was loaded"
        assert out["refused"].startswith(out["crafted"] + ": refused")
        assert not out["marker"], "the crafted file's code ran during load_checkpoint"
    assert not os.path.exists(marker)
    _assert_payload_live(out["crafted"], marker)
