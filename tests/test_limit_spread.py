"""The prediction's spread over SLQ probes, against hand-computed widths.

Truths used:
- a diagonal Hessian with Rademacher probes (entries +-1) gives every probe the exact
  quadrature once Lanczos has run D steps (``tau`` of eigenvalue i is ``v_i^2 / D = 1 / D``),
  so the spread collapses to the exact prediction, solved here with scipy's ``brentq`` on
  ``gw(R) = (1/D) sum 2 eps / (2 eps + R^2 |lambda_i|)`` written out independently;
- the non-positive Ritz mass of such a Hessian is the share of its non-positive diagonal;
- under ``flat`` a non-positive eigenvalue contributes 1 to gw.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from sparsemil.curvature.operator import DenseOperator
from sparsemil.curvature.slq import slq
from sparsemil.limit.predict import predict_limit, prediction_spread

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = 0.05
RATIOS = np.linspace(0.0, 1.0, 401)
DISTANCE = 40.0 * RATIOS**1.5  # an increasing R(rho), as a sweep gives


def exact_prediction(eigs: np.ndarray, negative: str = "abs") -> float:
    lam = np.asarray(eigs, dtype=np.float64)

    def gw(R: float) -> float:
        if negative == "flat":
            terms = np.where(lam > 0, 2 * EPS / (2 * EPS + R**2 * np.abs(lam)), 1.0)
        else:
            terms = 2 * EPS / (2 * EPS + R**2 * np.abs(lam))
        return float(terms.mean())

    return brentq(lambda r: gw(40.0 * r**1.5) - r, 1e-9, 1.0, xtol=1e-12)


def test_identical_probes_give_zero_spread_and_the_exact_prediction():
    eigs = np.geomspace(1e-3, 10.0, 24)
    op = DenseOperator(np.diag(eigs))
    res = predict_limit(op, RATIOS, DISTANCE, EPS, num_runs=4, num_steps=24, seed=3)
    exact = exact_prediction(eigs)
    spread = res.uncertainty
    assert res.predicted_ratio == pytest.approx(exact, abs=1e-6)
    assert spread["per_probe"] == pytest.approx([exact] * 4, abs=1e-6)
    assert spread["min"] == pytest.approx(spread["max"], abs=1e-9)
    assert spread["interval_90"] == pytest.approx([exact, exact], abs=1e-6)
    assert spread["by_steps"]["predicted_ratio"][-1] == pytest.approx(exact, abs=1e-6)


def test_rotated_hessian_spread_brackets_the_central_value():
    gen = np.random.default_rng(0)
    eigs = np.geomspace(1e-3, 10.0, 60)
    Q, _ = np.linalg.qr(gen.standard_normal((60, 60)))
    op = DenseOperator(Q @ np.diag(eigs) @ Q.T)
    res = predict_limit(op, RATIOS, DISTANCE, EPS, num_runs=6, num_steps=60, seed=1)
    spread = res.uncertainty
    # the pooled root lies between the per-probe roots (each h_r decreases in rho)
    assert spread["min"] - 1e-9 <= res.predicted_ratio <= spread["max"] + 1e-9
    assert spread["min"] < spread["max"]  # the probes disagree: there is a spread
    lo, hi = spread["interval_90"]
    assert spread["min"] - 1e-9 <= lo <= hi <= spread["max"] + 1e-9
    # the pooled prediction from six probes is close to the exact one
    assert res.predicted_ratio == pytest.approx(exact_prediction(eigs), abs=0.03)


def test_abs_and_flat_predictions_and_the_nonpositive_mass():
    eigs = np.concatenate([np.geomspace(1e-2, 5.0, 30), -np.geomspace(1e-2, 1.0, 10)])
    op = DenseOperator(np.diag(eigs))
    res = predict_limit(op, RATIOS, DISTANCE, EPS, num_runs=2, num_steps=40, seed=0)
    spread = res.uncertainty
    assert spread["nonpositive_mass"] == pytest.approx(10 / 40, abs=1e-9)
    assert spread["by_negative"]["abs"] == pytest.approx(exact_prediction(eigs, "abs"), abs=1e-6)
    assert spread["by_negative"]["flat"] == pytest.approx(exact_prediction(eigs, "flat"), abs=1e-6)
    assert spread["by_negative"]["flat"] > spread["by_negative"]["abs"]


def test_prediction_per_lanczos_step_count():
    eigs = np.geomspace(1e-4, 10.0, 200)
    op = DenseOperator(np.diag(eigs))
    full = slq(op, num_runs=2, num_steps=200, seed=0)
    spread = prediction_spread(full, RATIOS, DISTANCE, EPS)
    steps = spread["by_steps"]
    assert steps["steps"] == [8, 16, 32, 64, 128, 200]
    assert steps["predicted_ratio"][-1] == pytest.approx(exact_prediction(eigs), abs=1e-6)
    # each count's prediction is that of a fresh SLQ run with that many steps
    short = slq(op, num_runs=2, num_steps=8, seed=0)
    assert steps["predicted_ratio"][0] == pytest.approx(
        predict_limit(op, RATIOS, DISTANCE, EPS, spectrum=short).predicted_ratio, abs=1e-9
    )
    stable = spread["stable_at_steps"]
    assert stable is not None and stable <= 200
    i = steps["steps"].index(stable)
    assert all(abs(p - steps["predicted_ratio"][-1]) <= 0.01 for p in steps["predicted_ratio"][i:])
    # eight steps alone cannot show stability: no verdict either way
    assert prediction_spread(short, RATIOS, DISTANCE, EPS)["stable"] is None
    # a spectrum whose prediction still moves between the last two counts is flagged
    mid = slq(op, num_runs=2, num_steps=16, seed=0)
    moving = prediction_spread(mid, RATIOS, DISTANCE, EPS)
    p8, p16 = moving["by_steps"]["predicted_ratio"]
    assert abs(p8 - p16) > 0.03 and moving["stable"] is False


def test_one_probe_has_no_interval():
    op = DenseOperator(np.diag(np.geomspace(1e-3, 1.0, 10)))
    res = predict_limit(op, RATIOS, DISTANCE, EPS, num_runs=1, num_steps=10)
    assert res.uncertainty["interval_90"] is None
    assert "lanczos_num" in res.uncertainty["note"]


def test_bootstrap_is_seeded():
    gen = np.random.default_rng(1)
    Q, _ = np.linalg.qr(gen.standard_normal((30, 30)))
    op = DenseOperator(Q @ np.diag(np.geomspace(1e-3, 3.0, 30)) @ Q.T)
    spec = slq(op, num_runs=5, num_steps=30, seed=2)
    a = prediction_spread(spec, RATIOS, DISTANCE, EPS, seed=4)
    b = prediction_spread(spec, RATIOS, DISTANCE, EPS, seed=4)
    assert a["interval_90"] == b["interval_90"]


def test_trace_bracket_holds_on_an_exact_hessian():
    """Issue 15 §4: the Jensen and chord bounds bracket the prediction of an exact spectrum,
    and the lower one is the width of the isotropic spectrum with the same trace."""
    gen = np.random.default_rng(5)
    eigs = np.concatenate([gen.gamma(0.3, 2.0, 45), -gen.uniform(0.0, 0.05, 5)])
    op = DenseOperator(np.diag(eigs))  # Rademacher probes: the quadrature is exact
    res = predict_limit(op, RATIOS, DISTANCE, EPS, num_runs=3, num_steps=50, seed=0)
    exact = exact_prediction(eigs)
    b = res.bounds
    assert b["lower"] <= exact + 1e-6 and exact <= b["upper"] + 1e-6
    assert b["lower"] < b["upper"]
    # the quadrature's own prediction lies inside its bracket, always
    assert b["lower"] - 1e-9 <= res.predicted_ratio <= b["upper"] + 1e-9
    # trace-only predictor = isotropic spectrum with the same mean |lambda| (the quadrature's)
    iso = exact_prediction(np.full(50, b["mean_curvature"]))
    assert b["trace_only"] == pytest.approx(iso, abs=1e-4)  # R(rho) interpolated on 401 ratios
    assert b["mean_curvature"] == pytest.approx(np.abs(eigs).mean(), rel=1e-9)
    assert b["max_curvature"] == pytest.approx(np.abs(eigs).max(), rel=1e-9)


def test_isotropic_spectrum_collapses_the_bracket():
    op = DenseOperator(np.eye(20) * 0.7)
    res = predict_limit(op, RATIOS, DISTANCE, EPS, num_runs=2, num_steps=20)
    exact = exact_prediction(np.full(20, 0.7))
    assert res.bounds["lower"] == pytest.approx(exact, abs=1e-6)
    assert res.bounds["upper"] == pytest.approx(exact, abs=1e-6)
    assert res.predicted_ratio == pytest.approx(exact, abs=1e-6)
