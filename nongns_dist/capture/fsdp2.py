"""FSDP2 (``fully_shard``) capture: a pass-through reduce-scatter that keeps its input, and an
all-reduce hook that measures once the mean shard is ready.

Per-rank samples (DESIGN.md section 2): the driver accumulates micro-steps with
``set_requires_gradient_sync(False)``, so on the sync step each unit's reduce-scatter input holds
this rank's gradient accumulated over its local batch, in the reduce dtype.

Facts of torch 2.13 used here (private attributes; the layout is checked on every measuring
step, and a mismatch is an error, not a wrong estimate):
* ``set_custom_reduce_scatter(comm)`` per FSDP module with parameters; FSDP calls
  ``comm.allocate`` for the input, then for the output, then (only when the shard group has more
  than one rank) ``comm(output_tensor=, input_tensor=, group=, op=)``. The comm passes everything
  through, so the reduction is FSDP's own; it only remembers the input buffer.
* ``set_all_reduce_hook(hook)`` runs after the reduce-scatter and the HSDP all-reduce: ``hook(out)``
  with ``out`` the mean shard (times FSDP's post-divide factor).
* Input layout: ``input.view(W, -1)[r]`` is chunk r of every parameter that has a gradient, in
  ``fsdp_params`` order; Shard(0) pads dim 0 to a multiple of W, Shard(k > 0) concatenates the
  chunks along dim 0. Parameters without a gradient are left out, so the parameter group's
  ``post_backward`` is wrapped to record which ones have one.

On a measuring step, per unit: squares of the local gradient reduce-scattered in the same chunks
(then all-reduced over the replicate group under HSDP); the mean shards of the measured matrices
all-gathered over the shard group (the mean is sharded, centring needs all of it); Grams of
G_r - G to their owners. Nothing is kept past the unit. A failure in this rank's measurement
math is recorded by the session: FSDP's reduce-scatter and the measurement collectives still
run (zeros in place of this rank's statistics), and the step fails on every rank at
``session.finish``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from nongns_dist.capture.collectives import all_gather, exact_sum_travels
from nongns_dist.capture.plan import PlanEntry, TrackedParam, module_plan_entries
from nongns_dist.capture.session import MeasurementSession, SampleKind

__all__ = ["FSDP2Capture", "slot_width", "unchunk"]


def _divide_factors(param_group: Any, reduce_dtype: torch.dtype) -> tuple[float, float]:
    """(pre, post) of FSDP's gradient division: local = input x pre, mean = output / post."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        _get_gradient_divide_factors,
    )

    if param_group.gradient_divide_factor is not None:
        raise NotImplementedError(
            "set_gradient_divide_factor changes what the reduced gradient is a mean over; "
            "nongns_dist needs the mean (unset it)"
        )
    pre, post, _, _ = _get_gradient_divide_factors(
        _shard_group(param_group),
        _replicate_group(param_group),
        reduce_dtype,
        param_group.device.type,
        None,
        param_group.force_sum_reduction_for_comms,
    )
    return float(pre or 1.0), float(post or 1.0)


def _shard_group(param_group: Any) -> dist.ProcessGroup | None:
    return getattr(param_group.mesh_info, "shard_process_group", None)


def _replicate_group(param_group: Any) -> dist.ProcessGroup | None:
    return getattr(param_group.mesh_info, "replicate_process_group", None)


def slot_width(fsdp_param: Any, shards: int) -> int:
    """Elements of one rank's chunk of this parameter in the reduce-scatter buffer."""
    size = fsdp_param._orig_size
    if fsdp_param.fsdp_placement.dim == 0:
        return math.ceil(size[0] / shards) * math.prod(size[1:])
    return math.prod(size) // shards


def unchunk(rows: torch.Tensor, fsdp_param: Any) -> torch.Tensor:
    """The full tensor from its W chunks ``rows`` (W, width), as FSDP laid them out."""
    size = fsdp_param._orig_size
    dim = fsdp_param.fsdp_placement.dim
    shards = rows.shape[0]
    if dim == 0:
        return rows.reshape(-1, *size[1:])[: size[0]]
    chunk = list(size)
    chunk[dim] //= shards
    return torch.cat(rows.reshape(shards, *chunk).unbind(0), dim=dim)


class _KeepInput:
    """A reduce-scatter that is the one it wraps, and, while ``keep`` is set (a measuring
    backward), remembers its input buffer; otherwise it holds nothing past the reduction."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.keep = False
        self._buffers: list[torch.Tensor] = []

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self.inner.allocate(size, dtype=dtype, device=device)
        if self.keep:  # FSDP allocates the input, then the output, of each reduction
            self._buffers = [*self._buffers, buffer][-2:]
        return buffer

    def release(self) -> None:
        self._buffers = []
        self.keep = False

    def take_input(self, output: torch.Tensor, shards: int) -> torch.Tensor:
        buffer = self._buffers[0] if len(self._buffers) == 2 else None
        if buffer is None or buffer.numel() != output.numel() * shards:
            raise RuntimeError(
                "FSDP2 did not allocate its reduce-scatter buffers as nongns_dist expects "
                f"(torch {torch.__version__}); supported: torch 2.9 to 2.13"
            )
        return buffer

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> Any:
        return self.inner(
            output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op,
            async_op=async_op,
        )  # fmt: skip


class _Unit:
    """One FSDP module's parameter group and what the capture installed on it."""

    def __init__(self, module: FSDPModule, param_group: Any) -> None:
        self.module = module
        self.param_group = param_group
        self.comm = _KeepInput(param_group._reduce_scatter_comm)  # chains a user's comm
        self.user_hook: Callable[[torch.Tensor], None] | None = param_group._all_reduce_hook
        self.with_grad: list[Any] = []  # FSDPParams in this backward's reduce-scatter


class FSDP2Capture:
    """The FSDP2 backend. ``model``: the root ``fully_shard``-ed module."""

    def __init__(self, model: nn.Module, process_group: dist.ProcessGroup | None) -> None:
        if not isinstance(model, FSDPModule):
            raise TypeError(f"expected a fully_shard-ed module, got {type(model).__name__}")
        self.model = model
        self.sample_kind: SampleKind = "rank"
        self.session: MeasurementSession | None = None
        self.units: list[_Unit] = []
        seen: set[int] = set()
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            groups = module._get_fsdp_state()._fsdp_param_groups
            if len(groups) > 1:
                raise NotImplementedError(
                    f"{type(module).__name__} has {len(groups)} FSDP parameter groups (a "
                    "per-parameter mesh); FSDP2's reduce-scatter hooks take one"
                )
            # fully_shard([a, b]) (accelerate's [final norm, lm_head]): both modules report
            # the one group they share; it is hooked once
            if groups and id(groups[0]) not in seen:
                seen.add(id(groups[0]))
                self.units.append(_Unit(module, groups[0]))
        if not self.units:
            raise ValueError("the fully_shard-ed model has no parameters to measure")
        first = self.units[0].param_group
        self.device = first.device
        mesh = first.mesh_info.mesh
        for unit in self.units[1:]:
            if unit.param_group.mesh_info.mesh != mesh:
                raise NotImplementedError("FSDP units on different meshes are not supported")
        self.group = process_group if process_group is not None else _data_parallel_group(mesh)
        self.tracked: dict[int, TrackedParam] = {}  # id(sharded param) -> plan entry

    # -- GradientCapture -----------------------------------------------------------------------
    def plan_entries(self, norm: str, optimizer: torch.optim.Optimizer | None) -> list[PlanEntry]:
        # DTensor parameters report their global shape: no shard-shape correction needed
        return module_plan_entries(self.model, norm, optimizer)

    def install(self, session: MeasurementSession) -> None:
        self.session = session
        for param, tracked in session.plan.tracked(self.model.named_parameters()):
            self.tracked[id(param)] = tracked
        for unit in self.units:
            unit.module.set_custom_reduce_scatter(unit.comm)  # type: ignore[arg-type]
            unit.module.set_all_reduce_hook(self._hook(unit))
            self._record_gradients(unit)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def flush(self) -> None:
        """Nothing waits for the boundary: buckets / units are finished as they are reduced."""

    def discard(self) -> None:
        """Drop what an abandoned backward kept (normally released by the all-reduce hook)."""
        for unit in self.units:
            unit.comm.release()
            unit.with_grad = []

    def remove(self) -> None:
        """Stop measuring; the pass-through comm stays (FSDP2 has no way to unset it)."""
        self.session = None

    # -- hooks ---------------------------------------------------------------------------------
    def _record_gradients(self, unit: _Unit) -> None:
        param_group = unit.param_group
        post_backward = param_group.post_backward

        def recording_post_backward(*args: Any) -> Any:
            # which parameters reach the reduce-scatter: the same test FSDP makes, just before
            if self.session is not None and self.session.armed and param_group.reduce_grads:
                unit.comm.keep = True
                unit.with_grad = [
                    p
                    for p in param_group.fsdp_params
                    if hasattr(p, "_unsharded_param")
                    and (
                        p.unsharded_accumulated_grad is not None
                        or p.unsharded_param.grad is not None
                        or (
                            param_group.reduce_scatter_unused_params
                            and p.sharded_param.requires_grad
                        )
                    )
                ]
            return post_backward(*args)

        param_group.post_backward = recording_post_backward

    def _hook(self, unit: _Unit) -> Callable[[torch.Tensor], None]:
        def all_reduce_hook(output: torch.Tensor) -> None:
            session = self.session
            try:
                if session is not None and session.reduction(unit):
                    self._measure(session, unit, output)
            finally:
                unit.comm.release()
            if unit.user_hook is not None:
                unit.user_hook(output)

        return all_reduce_hook

    # -- measuring -----------------------------------------------------------------------------
    def _measure(self, session: MeasurementSession, unit: _Unit, output: torch.Tensor) -> None:
        param_group = unit.param_group
        shard_group = _shard_group(param_group)
        replicate_group = _replicate_group(param_group)
        shards = shard_group.size() if shard_group is not None else 1
        local_flat = unit.comm.take_input(output, shards)
        if local_flat.device.type != "cpu":
            # read on the all-reduce stream, while FSDP frees the buffer after the reduce-scatter
            # stream's event: keep the allocator from reusing it before these reads
            local_flat.record_stream(torch.accelerator.current_stream(local_flat.device))
        pre, post = _divide_factors(param_group, local_flat.dtype)
        fsdp_params, unit.with_grad = unit.with_grad, []
        widths = [slot_width(p, shards) for p in fsdp_params]
        if sum(widths) * shards != local_flat.numel():
            raise RuntimeError(
                f"FSDP2 reduce-scatter layout: {local_flat.numel()} elements, expected "
                f"{sum(widths) * shards} from the parameters with gradients"
            )
        rows = local_flat.view(shards, -1)
        # (guarded local math; after a failure the values no longer matter, only the shapes of
        # what this rank still sends)
        mean = output if post == 1.0 else session.guarded(torch.div, output, post)
        mean = output if mean is None else mean
        local_rows = rows if pre == 1.0 else session.guarded(torch.mul, rows, pre)
        local_rows = rows if local_rows is None else local_rows
        spans, matrices, start = [], [], 0
        for fsdp_param, width in zip(fsdp_params, widths, strict=True):
            tracked = self.tracked.get(id(fsdp_param.sharded_param))
            if tracked is not None and tracked.norm.matrix:
                matrices.append((tracked, fsdp_param, start, width))
            elif tracked is not None:
                spans.append((tracked, start, start + width))
            start += width
        if spans:
            self._coordinates(session, local_rows, mean, spans, shard_group, replicate_group)
        if matrices:
            gathered = _all_gather_columns(
                mean, [(s, w) for _, _, s, w in matrices], shards, shard_group
            )
            offsets = [0]
            for _, _, _, w in matrices:
                offsets.append(offsets[-1] + w)
            # None where forming one failed (the session has the failure; zeros travel)
            session.add_matrices(
                [t for t, _, _, _ in matrices],
                [session.guarded(unchunk, local_rows[:, s : s + w], p) for _, p, s, w in matrices],
                [
                    session.guarded(unchunk, gathered[:, offsets[i] : offsets[i + 1]], p)
                    for i, (_, p, _, _) in enumerate(matrices)
                ],
            )

    def _coordinates(
        self,
        session: MeasurementSession,
        local_rows: torch.Tensor,
        mean: torch.Tensor,
        spans: list[tuple[TrackedParam, int, int]],
        shard_group: dist.ProcessGroup | None,
        replicate_group: dist.ProcessGroup | None,
    ) -> None:
        # Squares in the same chunks as the gradient: rank r receives sum_s g_s^2 on its chunk.
        with_sum = exact_sum_travels(local_rows.dtype)
        shards = local_rows.shape[0]
        if shards > 1:
            work, received, packed, _ = session.reduce_squares(
                local_rows.reshape(-1), shard_group=shard_group
            )
            work.wait()
            del work, packed  # the squares' send buffer (the work holds it too): done with
        else:

            def own_rows() -> torch.Tensor:
                local = local_rows[0].float()
                return torch.stack([local.square(), local] if with_sum else [local.square()])

            own = session.guarded(own_rows)
            # failed: zeros in the replicate group's all-reduce
            received = own if own is not None else local_rows.new_zeros(
                (2 if with_sum else 1, local_rows.shape[1]), dtype=torch.float32
            )  # fmt: skip
        if replicate_group is not None and replicate_group.size() > 1:
            dist.all_reduce(received, group=replicate_group)
            if replicate_group.rank() != 0:  # replicas hold the same chunk: count it once
                return
        chunk_mean = received[1] / session.world_size if with_sum else mean.float()
        session.add_coordinate_chunk(spans, 0, chunk_mean, received[0])


def _all_gather_columns(
    mean: torch.Tensor,
    columns: list[tuple[int, int]],
    shards: int,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """(W, sum of widths): every rank's chunk of the given column ranges of the mean shard."""
    mine = torch.cat([mean[start : start + width] for start, width in columns])
    if shards == 1:
        return mine.view(1, -1)
    gathered = torch.empty(shards * mine.numel(), dtype=mine.dtype, device=mine.device)
    all_gather(gathered, mine, group=group)
    return gathered.view(shards, -1)


def _data_parallel_group(mesh: Any) -> dist.ProcessGroup | None:
    """The group of every rank that holds a sample: the mesh's only group (FSDP), or the whole
    world when a 2-D (replicate, shard) mesh spans it (HSDP)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None
    raise ValueError(
        "an HSDP mesh that is part of a larger world (tensor parallelism?): pass "
        "process_group= the group of all data-parallel ranks (replicate x shard)"
    )
