"""A small spawn helper: run a function on N processes joined by a real gloo process group.

    results = spawn(worker, 2, arg1, arg2)   # worker(rank, world_size, arg1, arg2) -> picklable

``worker`` must be a module-level function. A failure on any rank fails the call with that
rank's traceback; the return values come back in rank order.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    # what torchrun exports; DeepSpeed reads LOCAL_RANK even with a process group in place
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save({"result": result}, os.path.join(workdir, f"rank{rank}.pt"))
        dist.barrier()  # leave together
    except BaseException:
        with open(os.path.join(workdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        dist.destroy_process_group()
        raise
    # The result is saved and every rank got here. Interpreter teardown with gloo's C++ threads
    # still alive aborts about one process in fifty here ("terminate called without an active
    # exception"), so skip it: nothing of the test is left to run.
    os._exit(0)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as workdir:
        try:
            mp.spawn(_entry, args=(fn, world_size, workdir, args), nprocs=world_size, join=True)
        except Exception as exc:
            errors = []
            for name in sorted(os.listdir(workdir)):
                if name.endswith(".err"):
                    with open(os.path.join(workdir, name)) as f:
                        errors.append(f.read())
            raise AssertionError("\n".join(errors) or str(exc)) from exc
        return [
            torch.load(os.path.join(workdir, f"rank{r}.pt"), weights_only=False)["result"]
            for r in range(world_size)
        ]
