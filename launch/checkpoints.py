"""Checkpoint directories of launch/train.py: one per optimizer step, committed by a rename.

    <run>/checkpoints/step_00000120/
        trainer.json       what the run is (its flags, ranks, micro-batch) and where it stood
        model.pt           DDP, FSDP: model and optimizer as full state dicts (rank 0 writes)
        rank00000.pt ...   every rank: its monitor state (controller, pooled moments), RNG state
        (DeepSpeed: its own files of the tag, nongns_pool_*.pt beside them, rank*.pt)

Every rank writes into ``.step_00000120.partial/``; after a barrier rank 0 writes trainer.json
and renames the directory. A checkpoint is there whole or not at all, so a job killed while
saving resumes from the one before. The ranks must share the file system (as DeepSpeed's
checkpoints need too).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = [
    "FORMAT",
    "CheckpointError",
    "begin",
    "commit",
    "complete_checkpoints",
    "read_meta",
    "resolve",
    "step_name",
]

#: trainer.json's "format": a directory without it is not a train.py checkpoint.
FORMAT = "nongns_dist launch/train.py checkpoint 1"
_STEP_DIR = re.compile(r"step_(\d{8})")


class CheckpointError(ValueError):
    """A path that is not a usable train.py checkpoint; the message says why."""


def step_name(step: int) -> str:
    """The directory name of the checkpoint of optimizer step ``step``: ``step_00000120``."""
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The committed checkpoints under ``root`` (a run's checkpoints/), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(p for p in found if (p / "trainer.json").is_file())


def resolve(path: str, out: Path) -> Path | None:
    """The checkpoint directory ``--resume path`` names: a checkpoint, or a run directory (or its
    checkpoints/) whose latest one is taken; ``auto``: the latest under ``out``, None when there
    is none (a fresh start)."""
    if path == "auto":
        found = complete_checkpoints(out / "checkpoints")
        return found[-1] if found else None
    given = Path(path)
    if (given / "trainer.json").is_file():
        return given
    for root in (given / "checkpoints", given):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    if given.is_file():
        raise CheckpointError(
            f"--resume {path}: a file; train.py checkpoints are directories "
            "(<run>/checkpoints/step_NNNNNNNN/), give one of them or the run directory"
        )
    if not given.exists():
        raise CheckpointError(f"--resume {path}: no such file or directory")
    raise CheckpointError(
        f"--resume {path}: neither a checkpoint (no trainer.json) nor a run directory with "
        "complete checkpoints in checkpoints/"
    )


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """trainer.json of ``checkpoint``, checked to be one train.py wrote."""
    file = checkpoint / "trainer.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a checkpoint of launch/train.py ({FORMAT!r})")
    return meta


def begin(root: Path, step: int) -> Path:
    """Collective: the empty directory every rank writes the checkpoint of ``step`` into."""
    partial = root / f".{step_name(step)}.partial"
    if dist.get_rank() == 0:
        if partial.exists():  # left by a job killed while saving
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    return partial


def commit(partial: Path, meta: dict[str, Any], keep: int) -> Path:
    """Collective: after every rank wrote into ``partial``, rank 0 writes trainer.json and
    renames the directory to step_NNNNNNNN; then keeps the last ``keep`` (0: all) of this run.

    Checkpoints of later steps are another timeline (the run was resumed from an earlier step):
    they go, so that ``--resume auto`` and the pruning only ever see this run's."""
    final = partial.parent / step_name(meta["step"])
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        (partial / "trainer.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
        if final.exists():  # the same step saved again (a resumed run's last step)
            shutil.rmtree(final)
        os.replace(partial, final)  # the commit
        saved = complete_checkpoints(partial.parent)
        stale = [p for p in saved if p.name > final.name]
        older = [p for p in saved if p.name < final.name]
        for old in stale + (older[: max(0, len(older) - keep + 1)] if keep else []):
            shutil.rmtree(old)
    return final
