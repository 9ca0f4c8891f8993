"""``RankPool``: the pooled second moments of one rank's measurements, kept between steps.

A ``MomentPool`` (``nongns_dist.estimators``) keyed by what THIS rank measures: a coordinate
slice in its layout, ``(param index, first coordinate, count)``, or a matrix it owns,
``(param index,)`` (its upper triangle). Entries differ per rank, so a checkpoint holds one
state per rank, tagged with the rank, the group size and the measured parameters; anything else
restarts the pool with a warning. The measurement session adds each measurement's moments
here as they are finished and reads the pooled root after its one all-reduce.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import torch

from nongns_dist.capture.collectives import triangle_to_gram
from nongns_dist.capture.plan import MeasurementPlan, TrackedParam
from nongns_dist.config import GNSConfig
from nongns_dist.estimators import MomentPool, pool_moment, pooled_root, settle

__all__ = ["RankPool"]

logger = logging.getLogger("nongns_dist")


class RankPool:
    """This rank's pooled moments (``config.pool_moments``, every measured norm pooled)."""

    def __init__(self, plan: MeasurementPlan, config: GNSConfig, device: torch.device) -> None:
        self.plan = plan
        self.config = config
        self.device = device
        self.moments = MomentPool.for_config(config)
        #: This measurement's total trace (sum of every measured variance) and root (summed
        #: noise parts), for ``settle``.
        self._trace = self._root = 0.0
        self._slices: dict[int, list[tuple[int, int, int]]] = {}
        self._touched: set[Hashable] = set()  # entries this measurement updated

    # -- one measurement ---------------------------------------------------------------------
    def begin(self, *, staged: bool) -> None:
        """A measurement begins: nothing of an abandoned one stays; ``staged``: hold moment-mode
        updates apart until ``settle`` (a step a loss scaler may still skip)."""
        self._touched.clear()
        self.moments.rollback()
        if staged and self.moments.level_beta is None:
            self.moments.stage()  # (level-and-bias mode holds every measurement until settled)

    def abandon(self) -> None:
        self.moments.rollback()

    def add_slice(
        self, table: torch.Tensor, param: TrackedParam, first: int, var: torch.Tensor, dof: float
    ) -> None:
        """The variances ``var`` of ``param``'s coordinates from ``first`` (this rank's layout)."""
        key = self._slice_key(param.index, first, var.numel())
        self._touched.add(key)
        self._add(table, param, key, var, dof, 0.0, trace=var.sum())

    def add_matrix(
        self, table: torch.Tensor, param: TrackedParam, triangle: torch.Tensor, dof: float,
        floor: float, *, trace: torch.Tensor,
    ) -> None:  # fmt: skip
        """The covariance of an owned matrix, as its upper triangle."""
        key = (param.index,)
        self._touched.add(key)
        self._add(table, param, key, triangle, dof, floor, trace=trace)

    def fill_untouched(self, table: torch.Tensor, dof: float) -> None:
        """Entries this measurement did not reach (a parameter without gradient on this step:
        FSDP2 leaves unused ones out of its reduce-scatter) take a zero moment, as a gradient
        of zeros would give, so the pooled noise covers every measured parameter."""
        for key in self.moments.entry_keys():
            if key in self._touched:
                continue
            param = self.plan.params[key[0]]  # type: ignore[index]
            zero = torch.zeros_like(self.moments.value(key))
            self._add(table, param, key, zero, dof, 0.0, trace=0.0)

    def pooled_root(self, root: float, parts: list[float]) -> float:
        """The pooled noise before squaring, from this measurement's ``root`` (its summed noise
        parts) and the all-reduced pool ``parts`` (pooled or shape parts, fresh parts, trace)."""
        self._trace, self._root = float(parts[2]), root
        return pooled_root(self.moments, root, parts)

    def settle(self, keep: bool, dof: float) -> None:
        """After the all-reduce: keep the measurement (fold its moments in) or drop it."""
        settle(self.moments, self._trace, self._root, dof, keep)

    def restart(self) -> None:
        """Empty the pool (``MomentPool.restart``): the driver's call at the end of the warm-up.
        Moment mode keeps its pool: it has no bias ratio to protect."""
        if self.moments.level_beta is not None:
            self.moments.restart()

    def memory_bytes(self) -> int:
        """Bytes of tensors held: between measuring steps the pool alone (for each l1 slice on
        this rank one float32 moment per coordinate, for each matrix this rank OWNS the float64
        upper triangle of its m x m moment, m(m+1)/2 x 8 bytes; no other rank keeps it). During
        a step, add this measurement's moments, held until it is settled (level-and-bias mode:
        as many bytes again)."""
        return self.moments.memory_bytes()

    def _add(
        self, table: torch.Tensor, param: TrackedParam, key: Hashable, moment: torch.Tensor,
        dof: float, floor: float, *, trace: torch.Tensor | float,
    ) -> None:  # fmt: skip
        """``moment`` into entry ``key`` and its parts of the pooled noise into ``param``'s row
        of the session's table (columns 2-4)."""
        size = param.gram_size
        parts = pool_moment(
            self.moments, key, moment, param.norm, dof, floor, trace=trace,
            unpack=(lambda tri: triangle_to_gram(tri, size)) if param.norm.matrix else None,
            method=self.config.sqrt_trace_method, tol=self.config.sqrt_trace_tol,
            bias_correction=self.config.bias_correction,
        )  # fmt: skip
        row = table[param.index]
        row[2:5] += parts.to(row)

    def _slice_key(self, index: int, first: int, count: int) -> tuple[int, int, int]:
        """Key of a slice; a slice that overlaps another of the same parameter (a backend whose
        layout changed) replaces it. DDP's per-parameter segments and FSDP's shards keep their
        layout, so this is a guard, not the common case."""
        key = (index, first, count)
        if key not in self.moments:
            kept = []
            for old in self._slices.get(index, []):
                if old[1] < first + count and first < old[1] + old[2]:
                    self.moments.discard(old)
                else:
                    kept.append(old)
            self._slices[index] = [*kept, key]
        return key

    # -- checkpointing (the entries are this rank's: one state per rank) ----------------------
    def state(self, rank: int, world_size: int) -> dict[str, Any]:
        """This rank's pooled moments, tagged with its rank and group size."""
        return {
            "rank": rank,
            "world_size": world_size,
            "params": [t.name for t in self.plan.params],  # what the entries' indices mean
            **self.moments.state_dict(),
        }

    def load(self, state: dict[str, Any] | None, rank: int, world_size: int) -> bool:
        """Continue from ``state()`` of the same rank in a group of the same size; anything
        else (another rank's state, another world size, none) restarts the pool, with a
        warning. Returns whether the state was loaded."""
        names = [t.name for t in self.plan.params]
        if state is not None and state["params"] != names:
            state, where = None, "taken with other measured parameters"
        elif state is not None and (state["rank"], state["world_size"]) != (rank, world_size):
            where = f"rank {state['rank']} of {state['world_size']}"
            state = None
        else:
            where = "none"
        self._slices = {}
        if state is None:
            logger.warning(
                "nongns_dist: no pooled moments for rank %d of %d in the checkpoint (%s): the "
                "pool restarts (it reads low until it holds pool_dof degrees of freedom)",
                rank, world_size, where,
            )  # fmt: skip
            self.moments = MomentPool.for_config(self.config)
            return False
        try:
            self.moments.load_state_dict(state, self.device)
        except ValueError as error:  # moments vs shapes (level_beta): they cannot continue
            logger.warning("nongns_dist: the pool restarts: %s", error)
            self.moments = MomentPool.for_config(self.config)
            return False
        for key in self.moments.entry_keys():
            if isinstance(key, tuple) and len(key) == 3:  # a coordinate slice
                self._slices.setdefault(key[0], []).append(key)
        return True
