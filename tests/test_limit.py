"""End to end ``sparsemil prune run`` on a tiny MLP with digits, and the limit helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sparsemil.cli.main import main
from sparsemil.curvature.hvp import HessianOperator
from sparsemil.errors import SparsemilError
from sparsemil.limit.predict import important_flat_fraction, loss_epsilon, threshold_indices
from sparsemil.limit.width import gaussian_width, predicted_ratio
from sparsemil.prune.magnitude import prunable_parameters
from sparsemil.prune.sweep import SweepResult, actual_ratio
from torch_helpers import summed_hessian_rows

CONFIG = """\
model: mlp
widths: [32]
dataset: digits
batch_size: 64
optim: sgd
lr: 0.05
momentum: 0.9
epoch: 6
l1: true
lmbda: 0.0005
regularizer: L1
sparse_epoch: 200
lanczos_iter: 48
lanczos_num: 2
seed: 0
limit:
  threads: 1
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_prune_run_end_to_end(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    assert main(["prune", "run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "limit.json").read_text())
    for name in ("predict.png", "acc_loss.png", "esd.png", "sweep.csv", "spectrum.json"):
        assert (out / name).stat().st_size > 0, name
    assert doc["default_criterion"] == "drop_1pt"
    assert set(doc["actual_ratio"]) == {"drop_1pt", "official", "train_loss_eps"}
    assert 0.0 < doc["predicted_ratio"] < 1.0
    assert doc["D"] == 64 * 32 + 32 + 32 * 10 + 10
    assert doc["spectrum"]["num_steps"] == [48, 48]
    assert doc["epsilon"] > 0 and doc["timings"]["spectrum_s"] > 0
    # the actual ratio is the sweep's, recomputed from the CSV
    sweep = SweepResult.from_csv(out / "sweep.csv", dense=doc["dense"])
    assert doc["actual_ratio"]["drop_1pt"] == actual_ratio(sweep, "drop_1pt")
    # the prediction is reproducible from the stored Ritz pairs and R(rho)
    spec = json.loads((out / "spectrum.json").read_text())
    vals = np.array(spec["ritz_values"], dtype=float)
    wts = np.array(spec["ritz_weights"], dtype=float)
    pred = predicted_ratio(
        sweep.ratios, sweep.distance, lambda R: gaussian_width(R, vals, wts, doc["epsilon"])
    )
    assert pred == pytest.approx(doc["predicted_ratio"], abs=1e-9)
    # epsilon is the std of the per-mini-batch training losses at the official batch size
    # 128 (limit.epsilon_batch_size), over one seeded shuffle of the training set
    from sparsemil.data.vision import load_vision_dataset
    from sparsemil.experiments.vision.models import load_checkpoint

    model, _ = load_checkpoint(out / "model.safetensors")
    data = load_vision_dataset("digits", seed=0)
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(1))
    xs, ys = data.x_train[perm], data.y_train[perm]
    with torch.no_grad():
        losses = [
            float(F.cross_entropy(model(xs[i : i + 128]), ys[i : i + 128]))
            for i in range(0, len(ys), 128)
        ]
    assert doc["epsilon"] == pytest.approx(float(np.std(losses)), rel=1e-6)
    # the spread over the two probes and the premise checks are reported
    spread = doc["uncertainty"]
    assert spread["num_probes"] == 2 and len(spread["per_probe"]) == 2
    lo, hi = spread["interval_90"]
    assert spread["min"] <= lo <= doc["predicted_ratio"] + 1e-9 and hi <= spread["max"]
    assert spread["by_steps"]["steps"][-1] == 48
    assert doc["premises"]["kkt"]["bound"] == pytest.approx(0.0005 * np.sqrt(doc["D"]))
    # the official default: the Hessian over the whole training set, stated in limit.json
    assert doc["hessian"]["samples"] == len(data.y_train) == doc["n_train"]
    assert doc["hessian"]["subset"] is False


def test_prune_run_bad_option(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.replace("  threads: 1", "  negativ: flat"))
    assert main(["prune", "run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "negative" in capsys.readouterr().err


def test_loss_epsilon_rule():
    assert loss_epsilon([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.std([1, 2, 3, 4]))
    with pytest.raises(SparsemilError, match="at least 2 mini-batches"):
        loss_epsilon([1.0])
    with pytest.raises(SparsemilError, match="all equal"):
        loss_epsilon([2.0, 2.0])


def test_important_rows_against_exact_per_batch_hessians():
    torch.set_num_threads(1)
    d = load_digits()
    x = torch.tensor(d.data[:120] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:120])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 10))
    with torch.no_grad():  # dead first-layer unit: its incoming weights have flat rows
        model[0].weight[0].mul_(0.01)
        model[0].bias[0] = -100.0
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 120, 40)]

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    op = HessianOperator(model, ce, batches)
    prunable = prunable_parameters(model)
    out = important_flat_fraction(op, prunable, num_ratios=20, tol=1e-7)
    _, idx = threshold_indices(op, prunable, 20)
    # exact per-batch Hessians (float64, autograd); official normalisation: the rows' L1
    # norms summed over the batches, divided by the number of samples (gradient.py)
    rows = summed_hessian_rows(model, batches, idx)
    rows /= 120
    np.testing.assert_allclose(out["row_l1_norms"], rows, rtol=1e-5, atol=1e-12)
    assert out["num_batches"] == 3 and out["num_samples"] == 120
    assert out["fraction"] == pytest.approx(np.mean(rows < 1e-7))
    assert 0.0 < out["fraction"] < 1.0  # the smallest weights are the dead unit's


def test_reproduction_table_tiny(tmp_path):
    """CI-sized run of benchmarks/pruning_table.py (2 rows): the markdown is complete and
    the summary scores theory on the uncensored rows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pruning_table.py"
    spec = importlib.util.spec_from_file_location("pruning_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--out", str(tmp_path), "--workers", "1"]) == 0
    text = (tmp_path / "pruning_limit.md").read_text()
    assert "(complete)" in text and "### Censored rows" in text
    assert sum(line.startswith("| digits-tiny | 0.") for line in text.splitlines()) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    sc = summary["scores"]["drop_1pt"]
    assert sc["n_scored"] + sc["n_censored"] == summary["rows_done"] == 2
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/limit.json"))]
    top = (50 - 1) / 50  # the tiny profile's sparse_epoch
    scored = [
        r["abs_error"]
        for r in rows
        if r["predicted_ratio"] is not None
        and r["actual_ratio"]["drop_1pt"] is not None
        and r["actual_ratio"]["drop_1pt"] < top - 1e-9
        and r["bounds"]["trace_only"] < top - 1e-9
    ]
    # two seeds: each row's lambda-only baseline is the other row's actual ratio
    assert len(scored) == sc["n_scored"]
    if scored:
        assert sc["abs"]["theory"]["mean"] == pytest.approx(float(np.mean(scored)))
    # --markdown-only rewrites the same summary without running a row
    assert mod.main(["--tiny", "--out", str(tmp_path), "--markdown-only"]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["scores"] == summary["scores"]


def test_censored_abs_error_by_hand():
    from sparsemil.limit.predict import censored_abs_error

    assert censored_abs_error(0.8, None, 0.75) == pytest.approx(0.05)
    top = {"side": ">=", "ratio": 0.995}
    assert censored_abs_error(None, top, 0.995) == 0.0  # both censored at rho_max
    assert censored_abs_error(None, top, 0.9) == pytest.approx(0.095)  # prediction >= 0.995
    low = {"side": "<=", "ratio": 0.01}
    assert censored_abs_error(None, low, 0.01) == 0.0
    assert censored_abs_error(None, low, 0.2) == pytest.approx(0.19)
    assert censored_abs_error(None, None, 0.5) is None
    assert censored_abs_error(0.5, None, None) is None


def test_predict_limit_returns_a_typed_prediction():
    """On a diagonal operator with D Lanczos steps the quadrature is exact, so the prediction
    equals the root of rho = gw(R(rho)) with the exact eigenvalues."""
    from sparsemil.curvature.operator import DenseOperator
    from sparsemil.limit.predict import LimitPrediction, predict_limit

    lam = np.linspace(0.01, 2.0, 40)
    ratios = np.arange(100) / 100
    distance = 3.0 * ratios
    eps = 0.05
    res = predict_limit(
        DenseOperator(np.diag(lam)), ratios, distance, eps, num_runs=2, num_steps=40
    )
    assert isinstance(res, LimitPrediction)
    exact = predicted_ratio(ratios, distance, lambda R: gaussian_width(R, lam, None, eps))
    assert res.predicted_ratio == pytest.approx(exact, abs=1e-8)
    assert res.R_at_prediction == pytest.approx(3.0 * exact, abs=1e-7)
    assert res.predicted_bound is None and res.predicted_ratio_grid is not None
    assert res.R_curve.shape == res.gw_curve.shape == (400,)
    assert res.gw_at_actual.shape == ratios.shape
    assert res.predicted_ratio_official is not None and res.official_grid_nonzero_bins > 0
    again = predict_limit(
        DenseOperator(np.diag(lam)),
        ratios,
        distance,
        eps,
        official_grid=False,
        spectrum=res.spectrum,
    )
    assert again.predicted_ratio == res.predicted_ratio
    assert again.predicted_ratio_official is None and again.official_grid_nonzero_bins is None
