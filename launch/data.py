"""Token data for the training job: a byte-level corpus of the Python standard library, a user's
text file, or a pre-tokenized uint16 ``.bin`` file. No downloads.

    corpus = load_corpus("stdlib", cache_dir="runs/corpus", corpus_mb=4)
    rng = batch_rng(seed, rank, step)                         # reproducible, different per rank
    tokens = sample_windows(corpus.train, seq_len=128, count=8, rng=rng)   # (8, 129) int64
    val = validation_windows(corpus.val, seq_len=128, count=64)            # fixed, same everywhere

The stdlib corpus is built on first use from the ``*.py`` files of the running interpreter's
standard library and cached as ``train.bin`` / ``val.bin`` (uint16 memmaps) and a JSON manifest
listing the files of each split. Whole files are held out for validation, chosen by a hash of
their relative path, so a file never lands in both splits and rebuilding gives the same split.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BYTE_VOCAB_SIZE",
    "Corpus",
    "batch_rng",
    "build_stdlib_corpus",
    "load_corpus",
    "sample_windows",
    "stdlib_files",
    "validation_windows",
]

BYTE_VOCAB_SIZE = 256
#: Share of the stdlib corpus (files by path hash, bytes by budget) held out for validation.
STDLIB_VAL_FRACTION = 0.05
# Installed packages live under the stdlib directory but are not the standard library; they
# differ from machine to machine, which would make the corpus irreproducible.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Corpus:
    """Train and validation token arrays (memmaps where possible) and the vocabulary size."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    #: Where the tokens came from, for logs and the run summary.
    description: str


# -- the stdlib corpus ---------------------------------------------------------------------------


def _path_hash(salt: str, relative: str) -> int:
    # sha256, not hash(): Python salts str hashes per process, and the split must not move.
    return int.from_bytes(hashlib.sha256(f"{salt}:{relative}".encode()).digest()[:8], "big")


def _is_validation(relative: str, val_fraction: float) -> bool:
    return _path_hash("split", relative) < val_fraction * 2**64


def stdlib_files(stdlib: Path | None = None) -> list[str]:
    """Relative paths of the standard library's ``*.py`` files, sorted."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(path.relative_to(root).parts) and path.is_file()
    )


def _select(
    root: Path, files: list[str], budget_bytes: int, val_fraction: float
) -> tuple[list[str], list[str]]:
    """Fill a train and a validation byte budget with whole files.

    A file's split is fixed by its path (``_is_validation``), whatever the budget. Files are
    visited in the order of a second path hash, so a small budget still samples the whole
    library, not just the alphabetically first packages; a file that would overflow its split's
    budget is skipped (not the end: one large file must not starve a split). Each split takes
    at least one file, so validation is never empty.
    """
    budgets = {True: val_fraction * budget_bytes, False: (1 - val_fraction) * budget_bytes}
    used = {True: 0, False: 0}
    chosen: dict[bool, list[str]] = {True: [], False: []}
    for relative in sorted(files, key=lambda r: (_path_hash("select", r), r)):
        is_val = _is_validation(relative, val_fraction)
        size = (root / relative).stat().st_size
        if size == 0 or (used[is_val] + size > budgets[is_val] and chosen[is_val]):
            continue
        chosen[is_val].append(relative)
        used[is_val] += size
    return sorted(chosen[False]), sorted(chosen[True])


def _write_tokens(path: Path, root: Path, files: list[str]) -> int:
    """Concatenate the files' bytes as uint16 tokens; write to a temporary name, then rename, so
    that a reader (or a second rank building at once) never sees a half-written file."""
    tokens = np.concatenate(
        [np.frombuffer((root / f).read_bytes(), dtype=np.uint8) for f in files]
    ).astype(np.uint16)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tokens.tofile(tmp)
    os.replace(tmp, path)
    return int(tokens.size)


def build_stdlib_corpus(
    cache_dir: str | os.PathLike[str],
    corpus_mb: float,
    *,
    stdlib: Path | None = None,
) -> Path:
    """Build (or reuse) the stdlib corpus of at most ``corpus_mb`` MB; return its directory.

    The directory is keyed by the Python version and the size, and reused when its manifest is
    there (the manifest is written last, so its presence means the token files are complete).
    """
    if corpus_mb <= 0:
        raise ValueError(f"corpus_mb must be > 0, got {corpus_mb}")
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    directory = Path(cache_dir) / f"stdlib-py{platform.python_version()}-{corpus_mb:g}MB"
    if (directory / _MANIFEST).is_file():
        return directory
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library directory {root}")
    train_files, val_files = _select(root, files, int(corpus_mb * 1_000_000), STDLIB_VAL_FRACTION)
    directory.mkdir(parents=True, exist_ok=True)
    train_tokens = _write_tokens(directory / "train.bin", root, train_files)
    val_tokens = _write_tokens(directory / "val.bin", root, val_files)
    manifest = {
        "version": _MANIFEST_VERSION,
        "source": "stdlib",
        "python": platform.python_version(),
        "corpus_mb": corpus_mb,
        "val_fraction": STDLIB_VAL_FRACTION,
        "dtype": "uint16",
        "vocab_size": BYTE_VOCAB_SIZE,
        "stdlib_files": len(files),
        "train": {"files": train_files, "tokens": train_tokens},
        "val": {"files": val_files, "tokens": val_tokens},
    }
    tmp = directory / f"{_MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, directory / _MANIFEST)
    return directory


# -- loading any source --------------------------------------------------------------------------


def _memmap(path: Path, dtype: type[np.generic]) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"data file is empty: {path}")
    if path.stat().st_size % np.dtype(dtype).itemsize:
        raise ValueError(f"{path} is not a whole number of {np.dtype(dtype).name} tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def _tail_split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = round(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def load_corpus(
    data: str,
    *,
    cache_dir: str | os.PathLike[str] = "runs/corpus",
    corpus_mb: float = 4.0,
    val_fraction: float = 0.05,
    val_bin: str | None = None,
    vocab_size: int | None = None,
) -> Corpus:
    """Tokens for ``data``: ``"stdlib"``, a ``.bin`` of uint16 tokens, or any other file read as
    bytes (vocab 256). A file without ``val_bin`` holds out its last ``val_fraction``.

    ``vocab_size`` (``.bin`` only) defaults to the largest token id + 1 over both splits.
    """
    if data == "stdlib":
        directory = build_stdlib_corpus(cache_dir, corpus_mb)
        train = _memmap(directory / "train.bin", np.uint16)
        val = _memmap(directory / "val.bin", np.uint16)
        manifest = json.loads((directory / _MANIFEST).read_text())
        description = (
            f"python {manifest['python']} stdlib: {len(manifest['train']['files'])} train files, "
            f"{len(manifest['val']['files'])} validation files ({directory})"
        )
        return Corpus(train, val, BYTE_VOCAB_SIZE, description)

    path = Path(data)
    if path.suffix == ".bin":
        tokens = _memmap(path, np.uint16)
        if val_bin is not None:
            train, val = tokens, _memmap(Path(val_bin), np.uint16)
            description = f"uint16 tokens: {path}, validation {val_bin}"
        else:
            train, val = _tail_split(tokens, val_fraction)
            description = f"uint16 tokens: {path}, last {val_fraction:.0%} held out"
        largest = int(max(train.max(), val.max())) if len(val) else int(train.max())
        if vocab_size is None:
            vocab_size = largest + 1
        elif largest >= vocab_size:
            raise ValueError(f"{path} holds token id {largest} >= vocab_size {vocab_size}")
        return Corpus(train, val, vocab_size, description)

    if val_bin is not None:
        raise ValueError("val_bin goes with a .bin training file; a text file splits its tail")
    # Byte-level: the file's bytes are the tokens, read in place without a copy.
    train, val = _tail_split(_memmap(path, np.uint8), val_fraction)
    return Corpus(train, val, BYTE_VOCAB_SIZE, f"bytes of {path}, last {val_fraction:.0%} held out")


# -- batches -------------------------------------------------------------------------------------


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one rank's windows at one optimizer step: a rerun draws the same data,
    ranks draw different data, and the draw does not depend on what earlier steps consumed."""
    return np.random.default_rng((seed, rank, step))


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    return torch.from_numpy(rows.astype(np.int64))


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> int:
    last_start = len(tokens) - (seq_len + 1)
    if last_start < 0:
        raise ValueError(
            f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    return last_start


def sample_windows(
    tokens: np.ndarray, seq_len: int, count: int, rng: np.random.Generator
) -> torch.Tensor:
    """``count`` random windows of ``seq_len + 1`` tokens, as an int64 tensor (count, seq_len+1)."""
    last_start = _check_length(tokens, seq_len, "training")
    return _windows(tokens, rng.integers(0, last_start + 1, size=count), seq_len)


def validation_windows(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows evenly spaced over the split: fixed, and the same on every rank."""
    last_start = _check_length(tokens, seq_len, "validation")
    return _windows(tokens, np.linspace(0, last_start, count).round().astype(np.int64), seq_len)
