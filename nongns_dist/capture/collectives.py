"""The extra collectives of a measuring step (DESIGN.md section 3), shared by every backend.

* ``reduce_scatter_rows``: squares (and, below float32, sums) of local gradients, reduce-scattered
  in the same chunks as the gradient itself, so rank r receives sum_r g_r^2 on its 1/R only.
* ``reduce_to_owners``: one flat float64 tensor per matrix summed onto the matrix's owner only
  (Gram upper triangles, matrix sums), never all-reduced to everyone.
* ``all_gather_rows``: the mean of a sharded matrix, on measuring steps only (FSDP).

Every buffer is allocated on the device of the tensors it carries; every call takes the
data-parallel group explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from nongns_dist.capture.plan import TrackedParam

__all__ = [
    "all_gather",
    "exact_sum_travels",
    "gram_triangle",
    "group_rank_and_size",
    "reduce_scatter",
    "reduce_scatter_rows",
    "reduce_scatter_segments",
    "reduce_to_owners",
    "segment_parts",
    "triangle_to_gram",
    "upper_triangle",
]


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> Any:
    """Reduce-scatter of one flat tensor; torch 2.13 renamed reduce_scatter_tensor (deprecated
    there) to reduce_scatter_single. Looked up per call, so wrappers of torch.distributed see it."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


def all_gather(
    output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None
) -> Any:
    """All-gather of one flat tensor (all_gather_into_tensor, renamed all_gather_single in
    torch 2.13)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group)


def reduce_scatter_rows(
    rows: Sequence[torch.Tensor],
    world_size: int,
    group: dist.ProcessGroup | None,
    *,
    square: Sequence[int] = (),
) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """Reduce-scatter several flat tensors of one length together, in float32, asynchronously.

    Rank r receives, for every row, the sum over ranks of chunk r (the rows listed in
    ``square`` are squared first, in the send buffer: no temporary of the row's size). Returns
    (work, received of shape (rows, chunk), the packed input to keep alive until the work
    completes, chunk).
    """
    numel = rows[0].numel()
    device = rows[0].device
    chunk = -(-numel // world_size)
    packed = torch.zeros(world_size, len(rows), chunk, dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        for r in range(world_size):  # copied chunk by chunk: no padded temporary
            part = row[r * chunk : (r + 1) * chunk]
            packed[r, i, : part.numel()] = part
    for i in square:
        packed[:, i].square_()
    received, work = _reduce_scatter_async(packed, world_size, group)
    return work, received.view(len(rows), chunk), packed, chunk


class _Done:
    """The work handle of a collective that had nothing to do (one rank)."""

    def wait(self) -> bool:
        return True


def _reduce_scatter_async(
    packed: torch.Tensor, world_size: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, Any]:
    """(received, work) of a reduce-scatter of ``packed`` (world_size x ...); with one rank
    the received part is ``packed`` itself and no process group is needed."""
    if world_size == 1:
        return packed.view(-1), _Done()
    received = torch.empty(packed.numel() // world_size, dtype=packed.dtype, device=packed.device)
    return received, reduce_scatter(received, packed.view(-1), group=group, async_op=True)


def segment_parts(
    segments: Sequence[tuple[int, int]], world_size: int, rank: int
) -> tuple[list[tuple[int, int, int]], int]:
    """Rank ``rank``'s part of each segment [start, end) when every segment is split in
    ``world_size`` equal parts: (offset in the segment, count, position in the received row)
    per segment, and the received row's length (the same on every rank)."""
    parts, position = [], 0
    for start, end in segments:
        chunk = -(-(end - start) // world_size)
        offset = rank * chunk
        parts.append((offset, max(0, min(chunk, end - start - offset)), position))
        position += chunk
    return parts, position


def reduce_scatter_segments(
    rows: Sequence[torch.Tensor],
    segments: Sequence[tuple[int, int]],
    world_size: int,
    rank: int,
    group: dist.ProcessGroup | None,
    *,
    square: Sequence[int] = (),
) -> tuple[Any, torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """``reduce_scatter_rows`` of the ``segments`` of flat rows only, each segment split evenly
    over the ranks: what rank r receives of a segment depends on the segment alone, not on where
    it sits in the rows (a DDP bucket rebuild moves parameters, not this layout), and coordinates
    outside the segments do not travel. Returns (work, received (rows, length), packed input to
    keep alive, this rank's ``segment_parts``)."""
    device = rows[0].device
    length = segment_parts(segments, world_size, rank)[1]
    packed = torch.zeros(world_size, len(rows), length, dtype=torch.float32, device=device)
    for r in range(world_size):
        for (start, _), (offset, count, position) in zip(
            segments, segment_parts(segments, world_size, r)[0], strict=True
        ):
            for i, row in enumerate(rows):
                packed[r, i, position : position + count] = row[
                    start + offset : start + offset + count
                ]
    for i in square:
        packed[:, i].square_()
    received, work = _reduce_scatter_async(packed, world_size, group)
    parts = segment_parts(segments, world_size, rank)[0]
    return work, received.view(len(rows), length), packed, parts


def _upper(size: int, device: torch.device) -> torch.Tensor:
    # a boolean mask (1 byte an entry) rather than triu_indices (16 bytes an entry)
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_()


def upper_triangle(gram: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric matrix, row by row, flat: half the bytes travel."""
    return gram[_upper(gram.shape[0], gram.device)]


def gram_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """``upper_triangle(matrix @ matrix.T)``."""
    return upper_triangle(matrix @ matrix.T)


def triangle_to_gram(upper: torch.Tensor, size: int) -> torch.Tensor:
    """The symmetric matrix whose ``gram_triangle`` is ``upper``."""
    gram = torch.empty(size, size, dtype=upper.dtype, device=upper.device)
    mask = _upper(size, upper.device)
    gram[mask] = upper
    gram.T[mask] = upper  # the mirror, written in place: no second size x size temporary
    return gram


def reduce_to_owners(
    params: Sequence[TrackedParam],
    sizes: Sequence[int],
    payload: Iterable[torch.Tensor],
    *,
    world_size: int,
    rank: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> dict[int, torch.Tensor]:
    """Sum a flat float64 tensor of each matrix ``params[i]`` (``sizes[i]`` elements, the same
    on every rank) over the ranks onto the matrix's owner only. Every rank calls it with the
    same ``params``.

    One reduce-scatter over a buffer laid out owner by owner (each owner's chunk padded to the
    longest). ``payload`` is consumed one tensor at a time and copied into that buffer, so a
    generator keeps one temporary alive, not all. Returns this rank's sums by parameter index.
    """
    if not params:
        return {}
    offsets: list[tuple[int, int]] = []  # (owner, offset in the owner's chunk)
    lengths = [0] * world_size
    for t, size in zip(params, sizes, strict=True):
        assert t.owner is not None
        offsets.append((t.owner, lengths[t.owner]))
        lengths[t.owner] += size
    width = max(lengths)
    send = torch.zeros(world_size, width, dtype=torch.float64, device=device)
    for (owner, offset), size, part in zip(offsets, sizes, payload, strict=True):
        send[owner, offset : offset + size] = part.reshape(-1)
    if world_size > 1:
        received = torch.empty(width, dtype=torch.float64, device=device)
        reduce_scatter(received, send.view(-1), group=group)
    else:
        received = send[0]
    return {
        t.index: received[offset : offset + size]
        for t, (owner, offset), size in zip(params, offsets, sizes, strict=True)
        if owner == rank
    }


def exact_sum_travels(dtype: torch.dtype) -> bool:
    """Below float32 the reduced mean is too coarse for Q - n g^2: the float32 local gradient
    then travels with its squares, so each rank gets an exact sum S of its chunk as well."""
    return dtype not in (torch.float32, torch.float64)


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) without torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
