"""``SampleAccumulator``: samples that arrive over the micro-steps of a step (one process, and
DeepSpeed, whose hooks see every micro-step's gradient), kept as sums until the boundary and
then reduced into the session in one go. Its memory grows with the model (the sums of every
measured parameter), unlike the streaming per-rank backends.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nongns_dist.capture.collectives import reduce_scatter_rows, reduce_to_owners, upper_triangle
from nongns_dist.capture.plan import TrackedParam
from nongns_dist.capture.session import MeasurementSession
from nongns_dist.norms import as_matrix

__all__ = ["SampleAccumulator"]


class SampleAccumulator:
    """This rank's samples of one measuring step, summed per parameter, reduced at the end.

    For backends whose reduction does not leave the mean where the statistics need it, or whose
    samples arrive over several micro-steps (ZeRO partitions the averaged gradient; ZeRO-2/3
    reduce every micro-step): each sample (a local mean gradient over the session's
    ``sample_size`` examples) is added as it appears; ``flush`` then runs

    * one reduce-scatter of [S | Q] over all l1/l2 coordinates (S = sum_s g_s, Q = sum_s g_s^2);
    * one owner reduction of the float64 Grams (upper triangles) and one of the float64 sums of
      each matrix; the owner finishes it (uncentred: the mean is known only at the end).

    Costs on measuring steps only: S and Q (float32) of the measured vectors, S (float64) and the
    Gram of the measured matrices, kept until ``flush``.
    """

    def __init__(self, session: MeasurementSession) -> None:
        self.session = session
        self._coord_sums: dict[int, torch.Tensor] = {}
        self._coord_squares: dict[int, torch.Tensor] = {}
        self._matrix_sums: dict[int, torch.Tensor] = {}
        self._grams: dict[int, torch.Tensor] = {}

    def add(self, param: TrackedParam, grad: torch.Tensor) -> None:
        """One sample of ``param``: its local gradient as a mean over ``sample_size`` examples.
        Local math (``session.guarded``): a failure is recorded, and ``flush`` still takes part
        in every collective."""
        self.session.guarded(self._add_sample, param, grad)

    def _add_sample(self, param: TrackedParam, grad: torch.Tensor) -> None:
        i = param.index
        if param.norm.matrix:
            grad64 = grad.detach().reshape(param.shape).to(torch.float64)
            mat = as_matrix(grad64)
            self._add(self._grams, i, mat @ mat.T)
            self._add(self._matrix_sums, i, grad64.reshape(-1))
        else:
            flat = grad.detach().reshape(-1).float()
            self._add(self._coord_sums, i, flat)
            self._add(self._coord_squares, i, flat.square())

    @staticmethod
    def _add(store: dict[int, torch.Tensor], index: int, value: torch.Tensor) -> None:
        if index in store:
            store[index] += value
        else:
            store[index] = value.clone()

    def flush(self, device: torch.device) -> None:
        """Reduce everything added into the session (a collective: every rank calls it)."""
        s = self.session
        plan = s.plan
        n = s.num_samples
        # -- coordinates: one flat buffer in plan order, reduce-scattered as [S | Q] rows
        spans, start = [], 0
        for t in plan.params:
            if not t.norm.matrix:
                spans.append((t, start, start + t.shape.numel()))
                start += t.shape.numel()
        if spans:
            sums = torch.zeros(start, dtype=torch.float32, device=device)
            squares = torch.zeros(start, dtype=torch.float32, device=device)
            for t, a, b in spans:  # a parameter without gradient here is a zero sample
                if t.index in self._coord_sums and not s.failed:  # failed: zeros travel
                    sums[a:b] = self._coord_sums[t.index]
                    squares[a:b] = self._coord_squares[t.index]
            work, received, _packed, chunk = reduce_scatter_rows(
                [sums, squares], s.world_size, s.group
            )
            work.wait()
            s.add_coordinate_chunk(spans, s.rank * chunk, received[0] / n, received[1])
        # -- matrices: Grams and sums to their owners
        matrices = plan.matrices
        if matrices:

            def zeros(size: int) -> torch.Tensor:
                return torch.zeros(size, dtype=torch.float64, device=device)

            def triangles() -> Iterator[torch.Tensor]:
                for t in matrices:
                    gram = self._grams.get(t.index)
                    # no gradient on this rank (unused parameter), or its math failed: zeros
                    triangle = None if gram is None else s.guarded(upper_triangle, gram)
                    yield zeros(t.triangle_size) if triangle is None else triangle

            def matrix_sums() -> Iterator[torch.Tensor]:
                for t in matrices:
                    total = None if s.failed else self._matrix_sums.get(t.index)
                    yield zeros(t.shape.numel()) if total is None else total

            common = {"world_size": s.world_size, "rank": s.rank, "group": s.group}
            owned_grams = reduce_to_owners(
                matrices, [t.triangle_size for t in matrices], triangles(), device=device,
                **common,  # type: ignore[arg-type]
            )  # fmt: skip
            owned_sums = reduce_to_owners(
                matrices,
                [t.shape.numel() for t in matrices],
                matrix_sums(),
                device=device,
                **common,  # type: ignore[arg-type]
            )

            def finish_owned(t: TrackedParam) -> None:
                mean = owned_sums[t.index] / n
                s._finish_owned(t, owned_grams, mean, centred=False)

            for t in matrices:
                if t.index in owned_grams:
                    s.guarded(finish_owned, t)
        self._coord_sums.clear()
        self._coord_squares.clear()
        self._matrix_sums.clear()
        self._grams.clear()
