"""FSDP2 (``fully_shard``, HSDP, composable ``replicate``) and FSDP1 capture against the reference
estimator, on real gloo process groups: the estimate equals ``estimate_gns`` on the gathered
per-rank local gradients, and training is bit-identical to the same wrapping without the
library."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FullyShardedDataParallel,
    MixedPrecisionPolicy,
    ShardingStrategy,
    fully_shard,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor, Shard

from nongns_dist import GNSConfig, attach, estimate_gns
from nongns_dist.estimators import MomentPool

from .distributed import spawn
from .float32_bounds import Float32Bound
from .test_ddp import MICRO, Net, _batch, _check_equal, _loss, one_step_against_reference

pytestmark = pytest.mark.distributed


def _wrap(module: nn.Module, options: dict) -> nn.Module:
    """The model as the chosen engine wraps it (in place for FSDP2)."""
    engine = options.get("engine", "fsdp2")
    if engine == "fsdp1":
        strategy = ShardingStrategy[options.get("strategy", "FULL_SHARD")]
        return FullyShardedDataParallel(
            module,
            sharding_strategy=strategy,
            use_orig_params=options.get("orig_params", True),
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            device_id=torch.device("cpu"),
        )
    if engine == "replicate":  # torch's composable DDP (torchtitan's, the companion code's)
        for child in (module.conv, module.up, module.down) if options.get("per_layer") else ():
            replicate(child)
        return replicate(module)
    kwargs: dict = {}
    if "mesh" in options:
        kwargs["mesh"] = init_device_mesh("cpu", options["mesh"], mesh_dim_names=("rep", "shard"))
    if options.get("bf16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if options.get("shard1"):  # the matrix `up` sharded along its input dim
        kwargs["shard_placement_fn"] = lambda p: Shard(1) if p.shape == (24, 16) else Shard(0)
    if options.get("grouped"):  # two modules, one FSDP group (as accelerate's [norm, lm_head])
        fully_shard(module.conv, **kwargs)
        fully_shard([module.up, module.down], **kwargs)
    else:
        for child in (module.conv, module.up, module.down):
            fully_shard(child, **kwargs)
    fully_shard(module, **kwargs)
    if options.get("force_sum"):
        module.set_force_sum_reduction_for_comms(True)
    if options.get("user_hooks"):  # set before attach: they must keep running after it
        calls = options.setdefault("calls", [])
        module.up.set_all_reduce_hook(lambda out: calls.append(out.numel()))
        module.up.set_custom_reduce_scatter(_CountingReduceScatter(calls))
    return module


class _CountingReduceScatter:
    """A user's reduce-scatter: the default one, counting its calls."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.calls.append("comm")
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)


def _full_state(model: nn.Module, options: dict) -> dict[str, torch.Tensor]:
    if options.get("engine") == "fsdp1":
        with FullyShardedDataParallel.summon_full_params(model):
            return {
                n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for n, p in model.named_parameters()
            }
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _optimizer(norm: str, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if norm == "auto":  # spectral geometry for matrices, sign for the rest: l1 + nuclear
        matrices = [p for p in params if p.dim() >= 2]
        vectors = [p for p in params if p.dim() < 2]
        return torch.optim.SGD(
            [{"params": matrices, "geometry": "spectral"}, {"params": vectors, "geometry": "sign"}],
            lr=1e-3,
        )
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def _equality_worker(rank, world_size, norm, acc, options):
    torch.manual_seed(0)
    module = Net()
    reference = copy.deepcopy(module)
    model = _wrap(module, options)
    opt = _optimizer(norm, model)
    cfg = GNSConfig(norm=norm, interval=1, adapt_batch_size=False, layer_breakdown=True,
                    check_consistency=True)  # fmt: skip
    monitor = attach(model, cfg, opt, micro_batch_size=MICRO, accumulation_steps=acc)
    norms = {t.name: t.norm.name for t in monitor.plan.params}
    pool = MomentPool.for_config(cfg)
    bound = Float32Bound(cfg.pool_dof)
    results = []
    dtype = torch.bfloat16 if options.get("bf16") else torch.float32
    reference.to(dtype)  # bf16 params: the reference computes in bf16 as FSDP's unsharded ones
    for step in range(2):
        use_branch = not (options.get("unused") and step == 1)
        reference.load_state_dict(_full_state(model, options))
        reference.zero_grad()
        for micro in range(acc):
            x, y = _batch(rank, step, micro)
            (_loss(reference, x.to(dtype), y, use_branch) / acc).backward()
        local = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double()
            for n, p in reference.named_parameters()
            if n in norms
        }
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        for micro in monitor.micro_steps():
            with micro:
                (_loss(model, *_batch(rank, step, micro.index), use_branch)
                 / micro.loss_divisor).backward()  # fmt: skip
        opt.step()
        opt.zero_grad()
        expected = estimate_gns(
            gathered, MICRO * acc, norms, layer_breakdown=True, pool=pool
        )  # the pool: every measurement so far
        results.append(
            (monitor.last_estimate, expected, bound.step(gathered, MICRO * acc, norms, pool))
        )
    if options.get("user_hooks"):  # the user's comm and hook ran on both steps
        assert options["calls"].count("comm") == 2 and len(options["calls"]) == 4
    return results


@pytest.mark.parametrize("norm", ["l1", "l2", "nuclear", "auto"])
@pytest.mark.parametrize("acc", [1, 3])
def test_fsdp2_estimate_equals_reference(norm, acc):
    _check_equal(spawn(_equality_worker, 2, norm, acc, {}))


@pytest.mark.parametrize(
    "options",
    [
        {"shard1": True},
        {"bf16": True},
        {"force_sum": True},
        {"unused": True},
        {"mesh": (1, 2)},
        {"mesh": (2, 1)},
        {"user_hooks": True},
    ],
    ids=[
        "shard1",
        "bf16-params-fp32-reduce",
        "force-sum",
        "unused-param",
        "hsdp-1x2",
        "hsdp-2x1",
        "user-comm-and-hook",
    ],
)
def test_fsdp2_options_estimate_equals_reference(options):
    # bf16: one micro-step (FSDP accumulates bf16 micro-steps in float32, the reference in bf16)
    acc = 1 if options.get("bf16") else 2
    _check_equal(spawn(_equality_worker, 2, "auto", acc, options))


@pytest.mark.parametrize("norm", ["l1", "l2", "nuclear", "auto"])
@pytest.mark.parametrize("acc", [1, 3])
def test_replicate_estimate_equals_reference(norm, acc):
    _check_equal(spawn(_equality_worker, 2, norm, acc, {"engine": "replicate"}))


def test_replicate_per_layer_measures_and_trains_like_plain():
    options = {"engine": "replicate", "per_layer": True}
    _check_equal(spawn(_equality_worker, 2, "auto", 2, options))
    assert spawn(_bit_identity_worker, 2, "nuclear", 1, options) == [4, 4]


def _units_worker(rank, world_size):
    model = _wrap(Net(), {"grouped": True})
    opt = _optimizer("auto", model)
    monitor = attach(model, GNSConfig(norm="auto"), opt, micro_batch_size=MICRO)
    groups = [unit.param_group for unit in monitor.capture.units]
    return len(groups), len({id(g) for g in groups})


def test_fsdp2_one_group_over_two_modules_is_measured_once():
    """fully_shard([up, down]): one parameter group that both modules report; the capture
    hooks it once, and the estimate and the training are right."""
    assert spawn(_units_worker, 2)[0] == (3, 3)  # conv, [up, down], the root's own
    _check_equal(spawn(_equality_worker, 2, "auto", 2, {"grouped": True}))
    assert spawn(_bit_identity_worker, 2, "nuclear", 1, {"grouped": True}) == [4, 4]


def test_fsdp2_and_fsdp1_on_four_ranks():
    _check_equal(spawn(_equality_worker, 4, "auto", 2, {}))
    options = {"engine": "fsdp1", "strategy": "FULL_SHARD", "orig_params": True}
    _check_equal(spawn(_equality_worker, 4, "auto", 1, options))


def test_fsdp2_hsdp_on_four_ranks():
    # 2 replicas x 2 shards: squares reduce-scattered over the shard group, then all-reduced
    # over the replicas; Grams over all four ranks
    _check_equal(spawn(_equality_worker, 4, "auto", 1, {"mesh": (2, 2)}))


# -- training is unchanged ----------------------------------------------------------------------


def _bit_identity_worker(rank, world_size, norm, interval, options):
    torch.manual_seed(0)
    plain_module, hooked_module = Net(), Net()
    hooked_module.load_state_dict(plain_module.state_dict())
    plain, hooked = _wrap(plain_module, options), _wrap(hooked_module, options)
    opts = [_optimizer("l1", m) for m in (plain, hooked)]
    cfg = GNSConfig(norm=norm, interval=interval, adapt_batch_size=False)
    monitor = attach(hooked, cfg, opts[1], micro_batch_size=MICRO, accumulation_steps=2)
    for step in range(4):
        for model in (plain, hooked):
            for micro in range(2):
                if options.get("engine") == "fsdp1":
                    ctx = model.no_sync() if micro == 0 else torch.enable_grad()
                else:
                    model.set_requires_gradient_sync(micro == 1)
                    ctx = torch.enable_grad()
                with ctx:
                    (_loss(model, *_batch(rank, step, micro)) / 2).backward()
        for a, b in zip(plain.parameters(), hooked.parameters(), strict=True):
            if a.grad is not None:
                ga = a.grad.to_local() if isinstance(a.grad, DTensor) else a.grad
                gb = b.grad.to_local() if isinstance(b.grad, DTensor) else b.grad
                assert torch.equal(ga, gb), f"step {step}: gradients differ"
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for a, b in zip(plain.parameters(), hooked.parameters(), strict=True):
        la = a.to_local() if isinstance(a, DTensor) else a
        lb = b.to_local() if isinstance(b, DTensor) else b
        assert torch.equal(la, lb)
    return monitor.controller.num_updates


@pytest.mark.parametrize("norm", ["l1", "nuclear"])
def test_fsdp2_training_bit_identical_to_plain(norm):
    # interval 1: every step measures; interval 3: steps 0 and 3 measure, 1 and 2 do not
    assert spawn(_bit_identity_worker, 2, norm, 1, {}) == [4, 4]
    assert spawn(_bit_identity_worker, 2, norm, 3, {"mesh": (1, 2)}) == [2, 2]


# -- the batch grows and the micro-steps follow it ------------------------------------------------


def _schedule_worker(rank, world_size, options):
    torch.manual_seed(0)
    model = _wrap(Net(), options)
    opt = _optimizer("l2", model)
    cfg = GNSConfig(norm="l2", interval=2, theta=0.05, max_batch_size=MICRO * world_size * 5,
                    check_consistency=True)  # fmt: skip
    monitor = attach(model, cfg, opt, micro_batch_size=MICRO)
    trace = []
    for step in range(6):
        count = 0
        for micro in monitor.micro_steps():
            count += 1
            with micro:
                (_loss(model, *_batch(rank, step, micro.index)) / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
        trace.append((count, monitor.accumulation_steps, monitor.samples))
    return trace


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1", "replicate"])
def test_batch_grows_and_micro_steps_follow(engine):
    results = spawn(_schedule_worker, 2, {"engine": engine})
    assert results[0] == results[1]
    trace = results[0]
    samples = 0
    for k, (count, _acc, seen) in enumerate(trace):
        assert count == (1 if k == 0 else trace[k - 1][1])
        samples += count * MICRO * 2
        assert seen == samples
    assert trace[0][1] > 1 and trace[-1][1] == 5


# -- FSDP1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
@pytest.mark.parametrize("orig_params", [True, False])
def test_fsdp1_estimate_equals_reference(strategy, orig_params):
    options = {"engine": "fsdp1", "strategy": strategy, "orig_params": orig_params}
    # nuclear + l1 mixed (explicit per-group geometry) needs use_orig_params for "auto"
    norm = "auto" if orig_params else "l1"
    _check_equal(spawn(_equality_worker, 2, norm, 3, options))
    _check_equal(spawn(_equality_worker, 2, "nuclear", 1, options))


def test_fsdp1_training_bit_identical_to_plain():
    options = {"engine": "fsdp1", "strategy": "FULL_SHARD"}
    assert spawn(_bit_identity_worker, 2, "nuclear", 1, options) == [4, 4]


# -- what is refused ----------------------------------------------------------------------------


def _errors_worker(rank, world_size):
    with pytest.raises(TypeError, match="fully_shard"):  # sharded children, no sharded root
        module = Net()
        fully_shard(module.up)
        attach(module, GNSConfig(norm="l1"), micro_batch_size=1)
    # HYBRID_SHARD without a mesh has shard size 1 here: FSDP silently never reduces across the
    # replicas; with a (1, 2) mesh FSDP refuses comm hooks. Both are refused by name.
    for mesh in (None, init_device_mesh("cpu", (1, 2))):
        hybrid = FullyShardedDataParallel(
            Net(), sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=mesh,
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"),
        )  # fmt: skip
        with pytest.raises(NotImplementedError, match="HYBRID_SHARD"):
            attach(hybrid, GNSConfig(norm="l1"), micro_batch_size=1)
    return True


def test_bad_wrappings_are_refused():
    assert spawn(_errors_worker, 2) == [True, True]


def _hsdp_group_worker(rank, world_size):
    # a (replicate, shard) mesh on ranks {0,1} and {2,3} separately, as beside tensor parallelism
    world = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("tp", "rep", "shard"))
    mesh = world["rep", "shard"]
    module = Net()
    fully_shard(module, mesh=mesh)
    with pytest.raises(ValueError, match="process_group"):
        attach(module, GNSConfig(norm="l1"), micro_batch_size=1)
    return True


def test_hsdp_inside_a_larger_world_needs_its_group():
    assert spawn(_hsdp_group_worker, 4) == [True] * 4


def _tp_dp_worker(rank, world_size):
    # a (tp, dp) mesh: FSDP2 shards over "dp" only; each dp group is measured on its own
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("tp", "dp"))
    torch.manual_seed(0)
    module = Net()
    reference = copy.deepcopy(module)
    for child in (module.conv, module.up, module.down):
        fully_shard(child, mesh=mesh["dp"])
    fully_shard(module, mesh=mesh["dp"])
    opt = _optimizer("auto", module)
    monitor = attach(module, GNSConfig(norm="auto", interval=1), opt, micro_batch_size=MICRO)
    return one_step_against_reference(module, monitor, opt, reference, rank, mesh["dp"].get_group())


def test_fsdp2_data_parallel_submesh_measures_its_own_ranks():
    results = spawn(_tp_dp_worker, 4)
    for got, want, tol in results:
        assert got.num_samples == 2
        assert got.noise == pytest.approx(want.noise, rel=tol.noise)
        assert got.signal == pytest.approx(want.signal, rel=tol.signal)
    assert results[0][0].noise == results[1][0].noise != results[2][0].noise


def _checkpoint_step_worker(rank, world_size):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _wrap(Net(), {})
    opt = _optimizer("l2", model)
    monitor = attach(model, GNSConfig(norm="l2", interval=1), opt, micro_batch_size=MICRO)
    # torch initialises a fresh optimizer's state with a zero-lr step on zero gradients
    get_optimizer_state_dict(model, opt)
    before = (monitor.step, monitor.samples)
    for micro in monitor.micro_steps():
        with micro:
            _loss(model, *_batch(rank, 0, micro.index)).backward()
    opt.step()
    return before, (monitor.step, monitor.samples), monitor.last_estimate is not None


def test_optimizer_state_initialisation_step_is_not_a_training_step():
    assert spawn(_checkpoint_step_worker, 2) == [((0, 0), (1, MICRO * 2), True)] * 2


def _two_backwards_worker(rank, world_size, engine):
    model = _wrap(Net(), {"engine": engine})
    opt = _optimizer("l1", model)
    monitor = attach(model, GNSConfig(norm="l1", interval=2), opt, micro_batch_size=MICRO)
    with pytest.raises(RuntimeError, match="more than one synchronised backward"):
        for micro in range(2):  # accumulation with the sync left on: not per-rank samples
            _loss(model, *_batch(rank, 0, micro)).backward()
    monitor.session.disarm()
    opt.zero_grad()
    held = 0
    if engine == "fsdp2":  # a step that does not measure keeps no reduce-scatter buffer
        _loss(model, *_batch(rank, 1, 0)).backward()
        held = sum(len(unit.comm._buffers) for unit in monitor.capture.units)
    return held


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_second_synchronised_backward_in_a_measuring_step_is_refused(engine):
    assert spawn(_two_backwards_worker, 2, engine) == [0, 0]
