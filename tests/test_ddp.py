"""DDP capture against the reference estimator, on real gloo process groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nongns_dist import GNSConfig, attach, estimate_gns
from nongns_dist.capture.collectives import segment_parts
from nongns_dist.estimators import MomentPool
from nongns_dist.optim import Muon, Signum, muon_param_groups

from .distributed import spawn
from .float32_bounds import Float32Bound

pytestmark = pytest.mark.distributed

MICRO = 3


class Net(nn.Module):
    """Matrices of both orientations, a conv kernel, vectors, a frozen and an optional branch."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 5, bias=False)
        self.gain = nn.Parameter(torch.ones(24))
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.branch = nn.Linear(5, 5, bias=False)
        self.to(dtype)

    def forward(self, x, use_branch=True):
        h = self.conv(x.view(-1, 2, 8)).flatten(1)[:, :16]
        out = self.down(torch.tanh(self.up(h)) * self.gain)
        out = self.frozen(out)
        return self.branch(out) if use_branch else out


def _batch(rank, step, micro, dtype=torch.float32):
    g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    # rank-dependent shift: the ranks' gradients differ by more than noise
    x = torch.randn(MICRO, 16, generator=g) + 0.3 * rank
    y = torch.randn(MICRO, 5, generator=g)
    return x.to(dtype), y.to(dtype)


def _loss(model, x, y, use_branch=True):
    return ((model(x, use_branch) - y) ** 2).mean()


def _make_optimizer(kind, module):
    if kind == "muon":
        return Muon(muon_param_groups(module), lr=0.02, aux="adamw", aux_lr=1e-3)
    return Signum([p for p in module.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)


def _equality_worker(rank, world_size, norm, acc, options):
    dtype = options.get("dtype", torch.float32)
    torch.manual_seed(0)
    module = Net(dtype)
    reference = copy.deepcopy(module)
    ddp = DDP(
        module,
        bucket_cap_mb=0.0004,  # several buckets, parameters split across reduce-scatter chunks
        gradient_as_bucket_view=options.get("bucket_view", False),
        static_graph=options.get("static_graph", False),
        find_unused_parameters=options.get("unused", False),
    )
    opt = _make_optimizer("muon" if norm == "auto" else "signum", module)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, layer_breakdown=True,
                    check_consistency=True)  # fmt: skip
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO, accumulation_steps=acc)
    norms = {t.name: t.norm.name for t in monitor.plan.params}
    pool = MomentPool.for_config(cfg)
    bound = Float32Bound(cfg.pool_dof)
    results = []
    for step in range(3):
        use_branch = not (options.get("unused") and step == 1)
        # this rank's local accumulated gradient, computed without DDP
        reference.load_state_dict(module.state_dict())
        reference.zero_grad()
        for micro in range(acc):
            (_loss(reference, *_batch(rank, step, micro, dtype), use_branch) / acc).backward()
        local = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double()
            for n, p in reference.named_parameters()
            if n in norms
        }
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        for micro in monitor.micro_steps():
            with micro:
                (_loss(ddp, *_batch(rank, step, micro.index, dtype), use_branch)
                 / micro.loss_divisor).backward()  # fmt: skip
        opt.step()
        opt.zero_grad()
        if options.get("static_graph") and step == 0:
            # torch's static_graph cannot start under no_sync: the first step syncs every
            # micro-step and is not measured
            assert monitor.last_estimate is None
            continue
        expected = estimate_gns(
            gathered, MICRO * acc, norms, layer_breakdown=True, pool=pool
        )  # the pool: every measurement so far
        tolerance = bound.step(gathered, MICRO * acc, norms, pool)
        results.append((monitor.last_estimate, expected, tolerance))
        monitor.last_estimate = None
    return results


@pytest.mark.parametrize("norm", ["l1", "l2", "nuclear", "auto"])
@pytest.mark.parametrize("acc", [1, 3])
def test_estimate_equals_reference_on_gathered_local_gradients(norm, acc):
    results = spawn(_equality_worker, 2, norm, acc, {})
    _check_equal(results)


@pytest.mark.parametrize(
    "options",
    [{"bucket_view": True}, {"static_graph": True}, {"unused": True}],
    ids=["gradient_as_bucket_view", "static_graph", "find_unused_parameters"],
)
def test_estimate_with_ddp_options(options):
    results = spawn(_equality_worker, 2, "auto", 2, options)
    _check_equal(results)


def test_estimate_on_four_ranks():
    _check_equal(spawn(_equality_worker, 4, "l1", 2, {}))
    _check_equal(spawn(_equality_worker, 4, "nuclear", 1, {}))


def test_estimate_with_bf16_gradients():
    # bf16 buckets: the float32 sum travels with the squares, so no bf16 rounding of the mean
    results = spawn(_equality_worker, 2, "l1", 2, {"dtype": torch.bfloat16})
    _check_equal(results)


def _check_equal(results):
    """Each (estimate, reference, tolerance) of each rank: equal within the tolerance derived
    from the float32 arithmetic of the capture (tests/float32_bounds.py)."""
    for rank_results in results:
        for got, want, tol in rank_results:
            assert got is not None and got.num_samples == want.num_samples
            assert got.sample_size == want.sample_size and got.norm == want.norm
            assert got.noise == pytest.approx(want.noise, rel=tol.noise)
            assert got.signal == pytest.approx(want.signal, rel=tol.signal)
            assert (got.pooled_noise is None) == (want.pooled_noise is None)
            if want.pooled_noise is not None:
                assert got.pooled_noise == pytest.approx(want.pooled_noise, rel=tol.pooled_noise), [
                    (g.pooled_noise, w.pooled_noise) for g, w, _ in rank_results
                ]
            for name, layer in want.layers.items():
                noise_tol, signal_tol = tol.layers[name]
                assert got.layers[name].noise == pytest.approx(layer.noise, rel=noise_tol)
                assert got.layers[name].signal == pytest.approx(layer.signal, rel=signal_tol)
    assert [e.noise for e, *_ in results[0]] == [e.noise for e, *_ in results[-1]]  # ranks agree


# -- measure-only steps change nothing ----------------------------------------------------------


def _bit_identity_worker(rank, world_size, norm, interval):
    torch.manual_seed(0)
    plain_module, hooked_module = Net(), Net()
    hooked_module.load_state_dict(plain_module.state_dict())
    plain = DDP(plain_module, bucket_cap_mb=0.0004)
    hooked = DDP(hooked_module, bucket_cap_mb=0.0004)
    opts = [_make_optimizer("signum", m) for m in (plain_module, hooked_module)]
    cfg = GNSConfig(norm=norm, interval=interval, adapt_batch_size=False)
    monitor = attach(hooked, cfg, opts[1], micro_batch_size=MICRO, accumulation_steps=2)
    for step in range(4):
        for model in (plain, hooked):
            for micro in range(2):
                ctx = model.no_sync() if micro == 0 else torch.enable_grad()
                with ctx:
                    (_loss(model, *_batch(rank, step, micro)) / 2).backward()
        for a, b in zip(plain_module.parameters(), hooked_module.parameters(), strict=True):
            if a.grad is not None:
                assert torch.equal(a.grad, b.grad), f"step {step}: gradients differ"
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for a, b in zip(plain_module.parameters(), hooked_module.parameters(), strict=True):
        assert torch.equal(a, b)
    return monitor.controller.num_updates


@pytest.mark.parametrize("norm", ["l1", "nuclear"])
def test_gradients_bit_identical_to_plain_ddp(norm):
    # interval 1: every step measures; interval 3: steps 0 and 3 measure, 1 and 2 do not
    assert spawn(_bit_identity_worker, 2, norm, 1) == [4, 4]
    assert spawn(_bit_identity_worker, 2, norm, 3) == [2, 2]


# -- the batch changes exactly at the next optimizer step ----------------------------------------


def _schedule_worker(rank, world_size):
    torch.manual_seed(0)
    module = Net()
    ddp = DDP(module)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    # theta tiny: the target batch is huge, so every measurement grows the batch (capped)
    cfg = GNSConfig(norm="l2", interval=2, theta=0.05, max_batch_size=MICRO * world_size * 5,
                    check_consistency=True)  # fmt: skip
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO)
    lr_seen = []  # registered after attach: runs after the multiplier's pre-hook
    opt.register_step_pre_hook(lambda o, a, k: lr_seen.append(o.param_groups[0]["lr"]))
    trace = []
    for step in range(6):
        micro_count = 0
        for micro in monitor.micro_steps():
            micro_count += 1
            with micro:
                (_loss(ddp, *_batch(rank, step, micro.index)) / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
        d = monitor.last_decision
        trace.append((micro_count, d.accumulation_steps, d.lr_multiplier, monitor.samples))
    return trace, lr_seen


def test_accumulation_change_takes_effect_at_next_step_and_multiplier_reaches_optimizer():
    results = spawn(_schedule_worker, 2)
    assert results[0] == results[1], "ranks must take the same decisions"
    trace, lr_seen = results[0]
    unit = MICRO * 2
    samples = 0
    for k, (micro_count, _acc, _mult, seen_samples) in enumerate(trace):
        expected_count = 1 if k == 0 else trace[k - 1][1]
        assert micro_count == expected_count, f"step {k} ran {micro_count} micro-steps"
        samples += micro_count * unit
        assert seen_samples == samples
        expected_mult = 1.0 if k == 0 else trace[k - 1][2]
        assert lr_seen[k] == pytest.approx(0.1 * expected_mult)
    assert trace[0][1] > 1, "the first measurement must grow the batch"
    assert trace[-1][1] == 5, "the cap holds"
    assert trace[-1][2] == pytest.approx(math.sqrt(5))


# -- non-finite measurements ----------------------------------------------------------------------


def _nonfinite_worker(rank, world_size):
    torch.manual_seed(0)
    module = Net()
    ddp = DDP(module)
    opt = _make_optimizer("signum", module)
    monitor = attach(ddp, GNSConfig(norm="l1", interval=1, theta=0.05), opt, micro_batch_size=MICRO)
    for micro in monitor.micro_steps():
        with micro:
            x, y = _batch(rank, 0, 0)
            if rank == 0:
                x[0, 0] = float("inf")
            _loss(ddp, x, y).backward()
    opt.zero_grad()  # do not apply the broken gradient (the optimizer still steps: it closes)
    opt.step()
    return (monitor.controller.skipped, monitor.batch_size, monitor.last_estimate.is_finite)


def test_nonfinite_measurement_is_skipped_and_batch_kept():
    assert spawn(_nonfinite_worker, 2) == [(1, MICRO * 2, False)] * 2


# -- errors -----------------------------------------------------------------------------------


def _errors_worker(rank, world_size):
    module = Net()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        attach(module, GNSConfig(norm="l1"), micro_batch_size=1)
    vector_only = DDP(nn.ParameterList([nn.Parameter(torch.zeros(4))]))
    with pytest.raises(ValueError, match="nuclear"):
        attach(vector_only, GNSConfig(norm="nuclear"), micro_batch_size=1)
    ddp = DDP(module)
    with pytest.raises(ValueError, match="optimizer"):
        attach(ddp, GNSConfig(norm="auto"), micro_batch_size=1)
    attach(ddp, GNSConfig(norm="l1"), micro_batch_size=1)
    with pytest.raises(RuntimeError, match="already attached"):
        attach(ddp, GNSConfig(norm="l1"), micro_batch_size=1)
    return True


def test_attach_errors():
    assert spawn(_errors_worker, 2) == [True, True]


def _single_rank_worker(rank, world_size):
    module = Net()
    ddp = DDP(module)
    opt = _make_optimizer("signum", module)
    monitor = attach(ddp, GNSConfig(norm="l1", interval=1), opt, micro_batch_size=MICRO,
                     accumulation_steps=2)  # fmt: skip
    for step in range(2):
        for micro in monitor.micro_steps():
            with micro:
                (_loss(ddp, *_batch(rank, step, micro.index)) / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
    return monitor.can_measure, monitor.last_estimate, monitor.samples


def test_single_rank_trains_without_measuring():
    # one rank is one sample: nothing to measure, but the loop must run (with a warning)
    assert spawn(_single_rank_worker, 1) == [(False, None, 2 * 2 * MICRO)]


# -- collectives stay inside the data-parallel group ---------------------------------------------


def one_step_against_reference(model, monitor, opt, reference, rank, group):
    """One optimizer step of ``model``; returns its estimate and ``estimate_gns`` on the local
    gradients of the ranks of ``group``, recomputed on ``reference`` (the unwrapped model)."""
    norms = {t.name: t.norm.name for t in monitor.plan.params}
    _loss(reference, *_batch(rank, 0, 0)).backward()
    local = {n: p.grad.detach().double() for n, p in reference.named_parameters() if n in norms}
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    for micro in monitor.micro_steps():
        with micro:
            _loss(model, *_batch(rank, 0, micro.index)).backward()
    opt.step()
    tolerance = Float32Bound().step(gathered, MICRO, norms)
    return monitor.last_estimate, estimate_gns(gathered, MICRO, norms), tolerance


def _groups_worker(rank, world_size, norm):
    # ranks {0, 2} and {1, 3}: two data-parallel groups, as beside tensor parallelism
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]
    torch.manual_seed(0)
    module = Net()
    reference = copy.deepcopy(module)
    ddp = DDP(module, process_group=group, bucket_cap_mb=0.0004)
    opt = _make_optimizer("signum", module)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, check_consistency=True)
    monitor = attach(ddp, cfg, opt, micro_batch_size=MICRO)
    return one_step_against_reference(ddp, monitor, opt, reference, rank, group)


@pytest.mark.parametrize("norm", ["l1", "nuclear"])
def test_each_data_parallel_group_measures_its_own_ranks(norm):
    results = spawn(_groups_worker, 4, norm)
    for got, want, tol in results:
        assert got.num_samples == 2
        assert got.noise == pytest.approx(want.noise, rel=tol.noise)
        assert got.signal == pytest.approx(want.signal, rel=tol.signal)
    # the two groups hold different ranks' gradients: different estimates
    assert results[0][0].noise == results[2][0].noise != results[1][0].noise


def test_segment_parts_split_every_segment_evenly_and_cover_it_once():
    segments = [(0, 7), (7, 8), (8, 20), (30, 33)]  # (20, 30) is not measured: it does not travel
    for world in (1, 2, 3, 4):
        covered = []
        for rank in range(world):
            parts, length = segment_parts(segments, world, rank)
            assert length == sum(-(-(end - start) // world) for start, end in segments)
            for (start, end), (offset, count, at) in zip(segments, parts, strict=True):
                assert 0 <= count <= -(-(end - start) // world) and at + count <= length
                covered += range(start + offset, start + offset + count)
        assert sorted(covered) == [i for a, b in segments for i in range(a, b)]
