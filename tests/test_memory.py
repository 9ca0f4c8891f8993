"""What a monitor keeps between measuring steps: each pooled moment on one rank only.

The measured numbers (RSS of DDP and FSDP2 runs) are in BENCHMARKS.md, from
``launch/benchmarks/measure_memory.py``; this checks the account they are explained by.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nongns_dist import GNSConfig, attach

from .distributed import spawn

pytestmark = pytest.mark.distributed

MICRO = 2
SHAPES = [(12, 20), (20, 20), (20, 6), (6, 16), (16, 12)]


def _memory_worker(rank, world_size, engine, norm):
    torch.manual_seed(0)
    module = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in SHAPES])
    if engine == "ddp":
        model = DDP(module, bucket_cap_mb=0.001)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in module:
            fully_shard(layer)
        model = fully_shard(module)
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    config = GNSConfig(norm=norm, interval=1, adapt_batch_size=False)
    monitor = attach(model, config, opt, micro_batch_size=MICRO)
    session = monitor.session
    held, between = [], []
    finish = session.finish

    def finish_and_count():
        held.append(session.memory_bytes())
        return finish()

    session.finish = finish_and_count
    for step in range(3):
        x = torch.randn(
            MICRO, SHAPES[0][0], generator=torch.Generator().manual_seed(10 * rank + step)
        )
        for micro in monitor.micro_steps():
            with micro:
                (model(x).square().mean() / micro.loss_divisor).backward()
        opt.step()
        opt.zero_grad()
        between.append(session.memory_bytes())
    owned = sum(
        t.gram_size * (t.gram_size + 1) // 2 * 8
        for t in session.plan.params
        if t.norm.matrix and t.owner == rank
    )
    return held, between, owned


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_pooled_triangles_live_on_their_owner_only(engine):
    """nuclear: between steps a rank holds the float64 upper triangles of the matrices it owns
    and nothing else, so the ranks together hold each matrix's once; within a step, this
    measurement's moments as well (held until it is settled: as many bytes again)."""
    results = spawn(_memory_worker, 2, engine, "nuclear")
    every_triangle = sum(min(a, b) * (min(a, b) + 1) // 2 * 8 for a, b in SHAPES)
    assert sum(owned for _, _, owned in results) == every_triangle
    for held, between, owned in results:
        assert 0 < owned < every_triangle  # both ranks own some
        assert between == [owned] * 3
        assert held == [owned, 2 * owned, 2 * owned]  # the first step has no pool yet


def test_pooled_l1_moments_are_split_over_the_ranks():
    """l1 (DDP): each coordinate's float32 moment on one rank: the ranks' bytes add up to the
    model's coordinates x 4 once."""
    results = spawn(_memory_worker, 2, "ddp", "l1")
    coordinates = sum(a * b for a, b in SHAPES)
    assert sum(between[-1] for _, between, _ in results) == coordinates * 4
    for held, between, _ in results:
        assert between[0] == between[-1] and held[-1] == 2 * between[-1]
