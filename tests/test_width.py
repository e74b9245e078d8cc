"""Gaussian width on hand-computable spectra, the official grid variant, and the solver."""

from __future__ import annotations

import numpy as np
import pytest

from sparsemil.errors import SparsemilError
from sparsemil.limit.width import (
    gaussian_width,
    gaussian_width_grid,
    official_density,
    official_predicted_ratio,
    predicted_ratio,
)


def test_all_equal_eigenvalues_closed_form():
    lam, eps, D = 0.5, 0.02, 1000
    r2 = 2 * eps / lam
    R = np.array([0.0, 0.1, 0.2, 1.0, 3.0])
    got = gaussian_width(R, np.full(D, lam), None, eps)
    np.testing.assert_allclose(got, r2 / (R**2 + r2), rtol=1e-12)
    # the same spectrum as one Ritz node with weight 1
    np.testing.assert_allclose(gaussian_width(R, [lam], [1.0], eps), got, rtol=1e-12)
    assert gaussian_width(0.0, [lam], [1.0], eps) == 1.0


def test_one_flat_direction():
    eps, R = 0.1, 2.0
    lam = np.array([0.0, 1.0, 1.0, 1.0])  # one exactly flat direction out of four
    r2 = 2 * eps / 1.0
    expected = (1.0 + 3 * r2 / (R**2 + r2)) / 4
    assert gaussian_width(R, lam, None, eps) == pytest.approx(expected, rel=1e-12)
    # eigenvalues listed for 3 of D = 4 directions: the unlisted one is flat
    assert gaussian_width(R, lam[1:], None, eps, D=4) == pytest.approx(expected, rel=1e-12)
    # flat fraction correction: f of the directions are flat on top of the spectrum
    f = 0.25
    got = gaussian_width(R, [1.0], [1.0], eps, flat_fraction=f)
    assert got == pytest.approx(expected, rel=1e-12)


def test_negative_eigenvalue_options():
    eps, R = 0.05, 1.5
    lam = np.array([-0.4, 0.4])
    r2 = 2 * eps / 0.4
    term = r2 / (R**2 + r2)
    assert gaussian_width(R, lam, None, eps, negative="abs") == pytest.approx(term)
    assert gaussian_width(R, lam, None, eps, negative="flat") == pytest.approx((1 + term) / 2)
    with pytest.raises(SparsemilError, match="negative='clip'"):
        gaussian_width(R, lam, None, eps, negative="clip")
    with pytest.raises(SparsemilError, match="eps must be > 0"):
        gaussian_width(R, lam, None, 0.0)


def test_ritz_weights_normalised_and_nan_ignored():
    vals = np.array([[0.1, 1.0, np.nan], [0.2, 2.0, 3.0]])
    wts = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    eps, R = 0.01, 0.7
    f = lambda lam: 2 * eps / (2 * eps + R**2 * abs(lam))  # noqa: E731
    expected = (0.5 * f(0.1) + 0.5 * f(1.0) + 0.2 * f(0.2) + 0.3 * f(2.0) + 0.5 * f(3.0)) / 2
    assert gaussian_width(R, vals, wts, eps) == pytest.approx(expected, rel=1e-12)


def test_width_decreases_with_R():
    rng = np.random.default_rng(0)
    lam = rng.gamma(0.5, 1.0, size=200)
    R = np.linspace(0, 20, 50)
    g = gaussian_width(R, lam, None, 0.03)
    assert g[0] == pytest.approx(1.0, abs=1e-12) and np.all(np.diff(g) < 0)


def test_official_grid_density_on_grid_points():
    # Ritz values placed exactly on grid points survive the official narrow kernel
    vals = np.array([[0.0, 0.5, 1.0]])
    wts = np.array([[0.2, 0.3, 0.5]])
    grid, dens = official_density(vals, wts, num_bins=1001, overhead=0.0)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert np.sum(dens) * (grid[1] - grid[0]) == pytest.approx(1.0)
    eps, R = 0.02, np.array([0, 1, 2, 3])
    exact = gaussian_width(R, vals, wts, eps)
    np.testing.assert_allclose(gaussian_width_grid(R, grid, dens, eps), exact, rtol=1e-9)
    # flat mass f/(1-f) * sum(density) at lambda = 1e-30
    f = 0.3
    got = gaussian_width_grid(R, grid, dens, eps, flat_fraction=f)
    np.testing.assert_allclose(got, (1 - f) * exact + f, rtol=1e-9)


def _synthetic_curves():
    ratios = np.arange(1000) / 1000
    distance = 10.0 * ratios**3  # monotone R(rho)

    def gw(R):
        return 1.0 / (1.0 + np.asarray(R) ** 2 / 4.0)  # decreasing, gw(0) = 1

    return ratios, distance, gw


def test_solver_on_synthetic_monotone_curves():
    ratios, distance, gw = _synthetic_curves()
    rho = predicted_ratio(ratios, distance, gw)
    # the true root of rho = gw(10 rho^3) on the exact (not interpolated) curve
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gw(10 * mid**3) >= mid else (lo, mid)
    assert rho == pytest.approx(lo, abs=2e-6)  # interpolation error of R only
    grid = predicted_ratio(ratios, distance, gw, method="grid")
    assert grid <= rho < grid + 1e-3
    # the official integer-R rule lands near, but not exactly at, the root
    gw_int = gw(np.arange(0, 12))
    off = official_predicted_ratio(ratios, distance, gw_int)
    assert abs(off - rho) < 0.1


def test_solver_without_a_crossing_returns_none():
    ratios = np.linspace(0, 0.5, 51)
    distance = ratios * 0.01
    assert predicted_ratio(ratios, distance, lambda R: np.ones_like(R)) is None
    with pytest.raises(SparsemilError, match="equal length"):
        predicted_ratio(ratios, distance[:-1], lambda R: R)
    with pytest.raises(SparsemilError, match="method='newton'"):
        predicted_ratio(ratios, distance, lambda R: R, method="newton")
