"""The MIL pruning table's scoring and writer (benchmarks/mil_pruning_table.py), by hand."""

import pytest

from torch_helpers import benchmark_module


@pytest.fixture(scope="module")
def mt():
    return benchmark_module("mil_pruning_table")


def _row(pred, actual, bound=None, ext=None, model="mmil", seed=0):
    layers = {
        "groups": {
            "to_qkv": {
                "pruned_fraction": 0.2, "magnitude_over_mean": 20.0, "random_over_mean": 0.5,
                "magnitude_over_random": 40.0, "magnitude_over_random_nonzero": 2.0,
            }
        }
    }  # fmt: skip
    return {
        "_dataset": "musk1", "_model": model, "_l1": 1e-4, "_seed": seed, "_wall_s": 10.0,
        "D": 1000, "dense": {"test_acc": 0.9}, "epsilon": 0.01,
        "predicted_ratio": pred, "predicted_bound": bound,
        "uncertainty": {"interval_90": [0.5, 0.6]},
        "extension_anisotropy": {"predicted_ratio": ext, "predicted_bound": None},
        "actual_ratio": actual,
        "finish": {"converged": True, "iterations": 12, "kkt_before": {"ratio": 2.0},
                   "kkt_after": {"ratio": 0.08}},
        "premises": {"kkt": {"passed": True}, "order": {"first_order_share": 0.1},
                     "anisotropy": {"ratio": 30.0}, "layers": layers},
    }  # fmt: skip


def test_censored_rows_are_counted_not_scored(mt):
    rows = [
        _row(0.9, {"drop_1pt": 0.7, "official": None, "train_loss_eps": 0.8}, ext=0.75),
        _row(
            None,
            {"drop_1pt": 0.99, "official": 0.99, "train_loss_eps": 0.99},
            bound={"side": ">=", "ratio": 0.99},
            seed=1,
        ),  # fmt: skip
    ]
    sc = mt.score(rows, "drop_1pt", mt.theory)
    assert sc["errors"] == pytest.approx([0.2]) and sc["n_censored"] == 1
    assert sc["kept"] == pytest.approx([0.2 / 0.3])
    assert sc["reasons"] == {"actual at rho_max": 1, "prediction beyond the sweep / undefined": 1}
    assert mt.score(rows, "official", mt.theory)["n_censored"] == 2
    assert mt.score(rows, "train_loss_eps", mt.extension)["errors"] == pytest.approx([0.05])


def test_table_text(mt, tmp_path):
    rows = [_row(0.9, {"drop_1pt": 0.7, "official": None, "train_loss_eps": 0.8}, ext=0.75)]
    path = tmp_path / "t.md"
    mt.write_table(path, rows, 4, mt.SETTINGS, "0,1")
    text = path.read_text()
    assert "(1 of 4 rows finished)" in text
    assert "2.00 → 0.08 (12 steps ✓)" in text
    assert "| test accuracy, drop_1pt | paper's formula | 1 / 0 | 0.200 |" in text
    assert "extension (anisotropy)" in text and "`to_qkv`" in text
    assert "against a random support 40 (range 40-40; > 1 in 1 of 1 rows)" in text
    assert "among non-zero weights 2 (range" in text
    assert "the extension is closer in 1 of 1" in text  # |0.75 - 0.7| < |0.9 - 0.7|
    # the hand-written analysis below the marker is kept when the tables are rewritten
    path.write_text(text + "\n" + mt.FINDINGS + "\n\nWhat remains is anisotropy.\n")
    mt.write_table(path, rows, 4, mt.SETTINGS, "0,1")
    again = path.read_text()
    assert again.count(mt.FINDINGS) == 1 and again.rstrip().endswith("What remains is anisotropy.")
