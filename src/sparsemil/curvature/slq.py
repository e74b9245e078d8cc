"""Stochastic Lanczos quadrature (SLQ): the Hessian's eigenvalue density, trace, extremes.

The functions take any :class:`~sparsemil.curvature.operator.CurvatureOperator` (``shape``
(D, D) and ``matmat(V: (D, k)) -> (D, k)``): :class:`~sparsemil.curvature.hvp.HessianOperator`,
or :class:`~sparsemil.curvature.operator.DenseOperator` for an explicit matrix. An operator's
optional ``device`` (where the Lanczos basis lives) and ``num_products`` (a product counter,
reported) are used when present.

SLQ (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019): for each of ``num_runs`` runs draw
a Rademacher probe v (entries +-1, seeded), run ``num_steps`` Lanczos steps from
``q_1 = v/||v||`` and eigendecompose the tridiagonal ``T`` (``scipy.linalg.eigh_tridiagonal``).
The Ritz values ``theta_k`` and weights ``tau_k = (e_1^T y_k)^2`` (``sum_k tau_k = 1``) give
the quadrature ``(1/D) sum_i f(lambda_i) ~= mean_runs sum_k tau_k f(theta_k)``.

Implementation choices (all measured in ``benchmarks/bench_slq.py``):

* the runs advance in lock-step and share one ``matmat`` per step;
* the Lanczos basis is kept as one tensor per run; full reorthogonalisation is classical
  Gram-Schmidt in matrix form, repeated once when the first pass removed much of the norm
  (DGKS "twice is enough" criterion), which keeps the basis orthogonal to rounding and
  costs O(j D) per step;
* the recurrence (alpha, beta) and the vector algebra are float64; the basis is stored in
  float64, or float32 above 256 MiB (memory-bound step); the Hessian-vector product runs
  in the model's dtype (float32) and is cast up;
* a run stops early when ``beta_j < 1e-10 * max|T|`` (an invariant Krylov subspace: the
  Ritz values are then exact eigenvalues).

Why not ``hessian-eigenthings`` (installed in the venv, MIT, but not a declared dependency
of this package): its SLQ runs the recurrence in the operator's dtype (float32),
reorthogonalises one basis vector at a time with a host synchronisation per dot product,
and eigendecomposes T with a dense ``torch.linalg.eigh``; its operator averages batches with
equal weights (a ragged last batch is over-weighted, so it is not the mean over samples),
has no multi-vector product and recomputes the forward pass for every product. Its top-k
``lanczos`` turns reorthogonalisation off above 50 steps. On FC5/digits the wall time of
its ``spectral_density`` was on par with ours and with the PyHessian-style loop at 12
steps (see docs/pruning_limit.md); the reasons to keep our own are the float64 recurrence,
the exact sample weighting, the cached linearisation (about 1.5x fewer FLOPs per product
at 128 steps) and the multi-vector ``matmat`` used by Hutch++ and the tests.
``curvlinops-for-pytorch`` was not usable: it pulls torchvision and a 5 GB CUDA torch build.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from sparsemil.curvature.operator import CurvatureOperator, DenseOperator
from sparsemil.errors import SparsemilError

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "LanczosResult",
    "SpectrumResult",
    "hutchinson_trace",
    "lanczos",
    "rademacher",
    "ritz_pairs",
    "slq",
    "spectral_density",
    "top_eigenvalues",
]


@dataclass
class LanczosResult:
    """Tridiagonal coefficients of ``runs`` Lanczos runs (float64, NaN-padded)."""

    alpha: np.ndarray  # (runs, steps)
    beta: np.ndarray  # (runs, steps - 1)
    num_steps: np.ndarray  # (runs,) steps actually taken
    first_alpha: np.ndarray  # (runs,) q_1^T H q_1


@dataclass
class SpectrumResult:
    """SLQ output: Ritz values/weights per run plus summaries.

    ``ritz_values`` and ``ritz_weights`` have shape (runs, steps); runs that stopped early
    are padded with NaN values and zero weights. Each run's weights sum to 1.
    """

    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    num_steps: np.ndarray
    dim: int
    trace: float  # Hutchinson estimate from the same probes: D * mean_runs alpha_1
    seed: int
    seconds: float
    num_products: int
    extra: dict[str, Any] = field(default_factory=dict)
    alpha: np.ndarray | None = None  # (runs, steps) Lanczos diagonals, NaN-padded
    beta: np.ndarray | None = None  # (runs, steps - 1) off-diagonals, NaN-padded

    def select_runs(self, runs: np.ndarray | list[int]) -> SpectrumResult:
        """The spectrum of a subset of the probes (rows ``runs``; repeats allowed, as in a
        bootstrap resample). Trace and the Lanczos coefficients follow the selection."""
        idx = np.asarray(runs, dtype=np.int64)
        first = None if self.alpha is None else self.alpha[idx, 0]
        return dataclasses.replace(
            self,
            ritz_values=self.ritz_values[idx],
            ritz_weights=self.ritz_weights[idx],
            num_steps=self.num_steps[idx],
            trace=self.trace if first is None else float(self.dim * np.mean(first)),
            alpha=None if self.alpha is None else self.alpha[idx],
            beta=None if self.beta is None else self.beta[idx],
        )

    def truncated(self, steps: int) -> SpectrumResult:
        """The spectrum the first ``steps`` Lanczos steps of every probe give (Ritz pairs of
        the leading ``steps x steps`` tridiagonal). Needs the stored coefficients.

        Raises:
            SparsemilError: the result has no Lanczos coefficients (built by hand).
        """
        if self.alpha is None or self.beta is None:
            raise SparsemilError("SpectrumResult.truncated needs the Lanczos coefficients")
        k = int(max(1, min(steps, self.alpha.shape[1])))
        runs = self.alpha.shape[0]
        values = np.full((runs, k), np.nan)
        weights = np.zeros((runs, k))
        taken = np.minimum(self.num_steps, k)
        for r in range(runs):
            s = int(taken[r])
            theta, tau = ritz_pairs(self.alpha[r, :s], self.beta[r, : s - 1])
            values[r, :s], weights[r, :s] = theta, tau
        return dataclasses.replace(
            self,
            ritz_values=values,
            ritz_weights=weights,
            num_steps=taken,
            alpha=self.alpha[:, :k],
            beta=self.beta[:, : max(k - 1, 0)],
        )

    def nodes_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat Ritz values and weights; weights averaged over runs (sum to 1)."""
        mask = np.isfinite(self.ritz_values)
        runs = self.ritz_values.shape[0]
        return self.ritz_values[mask], self.ritz_weights[mask] / runs

    @property
    def lambda_max(self) -> float:
        return float(np.nanmax(self.ritz_values))

    @property
    def lambda_min(self) -> float:
        return float(np.nanmin(self.ritz_values))

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (extremes, trace, negative mass, settings, time)."""
        nodes, weights = self.nodes_weights()
        return {
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "trace": self.trace,
            "negative_mass": float(weights[nodes < 0].sum()),
            "nonpositive_mass": float(weights[nodes <= 0].sum()),
            "num_runs": int(self.ritz_values.shape[0]),
            "num_steps": [int(s) for s in self.num_steps],
            "num_products": int(self.num_products),
            "dim": int(self.dim),
            "seed": int(self.seed),
            "seconds": float(self.seconds),
            **self.extra,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (Ritz pairs as nested lists, NaN -> null when written)."""
        return {
            "ritz_values": self.ritz_values.tolist(),
            "ritz_weights": self.ritz_weights.tolist(),
            "lanczos_alpha": None if self.alpha is None else self.alpha.tolist(),
            "lanczos_beta": None if self.beta is None else self.beta.tolist(),
            **self.summary(),
        }


def rademacher(dim: int, num: int, seed: int) -> Tensor:
    """(dim, num) matrix of +-1 (float64) from a seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (num, dim), generator=gen, dtype=torch.int8)
    return (bits.to(torch.float64) * 2.0 - 1.0).T.contiguous()


def _reorthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from each row of ``w`` (a, D) its components along ``basis`` (a, j, D).

    Classical Gram-Schmidt in matrix form, repeated once more when the first pass removed
    more than 1 - 1/sqrt(2) of the norm (DGKS criterion). A float32 basis (large D) takes the
    products in float32 and the update in float64.
    """
    for _ in range(2):
        before = torch.linalg.vector_norm(w, dim=1)
        if basis.dtype == torch.float64:
            c = torch.einsum("ajd,ad->aj", basis, w)
            w = w - torch.einsum("aj,ajd->ad", c, basis)
        else:
            c = torch.einsum("ajd,ad->aj", basis, w.to(basis.dtype))
            w = w - torch.einsum("aj,ajd->ad", c, basis).to(torch.float64)
        if bool((torch.linalg.vector_norm(w, dim=1) > 0.7071 * before).all()):
            break
    return w


def lanczos(
    op: CurvatureOperator,
    V0: Tensor,
    num_steps: int,
    basis_dtype: torch.dtype = torch.float64,
    breakdown_tol: float = 1e-10,
    return_basis: bool = False,
    progress: bool = False,
) -> tuple[LanczosResult, Tensor | None]:
    """Run Lanczos from each column of ``V0`` (D, runs) in lock-step, full reorthogonalisation.

    ``progress`` shows a bar over the steps (one block of Hessian-vector products each).

    Returns the tridiagonal coefficients and, if ``return_basis``, the basis (runs, steps, D).
    The basis and the reorthogonalisation live on ``op.device`` when the operator has one
    (a GPU operator keeps the memory-bound Gram-Schmidt on the GPU), else on ``V0``'s device.
    """
    D, runs = V0.shape
    m = int(min(num_steps, D))
    if m < 1:
        raise SparsemilError(f"lanczos: num_steps must be >= 1, got {num_steps}")
    device = torch.device(getattr(op, "device", V0.device))
    Q = torch.zeros(runs, m, D, dtype=basis_dtype, device=device)
    q = V0.T.to(device=device, dtype=torch.float64)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    Q[:, 0] = q.to(basis_dtype)
    alpha = np.full((runs, m), np.nan)
    beta = np.full((runs, max(m - 1, 0)), np.nan)
    steps = np.zeros(runs, dtype=np.int64)
    active = np.ones(runs, dtype=bool)
    scale = np.zeros(runs)
    from tqdm.auto import tqdm

    for j in tqdm(range(m), desc="Lanczos steps", disable=not progress, leave=False):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        qj = Q[idx, j].to(torch.float64)  # (a, D)
        w = op.matmat(qj.T.contiguous()).T.to(torch.float64)  # (a, D)
        a = (qj * w).sum(dim=1)
        w = w - a[:, None] * qj
        if j > 0:
            b_prev = torch.as_tensor(beta[idx, j - 1], dtype=torch.float64, device=device)
            w = w - b_prev[:, None] * Q[idx, j - 1].to(torch.float64)
        # a view of the basis when every run is active (no copy of the (runs, j, D) block)
        basis = (
            Q[:, : j + 1] if idx.size == runs else Q[torch.as_tensor(idx, device=device), : j + 1]
        )
        w = _reorthogonalise(w, basis)
        b = torch.linalg.vector_norm(w, dim=1).cpu()
        a = a.cpu()
        alpha[idx, j] = a.numpy()
        steps[idx] = j + 1
        scale[idx] = np.maximum(scale[idx], np.maximum(np.abs(a.numpy()), b.numpy()))
        if j == m - 1:
            break
        for pos, r in enumerate(idx):
            bv = float(b[pos])
            if bv <= breakdown_tol * max(scale[r], 1e-300):
                active[r] = False
                continue
            beta[r, j] = bv
            Q[r, j + 1] = (w[pos] / bv).to(basis_dtype)
    return LanczosResult(alpha, beta, steps, alpha[:, 0].copy()), (Q if return_basis else None)


def ritz_pairs(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and weights (squared first eigenvector components) of one tridiagonal."""
    if alpha.size == 1:
        return alpha.astype(np.float64), np.ones(1)
    theta, S = eigh_tridiagonal(alpha, beta)
    return theta, S[0, :] ** 2


def slq(
    op: CurvatureOperator,
    num_runs: int = 1,
    num_steps: int = 128,
    seed: int = 0,
    basis_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> SpectrumResult:
    """Stochastic Lanczos quadrature of ``op`` (see the module docstring).

    ``basis_dtype`` defaults to float64, or float32 when the float64 basis would exceed
    256 MiB (runs * steps * D * 8 bytes): reorthogonalisation is memory-bound, and a float32
    basis keeps orthogonality to ~1e-7 while the recurrence stays float64.
    """
    if num_runs < 1 or num_steps < 1:
        raise SparsemilError(
            f"slq: num_runs (lanczos_num) and num_steps (lanczos_iter) must be >= 1, "
            f"got {num_runs} and {num_steps}"
        )
    D = int(op.shape[0])
    if basis_dtype is None:
        basis_dtype = (
            torch.float64 if num_runs * num_steps * D * 8 <= 256 * 1024**2 else torch.float32
        )
    t0 = time.perf_counter()
    before = getattr(op, "num_products", 0)
    V0 = rademacher(D, num_runs, seed)
    lz, _ = lanczos(op, V0, num_steps, basis_dtype=basis_dtype, progress=progress)
    m = lz.alpha.shape[1]
    values = np.full((num_runs, m), np.nan)
    weights = np.zeros((num_runs, m))
    for r in range(num_runs):
        s = int(lz.num_steps[r])
        theta, tau = ritz_pairs(lz.alpha[r, :s], lz.beta[r, : s - 1])
        values[r, :s], weights[r, :s] = theta, tau
    seconds = time.perf_counter() - t0
    return SpectrumResult(
        ritz_values=values,
        ritz_weights=weights,
        num_steps=lz.num_steps,
        dim=D,
        trace=float(D * np.mean(lz.first_alpha)),
        seed=int(seed),
        seconds=seconds,
        num_products=int(getattr(op, "num_products", 0) - before),
        extra={"basis_dtype": str(basis_dtype).replace("torch.", "")},
        alpha=lz.alpha,
        beta=lz.beta,
    )


def spectral_density(
    ritz_values: np.ndarray,
    ritz_weights: np.ndarray,
    num_bins: int = 2000,
    sigma: float | None = None,
    rel_sigma: float = 0.005,
    padding: float = 0.05,
    grid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed eigenvalue density on a grid: ``(grid, density)`` with integral 1.

    ``density(t) = mean_runs sum_k tau_k N(t; theta_k, sigma^2)``. Defaults: ``num_bins``
    = 2000 points evenly spaced over ``[min theta - pad, max theta + pad]`` with
    ``pad = padding * (max - min)``, and ``sigma = rel_sigma * (max - min)`` (0.5 % of the
    spectral range, i.e. about 10 grid steps, so the kernel is always resolved by the
    grid -- unlike the official code's sigma^2 = 1e-10, far below its grid spacing).
    """
    vals = np.asarray(ritz_values, dtype=np.float64)
    wts = np.asarray(ritz_weights, dtype=np.float64)
    vals2 = vals.reshape(-1, vals.shape[-1]) if vals.ndim > 1 else vals[None]
    wts2 = wts.reshape(vals2.shape)
    mask = np.isfinite(vals2)
    nodes = vals2[mask]
    w = wts2[mask] / vals2.shape[0]
    lo, hi = float(nodes.min()), float(nodes.max())
    spread = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    if grid is None:
        pad = padding * spread
        grid = np.linspace(lo - pad, hi + pad, int(num_bins))
    if sigma is None:
        sigma = rel_sigma * spread
    dens = np.zeros_like(grid, dtype=np.float64)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for start in range(0, nodes.size, 256):
        z = (grid[:, None] - nodes[None, start : start + 256]) / sigma
        dens += (np.exp(-0.5 * z * z) * norm) @ w[start : start + 256]
    return grid, dens


def hutchinson_trace(
    op: CurvatureOperator,
    num_probes: int = 60,
    seed: int = 0,
    method: str = "hutch++",
    block: int = 8,
) -> tuple[float, float]:
    """Trace estimate with Rademacher probes: ``(estimate, standard error)``.

    ``method="hutchinson"``: ``mean_j v_j^T H v_j`` over ``num_probes`` probes.
    ``method="hutch++"`` (default; Meyer, Musco, Musco & Woodruff 2021): a third of the
    products sketch the dominant subspace Q = orth(H S), whose trace ``tr(Q^T H Q)`` is
    exact, and Hutchinson runs on the deflated remainder ``(I - QQ^T) H (I - QQ^T)``. A
    Hessian's trace is dominated by a few large eigenvalues, which plain Hutchinson
    estimates with a large variance; Hutch++ removes them first. The standard error is that
    of the residual Hutchinson part.
    """
    if method not in ("hutch++", "hutchinson"):
        raise SparsemilError(f"hutchinson_trace method={method!r}: use hutch++ or hutchinson")
    if num_probes < 1 or (method == "hutch++" and num_probes < 3):
        raise SparsemilError("hutchinson_trace needs num_probes >= 1 (>= 3 for hutch++)")

    def apply(V: Tensor) -> Tensor:  # products come back on V's device (a GPU op: CPU probes)
        return torch.cat(
            [
                op.matmat(V[:, i : i + block]).to(device=V.device, dtype=torch.float64)
                for i in range(0, V.shape[1], block)
            ],
            dim=1,
        )

    D = int(op.shape[0])
    if method == "hutchinson":
        V = rademacher(D, num_probes, seed)
        s = (V * apply(V)).sum(dim=0).numpy()
        exact = 0.0
    else:
        k = num_probes // 3
        S = rademacher(D, k, seed)
        Q, _ = torch.linalg.qr(apply(S))
        exact = float((Q * apply(Q)).sum())
        G = rademacher(D, num_probes - 2 * k, seed + 1)
        G = G - Q @ (Q.T @ G)
        s = (G * apply(G)).sum(dim=0).numpy()
    err = float(s.std(ddof=1) / math.sqrt(s.size)) if s.size > 1 else float("nan")
    return exact + float(s.mean()), err


def top_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    which: str = "largest",
) -> np.ndarray:
    """The ``k`` extreme eigenvalues by Lanczos with full reorthogonalisation.

    ``which``: ``"largest"`` (algebraic, descending), ``"smallest"`` (ascending) or
    ``"magnitude"``. ``num_steps`` defaults to ``min(D, max(64, 4 k))``; the extremes of
    the spectrum converge first, so this is usually ample.
    """
    if which not in ("largest", "smallest", "magnitude"):
        raise SparsemilError(f"top_eigenvalues which={which!r}: use largest, smallest or magnitude")
    D = int(op.shape[0])
    k = int(min(k, D))
    steps = int(min(D, num_steps if num_steps is not None else max(64, 4 * k)))
    gen = torch.Generator().manual_seed(int(seed))
    v0 = torch.randn(D, 1, generator=gen, dtype=torch.float64)
    lz, _ = lanczos(op, v0, steps)
    s = int(lz.num_steps[0])
    theta, _ = ritz_pairs(lz.alpha[0, :s], lz.beta[0, : s - 1])
    if which == "largest":
        out = np.sort(theta)[::-1]
    elif which == "smallest":
        out = np.sort(theta)
    else:
        out = theta[np.argsort(-np.abs(theta))]
    return out[:k].copy()
