"""Dual norms and the matrix functions behind them. Pure math: no torch.distributed here.

The spectral geometry needs tr(C^{1/2}) of a symmetric positive semi-definite m x m matrix
(C a covariance or a Gram matrix G G^T, so tr((G G^T)^{1/2}) = ||G||_*). Two ways:

* ``sqrt_trace_eigh``: LAPACK/cuSOLVER ``eigvalsh``, negative eigenvalues (rounding) clamped.
* ``sqrt_trace_newton_schulz``: matmul-only coupled Newton-Schulz iteration (Higham 2008,
  eq. 6.35) with an accelerated start and a stopping rule that bounds the relative error.

The norms themselves are one registry (``NORMS``): each ``Norm`` says what every other layer
needs to know about it (the optimizer geometry it is dual to, whether its statistics are per
coordinate or per matrix, which parameters it covers, whether its parts are square roots to
square and its moments worth pooling). Config, plan, estimators, optimizer geometry and the
capture backends read it; adding a norm is adding an entry and its kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "L1",
    "L2",
    "NORMS",
    "NUCLEAR",
    "Norm",
    "as_matrix",
    "c4",
    "c4_dof",
    "norm_named",
    "polar_factor",
    "sqrt_trace",
    "sqrt_trace_eigh",
    "sqrt_trace_newton_schulz",
]


@dataclass(frozen=True, eq=False)
class Norm:
    """A norm the noise scale is measured in (the dual of an optimizer's geometry).

    It equals its name (``NUCLEAR == "nuclear"``) and hashes as it, so code that compared the
    names the library used before the registry keeps its meaning instead of silently reading
    False."""

    #: What configs and estimates call it.
    name: str
    #: The steepest-descent geometry it is dual to (``nongns_dist.optim.geometry``).
    geometry: str
    #: Statistics per matrix (a Gram of each parameter's ``as_matrix`` view) rather than per
    #: coordinate.
    matrix: bool
    #: Its additive parts are norms (standard deviations, sqrt-traces) whose sum is squared
    #: when finished; otherwise they are already squares (variances), added as they are.
    squared: bool

    @property
    def pooled(self) -> bool:
        """Whether second moments are pooled across measurements: a square root is concave in
        them (a root of few samples reads low); a sum of variances is linear and needs none."""
        return self.squared

    @property
    def min_dims(self) -> int:
        """Fewest dims of a parameter it covers: a matrix norm needs a matrix."""
        return 2 if self.matrix else 0

    def covers(self, shape: Sequence[int]) -> bool:
        """Whether a parameter of this full shape is measured in this norm: matrix norms leave
        vectors and scalars out (the spectral estimate is defined for matrices)."""
        return len(shape) >= self.min_dims

    def shape_error(self, what: str, shape: Sequence[int]) -> str:
        """The message for ``what`` of ``shape`` asked to be measured in a norm that does not
        cover it."""
        return f"norm {self.name!r} for {what} needs >= {self.min_dims} dims, got {tuple(shape)}"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Norm):
            return self.name == other.name
        if isinstance(other, str):
            return self.name == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)


L1 = Norm("l1", geometry="sign", matrix=False, squared=True)
L2 = Norm("l2", geometry="euclidean", matrix=False, squared=False)
NUCLEAR = Norm("nuclear", geometry="spectral", matrix=True, squared=True)
#: Every norm, by name.
NORMS: dict[str, Norm] = {n.name: n for n in (L1, L2, NUCLEAR)}


def norm_named(name: object, *, also: Sequence[str] = ()) -> Norm:
    """The registered norm called ``name``; anything else (``also``: further names the caller
    accepts but handles itself, e.g. ``auto``, only listed in the message) is a ``ValueError``
    naming what is allowed."""
    if isinstance(name, Norm):
        return name
    if isinstance(name, str) and name in NORMS:
        return NORMS[name]
    allowed = ", ".join(repr(n) for n in [*NORMS, *also])
    raise ValueError(f"norm must be one of {allowed}, got {name!r}")


# Muon's quintic (Jordan et al. 2024), read as a map on p = sigma^2: p -> p * h(p)^2 with
# h(p) = a + b p + c p^2. It multiplies small p by a^2 ~ 11.9 per step (the classic step: 2.25)
# and keeps p in about [0.45, 1.3] once there; classic steps then converge exactly.
_FAST_COEFFS = (3.4445, -4.7750, 2.0315)


def c4(n: int) -> float:
    """E[s] / sigma for the sample standard deviation s of n Gaussian samples.

    c4(n) = sqrt(2/(n-1)) * Gamma(n/2) / Gamma((n-1)/2): 0.798 at n=2, 0.921 at n=4, 0.965 at n=8.
    """
    if n < 2:
        raise ValueError(f"c4 needs n >= 2 samples, got n={n}")
    return c4_dof(n - 1)


def c4_dof(dof: float) -> float:
    """E[s] / sigma for s^2 a variance estimate with ``dof`` (possibly fractional) degrees of
    freedom, s^2 ~ sigma^2 chi^2_dof / dof: sqrt(2/dof) Gamma((dof+1)/2) / Gamma(dof/2)."""
    if not dof > 0:
        raise ValueError(f"c4_dof needs dof > 0, got {dof}")
    return math.sqrt(2.0 / dof) * math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2))


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """View a weight (or gradient) as the matrix the spectral geometry acts on.

    Conv weights (out, in, *kernel) become (out, in * prod(kernel)), as Muon does. The result is
    transposed unless rows < columns: the covariance is taken over its rows, so over the smaller
    dimension (PAPER.md), and for a SQUARE matrix over its columns (the input side, as the paper
    authors' companion code does). Both sides' tr C^{1/2} bound sqrt(B) E||g_B - G||_* from
    above, so the smaller is the closer; on the main job's gradients the column side was the
    smaller for 46 of 48 square matrices, and the row side put the Muon group's sum 17-30% above
    the smaller one (BENCHMARKS.md "Row or column Gram for square matrices").
    """
    if not NUCLEAR.covers(tensor.shape):
        raise ValueError(NUCLEAR.shape_error("a tensor", tensor.shape))
    matrix = tensor.reshape(tensor.shape[0], -1)
    return matrix if matrix.shape[0] < matrix.shape[1] else matrix.T


def _check_square(matrix: torch.Tensor) -> None:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")


def sqrt_trace_eigh(matrix: torch.Tensor, *, floor: float = 0.0) -> torch.Tensor:
    """tr(A^{1/2}) = sum sqrt(eig) of a symmetric PSD matrix, by ``eigvalsh``.

    Eigenvalues at or below ``floor`` count as zero (negative ones always do). Pass the
    resolution of the data A was built from (eps of its dtype times its norm): below it an
    eigenvalue is rounding, and its square root (~sqrt(eps) * sqrt(max eig), e.g. 3e-4 for
    float32) would otherwise add up over the null space of a rank-deficient A.
    """
    _check_square(matrix)
    if not bool(torch.isfinite(matrix).all()):
        # eigvalsh raises on inf/NaN (LAPACK: "failed to converge"); a non-finite statistic is
        # NaN here, and the measurement is then skipped, not the training step crashed
        return torch.full((), math.nan, dtype=matrix.dtype, device=matrix.device)
    eig = torch.linalg.eigvalsh(matrix)
    return torch.where(eig > floor, eig, 0).sqrt().sum()


def sqrt_trace_newton_schulz(
    matrix: torch.Tensor,
    *,
    tol: float = 1e-3,
    max_iter: int = 60,
    power_iters: int = 8,
    fast_steps: int | None = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """tr(A^{1/2}) of a symmetric PSD matrix with matrix multiplications only.

    Coupled Newton-Schulz on the commuting pair Y -> (A/s)^{1/2}, Z -> (A/s)^{-1/2}, tracking
    P = Z Y (eigenvalues p_i -> 1). Every iterate is a polynomial in A, so per eigenvalue
    x_i = lambda_i / s it reads y_i = sqrt(x_i p_i).

    * Scale s: 2x a Rayleigh-quotient estimate of lambda_max after ``power_iters`` mat-vecs
      (never above ||A||_F), so x_max lies in [0.5, 3) and the iteration converges.
    * Start: ``fast_steps`` quintic steps (Muon's coefficients) lift small eigenvalues 5x faster
      per matmul than the classic step; ``None`` picks them from the spectrum's spread.
    * Stop: after a classic step every p_i is in [0, 1] and the error of tr(Y) is
      sum sqrt(x_i)(1 - sqrt(p_i)) <= sum sqrt(x_i)(1 - p_i)
      <= sqrt(tr(X (I - P))) * sqrt(m - tr P)        (Cauchy-Schwarz),
      two traces that cost elementwise dots, not matmuls; eigenvalues that are exactly zero
      (rank-deficient A) add nothing to the first factor. The loop stops once that bound is
      <= ``tol`` * tr(Y), so ``tol`` bounds the relative error (up to rounding).

    The matrix must be PSD up to rounding: a truly negative eigenvalue makes p_i < 0 grow, which
    the loop detects (negative tr(X(I - P)), non-finite or rising bound) and answers with
    ``sqrt_trace_eigh``. So does a bound that cannot reach ``tol`` at the working precision
    (float32 and a rank-deficient matrix near tol = 1e-3): slower, never wrong.
    """
    _check_square(matrix)
    m = matrix.shape[0]
    a = 0.5 * (matrix + matrix.T)
    info: dict[str, float] = {"matmuls": 0.0, "iterations": 0.0, "fallback": 0.0}

    def done(value: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        return (value, info) if return_info else value

    fro = torch.linalg.matrix_norm(a)
    if not torch.isfinite(fro) or fro == 0:
        return done(fro.new_zeros(()) if fro == 0 else fro)
    # Rayleigh quotient of a few power steps: a lower bound on lambda_max, close after a few.
    v = torch.ones(m, dtype=a.dtype, device=a.device) + torch.linspace(
        0, 1, m, dtype=a.dtype, device=a.device
    )
    for _ in range(power_iters):
        v = a @ v
        v = v / v.norm()
    lam = torch.dot(v, a @ v)
    scale = torch.minimum(2.0 * lam.clamp_min(fro / m), fro)
    x = a / scale
    eye = torch.eye(m, dtype=a.dtype, device=a.device)

    if fast_steps is None:
        # tr(X)/m over x_max is the mean normalized eigenvalue: a flat spectrum needs no lift,
        # a spread one needs enough quintic steps to bring its bulk near 1.
        mean_x = float(torch.trace(x)) / m
        spread = max(float(lam / scale) / max(mean_x, 1e-30), 1.0)
        fast_steps = min(6, max(0, math.ceil(math.log(spread * 10.0) / math.log(11.86))))

    tr_x = torch.trace(x).to(torch.float64)
    y, z = x, eye
    p = x  # P = Z Y
    best_bound = math.inf
    for it in range(max_iter):
        if it < fast_steps:
            ca, cb, cc = _FAST_COEFFS
            p2 = p @ p
            t = ca * eye + cb * p + cc * p2
            info["matmuls"] += 1
        else:
            t = 1.5 * eye - 0.5 * p
        y = y @ t
        z = t @ z
        p = z @ y
        info["matmuls"] += 3
        info["iterations"] = it + 1
        if it < fast_steps:
            continue
        tr_y = torch.trace(y)
        unconverged = (m - torch.trace(p)).clamp_min(0)
        # tr(X (I - P)) (X, P symmetric) is >= 0 when A is PSD: a clearly negative value means a
        # negative eigenvalue beyond rounding, which this iteration cannot take.
        weighted = tr_x - torch.sum(x * p, dtype=torch.float64)
        if weighted < -tol * tr_x:
            break
        bound = float(torch.sqrt(weighted.clamp_min(0) * unconverged) / tr_y)
        if not math.isfinite(bound) or bound > 2 * best_bound + 1e-12:
            break  # diverging: a negative eigenvalue beyond rounding, or overflow
        best_bound = min(best_bound, abs(bound))
        if abs(bound) <= tol:
            return done(tr_y * scale.sqrt())
    info["fallback"] = 1.0
    return done(sqrt_trace_eigh(a))


SqrtTraceMethod = Literal["eigh", "newton_schulz"]


def sqrt_trace(
    matrix: torch.Tensor,
    method: SqrtTraceMethod = "eigh",
    *,
    tol: float = 1e-3,
    floor: float = 0.0,
) -> torch.Tensor:
    """tr(A^{1/2}) of a symmetric PSD matrix by ``method`` (``eigh`` or ``newton_schulz``).

    ``floor``: see ``sqrt_trace_eigh`` (the iteration resolves tiny eigenvalues only to ``tol``
    anyway, so it ignores it)."""
    if method == "eigh":
        return sqrt_trace_eigh(matrix, floor=floor)
    if method == "newton_schulz":
        result = sqrt_trace_newton_schulz(matrix, tol=tol)
        assert isinstance(result, torch.Tensor)
        return result
    raise ValueError(f"sqrt-trace method must be 'eigh' or 'newton_schulz', got {method!r}")


PolarMethod = Literal["svd", "newton_schulz"]


def muon_quintic(
    x: torch.Tensor, steps: int, coefficients: tuple[float, float, float] = _FAST_COEFFS
) -> torch.Tensor:
    """``steps`` of Muon's quintic X <- a X + (b G + c G^2) X, G = X X^T, on a wide matrix
    (rows <= cols) already scaled to spectral norm <= 1; its singular values land near 1."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def polar_factor(
    matrix: torch.Tensor,
    method: PolarMethod = "svd",
    *,
    tol: float = 1e-4,
    max_iter: int = 50,
    fast_steps: int = 5,
) -> torch.Tensor:
    """U V^T of the thin SVD U S V^T of a 2-D matrix: the steepest-descent direction of the
    spectral-norm ball (the update of spectral descent).

    ``svd``: exact, from ``torch.linalg.svd``. ``newton_schulz``: ``fast_steps`` of Muon's quintic,
    then the classic cubic X <- 1.5 X - 0.5 X X^T X (quadratic convergence of every singular
    value to 1) until an update changes X by at most ``tol`` relative (Frobenius). Singular values
    far below ``tol`` times the largest grow slowly and may not reach 1 within ``max_iter``; the
    exact U V^T of a rank-deficient matrix is itself ill-defined there.
    """
    if matrix.dim() != 2:
        raise ValueError(f"polar_factor needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if method == "svd":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u @ vh
    if method != "newton_schulz":
        raise ValueError(f"polar method must be 'svd' or 'newton_schulz', got {method!r}")
    transposed = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if transposed else matrix  # X X^T is the small Gram
    norm = torch.linalg.matrix_norm(x)
    if norm == 0:
        return torch.zeros_like(matrix)
    x = x / norm
    x = muon_quintic(x, fast_steps)
    for _ in range(max_iter):
        step = 0.5 * (x - (x @ x.T) @ x)  # X_new - X for the cubic
        x = x + step
        if torch.linalg.matrix_norm(step) <= tol * torch.linalg.matrix_norm(x):
            break
    return x.T if transposed else x
