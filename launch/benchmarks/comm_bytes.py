"""Bytes each rank hands to and receives from torch.distributed collectives, by wrapping them.

    counter = ByteCounter(); counter.install()      # once, before any collective
    with counter.counting():
        train_step()
    counter.handed, counter.received                # {(family, dtype): bytes}

received follows a ring model: all-reduce 2(R-1)/R N, reduce-scatter (R-1)/R N of its input,
all-gather (R-1)/R N of its output, R the size of the call's group.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ByteCounter", "Bytes", "Key"]

#: torch.distributed name -> (family, argument holding the tensor the ring model sizes, factor).
#: The deprecated names call the new ones inside torch, past the wrapper: no double count.
COUNTED: dict[str, tuple[str, str, float]] = {
    "all_reduce": ("all-reduce", "tensor", 2.0),
    "reduce_scatter_single": ("reduce-scatter", "input", 1.0),
    "reduce_scatter_tensor": ("reduce-scatter", "input", 1.0),
    "all_gather_single": ("all-gather", "output_tensor", 1.0),
    "all_gather_into_tensor": ("all-gather", "output_tensor", 1.0),
    "all_gather": ("all-gather", "tensor_list", 1.0),
}
Key = tuple[str, str]  # (family, dtype)
Bytes = dict[Key, float]


def _nbytes(value: torch.Tensor | list[torch.Tensor]) -> int:
    tensors = value if isinstance(value, list) else [value]
    return sum(t.numel() * t.element_size() for t in tensors)


class ByteCounter:
    def __init__(self) -> None:
        self.on = False
        self.handed: Bytes = defaultdict(float)
        self.received: Bytes = defaultdict(float)

    @contextlib.contextmanager
    def counting(self) -> Iterator[ByteCounter]:
        self.on = True
        self.handed, self.received = defaultdict(float), defaultdict(float)
        try:
            yield self
        finally:
            self.on = False

    def install(self) -> None:
        for name, (family, sized, factor) in COUNTED.items():
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(original, family, sized, factor))

    def _wrap(
        self, original: Callable[..., Any], family: str, sized: str, factor: float
    ) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                bound = signature.bind(*args, **kwargs).arguments
                ring = dist.get_world_size(bound.get("group"))
                value = bound[sized]
                # an all-gather hands in its input; the others hand in what the model sizes
                handed = bound.get("input_tensor", bound.get("tensor", value))
                if family != "all-gather":
                    handed = value
                dtype = str((value[0] if isinstance(value, list) else value).dtype)
                key = (family, dtype.removeprefix("torch."))
                self.handed[key] += _nbytes(handed)
                self.received[key] += factor * (ring - 1) / ring * _nbytes(value)
            return original(*args, **kwargs)

        return wrapped
