"""Optimizers: steepest-descent directions, torch.optim contract, geometry, DDP consistency."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nongns_dist.capture.plan import module_plan_entries
from nongns_dist.norms import L1, NUCLEAR
from nongns_dist.optim import (
    LRMultiplier,
    Muon,
    SignSGD,
    Signum,
    SpecSGD,
    group_norms,
    muon_param_groups,
)

from .distributed import spawn


def _param(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=g, dtype=dtype))


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(steps)]


class TinyLM(nn.Module):
    def __init__(self, vocab=11, dim=8, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(2 * dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.out_proj(torch.relu(self.mlp(self.q(h))))
        return self.lm_head(self.norm(h))


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (4, 6), generator=g)
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())


# -- update directions ----------------------------------------------------------------------


def test_signsgd_direction_and_decoupled_weight_decay():
    p = _param(5, 7)
    p0 = p.detach().clone()
    opt = SignSGD([p], lr=0.1, weight_decay=0.5)
    grad = _grads((5, 7), 1)[0]
    grad[0, 0] = 0.0  # sign(0) = 0: no move from the gradient
    p.grad = grad.clone()
    opt.step()
    assert torch.equal(p.detach(), p0 * (1 - 0.1 * 0.5) - 0.1 * torch.sign(grad))
    assert torch.equal(p.grad, grad), "step must not mutate p.grad"
    assert len(opt.state) == 0, "signSGD keeps no state"


@pytest.mark.parametrize("nesterov", [False, True])
def test_signum_momentum_matches_hand_computed_steps(nesterov):
    beta, lr, wd = 0.8, 0.05, 0.1
    p = _param(3, 4)
    expected = p.detach().clone()
    opt = Signum([p], lr=lr, momentum=beta, weight_decay=wd, nesterov=nesterov)
    buf = torch.zeros_like(expected)
    for grad in _grads((3, 4), 4):
        p.grad = grad.clone()
        opt.step()
        buf = beta * buf + (1 - beta) * grad
        update = (1 - beta) * grad + beta * buf if nesterov else buf
        expected = expected * (1 - lr * wd) - lr * torch.sign(update)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)


def _svd_polar(grad: torch.Tensor) -> torch.Tensor:
    u, _, vh = np.linalg.svd(grad.reshape(grad.shape[0], -1).double().numpy(), full_matrices=False)
    return torch.from_numpy(u @ vh).reshape(grad.shape)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 3, 3, 3)])
def test_specsgd_exact_is_uvt_of_float64_svd(shape):
    p = _param(*shape)
    p0 = p.detach().clone()
    grad = _grads(shape, 1)[0]
    opt = SpecSGD([p], lr=0.3, weight_decay=0.2)
    p.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), p0 * (1 - 0.3 * 0.2) - 0.3 * _svd_polar(grad))
    assert torch.equal(p.grad, grad)


@pytest.mark.parametrize("shape", [(16, 32), (32, 16), (24, 24)])
def test_specsgd_newton_schulz_within_its_tolerance(shape):
    p = _param(*shape, dtype=torch.float32)
    p0 = p.detach().clone()
    grad = _grads(shape, 1)[0].float()
    opt = SpecSGD([p], lr=1.0, polar="newton_schulz", polar_tol=1e-4)
    p.grad = grad
    opt.step()
    ns_update = (p0 - p.detach()).double()
    exact = _svd_polar(grad)
    assert float((ns_update - exact).norm() / exact.norm()) <= 1e-3


# -- hybrid Muon ----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_muon_param_groups_split_like_practitioners(tied):
    model = TinyLM(tied=tied)
    model.norm.bias.requires_grad_(False)
    groups = muon_param_groups(model)
    muon = {id(p) for p in groups[0]["params"]}
    aux = {id(p) for p in groups[1]["params"]}
    assert groups[0]["use_muon"] and not groups[1]["use_muon"]
    assert muon == {id(model.q.weight), id(model.mlp.weight), id(model.out_proj.weight)}
    expected_aux = {model.embed.weight, model.mlp.bias, model.norm.weight, model.lm_head.weight}
    assert aux == {id(p) for p in expected_aux}
    assert id(model.norm.bias) not in muon | aux  # frozen


def test_muon_matches_torch_muon_plus_adamw_exactly():
    torch.manual_seed(0)
    ours_model = TinyLM()
    ref_model = copy.deepcopy(ours_model)
    hyper = dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05, ns_steps=5)
    ours = Muon(muon_param_groups(ours_model), **hyper, aux="adamw", aux_lr=3e-3,
                aux_betas=(0.8, 0.9), aux_eps=1e-7, aux_weight_decay=0.01)  # fmt: skip
    ref_groups = muon_param_groups(ref_model)
    ref_muon = torch.optim.Muon(ref_groups[0]["params"], **hyper)
    ref_adamw = torch.optim.AdamW(
        ref_groups[1]["params"], lr=3e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.01
    )
    for step in range(4):
        for model, opts in ((ours_model, [ours]), (ref_model, [ref_muon, ref_adamw])):
            for opt in opts:
                opt.zero_grad()
            _loss(model, step).backward()
            for opt in opts:
                opt.step()
    for (name, a), (_, b) in zip(
        ours_model.named_parameters(), ref_model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def _reference_muon(weight, grads, lr, momentum, wd):
    """Float64 brute force of Muon's update (momentum, Nesterov, quintic Newton-Schulz)."""
    w, buf = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    a, b, c = 3.4445, -4.7750, 2.0315
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        x = (1 - momentum) * g + momentum * buf
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if tall else x
        w = w * (1 - lr * wd) - lr * max(1.0, w.shape[0] / w.shape[1]) ** 0.5 * x
    return w


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_muon_float_newton_schulz_matches_float64_reference(shape):
    torch.manual_seed(1)
    grads = [torch.randn(shape) for _ in range(3)]
    start = torch.randn(shape)
    results = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        store = torch.float64 if dtype == torch.float64 else torch.float32
        weight = nn.Parameter(start.clone().to(store))
        opt = Muon([weight], lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype=dtype)
        for g in grads:
            weight.grad = g.clone().to(store)
            opt.step()
        assert opt.state[weight]["momentum_buffer"].shape == shape  # torch's state key
        results[dtype] = weight.detach().double()
    ref = _reference_muon(start, grads, lr=0.02, momentum=0.9, wd=0.1)
    moved = (ref - start.double()).norm()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        assert float((results[dtype] - ref).norm() / moved) <= tol, dtype
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([nn.Parameter(start.clone())], ns_dtype=torch.float16)


def test_muon_aux_signum_and_validation():
    model = TinyLM()
    opt = Muon(muon_param_groups(model), aux="signum", aux_lr=1e-3, aux_momentum=0.5)
    _loss(model, 0).backward()
    opt.step()
    assert [g["geometry"] for g in opt.param_groups] == ["spectral", "sign"]
    with pytest.raises(ValueError, match="aux"):
        Muon(muon_param_groups(model), aux="lion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use_muon"):
        Muon([{"params": [model.q.weight]}])
    with pytest.raises(ValueError, match="no matrix"):
        Muon([{"params": [model.norm.weight], "use_muon": False}])
    with pytest.raises(ValueError, match="2D"):
        Muon([{"params": [model.norm.weight], "use_muon": True}])
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "use_muon": True})
    # plain parameters are split by ndim
    flat = Muon([model.q.weight, model.norm.weight])
    assert [len(g["params"]) for g in flat.param_groups] == [1, 1]


# -- torch.optim contract -------------------------------------------------------------------


def _optimizers():
    return {
        "signum": lambda m: Signum(
            m.parameters(), lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1
        ),
        "signsgd": lambda m: SignSGD(m.parameters(), lr=1e-2),
        "specsgd": lambda m: SpecSGD([p for p in m.parameters() if p.dim() >= 2], lr=1e-2),
        "muon_adamw": lambda m: Muon(muon_param_groups(m), lr=0.02, aux="adamw"),
        "muon_signum": lambda m: Muon(muon_param_groups(m), lr=0.02, aux="signum"),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_optimizers()))
def test_state_dict_round_trip_continues_identically(name):
    make = _optimizers()[name]
    torch.manual_seed(0)
    model = TinyLM()
    opt = make(model)
    for step in range(3):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    resumed_model = copy.deepcopy(model)
    resumed = make(resumed_model)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    # a scheduler writes lr through param_groups: it must reach the inner optimizers too
    for o in (opt, resumed):
        for g in o.param_groups:
            g["lr"] *= 0.5
    for step in range(3, 6):
        for m, o in ((model, opt), (resumed_model, resumed)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda p: Signum(p, lr=-1.0), "lr"),
        (lambda p: Signum(p, momentum=1.0), "momentum"),
        (lambda p: Signum(p, weight_decay=-0.1), "weight_decay"),
        (lambda p: Signum(p, momentum=0.0, nesterov=True), "nesterov"),
        (lambda p: SignSGD(p, lr=float("nan")), "lr"),
        (lambda p: SpecSGD(p, lr=-1.0), "lr"),
        (lambda p: SpecSGD(p, polar="qr"), "polar"),  # type: ignore[arg-type]
        (lambda p: SpecSGD(p, polar_tol=0.0), "polar_tol"),
        (lambda p: SpecSGD([nn.Parameter(torch.zeros(3))]), "matrices only"),
    ],
)
def test_hyper_parameter_validation(factory, match):
    with pytest.raises(ValueError, match=match):
        factory([nn.Parameter(torch.zeros(2, 2))])


def test_signum_group_override_is_validated():
    opt = Signum([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "momentum": 2.0})


# -- geometry -------------------------------------------------------------------------------


def test_auto_geometry_resolution():
    model = TinyLM()
    params = list(model.parameters())
    matrices = [p for p in params if p.dim() >= 2]
    assert group_norms(Signum(params)) == ["l1"]
    assert group_norms(SignSGD(params)) == ["l1"]
    assert group_norms(torch.optim.AdamW(params)) == ["l1"]
    assert group_norms(torch.optim.Adam(params)) == ["l1"]
    assert group_norms(torch.optim.SGD(params, lr=0.1)) == ["l2"]
    assert group_norms(SpecSGD(matrices)) == ["nuclear"]
    assert group_norms(torch.optim.Muon([model.q.weight])) == ["nuclear"]
    hybrid = Muon(muon_param_groups(model))
    assert group_norms(hybrid) == ["nuclear", None]  # the aux group is left out, as in the paper
    norms = {name: k for name, _, k in module_plan_entries(model, "auto", hybrid)}
    assert norms["q.weight"] is NUCLEAR and norms["embed.weight"] is None
    # explicit norms override the optimizer; nuclear covers matrices only
    explicit = {name: k for name, _, k in module_plan_entries(model, "nuclear", Signum(params))}
    assert explicit["q.weight"] is NUCLEAR and explicit["norm.weight"] is None
    assert {k for _, _, k in module_plan_entries(model, "l1", hybrid)} == {L1}
    # a group may declare its geometry itself
    sgd = torch.optim.SGD([{"params": params, "geometry": "sign"}], lr=0.1)
    assert group_norms(sgd) == ["l1"]
    with pytest.raises(ValueError, match="geometry"):
        group_norms(torch.optim.Adagrad(params))
    with pytest.raises(ValueError, match="unknown geometry"):
        group_norms(torch.optim.SGD([{"params": params, "geometry": "hyperbolic"}], lr=0.1))
    with pytest.raises(ValueError, match="optimizer"):
        module_plan_entries(model, "auto", None)


# -- the lr multiplier composes with schedulers -----------------------------------------------


@pytest.mark.parametrize("kind", ["lambda", "step", "exponential"])
def test_lr_multiplier_composes_with_schedulers(kind):
    def make():
        p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = {
            "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)),
            "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
            "exponential": lambda: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7),
        }[kind]()
        return p, opt, sched

    p_ref, opt_ref, sched_ref = make()
    p, opt, sched = make()
    mult = LRMultiplier(opt)

    def lr_used(q, o, s):  # SGD with grad 1 moves the parameter by exactly the lr it used
        before = q.detach().item()
        q.grad = torch.ones_like(q)
        o.step()
        s.step()
        return before - q.detach().item()

    for step in range(6):
        mult.value = 1.0 + step  # the controller's multiplier changes over time
        reference = lr_used(p_ref, opt_ref, sched_ref)
        assert lr_used(p, opt, sched) == pytest.approx(reference * mult.value, rel=1e-12)
        assert sched.get_last_lr() == sched_ref.get_last_lr()
        assert opt.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"]
    mult.remove()
    mult.value = 3.0
    opt.step()
    assert opt.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"]


# -- DDP: every optimizer keeps ranks identical -----------------------------------------------


def _ddp_worker(rank, world_size):
    results = {}
    for name, make in _optimizers().items():
        torch.manual_seed(0)  # same initial weights on every rank
        ddp = nn.parallel.DistributedDataParallel(TinyLM())
        opt = make(ddp.module)
        for step in range(3):
            opt.zero_grad()
            _loss(ddp, 100 * rank + step).backward()  # different data per rank
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, flat)
        results[name] = gathered
    return results


@pytest.mark.distributed
def test_ddp_ranks_stay_identical():
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in TinyLM().parameters()])
    results = spawn(_ddp_worker, 2)
    for name, gathered in results[0].items():
        assert torch.equal(gathered[0], gathered[1]), name
        assert not torch.equal(gathered[0], initial), f"{name} did not train"
