"""Bad inputs at the API boundary: each one a clear error (type, the argument, the value, what is
allowed) before anything is hooked or any rank diverges; nothing silently ignored."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nongns_dist import GNSConfig, attach, estimate_gns
from nongns_dist.capture.plan import plan_entries

from .distributed import spawn

MICRO = 2


class WithEmpty(nn.Module):
    """A linear layer and an empty matrix parameter (0 elements)."""

    def __init__(self, shape=(0, 5)):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.empty = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        return self.lin(x) + self.empty.sum()


class SparseEmbedding(nn.Module):
    def __init__(self, sparse=True):
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.emb(x))


class Complex(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))

    def forward(self, x):
        return self.lin(x) + (self.w.abs() ** 2).sum()


def _x(seed, rows=MICRO):
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed))


def _steps(model, monitor, steps, seed=0, rank=0):
    for step in range(steps):
        for micro in monitor.micro_steps():
            with micro:
                x = _x(1000 * rank + 100 * seed + 10 * step + micro.index)
                (model(x).square().mean() / micro.loss_divisor).backward()
        monitor.step_done()


def _unhooked(model):
    """Nothing was attached: no monitor, no tensor hook left on any parameter."""
    return getattr(model, "_nongns_monitor", None) is None and all(
        not p._backward_hooks for p in model.parameters()
    )


# -- config -----------------------------------------------------------------------------------
def test_a_mapping_config_is_read_with_from_dict_and_anything_else_is_a_type_error():
    monitor = attach(WithEmpty(), {"norm": "l1", "interval": 1}, micro_batch_size=MICRO)
    assert monitor.config == GNSConfig(norm="l1", interval=1)
    with pytest.raises(ValueError, match="thetaa"):  # from_dict validates the keys
        attach(WithEmpty(), {"norm": "l1", "thetaa": 0.6}, micro_batch_size=MICRO)
    with pytest.raises(ValueError, match="norm"):
        attach(WithEmpty(), {"norm": "l3"}, micro_batch_size=MICRO)
    for bad in ("l1", None, [("norm", "l1")]):
        model = WithEmpty()
        with pytest.raises(TypeError, match=r"GNSConfig or a mapping.*GNSConfig\.from_dict"):
            attach(model, bad, micro_batch_size=MICRO)  # type: ignore[arg-type]
        assert _unhooked(model)


@pytest.mark.parametrize(
    ("value", "error"),
    [("2", TypeError), (2.5, TypeError), (2.0, TypeError), (True, TypeError), (None, TypeError),
     (0, ValueError), (-3, ValueError), (2**60, ValueError)],
)  # fmt: skip
@pytest.mark.parametrize("argument", ["micro_batch_size", "accumulation_steps"])
def test_counts_must_be_positive_ints(argument, value, error):
    if argument == "accumulation_steps" and value is None:
        return  # None: the default (from initial_batch_size, else 1)
    model = WithEmpty()
    kwargs = {"micro_batch_size": MICRO, argument: value}
    with pytest.raises(error, match=rf"{argument}={value!r}.*allowed: an int >= 1"):
        attach(model, GNSConfig(norm="l1"), **kwargs)
    assert _unhooked(model)
    attach(model, GNSConfig(norm="l1"), micro_batch_size=MICRO)  # nothing was left behind


# -- the model's parameters -------------------------------------------------------------------
def test_a_model_without_parameters_or_without_trainable_ones_is_refused():
    with pytest.raises(ValueError, match=r"\(ReLU\) has no parameters"):
        attach(nn.ReLU(), GNSConfig(norm="l1"), micro_batch_size=MICRO)
    frozen = WithEmpty()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match=r"none of the 3 parameters .* requires grad"):
        attach(frozen, GNSConfig(norm="l1"), micro_batch_size=MICRO)
    assert _unhooked(frozen)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
@pytest.mark.parametrize("norm", ["nuclear", "l1"])
def test_empty_parameters_are_left_out_by_the_plan_and_by_estimate_gns(shape, norm):
    torch.manual_seed(0)
    model = WithEmpty(shape)
    reference = copy.deepcopy(model)
    monitor = attach(model, GNSConfig(norm=norm, interval=1, adapt_batch_size=False),
                     micro_batch_size=MICRO, accumulation_steps=3)  # fmt: skip
    assert monitor.plan.get("empty") is None  # not measured
    assert "lin.weight" in monitor.plan.by_name
    samples = []
    for micro in range(3):
        reference.zero_grad()
        reference(_x(micro)).square().mean().backward()
        samples.append({n: p.grad.double().clone() for n, p in reference.named_parameters()})
    _steps(model, monitor, 1)
    want = estimate_gns(samples, MICRO, norm, layer_breakdown=True)
    assert "empty" not in want.layers
    got = monitor.last_estimate
    assert got.noise == pytest.approx(want.noise, rel=1e-5)
    assert got.signal == pytest.approx(want.signal, rel=1e-5)
    # nothing measured for it, so nothing from it: the same as without it
    without = estimate_gns([{k: v for k, v in s.items() if k != "empty"} for s in samples],
                           MICRO, norm)  # fmt: skip
    assert (want.noise, want.signal) == (without.noise, without.signal)
    # a model of empty parameters only leaves nothing to measure: refused in both places
    only_empty = [(f"w{i}", nn.Parameter(torch.zeros(shape))) for i in range(2)]
    with pytest.raises(ValueError, match=r"non-empty|empty ones"):
        plan_entries(only_empty, norm)
    with pytest.raises(ValueError, match="no non-empty parameter"):
        estimate_gns(torch.zeros(3, *shape), MICRO, norm)


def test_a_trainable_sparse_gradient_is_refused_at_attach():
    model = SparseEmbedding()
    with pytest.raises(ValueError, match=r"\['emb.weight'\] get sparse gradients.*sparse=False"):
        attach(model, GNSConfig(norm="l1"), micro_batch_size=MICRO)
    assert _unhooked(model)
    model.emb.weight.requires_grad_(False)  # frozen, its gradient never exists: fine
    assert (
        attach(model, GNSConfig(norm="l1"), micro_batch_size=MICRO).plan.get("emb.weight") is None
    )
    dense = SparseEmbedding(sparse=False)
    assert attach(dense, GNSConfig(norm="l1"), micro_batch_size=MICRO).plan.get("emb.weight")


@pytest.mark.parametrize("norm", ["l1", "l2", "nuclear"])
def test_a_complex_parameter_is_refused_at_attach(norm):
    model = Complex()
    with pytest.raises(ValueError, match=r"parameter 'w': dtype torch.complex64 is complex"):
        attach(model, GNSConfig(norm=norm), micro_batch_size=MICRO)
    assert _unhooked(model)
    model.w.requires_grad_(False)
    attach(model, GNSConfig(norm=norm), micro_batch_size=MICRO)  # frozen: never measured


def test_estimate_gns_refuses_sparse_and_complex_samples():
    dense = [{"a": torch.randn(3, 4), "b": torch.randn(4)} for _ in range(3)]
    sparse = [{**s, "a": s["a"].to_sparse()} for s in dense]
    with pytest.raises(ValueError, match=r"parameter 'a': a torch.sparse_coo gradient"):
        estimate_gns(sparse, 2, "l1")
    with pytest.raises(ValueError, match="sparse_coo"):
        estimate_gns(torch.randn(3, 4, 4).to_sparse(), 2, "l1")
    with pytest.raises(ValueError, match="complex128 is complex"):
        estimate_gns(torch.randn(3, 4, 4, dtype=torch.complex128), 2, "nuclear")
    complex_b = [{**s, "b": s["b"].to(torch.complex64)} for s in dense]
    with pytest.raises(ValueError, match=r"parameter 'b': dtype torch.complex64"):
        estimate_gns(complex_b, 2, {"a": "nuclear", "b": None})  # even when left out


# -- resume -----------------------------------------------------------------------------------
def test_a_state_measured_in_another_geometry_is_refused_on_load():
    model = WithEmpty()
    cfg = GNSConfig(norm="l1", interval=1, adapt_batch_size=False)
    monitor = attach(model, cfg, micro_batch_size=MICRO, accumulation_steps=2)
    _steps(model, monitor, 2)
    state = monitor.state_dict()
    for field, value in [("norm", "nuclear"), ("pool_dof", 30.0), ("ema_beta_noise", 0.5),
                         ("pool_moments", False), ("bias_correction", False)]:  # fmt: skip
        other = WithEmpty()
        fresh = attach(other, dataclasses.replace(cfg, **{field: value}), micro_batch_size=MICRO,
                       accumulation_steps=2)  # fmt: skip
        saved = getattr(cfg, field)
        with pytest.raises(ValueError, match=rf"{field}={saved!r}.*{field}={value!r}"):
            fresh.load_state_dict(state)
        assert fresh.controller.step == 0 and fresh.skipped_steps == 0  # nothing loaded
    # fields that may change: they take effect
    other = WithEmpty()
    changed = dataclasses.replace(cfg, theta=1.2, interval=5, sqrt_trace_method="newton_schulz")
    resumed = attach(other, changed, micro_batch_size=MICRO, accumulation_steps=2)
    resumed.load_state_dict(state)
    assert resumed.controller.step == 2 and resumed.controller.num_updates == 2


# -- distributed: real gloo process groups ----------------------------------------------------
class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)
        self.empty = nn.Parameter(torch.zeros(0, 5))

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x))) + self.empty.sum()


def _ddp_worker(rank, world_size):
    out = {}
    # 1. a sparse gradient: refused on every rank before a hook is registered; DDP then
    #    reduces it itself as without the library
    torch.manual_seed(0)
    sparse = DDP(SparseEmbedding())
    try:
        attach(sparse, GNSConfig(norm="l1"), micro_batch_size=MICRO)
    except ValueError as error:
        out["sparse"] = str(error)
    sparse(torch.tensor([rank, 3])).sum().backward()
    out["sparse_grad"] = sparse.module.emb.weight.grad.to_dense()

    # 2. an empty parameter under nuclear and l1: left out, the rest equals estimate_gns
    for norm in ("nuclear", "l1"):
        torch.manual_seed(0)
        module = _Two()
        reference = copy.deepcopy(module)
        ddp = DDP(module)
        cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, check_consistency=True)
        monitor = attach(ddp, cfg, micro_batch_size=MICRO)
        reference.zero_grad()
        reference(_x(1000 * rank)).square().mean().backward()  # what _steps feeds
        local = {n: p.grad.double().clone() for n, p in reference.named_parameters()}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        _steps(ddp, monitor, 1, rank=rank)
        out[norm] = (monitor.last_estimate, estimate_gns(gathered, MICRO, norm),
                     monitor.plan.get("empty"))  # fmt: skip

    # 3. resume: a lower max_batch_size caps the batch on every rank; another norm is refused
    unit = MICRO * world_size
    cfg = GNSConfig(norm="l1", interval=1, theta=0.01, max_batch_size=4 * unit,
                    check_consistency=True)  # fmt: skip
    torch.manual_seed(0)
    ddp = DDP(_Two())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO)
    for step in range(2):
        for micro in monitor.micro_steps():
            with micro:
                x = _x(1000 * rank + 10 * step + micro.index)
                (ddp(x).square().mean() / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
    state = monitor.state_dict()
    out["grown"] = state["controller"]["batch_size"]

    ddp = DDP(_Two())
    try:
        attach(ddp, dataclasses.replace(cfg, norm="l2"), micro_batch_size=MICRO).load_state_dict(
            state
        )
    except ValueError as error:
        out["norm"] = str(error)

    ddp = DDP(_Two())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    lower = dataclasses.replace(cfg, max_batch_size=2 * unit + 1)  # rounds down to 2 units
    monitor = attach(ddp, lower, opt, micro_batch_size=MICRO)
    monitor.load_state_dict(state)
    out["capped"] = (monitor.batch_size, monitor.accumulation_steps, monitor.lr_multiplier.value)
    for micro in monitor.micro_steps():  # a step at the capped batch; ranks checked to agree
        with micro:
            (ddp(_x(7 * rank + micro.index)).square().mean() / micro.loss_divisor).backward()
    opt.step()
    out["after"] = (monitor.batch_size, monitor.step)
    return out


@pytest.mark.distributed
def test_ddp_bad_inputs_fail_alike_on_every_rank():
    results = spawn(_ddp_worker, 2)
    unit = MICRO * 2
    for out in results:
        assert "emb.weight" in out["sparse"] and "sparse=True" in out["sparse"]
        for norm in ("nuclear", "l1"):
            got, want, empty = out[norm]
            assert empty is None
            assert got.noise == pytest.approx(want.noise, rel=1e-5)
            assert got.signal == pytest.approx(want.signal, rel=1e-5)
        assert out["grown"] == 4 * unit
        assert "norm='l1'" in out["norm"] and "norm='l2'" in out["norm"]
        assert out["capped"] == (2 * unit, 2, pytest.approx(math.sqrt(2)))
        assert out["after"] == (2 * unit, 3)
    # DDP averaged the sparse gradient itself: the same dense value on both ranks
    assert torch.equal(results[0]["sparse_grad"], results[1]["sparse_grad"])
