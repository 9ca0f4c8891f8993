"""Checkpoint directories of launch/train.py: one per optimizer step, committed by a rename.

    <run>/checkpoints/step_00000120/
        trainer.json       what the run is (its flags, ranks, micro-batch) and where it stood
        model.pt           DDP, FSDP: model and optimizer as full state dicts (rank 0 writes)
        rank00000.pt ...   every rank: its monitor state (controller, pooled moments), RNG state
        (DeepSpeed: its own files of the tag, nongns_pool_*.pt beside them, rank*.pt)

Every rank writes into ``.step_00000120.partial/``; after the ranks agree that every write
succeeded, rank 0 fsyncs the files, writes trainer.json and renames the directory (then fsyncs
checkpoints/). A checkpoint is there whole or not at all, so a job killed while saving resumes
from the one before; a failed write (a full disk) is an error on every rank that names the
directory, removes the partial one and leaves the earlier checkpoints as they were. Directories
starting with a dot (a partial save, a checkpoint being replaced or deleted) are never
checkpoints. The ranks must share the file system (as DeepSpeed's checkpoints need too).

A run directory holds one run: ``--resume`` into an ``--out`` that holds another run's outputs
(``run_outputs``) is refused by train.py; resuming into an empty or new ``--out`` forks the
checkpoint's run (README: Long runs).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "FORMAT",
    "META_FIELDS",
    "BrokenCheckpoint",
    "CheckpointError",
    "SaveError",
    "complete_checkpoints",
    "read_meta",
    "resolve",
    "run_directory",
    "run_outputs",
    "save",
    "save_torch",
    "step_name",
]

#: trainer.json's "format": a directory without it is not a train.py checkpoint.
FORMAT = "nongns_dist launch/train.py checkpoint 1"
_STEP_DIR = re.compile(r"step_(\d{8})")
#: trainer.json's fields besides "format", and the types a resume reads them as (zero_stage:
#: None except under DeepSpeed).
META_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "samples": (int,),
    "batch_size": (int,),
    "world_size": (int,),
    "micro_batch": (int,),
    "zero_stage": (int, type(None)),
    "args": (dict,),
}


class CheckpointError(ValueError):
    """A path that is not a usable train.py checkpoint; the message says why."""


class BrokenCheckpoint(CheckpointError):
    """A checkpoint whose files are damaged or incomplete (an unreadable or malformed
    trainer.json, a file that does not load): ``--resume auto`` goes on to an older one. Other
    ``CheckpointError``s (flags that contradict the checkpoint) stop the job whichever
    checkpoint it is."""


class SaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a failed write); the message names
    the directory and says what is left."""


def step_name(step: int) -> str:
    """The directory name of the checkpoint of optimizer step ``step``: ``step_00000120``."""
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The committed checkpoints under ``root`` (a run's checkpoints/), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(p for p in found if (p / "trainer.json").is_file())


def run_directory(checkpoint: Path) -> Path | None:
    """The run directory ``checkpoint`` belongs to (``<run>/checkpoints/step_N``), resolved;
    None for a checkpoint kept elsewhere (copied out of its run)."""
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name != "checkpoints":
        return None
    return checkpoint.parent.parent


def run_outputs(out: Path) -> list[str]:
    """What of a train.py run ``out`` holds (relative names; empty for a new or empty
    directory): metrics.jsonl, summary.json, tensorboard/ and what checkpoints/ holds."""
    names = ("metrics.jsonl", "summary.json", "tensorboard")
    held = [name for name in names if (out / name).exists()]
    root = out / "checkpoints"
    if root.is_dir():
        held += sorted(f"checkpoints/{p.name}" for p in root.iterdir())
    return held


def resolve(path: str, out: Path) -> Path | None:
    """The checkpoint directory ``--resume path`` names: a checkpoint, or a run directory (or its
    checkpoints/) whose latest one is taken; ``auto``: the latest under ``out``, None when there
    is none (a fresh start). train.py's ``--resume auto`` looks further back itself when the
    latest is broken."""
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
    """trainer.json of ``checkpoint``, checked to be one train.py wrote, with every field of
    ``META_FIELDS`` of its type; ``BrokenCheckpoint`` naming the file and the field if not."""
    file = checkpoint / "trainer.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrokenCheckpoint(f"{file}: unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BrokenCheckpoint(f"{file}: not a checkpoint of launch/train.py ({FORMAT!r})")
    for field, types in META_FIELDS.items():
        if field not in meta:
            raise BrokenCheckpoint(
                f"{file}: no {field!r} field (train.py writes {sorted(META_FIELDS)}); the file "
                "is damaged or was written by hand"
            )
        value = meta[field]
        # bool is an int to isinstance; a count or a flag dict of another type is damage too
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise BrokenCheckpoint(f"{file}: {field!r} is {value!r}, expected {allowed}")
    for field in ("batch_size", "world_size", "micro_batch", "step", "samples"):
        least = 0 if field in ("step", "samples") else 1
        if meta[field] < least:
            raise BrokenCheckpoint(f"{file}: {field!r} is {meta[field]!r}, expected >= {least}")
    return meta


# -- saving ----------------------------------------------------------------------------------------


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` into ``path``, flushed to the disk. Through a Python file object, so that
    a failed write keeps its OSError (ENOSPC, EFBIG) as the cause of torch's own opaque
    "unexpected pos" / "PytorchStreamWriter failed writing file" error."""
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save(
    root: Path,
    step: int,
    write: Callable[[Path], None],
    meta: dict[str, Any],
    keep: int,
    device: torch.device,
) -> Path:
    """Collective: the checkpoint of ``step`` under ``root`` (a run's checkpoints/). Every rank
    calls ``write(partial)`` to put its files into the partial directory; when every rank
    succeeded, rank 0 commits it (``_commit``) and keeps the last ``keep`` (0: all) of this run.

    A failure on any rank (a full disk: OSError ENOSPC, or torch's opaque writer error) is a
    ``SaveError`` on every rank, naming the directory and the free space, after the partial
    directory is removed: earlier checkpoints stay as they were, and nothing half written is a
    checkpoint. Returns the committed directory."""
    partial = root / f".{step_name(step)}.partial"
    final = root / step_name(step)
    rank = dist.get_rank()

    error = None
    if rank == 0:
        try:
            # left by a job killed while saving, replacing or pruning: never checkpoints
            for leftover in root.glob(".step_*"):
                shutil.rmtree(leftover)
            partial.mkdir(parents=True)
        except OSError as exc:
            error = _describe(exc)
    _raise_if_any_failed(error, device, partial, final)  # also the barrier before the writes

    try:
        write(partial)
    except Exception as exc:  # whatever failed, the other ranks must not wait for this one
        error = _describe(exc)
    _raise_if_any_failed(error, device, partial, final)

    replaced = None
    if rank == 0:
        try:
            replaced = _commit(partial, final, meta)
        except OSError as exc:
            error = _describe(exc)
    _raise_if_any_failed(error, device, partial, final)

    if rank == 0:
        saved = complete_checkpoints(root)
        # Checkpoints of later steps are another timeline (the run was resumed from an earlier
        # step): they go, so that --resume auto and the pruning only ever see this run's.
        stale = [p for p in saved if p.name > final.name]
        older = [p for p in saved if p.name < final.name]
        doomed = stale + (older[: max(0, len(older) - keep + 1)] if keep else [])
        for old in doomed + ([replaced] if replaced is not None else []):
            try:
                _remove(old)
            except OSError as exc:  # the new checkpoint is committed: not worth stopping for
                print(f"train.py: warning: cannot delete {old}: {exc}", flush=True)
    return final


def _commit(partial: Path, final: Path, meta: dict[str, Any]) -> Path | None:
    """Rank 0, after every rank wrote into ``partial``: make its files durable, write
    trainer.json (what makes it a checkpoint), rename it to ``final``. Returns where a
    checkpoint ``final`` replaced went (a hidden name, for ``save`` to delete), or None."""
    # Each rank closed its files before the collective that brought us here. On one node the
    # page cache is shared, so these fsyncs flush every rank's data; on a shared file system
    # close() has sent them to the server (NFS close-to-open), and fsync asks for stable storage.
    for directory, _, files in os.walk(partial, topdown=False):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))
    trainer = partial / "trainer.json"
    with trainer.open("w") as f:
        f.write(json.dumps({"format": FORMAT, **meta}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync(partial)  # its entries (trainer.json) before the rename publishes them
    replaced = None
    if final.exists():  # the same step saved again (a resumed run's last step)
        replaced = final.with_name(f".{final.name}.replaced")
        os.replace(final, replaced)  # out of the way first: a hidden name is no checkpoint
    os.replace(partial, final)  # the commit
    _fsync(final.parent)  # the rename itself
    return replaced


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint: renamed to a hidden name first (unless it has one), so that a job
    killed while deleting leaves no step directory with trainer.json and half its files."""
    doomed = checkpoint
    if not checkpoint.name.startswith("."):
        doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
        os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: BaseException) -> str:
    """What a failed write says: the OSError's reason when there is one (torch's writer errors
    carry it as their cause or context when written through a Python file object)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"the disk is full ({cause})"
    if isinstance(cause, OSError) and cause.errno == errno.EDQUOT:
        return f"the disk quota is exhausted ({cause})"
    if isinstance(cause, OSError) and cause.errno == errno.EFBIG:
        return f"a file outgrew the size limit of this process or file system ({cause})"
    if isinstance(cause, OSError):
        return f"the write failed ({cause})"
    # torch's writer without an OSError behind it (a path DeepSpeed handed to torch.save):
    # "[enforce fail at inline_container.cc] unexpected pos ...", "PytorchStreamWriter failed
    # writing file ...", "iostream error": a short write, most often a full disk
    return f"the write failed, is the disk full? ({type(exc).__name__}: {exc})"


def _raise_if_any_failed(
    error: str | None, device: torch.device, partial: Path, final: Path
) -> None:
    """Collective: every rank learns whether any failed (one all-reduce, on ``device`` for
    NCCL); then all raise ``SaveError``, rank 0 after removing the partial directory (no rank
    is writing into it any more: they all reached this all-reduce)."""
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed)
    if not failed.item():
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # frees the space it took
    dist.barrier()  # the removal done before any rank exits (torchrun then stops the others)
    try:
        free = f"{shutil.disk_usage(final.parent).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    kept = complete_checkpoints(final.parent)
    before = f"the latest checkpoint {kept[-1]} is as it was" if kept else "no checkpoint before"
    reason = error or f"{int(failed.item())} other rank(s) failed, see their errors"
    raise SaveError(
        f"cannot save checkpoint {final} (written into {partial}, removed): {reason}; {free}; "
        f"{before}. Make room (free space, lower --keep-checkpoints, raise a file-size limit) "
        "and continue with --resume auto"
    )
