"""FSDP1 capture: one comm hook that is FSDP's own reduction on steps that do not measure and
adds gradient statistics, unit by unit, on steps that do.

Per-rank samples (DESIGN.md section 2): the driver runs all micro-steps but the last under
``no_sync``, so on the sync step each FlatParameter's hook call holds this rank's gradient
accumulated over its local batch, flat, in the reduce dtype, padded to a multiple of the group.

On a measuring step, for each FSDP unit, before its gradient is pre-divided IN PLACE by the
default hook:
* l1/l2 coordinates: the squares are reduce-scattered in the same chunks as the gradient
  (``reduce_squares``), so rank r gets sum_r g_r^2 exactly where its mean shard lies;
* nuclear matrices: this rank's segments are copied;
then the unit is reduced by ``default_hooks`` (bit-identical to no hook) and finished at once:
the mean shard is paired with the squares, the mean matrices are all-gathered from the shards
(measuring steps only) and sent with the copies to their owners. Nothing outlives the unit.
A failure in this rank's measurement math is recorded by the session: the unit's reduction and
the measurement collectives still run (zeros in place of this rank's statistics), and the step
fails on every rank at ``session.finish``.

    capture = FSDP1Capture(fsdp_root, None)     # refuses hybrid sharding, CPU offload
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.algorithms._comm_hooks import default_hooks
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from nongns_dist.capture.collectives import all_gather, exact_sum_travels, group_rank_and_size
from nongns_dist.capture.plan import PlanEntry, TrackedParam, clean_fqn, group_kinds, plan_entries
from nongns_dist.capture.session import MeasurementSession, SampleKind

__all__ = ["FSDP1Capture", "gns_fsdp_hook"]

_HYBRID = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)


class _Segment(NamedTuple):
    """One original parameter inside its unit's flat gradient."""

    name: str  # cleaned fully-qualified name
    shape: torch.Size  # full shape
    start: int  # flat offsets [start, end)
    end: int
    trainable: bool
    optimizer_param: torch.Tensor  # what the optimizer holds: original param or FlatParameter


class FSDP1Capture:
    """The FSDP1 (``FullyShardedDataParallel``) backend, for the root instance."""

    def __init__(
        self, model: FullyShardedDataParallel, process_group: dist.ProcessGroup | None
    ) -> None:
        # A nested instance can only be told apart once FSDP has run its lazy init (_is_root).
        if not isinstance(model, FullyShardedDataParallel) or model._is_root is False:
            raise ValueError(
                "FSDP1 capture needs the ROOT FullyShardedDataParallel instance: FSDP1 takes a "
                f"comm hook on the root only (got {type(model).__name__})"
            )
        self.model = model
        self.group: dist.ProcessGroup | None = (
            process_group if process_group is not None else model.process_group
        )
        self.sample_kind: SampleKind = "rank"
        self.session: MeasurementSession | None = None
        units = FullyShardedDataParallel.fsdp_modules(model)
        self.units = [u for u in units if u._handle is not None]  # units that hold parameters
        rank_and_size = group_rank_and_size(self.group)
        for unit in units:
            hybrid_pg = getattr(unit, "_inter_node_pg", None)  # set only when hybrid was asked
            if unit.sharding_strategy in _HYBRID or hybrid_pg is not None:
                # FSDP1 refuses comm hooks for effective hybrid sharding, and with a shard group
                # of size 1 it quietly makes the unit NO_SHARD, which never reduces across the
                # replicas (upstream bug, not fixed): either way the hook sees no true reduction.
                raise NotImplementedError(
                    "FSDP1 HYBRID_SHARD / _HYBRID_SHARD_ZERO2 is not supported (FSDP1 allows no "
                    "comm hook there, and with a shard group of size 1 it never reduces across "
                    "replicas); for HSDP use FSDP2 fully_shard with a 2-D device mesh "
                    "(replicate, shard)"
                )
            if unit._comm_hook is not None:
                raise ValueError(
                    "FSDP1 capture: the model already has a comm hook, and FSDP1 takes only one"
                )
            if unit.cpu_offload.offload_params:
                raise NotImplementedError(
                    "FSDP1 capture with CPUOffload(offload_params=True): the hook has not been "
                    "verified against offloaded gradients"
                )
            if (
                unit._handle is not None
                and group_rank_and_size(unit.process_group) != rank_and_size
            ):
                raise ValueError(
                    "FSDP1 capture: a unit reduces over a group whose (rank, size) differs from "
                    f"the data-parallel group's {rank_and_size}"
                )
        self.device = model.compute_device or torch.device("cpu")  # where the flat grads live
        self.layout = self._layout()

    # -- GradientCapture -----------------------------------------------------------------------
    def plan_entries(self, norm: str, optimizer: torch.optim.Optimizer | None) -> list[PlanEntry]:
        # ``plan_entries`` reads names, shapes, requires_grad and ids: meta tensors stand in for
        # the original parameters, which a FlatParameter does not expose as tensors.
        optimizer_kinds = group_kinds(optimizer, norm) if optimizer is not None else None
        views: list[tuple[str, torch.Tensor]] = []
        kinds: dict[int, str | None] = {}
        for segment in (s for segments in self.layout.values() for s in segments):
            view = torch.empty(segment.shape, device="meta", requires_grad=segment.trainable)
            views.append((segment.name, view))
            if optimizer_kinds is not None:
                kinds[id(view)] = optimizer_kinds.get(id(segment.optimizer_param))
        return plan_entries(views, norm, kinds if optimizer_kinds is not None else None)

    def install(self, session: MeasurementSession) -> None:
        self.session = session
        # one hook for all units; each unit then gets its own state (private, as FSDP has one)
        self.model.register_comm_hook(None, gns_fsdp_hook)
        for unit, segments in self.layout.items():
            coords: list[tuple[TrackedParam, int, int]] = []
            matrices: list[tuple[TrackedParam, int, int]] = []
            for segment in segments:
                tracked = session.plan.get(segment.name)  # None: frozen or not measured
                if tracked is not None:
                    spans = matrices if tracked.norm.matrix else coords
                    spans.append((tracked, segment.start, segment.end))
            unit._comm_hook_state = _UnitState(self, unit, coords, matrices)

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return self.model.no_sync()

    def flush(self) -> None:
        """Nothing waits for the boundary: units are finished as they are reduced."""

    def discard(self) -> None:
        """Nothing outlives a unit's reduction: nothing to forget."""

    def remove(self) -> None:
        """FSDP cannot unregister a comm hook: this only stops measuring (the hook stays the
        default reduction)."""
        self.session = None

    def _layout(self) -> dict[FullyShardedDataParallel, list[_Segment]]:
        """Each unit's original parameters by flat offset (fixed at wrapping); alignment padding
        (use_orig_params=True) and the world-size padding at the end are skipped."""
        names = {m: n for n, m in self.model.named_modules()}
        layout = {}
        for unit in self.units:
            assert unit._handle is not None
            flat = unit._handle.flat_param
            segments, offset, i = [], 0, 0
            for numel, is_padding in zip(
                flat._numels_with_padding, flat._is_padding_mask, strict=True
            ):
                if not is_padding:
                    owner = flat._params[i] if flat._params is not None else flat
                    name = f"{names[unit]}.{flat._fqns[i]}" if names[unit] else flat._fqns[i]
                    shape, end = flat._shapes[i], offset + numel
                    segments.append(
                        _Segment(clean_fqn(name), shape, offset, end, owner.requires_grad, owner)
                    )
                    i += 1
                offset += numel
            layout[unit] = segments
        return layout


class _UnitState:
    """Comm hook state of one FSDP unit: its group, FSDP's own division factors, its layout."""

    __slots__ = ("capture", "coords", "default", "group", "matrices", "rank")

    def __init__(
        self,
        capture: FSDP1Capture,
        unit: FullyShardedDataParallel,
        coords: list[tuple[TrackedParam, int, int]],
        matrices: list[tuple[TrackedParam, int, int]],
    ) -> None:
        # -- wiring ----------------------------------------------------------------------------
        self.capture = capture  # its ``session`` is None when not measuring (remove())
        assert unit.process_group is not None
        self.group = unit.process_group
        self.rank = dist.get_rank(self.group)
        self.default = default_hooks.DefaultState(self.group)
        # the factors FSDP's default path uses, read from FSDP itself (equal for non-hybrid)
        self.default.gradient_predivide_factor = unit._gradient_predivide_factor
        self.default.gradient_postdivide_factor = unit._gradient_postdivide_factor
        # -- layout: trainable tracked parameters by flat offset -------------------------------
        self.coords = coords  # l1/l2
        self.matrices = matrices  # nuclear

    def reduce(self, grad: torch.Tensor, output: torch.Tensor | None) -> None:
        """FSDP's default reduction, exactly (pre-divides ``grad`` in place)."""
        if output is None:
            default_hooks.allreduce_hook(self.default, grad)
        else:
            default_hooks.reduce_scatter_hook(self.default, grad, output)

    def measure(
        self, session: MeasurementSession, grad: torch.Tensor, output: torch.Tensor | None
    ) -> None:
        world = session.world_size
        if output is not None and grad.numel() != world * output.numel():
            raise RuntimeError(f"FSDP1 shard of {output.numel()} for {grad.numel()} elements")
        squares = None
        with_sum = exact_sum_travels(grad.dtype)
        if self.coords:  # padded to a multiple of the group: the chunks are FSDP's shards
            squares = session.reduce_squares(grad)
        # None where the copy failed (the session has the failure; zeros travel instead)
        local = [session.guarded(grad[a:b].clone) for _, a, b in self.matrices]
        self.reduce(grad, output)  # NO_SHARD: ``grad`` now holds the mean
        if squares is not None:
            work, received, _packed, chunk = squares
            work.wait()
            lo = self.rank * chunk
            if with_sum:
                mean = received[1] / world
            else:
                mean = output if output is not None else grad[lo : lo + chunk]
            session.add_coordinate_chunk(self.coords, lo, mean, received[0])
        if self.matrices:
            full = grad
            if output is not None:  # the mean is sharded: gather it, on measuring steps only
                full = output.new_empty(world * output.numel())
                all_gather(full, output, group=self.group)
            session.add_matrices(
                [t for t, _, _ in self.matrices], local, [full[a:b] for _, a, b in self.matrices]
            )


def gns_fsdp_hook(
    state: _UnitState, grad: torch.Tensor, output: torch.Tensor | None = None
) -> None:
    """The FSDP1 comm hook: sharded strategies call it with (padded local grad, output shard),
    NO_SHARD with the grad alone (reduced in place)."""
    session = state.capture.session
    if session is not None and session.reduction(state):
        state.measure(session, grad, output)
    else:
        state.reduce(grad, output)
