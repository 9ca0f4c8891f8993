"""``nongns_dist.hf.attach`` on the real transformers ``Trainer``, a tiny ``LlamaForCausalLM``
built from a config (no downloads), 2 gloo ranks: DDP and DeepSpeed ZeRO-2.

The batch follows a schedule chosen so that one decision cannot take effect at once (the
Trainer's micro-batch index is not a multiple of the new count: it waits two steps), an epoch
ends in a short window, and the sample budget ends the run. Checked against what the Trainer
itself reports: every optimizer step ran exactly the micro-batches of its count, replicas stay
identical, the logged lr is the schedule at samples / first batch, a resume from the pending
checkpoint and from the epoch's end reproduces the uninterrupted run bit for bit, and (DDP)
the estimate equals ``estimate_gns`` on the gathered local gradients; a measure-only run
trains bit for bit like a plain Trainer."""

from __future__ import annotations

import copy
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed as dist

from nongns_dist import GNSConfig, estimate_gns
from nongns_dist.estimators import MomentPool

from .distributed import spawn
from .float32_bounds import Float32Bound

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]')")

VOCAB, SEQ, MICRO = 64, 12, 2
#: 2 ranks x micro 2: 14 micro-batches per rank and epoch
EXAMPLES = 56
LR = 1e-3
#: batch 4 (1 micro-step), 12 (3) from 16 samples, 16 (4) from 48: the count 3 is decided at
#: micro-batch 4 of the epoch and waits until 6; the count 4 meets the epoch's end at 12 + 2
SCHEDULE = [(0, 4), (16, 12), (48, 16)]
#: max_steps 20 at the first batch 4: a budget of 80 samples, reached after step 11
MAX_STEPS = 20


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences, every token a label: each example has the same label count, so
    the Trainer's token-normalised loss is the example mean."""

    def __init__(self, n: int = EXAMPLES) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out, *, gas=1, deepspeed=None, save_at=(), callbacks=(), **overrides):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_save = control.should_save or state.global_step in save_at

    args = {
        "output_dir": out, "per_device_train_batch_size": MICRO,
        "gradient_accumulation_steps": gas, "max_steps": MAX_STEPS, "learning_rate": LR,
        "lr_scheduler_type": "linear", "logging_steps": 1, "save_strategy": "steps",
        "save_steps": 10**6, "report_to": [], "use_cpu": True, "seed": 0,
        "dataloader_drop_last": True, "disable_tqdm": True, "deepspeed": deepspeed,
        **overrides,
    }  # fmt: skip
    return Trainer(
        model=_model(),
        args=TrainingArguments(**args),
        train_dataset=_Tokens(),
        callbacks=[SaveAt(), *callbacks],
    )


class _Record:
    """Per optimizer step, from the Trainer's own callbacks: the micro-batches it ran; from the
    monitor's events: the count and samples the step was closed with."""

    def __init__(self, driver=None) -> None:
        from transformers import TrainerCallback

        record = self
        self.windows: list[int] = []
        self.events: list[tuple[int, int, int]] = []
        self._micro = 0

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if driver is not None:
                    driver.monitor.subscribe(
                        lambda e: record.events.append((e.step, e.accumulation_steps, e.samples))
                    )

            def on_substep_end(self, args, state, control, **kw):
                record._micro += 1

            def on_step_end(self, args, state, control, **kw):
                record.windows.append(record._micro + 1)
                record._micro = 0

        self.callback = Callback()


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _identical_on_every_rank(model) -> bool:
    mine = _params(model)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return all(torch.equal(mine, other) for other in everyone)


def _train_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


def _run(out, deepspeed, config, *, resume=None, save_at=()):
    from nongns_dist.hf import attach

    trainer = _trainer(out, deepspeed=deepspeed, save_at=save_at)
    driver = attach(trainer, config)
    record = _Record(driver)
    trainer.add_callback(record.callback)
    trainer.train(resume_from_checkpoint=resume)
    return {
        "windows": record.windows,
        "events": record.events,
        "logs": _train_logs(trainer),
        "params": _params(trainer.model),
        "identical": _identical_on_every_rank(trainer.model),
        "gas_after": trainer.args.gradient_accumulation_steps,
    }


class _RunsCode:
    """Pickles to a call of os.system: what a crafted checkpoint file would hold."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _growth_worker(rank, world, out, deepspeed):
    config = None if deepspeed else GNSConfig(norm="auto", interval=1, batch_schedule=SCHEDULE)
    full = _run(out, deepspeed, config, save_at=(5, 9))
    resumed = {
        step: _run(out + f"-from{step}", deepspeed, config, resume=f"{out}/checkpoint-{step}")
        for step in (5, 9)
    }
    # a crafted checkpoint: DeepSpeed's model file (DeepSpeed) or each rank's own file (DDP)
    crafted, marker = out + "-crafted", out + "-code-ran"
    if rank == 0:
        shutil.copytree(f"{out}/checkpoint-9", crafted)
    dist.barrier()
    if deepspeed is None:
        torch.save({"x": _RunsCode(marker)}, f"{crafted}/nongns_rank{rank}.pt")
    elif rank == 0:
        torch.save({"x": _RunsCode(marker)}, f"{crafted}/global_step9/mp_rank_00_model_states.pt")
    dist.barrier()
    try:
        _run(out + "-from-crafted", deepspeed, config, resume=crafted)
        refused = None
    except pickle.UnpicklingError as exc:  # weights_only's error, and UnsafeCheckpointError
        refused = type(exc).__name__
    return full, resumed, (refused, os.path.exists(marker))


def _linear(before, after):
    """The lr the step ran with (the Trainer logs it before stepping its scheduler; the
    multiplier is not in it): linear decay at samples / first batch."""
    return LR * (1 - before / 4 / MAX_STEPS)


def _check_growth(full, resumed, crafted, lr_of=_linear):
    unit = MICRO * 2
    # the Trainer's count per step: 1 x 6 (3 decided after step 4, pending until micro-batch 6),
    # 3 x 2, then 4 meets the epoch's end (2 left), then 4 x 2 until 80 samples
    assert full["windows"] == [1, 1, 1, 1, 1, 1, 3, 3, 2, 4, 4], full["windows"]
    assert [count for _, count, _ in full["events"]] == full["windows"]
    samples = [unit * sum(full["windows"][: i + 1]) for i in range(len(full["windows"]))]
    assert [seen for *_, seen in full["events"]] == samples
    assert full["identical"], "replicas differ: some optimizer step applied an unreduced gradient"
    assert full["gas_after"] == 1, "the user's arguments are given back after training"
    logs = full["logs"]
    assert [log["step"] for log in logs] == list(range(1, 12))
    for log, before, after in zip(logs, [0, *samples[:-1]], samples, strict=True):
        assert log["learning_rate"] == pytest.approx(lr_of(before, after), rel=1e-6), log["step"]
    assert logs[3]["nongns/pending_accumulation_steps"] == 3  # decided, not yet exact
    assert logs[3]["nongns/accumulation_steps"] == 1 and logs[5]["nongns/accumulation_steps"] == 3
    assert logs[-1]["nongns/samples"] == 88 and "nongns/gns_raw" in logs[-1]
    for step, run in resumed.items():
        assert run["windows"] == full["windows"][step:], (step, run["windows"])
        assert run["events"] == full["events"][step:]
        # the history up to the checkpoint comes back from it, the rest is logged again
        assert run["logs"] == logs, f"resumed from step {step}: the logs differ"
        assert torch.equal(run["params"], full["params"]), f"resumed from step {step}"
        assert run["identical"]
    refused, code_ran = crafted
    assert refused is not None and not code_ran, "a crafted checkpoint file was unpickled"


@pytest.mark.distributed  # 2 gloo ranks, a few Trainers each
@pytest.mark.slow
def test_trainer_ddp_grows_the_batch_exactly_and_resumes_exactly(tmp_path):
    full, resumed, crafted = spawn(_growth_worker, 2, str(tmp_path / "run"), None)[0]
    _check_growth(full, resumed, crafted)


def _warmup_decay(before, after):
    """DeepSpeed's WarmupDecayLR as the Trainer fills it ("auto": a warm-up of 1 step, the least
    DeepSpeed takes, decay to 0 at max_steps), stepped inside engine.step(): the Trainer logs it
    after that step, so the lr of the next step, at samples / first batch."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    schedule = WarmupDecayLR(optimizer, MAX_STEPS, 0, LR, warmup_num_steps=1)
    schedule.step(last_batch_iteration=after // 4 - 1)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.distributed  # 2 gloo ranks, a few Trainers each
@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["trainer", "deepspeed"])
def test_trainer_deepspeed_zero2_grows_the_batch_exactly_and_resumes_exactly(
    deepspeed_ops, tmp_path, scheduler
):
    """ZeRO-2 from the Trainer's JSON, the config from its "nongns" section ("norm": "auto"
    included, which accelerate would otherwise take for a value to fill); the lr schedule the
    Trainer's (stepped by the Trainer) or the JSON's (stepped by DeepSpeed)."""
    ds = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2},
        "zero_force_ds_cpu_optimizer": False,
        "nongns": {"norm": "auto", "interval": 1, "batch_schedule": SCHEDULE},
    }  # fmt: skip
    lr_of = _linear
    if scheduler == "deepspeed":
        ds["scheduler"] = {"type": "WarmupDecayLR", "params": dict.fromkeys(
            ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps"), "auto"
        )}  # fmt: skip
        lr_of = _warmup_decay
    full, resumed, crafted = spawn(_growth_worker, 2, str(tmp_path / "run"), ds)[0]
    _check_growth(full, resumed, crafted, lr_of)


# -- estimates and bit identity (DDP) ------------------------------------------------------------


def _equality_worker(rank, world, out):
    from transformers import TrainerCallback

    from nongns_dist.hf import attach

    acc = 2
    trainer = _trainer(out, gas=acc, max_steps=3)
    config = GNSConfig(norm="auto", interval=1, adapt_batch_size=False)
    driver = attach(trainer, config)
    reference = copy.deepcopy(trainer.model)
    inputs: list[dict] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, batch, *args, **kwargs):
        inputs.append({k: v.detach().clone() for k, v in batch.items()})
        return compute_loss(model, batch, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    results = []
    pool, bound = MomentPool.for_config(config), Float32Bound(config.pool_dof)  # across steps

    class Compare(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            # the window's gradients are reduced, the parameters not yet updated: this rank's
            # local gradient, from the same inputs, on a plain copy
            monitor = driver.monitor
            norms = {t.name: t.norm.name for t in monitor.plan.params}
            reference.load_state_dict(trainer.model.state_dict())
            reference.zero_grad()
            for batch in inputs:
                (reference(**batch).loss / acc).backward()
            inputs.clear()
            local = {
                n: p.grad.detach().double() for n, p in reference.named_parameters() if n in norms
            }
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
            self.pending = (gathered, norms)

        def on_step_end(self, args, state, control, **kw):
            gathered, norms = self.pending
            monitor = driver.monitor
            expected = estimate_gns(gathered, MICRO * acc, norms, pool=pool)
            tol = bound.step(gathered, MICRO * acc, norms, pool)
            results.append((monitor.last_estimate, expected, tol))

    trainer.add_callback(Compare())
    trainer.train()
    return results


@pytest.mark.distributed  # 2 gloo ranks, a few Trainers each
@pytest.mark.slow
def test_trainer_ddp_estimate_equals_reference_on_gathered_local_gradients(tmp_path):
    results = spawn(_equality_worker, 2, str(tmp_path / "run"))[0]
    assert len(results) == 3
    for got, want, tol in results:  # tolerances: float32_bounds
        assert (got.num_samples, got.sample_size) == (2, MICRO * 2)
        assert got.noise == pytest.approx(want.noise, rel=tol.noise)
        assert got.signal == pytest.approx(want.signal, rel=tol.signal)
        assert got.pooled_noise == pytest.approx(want.pooled_noise, rel=tol.pooled_noise)


def _bit_identity_worker(rank, world, out):
    from nongns_dist.hf import attach

    params = []
    for attached in (False, True):
        trainer = _trainer(f"{out}-{attached}", gas=2, max_steps=4)
        if attached:  # measure only: every step measures, the batch stays
            attach(trainer, GNSConfig(norm="auto", interval=1, adapt_batch_size=False))
        trainer.train()
        params.append(_params(trainer.model))
    return torch.equal(*params)


@pytest.mark.distributed  # 2 gloo ranks, a few Trainers each
@pytest.mark.slow
def test_trainer_measure_only_trains_bit_for_bit_like_a_plain_trainer(tmp_path):
    assert spawn(_bit_identity_worker, 2, str(tmp_path / "run")) == [True, True]


# -- refusals (one process) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train_sampling_strategy": "batch_rebalance"}, "batch_rebalance"),
        ({"accelerator_config": {"gradient_accumulation_kwargs": {"sync_each_batch": True}}},
         "sync_each_batch"),
        ({"auto_find_batch_size": True}, "auto_find_batch_size"),
        ({"dataloader_drop_last": False, "per_device_train_batch_size": 3}, "dataloader_drop_last"),
    ],
)  # fmt: skip
def test_what_the_trainer_cannot_do_with_a_changing_count_is_refused(tmp_path, overrides, match):
    from nongns_dist.hf import attach

    trainer = _trainer(str(tmp_path), **overrides)
    with pytest.raises(ValueError, match=match):
        attach(trainer, GNSConfig(norm="auto"))


def test_a_first_batch_other_than_the_trainers_is_refused(tmp_path):
    from nongns_dist.hf import attach

    trainer = _trainer(str(tmp_path), gas=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        attach(trainer, GNSConfig(norm="auto", initial_batch_size=MICRO))


@pytest.mark.slow
def test_one_process_trainer_measures_its_micro_steps_and_grows(tmp_path):
    """No process group: the samples are the micro-steps of each window (local capture); the
    count 2 -> 3 is exact at once (micro-batch 6), the epoch's 28th micro-batch is a short
    window of 1, and the budget (20 steps x 4 = 80 samples) ends the run."""
    from nongns_dist.hf import attach

    trainer = _trainer(str(tmp_path), gas=2)
    driver = attach(trainer, GNSConfig(norm="auto", interval=1, batch_schedule=[(0, 4), (12, 6)]))
    record = _Record(driver)
    trainer.add_callback(record.callback)
    trainer.train()
    assert record.windows == [2, 2, 2, *[3] * 7, 1, 3, 3, 3, 3], record.windows
    assert [count for _, count, _ in record.events] == record.windows
    assert record.events[-1][2] == 2 * sum(record.windows) == 80
    assert driver.monitor.last_estimate.num_samples == 3  # the last window's 3 micro-steps


@pytest.mark.slow
def test_epochs_end_the_run_with_every_example_trained_once_per_epoch(tmp_path):
    """No max_steps: 2 epochs of 28 micro-batches; the count grows 2 -> 3 at micro-batch 6 and
    each epoch ends in a short window of 1, so the run trains 2 x 56 samples and ends."""
    from nongns_dist.hf import attach

    trainer = _trainer(str(tmp_path), gas=2, max_steps=-1, num_train_epochs=2)
    driver = attach(trainer, GNSConfig(norm="auto", interval=1, batch_schedule=[(0, 4), (12, 6)]))
    record = _Record(driver)
    trainer.add_callback(record.callback)
    trainer.train()
    epoch = [2, 2, 2, *[3] * 7, 1]
    assert record.windows == epoch + [3] * 9 + [1], record.windows
    assert record.events[-1][2] == 2 * EXAMPLES
