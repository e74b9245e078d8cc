"""Normalised squared Gaussian width of the loss sub-level set, and the predicted ratio.

For a quadratic loss model ``L(w* + d) - L(w*) = d^T H d / 2`` the sub-level set
``{d : L <= L(w*) + eps}`` is an ellipsoid with semi-axes ``r_i = sqrt(2 eps / |lambda_i|)``.
Its normalised squared Gaussian width seen from a ball of radius R is

    gw(R) = (1/D) sum_i r_i^2 / (R^2 + r_i^2) = (1/D) sum_i 2 eps / (2 eps + R^2 |lambda_i|).

A flat direction (``lambda_i = 0``, ``r_i = inf``) contributes exactly 1; gw(0) = 1 and gw
decreases with R. With SLQ Ritz pairs ``(theta_k, tau_k)`` (weights of each run summing to
1), ``(1/D) sum_i f(lambda_i)`` is the tau-weighted sum ``mean_runs sum_k tau_k f(theta_k)``:
the D directions are represented by the quadrature, no grid needed.

Non-positive-definite Hessians (``negative``):
* ``"abs"`` (the official code): ``r_i = sqrt(2 eps / |lambda_i|)`` for every eigenvalue;
* ``"flat"``: ``lambda_i <= 0`` is treated as flat (no increase of the loss along it, r = inf)
  and contributes 1.
Exactly-zero eigenvalues are flat under both options.

The official code instead builds a density on a grid (100,000 bins, kernel variance 1e-10)
and evaluates gw only at integer R; :func:`official_density` and :func:`gaussian_width_grid`
reproduce that variant for comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sparsemil.errors import SparsemilError

NEGATIVE = ("abs", "flat")


def _clean(
    eigenvalues: np.ndarray, weights: np.ndarray | None, D: int | None
) -> tuple[np.ndarray, np.ndarray]:
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if weights is None:
        if D is not None and D < lam.size:
            raise SparsemilError(
                f"gaussian_width: D={D} is smaller than the {lam.size} eigenvalues"
            )
        listed = lam.size
        n = listed if D is None else int(D)
        w = np.full(listed, 1.0 / n)
        if n > listed:  # the D - listed directions not given are flat
            lam, w = np.append(lam, 0.0), np.append(w, (n - listed) / n)
        return lam, w
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != lam.size:
        raise SparsemilError(f"gaussian_width: {lam.size} eigenvalues but {w.size} weights")
    keep = np.isfinite(lam) & (w > 0)
    lam, w = lam[keep], w[keep]
    total = w.sum()
    if total <= 0:
        raise SparsemilError("gaussian_width: the weights sum to zero")
    return lam, w / total


def width_terms(lam: np.ndarray, R: np.ndarray, eps: float, negative: str = "abs") -> np.ndarray:
    """``r^2 / (R^2 + r^2)`` for every (R, lambda) pair: shape (len(R), len(lam))."""
    if negative not in NEGATIVE:
        raise SparsemilError(f"negative={negative!r}: use one of {NEGATIVE}")
    if not eps > 0:
        raise SparsemilError(f"eps must be > 0, got {eps}")
    curv = np.abs(lam) if negative == "abs" else np.where(lam > 0, lam, 0.0)
    R2 = np.asarray(R, dtype=np.float64).reshape(-1, 1) ** 2
    return (2.0 * eps) / (2.0 * eps + R2 * curv[None, :])


def gaussian_width(
    R: float | np.ndarray,
    eigenvalues: np.ndarray,
    weights: np.ndarray | None,
    eps: float,
    D: int | None = None,
    negative: str = "abs",
    flat_fraction: float = 0.0,
) -> float | np.ndarray:
    """gw(R) for a spectrum given as eigenvalues with weights (Ritz pairs) or as a list.

    Args:
        R: radius (scalar or array).
        eigenvalues: Ritz values (any shape; NaN entries are ignored) or exact eigenvalues.
        weights: quadrature weights of the same shape (normalised to sum 1 here), or None:
            every listed eigenvalue stands for one direction out of ``D`` (default: as many
            as listed) and the ``D - n`` unlisted directions are flat.
        eps: loss tolerance epsilon (> 0).
        D: number of directions when ``weights`` is None.
        negative: ``"abs"`` or ``"flat"`` (module docstring).
        flat_fraction: f in [0, 1): a fraction f of directions is exactly flat on top of the
            given spectrum (the official "important eigenvalues" correction):
            ``gw = (1 - f) gw_spectrum + f``.

    Returns:
        float for scalar R, else an array shaped like R.
    """
    if not 0.0 <= flat_fraction < 1.0:
        raise SparsemilError(f"flat_fraction must be in [0, 1), got {flat_fraction}")
    lam, w = _clean(eigenvalues, weights, D)
    out = width_terms(lam, R, eps, negative) @ w
    out = (1.0 - flat_fraction) * out + flat_fraction
    if np.ndim(R) == 0:
        return float(out[0])
    return out.reshape(np.shape(R))


def trace_bounds(
    eigenvalues: np.ndarray,
    weights: np.ndarray | None,
    eps: float,
    negative: str = "abs",
    flat_fraction: float = 0.0,
) -> dict[str, Any]:
    """Bounds on gw(R) from the trace and the largest eigenvalue alone.

    ``f(c) = 2 eps / (2 eps + R^2 c)`` is convex in the curvature ``c >= 0``, so with
    ``c_i = |lambda_i|`` (``abs``) or ``max(lambda_i, 0)`` (``flat``; the non-positive share
    ``m0`` then contributes exactly 1), ``c_bar`` the mean curvature and ``c_max`` the largest:

    - lower (Jensen): ``gw(R) >= f(c_bar)``;
    - upper (the chord of f from 0 to ``c_max``): ``gw(R) <= 1 - (c_bar / c_max) (1 - f(c_max))``.

    Both are applied to the curved part, so with ``m0`` flat directions (and the important-
    eigenvalue fraction f) ``gw = m + (1 - m) mean_curved f``, ``m = m0 + f - m0 f``. The
    lower bound is also the width of an *isotropic* spectrum with the same trace -- the
    trace-only predictor. Under ``abs`` the trace is ``Tr|H|`` (estimated from the same
    quadrature), not ``Tr(H)``; they agree when the non-positive mass is negligible.

    Returns:
        ``{"lower": R -> gw_lower(R), "upper": R -> gw_upper(R), "mean_curvature": c_bar,
        "max_curvature": c_max, "abs_trace_per_dim": mean |lambda|, "nonpositive_mass": the
        weight of lambda <= 0}`` (``m0`` is the weight of zero *curvature*: lambda <= 0 under
        ``flat``, exactly 0 under ``abs``)
        (the two bounds are vectorised callables).
    """
    lam, w = _clean(eigenvalues, weights, None)
    curv = np.abs(lam) if negative == "abs" else np.where(lam > 0, lam, 0.0)
    flat = curv == 0
    m0 = float(w[flat].sum())
    m = m0 + flat_fraction - m0 * flat_fraction
    curved_w = w[~flat] / max(float(w[~flat].sum()), 1e-300)
    c_bar = float(curved_w @ curv[~flat]) if (~flat).any() else 0.0
    c_max = float(curv.max()) if curv.size else 0.0

    def f(c: float, R: np.ndarray) -> np.ndarray:
        R2 = np.asarray(R, dtype=np.float64) ** 2
        return 2.0 * eps / (2.0 * eps + R2 * c)

    def lower(R: np.ndarray) -> np.ndarray:
        return m + (1.0 - m) * f(c_bar, R)

    def upper(R: np.ndarray) -> np.ndarray:
        chord = 1.0 if c_max == 0 else 1.0 - (c_bar / c_max) * (1.0 - f(c_max, R))
        return m + (1.0 - m) * chord

    return {
        "lower": lower,
        "upper": upper,
        "mean_curvature": c_bar,
        "max_curvature": c_max,
        "abs_trace_per_dim": float(w @ np.abs(lam)),
        "nonpositive_mass": float(w[lam <= 0].sum()),
    }


def official_density(
    ritz_values: np.ndarray,
    ritz_weights: np.ndarray,
    num_bins: int = 100_000,
    sigma_squared: float = 1e-10,
    overhead: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """The official code's density on a grid (reproduced for comparison, quirks included).

    Grid: ``num_bins`` points over [mean_runs(min theta) - overhead, mean_runs(max theta) +
    overhead]; kernel variance ``sigma_squared * max(1, range)``; density normalised so
    that ``sum(density) * bin width = 1``. With variance 1e-10 the kernel is far narrower
    than a bin, so a Ritz value contributes only if it falls within ~1e-5 of a grid point
    (an aliasing artefact of the official code; see docs/pruning_limit.md).
    """
    vals = np.asarray(ritz_values, dtype=np.float64)
    wts = np.asarray(ritz_weights, dtype=np.float64)
    if vals.ndim == 1:
        vals, wts = vals[None], wts[None]
    lmax = float(np.mean(np.nanmax(vals, axis=1))) + overhead
    lmin = float(np.mean(np.nanmin(vals, axis=1))) - overhead
    grid = np.linspace(lmin, lmax, int(num_bins))
    var = sigma_squared * max(1.0, lmax - lmin)
    dens = np.zeros(grid.size)
    for r in range(vals.shape[0]):
        ok = np.isfinite(vals[r])
        for t, w in zip(vals[r][ok], wts[r][ok], strict=True):
            # only grid points within 40 standard deviations can contribute (exp(-800) = 0)
            half = 40.0 * np.sqrt(var)
            lo, hi = np.searchsorted(grid, [t - half, t + half])
            z = grid[lo:hi] - t
            dens[lo:hi] += w * np.exp(-(z * z) / (2.0 * var)) / np.sqrt(2.0 * np.pi * var)
    dens /= vals.shape[0]
    total = dens.sum() * (grid[1] - grid[0])
    if total > 0:
        dens = dens / total
    return grid, dens


def gaussian_width_grid(
    R: float | np.ndarray,
    grid: np.ndarray,
    density: np.ndarray,
    eps: float,
    negative: str = "abs",
    flat_fraction: float = 0.0,
) -> float | np.ndarray:
    """gw(R) from a density on a grid, the official way: zero-density bins are dropped,
    the remaining bins weighted by their density, plus mass ``f/(1-f) * sum(density)`` at
    lambda = 1e-30 (i.e. flat) for the important-eigenvalue correction."""
    grid = np.asarray(grid, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    keep = density > 0
    lam, w = grid[keep], density[keep]
    if flat_fraction > 0:
        lam = np.append(lam, 1e-30)
        w = np.append(w, flat_fraction / (1.0 - flat_fraction) * w.sum())
    return gaussian_width(R, lam, w, eps, negative=negative)


def predicted_ratio(
    ratios: np.ndarray,
    distance: np.ndarray,
    gw: Callable[[np.ndarray], np.ndarray],
    method: str = "bisect",
    tol: float = 1e-10,
) -> float | None:
    """Solve ``rho = gw(R(rho))`` for the pruning ratio.

    ``R(rho)`` is the piecewise-linear interpolation of the sweep's ``(ratios, distance)``
    (both sorted by ratio; R is non-decreasing in rho). ``h(rho) = gw(R(rho)) - rho`` is
    strictly decreasing (gw decreases in R), so the root is unique when ``h`` changes sign
    over the swept range.

    Args:
        ratios, distance: the sweep grid and the L2 distance ||w* - w_rho||.
        gw: vectorised callable R -> gw(R).
        method: ``"bisect"`` (bisection on the interpolated R(rho), to ``tol``) or
            ``"grid"`` (the largest swept ratio with ``gw(R(rho)) >= rho``).

    Returns:
        The predicted ratio, or None if ``h`` does not change sign on the swept range
        (e.g. gw stays above every swept ratio).
    """
    rho = np.asarray(ratios, dtype=np.float64)
    dist = np.asarray(distance, dtype=np.float64)
    if rho.ndim != 1 or rho.shape != dist.shape or rho.size < 2:
        raise SparsemilError("predicted_ratio needs 1-D ratios and distance of equal length >= 2")
    order = np.argsort(rho, kind="stable")
    rho, dist = rho[order], np.maximum.accumulate(dist[order])

    def h(x: np.ndarray) -> np.ndarray:
        return np.asarray(gw(np.interp(x, rho, dist)), dtype=np.float64) - x

    hv = h(rho)
    if method == "grid":
        ok = np.flatnonzero(hv >= 0)
        if ok.size == 0 or ok[-1] == rho.size - 1:
            return None if ok.size == 0 else float(rho[-1])
        return float(rho[ok[-1]])
    if method != "bisect":
        raise SparsemilError(f"predicted_ratio method={method!r}: use bisect or grid")
    if hv[0] < 0 or hv[-1] > 0:
        return None
    # bracket on the grid, then bisect inside the bracketing interval
    i = int(np.flatnonzero(hv >= 0)[-1])
    lo, hi = float(rho[i]), float(rho[min(i + 1, rho.size - 1)])
    if hv[i] == 0 or lo == hi:
        return lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if h(np.array([mid]))[0] >= 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= tol:
            break
    return 0.5 * (lo + hi)


def official_predicted_ratio(
    ratios: np.ndarray, distance: np.ndarray, gw_integer: np.ndarray
) -> float:
    """The official rule: ``argmin_rho |gw[round(R(rho))] - rho|`` with gw tabulated at
    integer R = 0, 1, ..., len(gw_integer) - 1 (R beyond the table is clipped)."""
    rho = np.asarray(ratios, dtype=np.float64)
    Ri = np.clip(
        np.rint(np.asarray(distance, dtype=np.float64)).astype(int), 0, len(gw_integer) - 1
    )
    diff = np.abs(np.asarray(gw_integer)[Ri] - rho)
    return float(rho[int(np.argmin(diff))])
