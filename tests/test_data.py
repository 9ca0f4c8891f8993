"""The training job's data: the stdlib corpus split, text and .bin inputs, batch windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.data import (
    BYTE_VOCAB_SIZE,
    batch_rng,
    build_stdlib_corpus,
    load_corpus,
    sample_windows,
    stdlib_files,
    validation_windows,
)

#: Small enough to build in a few seconds; the same value in test_train.py reuses the cache.
TEST_CORPUS_MB = 0.5


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real stdlib corpus, built once per session under a shared cache directory."""
    return build_stdlib_corpus(tmp_path_factory.getbasetemp() / "corpus", TEST_CORPUS_MB)


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def test_stdlib_split_is_disjoint_nonempty_and_complete(stdlib_corpus: Path) -> None:
    manifest = _manifest(stdlib_corpus)
    train, val = manifest["train"]["files"], manifest["val"]["files"]
    assert train and val
    assert not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert set(train) | set(val) <= set(stdlib_files())
    assert not any("site-packages" in f for f in train + val)
    # The token files hold exactly the listed files' bytes, as uint16.
    tokens = np.fromfile(stdlib_corpus / "val.bin", dtype=np.uint16)
    assert tokens.size == manifest["val"]["tokens"]
    assert 0 < tokens.size <= TEST_CORPUS_MB * 1_000_000
    assert tokens.max() < BYTE_VOCAB_SIZE


def test_stdlib_rebuild_gives_the_same_files_and_tokens(
    stdlib_corpus: Path, tmp_path: Path
) -> None:
    again = build_stdlib_corpus(tmp_path, TEST_CORPUS_MB)
    assert again != stdlib_corpus
    first, second = _manifest(stdlib_corpus), _manifest(again)
    assert first["train"] == second["train"] and first["val"] == second["val"]
    for split in ("train.bin", "val.bin"):
        assert (stdlib_corpus / split).read_bytes() == (again / split).read_bytes()


def test_stdlib_cache_is_reused(stdlib_corpus: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in stdlib_corpus.iterdir()}
    assert build_stdlib_corpus(stdlib_corpus.parent, TEST_CORPUS_MB) == stdlib_corpus
    corpus = load_corpus("stdlib", cache_dir=stdlib_corpus.parent, corpus_mb=TEST_CORPUS_MB)
    assert {p.name: p.stat().st_mtime_ns for p in stdlib_corpus.iterdir()} == before
    assert corpus.vocab_size == BYTE_VOCAB_SIZE
    assert len(corpus.train) == _manifest(stdlib_corpus)["train"]["tokens"]


def test_a_file_stays_in_its_split_whatever_the_size(tmp_path: Path) -> None:
    """The split is a function of the path: a larger corpus never moves a validation file into
    training, and both splits fill their share of the budget. Uses a synthetic library tree."""
    root = tmp_path / "lib"
    rng = np.random.default_rng(0)
    for i in range(300):
        path = root / f"pkg{i % 7}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(32, 127, size=int(rng.integers(200, 2000))).astype(np.uint8))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "installed.py").write_text("not the standard library\n")
    assert "site-packages/installed.py" not in stdlib_files(root)

    train: set[str] = set()
    val: set[str] = set()
    for mb in (0.06, 0.2):  # validation budgets of 3 and 10 kB; files of 0.2 to 2 kB
        manifest = _manifest(build_stdlib_corpus(tmp_path / f"cache{mb}", mb, stdlib=root))
        train |= set(manifest["train"]["files"])
        val |= set(manifest["val"]["files"])
        for split, share in (("train", 0.95), ("val", 0.05)):
            budget = share * mb * 1e6
            assert 0.8 * budget <= manifest[split]["tokens"] <= budget, (split, mb)
    assert not train & val


def test_text_file_is_bytes_with_a_held_out_tail(tmp_path: Path) -> None:
    text = tmp_path / "book.txt"
    payload = ("the quick brown fox jumps over the lazy dog\n" * 50).encode()
    text.write_bytes(payload)
    corpus = load_corpus(str(text), val_fraction=0.1)
    assert corpus.vocab_size == BYTE_VOCAB_SIZE
    assert bytes(corpus.train) + bytes(corpus.val) == payload
    assert len(corpus.val) == pytest.approx(0.1 * len(payload), abs=1)


def test_bin_file_with_tail_or_separate_validation(tmp_path: Path) -> None:
    train = np.arange(2000, dtype=np.uint16) % 1000
    path = tmp_path / "train.bin"
    train.tofile(path)
    corpus = load_corpus(str(path), val_fraction=0.25)
    assert corpus.vocab_size == 1000  # largest id + 1
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), train)
    assert len(corpus.val) == 500

    val_path = tmp_path / "val.bin"
    np.full(100, 1234, dtype=np.uint16).tofile(val_path)
    corpus = load_corpus(str(path), val_bin=str(val_path))
    assert len(corpus.train) == 2000 and len(corpus.val) == 100
    assert corpus.vocab_size == 1235
    with pytest.raises(ValueError, match="vocab_size"):
        load_corpus(str(path), val_bin=str(val_path), vocab_size=1000)


def test_windows_are_reproducible_per_rank_and_step() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    a = sample_windows(tokens, seq_len=16, count=4, rng=batch_rng(0, rank=0, step=3))
    assert a.shape == (4, 17) and a.dtype == torch.int64
    # consecutive tokens: every row is a contiguous window
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())
    again = sample_windows(tokens, seq_len=16, count=4, rng=batch_rng(0, rank=0, step=3))
    other_rank = sample_windows(tokens, seq_len=16, count=4, rng=batch_rng(0, rank=1, step=3))
    assert bool((a == again).all()) and not bool((a == other_rank).all())

    val = validation_windows(tokens, seq_len=16, count=5)
    assert bool((val == validation_windows(tokens, seq_len=16, count=5)).all())
    assert val[0, 0] == 0 and val[-1, -1] == 999  # spread over the whole split
    with pytest.raises(ValueError, match="fewer than seq_len"):
        validation_windows(tokens[:10], seq_len=16, count=1)
