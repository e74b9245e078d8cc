"""Scoring of benchmarks/pruning_table.py (baselines, censoring, intervals) by hand."""

import numpy as np
import pytest

from torch_helpers import benchmark_module


@pytest.fixture(scope="module")
def pt():
    return benchmark_module("pruning_table")


def _rec(config, lmbda, seed, theory, trace, d1, off=None, tl=None, bound=None, rho_max=0.99):
    return {
        "config": config,
        "lmbda": lmbda,
        "seed": seed,
        "theory": theory,
        "theory_bound": bound,
        "trace_only": trace,
        "actual": {"drop_1pt": d1, "official": off, "train_loss_eps": tl},
        "rho_max": rho_max,
    }


def test_row_record_reads_limit_json(pt):
    doc = {
        "predicted_ratio": None,
        "predicted_bound": {"side": ">=", "ratio": 0.99},
        "bounds": {"lower": 0.5, "upper": 0.99, "trace_only": 0.5},
        "actual_ratio": {"drop_1pt": 0.7, "official": None, "train_loss_eps": 0.4},
    }
    rec = pt.row_record("a", 1e-3, 2, doc, rho_max=0.99)
    assert rec["theory"] is None and rec["theory_bound"]["ratio"] == 0.99
    assert rec["trace_only"] == 0.5
    assert rec["actual"] == {"drop_1pt": 0.7, "official": None, "train_loss_eps": 0.4}
    assert (rec["config"], rec["lmbda"], rec["seed"], rec["rho_max"]) == ("a", 1e-3, 2, 0.99)


def test_lambda_only_is_leave_one_out_within_config_and_strength(pt):
    recs = [
        _rec("a", 1e-3, 0, 0.5, 0.4, d1=0.5, off=0.4),
        _rec("a", 1e-3, 1, 0.5, 0.4, d1=0.6, off=None),
        _rec("a", 1e-3, 2, 0.5, 0.4, d1=0.8, off=0.6),
        _rec("a", 2e-3, 0, 0.5, 0.4, d1=0.1),  # other strength: alone
        _rec("b", 1e-3, 0, 0.5, 0.4, d1=0.9),  # other configuration: alone
    ]
    pt.attach_lambda_only(recs)
    d1 = [r["lambda_only"]["drop_1pt"] for r in recs]
    # seed 0: mean(0.6, 0.8); seed 1: mean(0.5, 0.8); seed 2: mean(0.5, 0.6)
    assert d1[:3] == pytest.approx([0.7, 0.65, 0.55])
    assert d1[3] is None and d1[4] is None
    off = [r["lambda_only"]["official"] for r in recs[:3]]
    # undefined actual ratios (None) are left out of the mean
    assert off == pytest.approx([0.6, 0.5, 0.4])


def test_censor_reasons(pt):
    ok = _rec("a", 1e-3, 0, 0.6, 0.5, d1=0.7)
    ok["lambda_only"] = {"drop_1pt": 0.65, "official": None, "train_loss_eps": 0.5}
    assert pt.censor_reasons(ok, "drop_1pt") == []
    assert pt.censor_reasons(ok, "official") == ["actual undefined", "λ-only undefined"]
    top = _rec("a", 1e-3, 0, None, 0.99, d1=0.99, bound={"side": ">=", "ratio": 0.99})
    top["lambda_only"] = {"drop_1pt": 0.9, "official": None, "train_loss_eps": None}
    assert pt.censor_reasons(top, "drop_1pt") == [
        "actual at rho_max",
        "theory beyond the sweep",
        "trace-only at rho_max",
    ]
    nothing = _rec("a", 1e-3, 0, None, None, d1=0.5)
    nothing["lambda_only"] = {"drop_1pt": 0.99, "official": None, "train_loss_eps": None}
    assert pt.censor_reasons(nothing, "drop_1pt") == [
        "theory undefined",
        "λ-only at rho_max",
        "trace-only undefined",
    ]


def test_errors_by_hand(pt):
    assert pt.abs_error(0.9, 0.8) == pytest.approx(0.1)
    # kept fraction 0.1 predicted vs 0.2 measured: half of the kept weights wrong
    assert pt.kept_fraction_error(0.9, 0.8) == pytest.approx(0.5)
    assert pt.kept_fraction_error(0.5, 0.75) == pytest.approx(1.0)


def test_mean_ci_by_hand(pt):
    m = pt.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert m["n"] == 3 and m["mean"] == pytest.approx(2.0)
    assert (m["lo"], m["hi"]) == pytest.approx((2.0 - half, 2.0 + half))
    assert pt.mean_ci([0.0, 0.1], nonnegative=True)["lo"] == 0.0
    assert pt.mean_ci([0.5]) == {"n": 1, "mean": 0.5, "lo": None, "hi": None}
    assert pt.mean_ci([])["mean"] is None
    assert pt.verdict({"mean": -0.1, "lo": -0.2, "hi": -0.01}) == "beats"
    assert pt.verdict({"mean": 0.1, "lo": 0.01, "hi": 0.2}) == "loses"
    assert pt.verdict({"mean": 0.0, "lo": -0.1, "hi": 0.1}) == "not separated"
    assert pt.verdict({"mean": -0.1, "lo": None, "hi": None}) == "not separated"


def test_score_counts_censored_rows_apart_and_pairs_predictors(pt):
    recs = [
        _rec("a", 1e-3, 0, theory=0.60, trace=0.40, d1=0.50),
        _rec("a", 1e-3, 1, theory=0.75, trace=0.50, d1=0.70),
        _rec("a", 1e-3, 2, theory=0.80, trace=0.60, d1=0.90),
        # actual at the end of the sweep: censored, not an error of 0 or of 0.19
        _rec("a", 1e-3, 3, theory=0.80, trace=0.60, d1=0.99),
    ]
    pt.attach_lambda_only(recs)
    # LOO lambda-only: (0.7+0.9+0.99)/3, (0.5+0.9+0.99)/3, (0.5+0.7+0.99)/3
    lo = [r["lambda_only"]["drop_1pt"] for r in recs[:3]]
    assert lo == pytest.approx([2.59 / 3, 2.39 / 3, 2.19 / 3])
    sc = pt.score(recs, "drop_1pt")
    assert (sc["n_rows"], sc["n_scored"], sc["n_censored"]) == (4, 3, 1)
    assert sc["reasons"] == {"actual at rho_max": 1}
    theory = [0.10, 0.05, 0.10]
    trace = [0.10, 0.20, 0.30]
    lam = [abs(2.59 / 3 - 0.5), abs(2.39 / 3 - 0.7), abs(2.19 / 3 - 0.9)]
    assert sc["abs"]["theory"]["mean"] == pytest.approx(np.mean(theory))
    assert sc["abs"]["trace_only"]["mean"] == pytest.approx(np.mean(trace))
    assert sc["abs"]["lambda_only"]["mean"] == pytest.approx(np.mean(lam))
    kept = [0.10 / 0.5, 0.05 / 0.3, 0.10 / 0.1]
    assert sc["kept"]["theory"]["mean"] == pytest.approx(np.mean(kept))
    diff = np.subtract(theory, trace)
    assert sc["diff_abs"]["trace_only"]["mean"] == pytest.approx(diff.mean())
    assert sc["verdict_abs"]["trace_only"] == pt.verdict(sc["diff_abs"]["trace_only"])
    # every row censored: nothing scored, the means undefined rather than 0
    none = pt.score(recs[3:], "drop_1pt")
    assert none["n_scored"] == 0 and none["abs"]["theory"]["mean"] is None


def test_premise_verdict_uses_current_thresholds(pt):
    from sparsemil.limit import premises as P

    def doc(residual, share, q):
        return {
            "premises": {
                "kkt": {"residual": residual, "bound": 2.0, "passed": True},  # stale flag
                "order": {"first_order_share": share},
                "anisotropy": {"ratio": q},
                "determinism": {"passed": True},
            }
        }

    # residual 0.8 x lambda sqrt(D): passed under the old rule (<= 1), not under 0.5
    v = pt.premise_verdict(doc(1.6, 0.2, 1.0))
    assert v["kkt_ratio"] == pytest.approx(0.8)
    assert v["failed"] == (["kkt"] if P.KKT_MAX_SHARE < 0.8 else [])
    v = pt.premise_verdict(doc(0.5, 0.2, 1.0))
    assert v["passed"] and v["failed"] == []
    v = pt.premise_verdict(doc(0.5, 0.9, 10.0))
    assert v["failed"] == ["order", "anisotropy"] and not v["passed"]
    assert pt.premise_verdict({"premises": None}) is None
