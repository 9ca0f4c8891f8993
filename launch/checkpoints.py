"""Checkpoints of launch/train.py: one directory per optimizer step, committed by a rename, and
the run's use of them: saving on every rank, which checkpoint a --resume continues, loading it.

    <run>/checkpoints/step_00000120/
        trainer.json       what the run is (its flags, ranks, micro-batch, ZeRO stage) and where
                           it stood (step, samples, global batch): ``META_FIELDS``
        model.pt           DDP, FSDP: {"model", "optimizer"} as full state dicts (rank 0 writes)
        rank00000.pt ...   one per rank (``rank_file``): {"rng": its CPU RNG state, "monitor":
                           its monitor state (controller, config, skipped steps, pooled moments)}

    DeepSpeed writes its own files of the tag (the step directory) instead of model.pt, with the
    plugin's monitor state in their client_state and each rank's pooled moments in
    nongns_pool_rank*.pt beside them; its rank*.pt files hold the RNG state only.

Saving (``save_checkpoint``, ``save``): every rank writes into ``.step_00000120.partial/``; after
the ranks agree that every write succeeded, rank 0 fsyncs the files, writes trainer.json and
renames the directory (then fsyncs checkpoints/). A checkpoint is there whole or not at all, so a
job killed while saving resumes from the one before; a failed write (a full disk) is an error on
every rank that names the directory, removes the partial one and leaves the earlier checkpoints
as they were. Directories starting with a dot (a partial save, a checkpoint being replaced or
deleted) are never checkpoints. The ranks must share the file system (as DeepSpeed's checkpoints
need too).

Resuming: ``resume_point`` (while the flags are parsed) finds the checkpoint --resume names and
the batch the run starts with; flags other than ``RESUME_MAY_CHANGE`` must be the checkpoint's.
A run directory holds one run: ``--resume`` into an ``--out`` that holds another run's outputs
(``run_outputs``) is refused (``check_resume_out``); resuming into an empty or new ``--out`` forks
the checkpoint's run (README: Long runs). ``load_resume`` then loads it on every rank, going
back to an older checkpoint under ``--resume auto`` while one does not load.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from nongns_dist import resume_batch_size
from nongns_dist.controller import ControllerReadout

__all__ = [
    "FORMAT",
    "META_FIELDS",
    "RESUME_MAY_CHANGE",
    "BrokenCheckpoint",
    "CheckpointError",
    "Runtime",
    "SaveError",
    "check_checkpoint",
    "check_resume_out",
    "complete_checkpoints",
    "load_checkpoint",
    "load_rank_state",
    "load_resume",
    "rank_file",
    "read_meta",
    "resolve",
    "resume_point",
    "run_directory",
    "run_outputs",
    "save",
    "save_checkpoint",
    "save_torch",
    "step_name",
    "usable_checkpoints",
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
    is none (a fresh start). ``resume_point`` and ``load_resume`` look further back under
    ``--resume auto`` when the latest is broken."""
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


# -- resuming: which checkpoint, with which flags --------------------------------------------------


#: What a resumed run may change (the ranks change outside the flags; a checkpoint holds CPU
#: tensors, so a CUDA run resumes on the CPU and back); every other flag must be the
#: checkpoint's (one saved before a flag existed has its default).
RESUME_MAY_CHANGE = frozenset({
    "micro_batch", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
    "resume", "out", "corpus_dir", "local_rank", "resume_from", "start_batch", "device",
})  # fmt: skip


def resume_point(args: argparse.Namespace, world: int, defaults: Mapping[str, Any]) -> None:
    """Find the checkpoint --resume names and the batch the run starts with: sets
    ``args.resume_from`` (a checkpoint directory or None) and ``args.start_batch``.

    ``--resume auto`` takes the newest checkpoint of --out whose trainer.json is whole, skipping
    broken ones with a warning (``load_resume`` goes further back when its files do not load);
    flags that contradict it stop the job. ``--resume PATH`` is that checkpoint or an error.

    Where the run goes: its own run directory continues it (steps after the checkpoint are
    replaced, README: Long runs). Another --out must hold nothing of a run: resuming into a new
    or empty --out forks the checkpoint's run, whose metrics.jsonl then starts with that run's
    records up to the checkpoint's step, and nothing else of either directory is touched. An
    --out holding another run's outputs (metrics.jsonl, summary.json, tensorboard/,
    checkpoints/) is refused before anything is written: the resumed run would replace its
    metrics.jsonl and summary.json and delete its checkpoints."""
    args.resume_from, args.start_batch = None, args.initial_batch
    out = Path(args.out)
    if args.resume is None:
        saved = complete_checkpoints(out / "checkpoints")
        if saved:
            raise CheckpointError(
                f"--out {args.out} holds checkpoints of an earlier run (latest: {saved[-1].name}): "
                "continue it with --resume auto, or start this one in another --out"
            )
        return
    if args.resume == "auto":
        found = complete_checkpoints(out / "checkpoints")
        usable = next(usable_checkpoints(args, world, defaults), None)
        if usable is None:
            if found:
                raise CheckpointError(
                    f"--resume auto: none of the {len(found)} checkpoint(s) in {out}/checkpoints "
                    "is usable (see the warnings above); remove them to start afresh"
                )
            return  # nothing saved yet: a fresh start
        checkpoint, args.start_batch = usable
    else:
        given = resolve(args.resume, out)
        assert given is not None  # only "auto" resolves to nothing
        args.start_batch = check_checkpoint(args, world, given, defaults)
        check_resume_out(out, given)
        checkpoint = given
    args.resume_from = str(checkpoint)


def usable_checkpoints(
    args: argparse.Namespace, world: int, defaults: Mapping[str, Any], below: Path | None = None
) -> Iterator[tuple[Path, int]]:
    """--resume auto: the checkpoints of --out (older than ``below`` when given), newest first,
    with the batch each would start with; broken ones are skipped with a warning saying why,
    one that contradicts the flags raises its ``CheckpointError``."""
    for checkpoint in reversed(complete_checkpoints(Path(args.out) / "checkpoints")):
        if below is not None and checkpoint.name >= below.name:
            continue
        try:
            start_batch = check_checkpoint(args, world, checkpoint, defaults)
        except BrokenCheckpoint as exc:
            warn(f"--resume auto: skipped {checkpoint}: {exc}")
            continue
        yield checkpoint, start_batch


def check_checkpoint(
    args: argparse.Namespace, world: int, checkpoint: Path, defaults: Mapping[str, Any]
) -> int:
    """The batch a run with ``args`` on ``world`` ranks starts with from ``checkpoint``; a
    ``CheckpointError`` when its trainer.json is broken (``BrokenCheckpoint``) or it cannot be
    resumed with these flags or ranks."""
    meta = read_meta(checkpoint)
    saved = meta["args"]
    differ = [
        f"--{k.replace('_', '-')} {saved.get(k, defaults.get(k))!r} (this run: {v!r})"
        for k, v in vars(args).items()
        if k not in RESUME_MAY_CHANGE and saved.get(k, defaults.get(k)) != v
    ]
    if differ:
        raise CheckpointError(
            f"--resume {checkpoint}: the checkpoint was taken with " + ", ".join(differ)
            + "; resume with the same flags"
        )  # fmt: skip
    if meta["zero_stage"] and world != meta["world_size"]:
        raise CheckpointError(
            f"--resume {checkpoint}: ZeRO-{meta['zero_stage']} checkpoints hold one optimizer "
            f"partition per rank ({meta['world_size']} ranks, this run {world}); resume on as "
            "many ranks (ZeRO-0 converts)"
        )
    unit = args.micro_batch * world
    if unit != meta["micro_batch"] * meta["world_size"]:
        # the controller's own rule (BatchSizeController.load_state_dict converts the same way)
        return resume_batch_size(meta["batch_size"], unit=unit, maximum=args.max_batch or None)
    return int(meta["batch_size"])


def check_resume_out(out: Path, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` into ``out`` when ``out`` is not its run directory and
    holds another run's outputs (``resume_point`` says why; a new or empty ``out`` is a fork)."""
    run = run_directory(checkpoint)
    if run is not None and out.resolve() == run:
        return  # the checkpoint's own run continues
    held = run_outputs(out)
    if not held:
        return  # a fork into a new or empty directory
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    raise CheckpointError(
        f"--out {out} holds another run's outputs ({shown}), and --resume {checkpoint} is "
        f"of {'run ' + str(run) if run else 'no run directory'}: resuming there would replace "
        f"its metrics.jsonl and summary.json and delete its checkpoints. Continue the run in "
        f"{out} with --resume {out} (or --resume auto), fork {checkpoint} into a new or empty "
        "--out, or move that run's outputs away first"
    )


# -- a run's checkpoints on every rank -------------------------------------------------------------


class Runtime(Protocol):
    """What saving and loading a checkpoint need of an engine runtime (launch/runtimes.py)."""

    @property
    def readout(self) -> ControllerReadout: ...

    @property
    def device(self) -> torch.device: ...

    def save(self, directory: Path, rank_state: dict[str, Any]) -> None:
        """Collective: write this rank's files of the checkpoint into ``directory``."""

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore model, optimizer and monitor; returns this rank's saved state."""


def save_checkpoint(runtime: Runtime, args: argparse.Namespace, world: int) -> Path:
    """Collective: the checkpoint of the step just closed, committed atomically; a failed write
    on any rank (a full disk) stops every rank with an error naming the directory."""
    monitor = runtime.readout
    meta = {
        "step": monitor.step,
        "samples": monitor.samples,
        "batch_size": monitor.batch_size,
        "world_size": world,
        "micro_batch": args.micro_batch,
        "zero_stage": getattr(runtime, "zero_stage", None),
        "args": vars(args),
    }
    rank_state = {"rng": torch.get_rng_state()}
    try:
        return save(
            Path(args.out) / "checkpoints",
            monitor.step,
            lambda partial: runtime.save(partial, rank_state),
            meta,
            args.keep_checkpoints,
            runtime.device,  # NCCL reduces on the GPU
        )
    except SaveError as exc:
        raise SystemExit(f"train.py: error: {exc}") from exc


def load_checkpoint(runtime: Runtime, checkpoint: Path) -> str | None:
    """Load every part of ``checkpoint``: None when it loaded on every rank, else why not. The
    same answer on every rank (they agree in one all-reduce), so that none goes on alone."""
    meta = read_meta(checkpoint)
    error, rng = None, None
    try:
        rank_state = runtime.load(checkpoint)
        rng = rank_state["rng"]
        monitor = runtime.readout
        if (monitor.step, monitor.samples) != (meta["step"], meta["samples"]):
            raise ValueError(
                f"it holds no nongns state for step {meta['step']} (loaded: step "
                f"{monitor.step}, {monitor.samples} samples)"
            )
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    failed = torch.tensor([float(error is not None)], device=runtime.device)  # NCCL: on the GPU
    dist.all_reduce(failed)
    if failed.item():
        return error or f"{int(failed.item())} other rank(s) failed, see their errors"
    if dist.get_rank() < meta["world_size"]:
        assert rng is not None  # read before the all-reduce, which found no failure
        torch.set_rng_state(rng)
    return None


def load_resume(
    runtime: Runtime, args: argparse.Namespace, world: int, defaults: Mapping[str, Any]
) -> Path:
    """Load the checkpoint ``resume_point`` chose and return the one loaded. ``--resume auto``
    goes back to the next older checkpoint while one does not load (a truncated file, say),
    with a warning naming it and why; an explicit ``--resume PATH`` that does not load, or no
    checkpoint that loads, stops every rank with an error (before anything is written)."""
    first = Path(args.resume_from)
    failures = []
    try:
        older = (
            usable_checkpoints(args, world, defaults, below=first)
            if args.resume == "auto"
            else None
        )
        for checkpoint in itertools.chain([first], (c for c, _ in older or ())):
            error = load_checkpoint(runtime, checkpoint)
            if error is None:
                return checkpoint
            failures.append(f"cannot load checkpoint {checkpoint} (truncated, or not this run's?): "
                            f"{error}")  # fmt: skip
            if older is not None:
                warn(f"--resume auto: skipped {checkpoint}: it does not load ({error})")
    except CheckpointError as exc:  # an older checkpoint that contradicts the flags
        failures.append(str(exc))
    raise SystemExit("train.py: error: " + "\ntrain.py: error: ".join(failures))


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank:05d}.pt"


def load_rank_state(directory: Path) -> dict[str, Any]:
    """This rank's saved state; on more ranks than the checkpoint had, rank 0's (the controller
    state is the same on every rank; the pooled moments are refused as another rank's)."""
    file = rank_file(directory, dist.get_rank())
    if not file.is_file():
        file = rank_file(directory, 0)
    return torch.load(file, map_location="cpu", weights_only=True)


def warn(message: str) -> None:
    """A warning on stderr from the first rank (the others find the same); before the process
    group exists too (torchrun and DeepSpeed's launcher export RANK)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train.py: warning: {message}", file=sys.stderr, flush=True)
