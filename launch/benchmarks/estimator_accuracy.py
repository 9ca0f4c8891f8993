"""How close measured noise is to the population's, on REAL per-example gradients.

Takes a checkpoint of the main job (launch/train.py writes <run>/checkpoints/), computes the
gradient of every one of --population training windows at those weights (one example = one
window), and
treats that set as the population: examples are drawn from it WITH replacement, so its own
per-coordinate variances sigma_i^2 and row covariances C are exactly what an estimator
estimates. Population noise (squared dual norms, what the controller divides by the signal):

    l1       (sum_i sigma_i)^2                     over every parameter (Signum's geometry)
    nuclear  (sum_X tr C_X^{1/2})^2                over the Muon group's matrices

A measurement draws n samples, each the mean gradient of b examples. For each (n, b) the script
runs --sequences independent sequences of --measurements measurements at the same weights and
reports, per estimator, mean(estimate) / population:

    paper       each measurement's own estimate (no c4, no pooling); the paper's EMA of that
                scalar has the same mean
    raw         each measurement's own estimate as the library logs it (l1 with c4(n))
    pooled dof T  the library's default (T = GNSConfig.pool_dof = 100): moments pooled over
                  measurements (MomentPool(target_dof=T)), read over the second half of each
                  sequence (--dofs)
    pooled b      the same with a fixed EMA coefficient b instead (--betas)
    delta ...     (--delta) pooled, plus a delta-method bias correction of the sqrt-trace

    python launch/benchmarks/estimator_accuracy.py --checkpoint runs/<run>

CPU, one process; the per-example gradients are held in memory (population x parameters x 4
bytes: 2.6 GB for the default model and 768 windows).
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from launch import checkpoints
from launch.data import load_corpus, sample_windows
from launch.llama import Llama, LlamaConfig
from nongns_dist.estimators import (
    MomentPool,
    noise_from_variance,
    pooled_noise_part,
    sample_covariance,
)
from nongns_dist.norms import as_matrix, sqrt_trace
from nongns_dist.optim import muon_param_groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint (or run) directory of launch/train.py"
    )
    p.add_argument("--population", type=int, default=768, help="training windows (examples)")
    p.add_argument("--samples", type=int, nargs="+", default=[2, 4, 8], help="n per measurement")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="b per sample")
    p.add_argument("--betas", type=float, nargs="*", default=[0.95], help="pools by EMA beta")
    p.add_argument("--sequences", type=int, default=3, help="independent sequences per (n, b)")
    p.add_argument("--measurements", type=int, default=120, help="measurements per sequence")
    p.add_argument("--seed", type=int, default=1234, help="population windows and draws")
    p.add_argument("--delta", action="store_true", help="also: pooled + delta-method correction")
    p.add_argument("--dofs", type=float, nargs="*", default=[100.0], help="pools by target dof")
    p.add_argument("--cache", default=None, help="file for the per-example gradients (reused)")
    return p.parse_args(argv)


def load_model(path: str) -> tuple[Llama, dict]:
    try:
        directory = checkpoints.resolve(path, Path(path))
        if directory is None or not (directory / "model.pt").is_file():
            raise checkpoints.CheckpointError("no DDP/FSDP checkpoint of launch/train.py there")
        args = checkpoints.read_meta(directory)["args"]
    except checkpoints.CheckpointError as exc:
        raise SystemExit(f"--checkpoint {path}: {exc}") from exc
    checkpoint = load_file(directory / "model.pt", "--checkpoint")
    corpus = load_corpus(args["data"], cache_dir=args["corpus_dir"], corpus_mb=args["corpus_mb"])
    cfg = LlamaConfig(
        vocab_size=corpus.vocab_size,
        dim=args["dim"],
        n_layers=args["layers"],
        n_heads=args["heads"],
        max_seq_len=args["seq_len"],
    )
    model = Llama(cfg)
    model.load_state_dict(checkpoint["model"])
    return model, args


def load_file(path: Path, flag: str) -> dict:
    """A torch file read with ``weights_only=True``: tensors and plain containers only, so that
    a file from elsewhere cannot run code while it is read; any failure names the file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals are UnpicklingError, damage RuntimeError...
        # torch's refusal is a page of advice; the line naming the refused object is the news
        refused = re.search(r"Unsupported global: [^\n]*", str(exc))
        raise SystemExit(
            f"{flag}: cannot load {path} (weights_only=True: tensors and plain containers "
            f"only): {type(exc).__name__}: {refused.group(0) if refused else exc}"
        ) from exc
    if not isinstance(loaded, dict):
        raise SystemExit(f"{flag}: {path} holds a {type(loaded).__name__}, expected a dict")
    return loaded


#: --cache's format: the gradients and, per parameter, its columns and shape as plain ints
#: (read with weights_only=True; the first format pickled slice objects and needed a full
#: unpickler).
CACHE_FORMAT = "estimator_accuracy per-example gradients 2"


def write_cache(
    path: Path, grads: torch.Tensor, columns: dict[str, slice], shapes: dict[str, torch.Size]
) -> None:
    torch.save(
        {
            "format": CACHE_FORMAT,
            "grads": grads,
            "columns": {name: [c.start, c.stop] for name, c in columns.items()},
            "shapes": {name: list(shape) for name, shape in shapes.items()},
        },
        path,
    )


def read_cache(
    path: Path,
) -> tuple[torch.Tensor, dict[str, slice], dict[str, torch.Size]]:
    """What ``write_cache`` wrote; any other file is refused with an error naming it."""
    cache = load_file(path, "--cache")
    if cache.get("format") != CACHE_FORMAT:
        raise SystemExit(
            f"--cache: {path} is not a cache of this script ({CACHE_FORMAT!r}; an older one is "
            "rebuilt when removed)"
        )
    try:
        grads, columns, shapes = cache["grads"], cache["columns"], cache["shapes"]
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2:
            raise TypeError(f"grads must be a 2-D tensor, got {type(grads).__name__}")
        parsed = (
            grads,
            {name: slice(int(a), int(b)) for name, (a, b) in columns.items()},
            {name: torch.Size(int(n) for n in shape) for name, shape in shapes.items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SystemExit(f"--cache: {path} is malformed: {type(exc).__name__}: {exc}") from exc
    return parsed


def per_example_gradients(
    model: Llama, windows: torch.Tensor
) -> tuple[torch.Tensor, dict[str, slice], dict[str, torch.Size]]:
    """(population x parameters) float32 gradients, one row per window; name -> columns."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    columns, shapes, start = {}, {}, 0
    for name, p in params:
        columns[name] = slice(start, start + p.numel())
        shapes[name] = p.shape
        start += p.numel()
    grads = torch.empty(len(windows), start, dtype=torch.float32)
    for i, window in enumerate(windows):
        model.zero_grad(set_to_none=True)
        model.loss(window[None]).backward()
        for name, p in params:
            assert p.grad is not None
            grads[i, columns[name]] = p.grad.reshape(-1)
    return grads, columns, shapes


class Geometry:
    """The columns and matrices each norm is taken over."""

    def __init__(self, model: Llama, columns: dict[str, slice], shapes: dict[str, torch.Size]):
        names = {id(p): n for n, p in model.named_parameters()}
        muon = next(g for g in muon_param_groups(model) if g["use_muon"])["params"]
        self.matrices = [(names[id(p)], columns[names[id(p)]], shapes[names[id(p)]]) for p in muon]

    @staticmethod
    def matrix(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(k, *shape) rows -> (k, m, cols) with m <= cols, as the library sees them."""
        return torch.stack([as_matrix(r.reshape(shape)) for r in rows])


def population_noise(grads: torch.Tensor, geometry: Geometry) -> dict[str, float]:
    n = grads.shape[0]
    var = torch.zeros(grads.shape[1], dtype=torch.float64)
    for lo in range(0, grads.shape[1], 1 << 16):  # float64 in column blocks
        block = grads[:, lo : lo + (1 << 16)].to(torch.float64)
        var[lo : lo + block.shape[1]] = block.var(0, correction=1)
    l1 = float(var.sqrt().sum()) ** 2
    nuclear = 0.0
    for _, cols, shape in geometry.matrices:
        mats = Geometry.matrix(grads[:, cols].to(torch.float64), shape)
        dev = mats - mats.mean(0)
        cov = torch.einsum("sik,sjk->ij", dev, dev) / (n - 1)
        nuclear += float(sqrt_trace(cov, floor=1e-16 * float(torch.linalg.matrix_norm(cov))))
    return {"l1": l1, "nuclear": nuclear**2}


def delta_corrected_sqrt_trace(cov: torch.Tensor, dof: float, floor: float) -> float:
    """tr(C^{1/2}) plus its second-order (delta-method) bias under Wishart noise with ``dof``
    degrees of freedom, plugged in from C's own eigenvalues l_i:
    (sum_ij sqrt(l_i l_j) / (sqrt l_i + sqrt l_j) + sum_i sqrt(l_i) / 2) / (4 dof).
    An alternative to pooling alone, measured here (--delta)."""
    eig = torch.linalg.eigvalsh(cov)
    root = torch.where(eig > floor, eig, 0).sqrt()
    pair = root[:, None] * root[None, :] / (root[:, None] + root[None, :]).clamp_min(1e-300)
    return float(root.sum() + (pair.sum() + 0.5 * root.sum()) / (4 * dof))


def measure(
    grads: torch.Tensor,
    geometry: Geometry,
    n: int,
    b: int,
    pools: dict[str, MomentPool],
    rng: np.random.Generator,
    delta: bool,
) -> dict[str, float]:
    """One measurement: n samples of b examples each. Returns noise per estimator name."""
    picks = torch.from_numpy(rng.integers(0, grads.shape[0], size=(n, b)))
    if n * b <= grads.shape[0] // 8:  # few rows: gather them (a matmul reads every row)
        rows = grads.index_select(0, picks.reshape(-1)).to(torch.float64)
        samples = rows.reshape(n, b, -1).mean(1)
    else:
        weights = torch.zeros(n, grads.shape[0], dtype=torch.float64)
        weights.scatter_add_(1, picks, torch.full((n, b), 1.0 / b, dtype=torch.float64))
        samples = (weights.float() @ grads).to(torch.float64)  # (n, parameters): sample means
    mean = samples.mean(0)
    var = (samples - mean).square().sum(0) * (b / (n - 1))
    out = {
        "paper/l1": float(noise_from_variance(var, "l1", n - 1, bias_correction=False)) ** 2,
        "raw/l1": float(noise_from_variance(var, "l1", n - 1)) ** 2,
    }
    pooled_l1 = dict.fromkeys(pools, 0.0)
    for beta, pool in pools.items():
        moment, dof, _ = pool.update("l1", var, n - 1)
        pooled_l1[beta] = float(pooled_noise_part(moment, "l1", dof))
    raw_nuclear = 0.0
    pooled_nuclear = dict.fromkeys(pools, 0.0)
    delta_nuclear = dict.fromkeys(pools, 0.0)
    for name, cols, shape in geometry.matrices:
        mats = Geometry.matrix(samples[:, cols], shape)
        dev = mats - mats.mean(0)
        gram = torch.einsum("sik,sjk->ij", dev, dev)
        cov, floor = sample_covariance(gram, gram, n, b, centered=True)
        raw_nuclear += float(sqrt_trace(cov, floor=floor))
        for beta, pool in pools.items():
            moment, dof, pooled_floor = pool.update(name, cov, n - 1, floor=floor)
            pooled_nuclear[beta] += float(pooled_noise_part(moment, "nuclear", dof, pooled_floor))
            if delta:
                delta_nuclear[beta] += float(delta_corrected_sqrt_trace(moment, dof, pooled_floor))
    out["paper/nuclear"] = out["raw/nuclear"] = raw_nuclear**2
    for beta in pools:
        out[f"pooled {beta}/l1"] = pooled_l1[beta] ** 2
        out[f"pooled {beta}/nuclear"] = pooled_nuclear[beta] ** 2
        if delta:
            out[f"delta {beta}/nuclear"] = delta_nuclear[beta] ** 2
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, train_args = load_model(args.checkpoint)
    corpus = load_corpus(
        train_args["data"], cache_dir=train_args["corpus_dir"], corpus_mb=train_args["corpus_mb"]
    )
    rng = np.random.default_rng(args.seed)
    windows = sample_windows(corpus.train, train_args["seq_len"], args.population, rng)
    cached = bool(args.cache) and Path(args.cache).is_file()
    if cached:
        grads, columns, shapes = read_cache(Path(args.cache))
    else:
        grads, columns, shapes = per_example_gradients(model, windows)
        if args.cache:
            write_cache(Path(args.cache), grads, columns, shapes)
    geometry = Geometry(model, columns, shapes)
    population = population_noise(grads, geometry)
    print(
        f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; checkpoint {args.checkpoint}"
    )
    print(
        f"model: {grads.shape[1]:,} parameters, {len(geometry.matrices)} Muon-group matrices; "
        f"population: {args.population} windows of {train_args['seq_len']} tokens "
        f"({time.perf_counter() - started:.0f} s for the per-example gradients"
        f"{', read from ' + args.cache if cached else ''})"
    )
    print(
        f"population noise: l1 {population['l1']:.4g}, nuclear {population['nuclear']:.4g}; "
        f"{args.sequences} sequences x {args.measurements} measurements per (n, b)"
    )
    pool_names = [f"{beta}" for beta in args.betas] + [f"dof {dof:g}" for dof in args.dofs]
    names = ["paper", "raw"] + [f"pooled {name}" for name in pool_names]
    names += [f"delta {name}" for name in pool_names] if args.delta else []
    results: dict[tuple[int, int], dict[str, float]] = {}
    for n in args.samples:
        for b in args.sizes:
            sums: dict[str, list[float]] = {}
            for _ in range(args.sequences):
                pools = {f"{beta}": MomentPool(beta) for beta in args.betas}
                pools |= {f"dof {dof:g}": MomentPool(target_dof=dof) for dof in args.dofs}
                for t in range(args.measurements):
                    values = measure(grads, geometry, n, b, pools, rng, args.delta)
                    for key, value in values.items():
                        # a pool is read once settled: over the second half of each sequence
                        if key.startswith(("paper", "raw")) or t >= args.measurements // 2:
                            sums.setdefault(key, []).append(value)
            results[n, b] = {
                key: float(np.mean(v)) / population[key.split("/")[1]] for key, v in sums.items()
            }
            print(f"  n={n} b={b}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[n, b].items()))
    for norm in ("l1", "nuclear"):
        print(f"\nestimate / population, {norm} noise (mean over draws)")
        print("| estimator | n | " + " | ".join(f"b={b}" for b in args.sizes) + " |")
        print("|---|---|" + "---|" * len(args.sizes))
        for name in names:
            if (name == "paper" and norm == "nuclear") or (
                name.startswith("delta") and norm == "l1"
            ):
                continue  # paper: the same numbers as raw (nuclear has no c4); delta: nuclear
            for n in args.samples:
                cells = " | ".join(f"{results[n, b][f'{name}/{norm}']:.3f}" for b in args.sizes)
                label = "paper = raw" if name == "raw" and norm == "nuclear" else name
                print(f"| {label} | {n} | {cells} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if not math.isfinite(sum(v for r in results.values() for v in r.values())):
        raise SystemExit("non-finite result")


if __name__ == "__main__":
    main()
