"""benchmarks/slide_scale.py's table: the per-bag-size breakdown computes its AUCs from the
runs' test predictions (checked against sklearn on hand-made predictions), the tested epoch
is shown, and the hand-written findings below the marker survive a rewrite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from sklearn.metrics import roc_auc_score

from torch_helpers import benchmark_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ss():
    return benchmark_module("slide_scale")


def _cohort(d: Path) -> None:
    sizes = {"t0": 100, "t1": 200, "t2": 300, "t3": 4000, "t4": 5000, "t5": 6000}
    d.mkdir(parents=True)
    (d / "cohort.json").write_text(json.dumps({
        "summary": {"instances": {"median": 1000, "max": 6000}, "n_train": 10, "n_test": 6,
                    "n_positive": 8},
        "images": {"dataset": "digits", "tumour_class": "9", "normal_classes": list("012")},
        "encoder": {"kind": "pca", "dim": 16}, "linear_probe": {"auc": 0.9},
        "slides": [{"slide_id": s, "part": "test", "n_instances": n} for s, n in sizes.items()],
    }))  # fmt: skip


def test_size_breakdown_best_epoch_and_kept_findings(ss, tmp_path):
    _cohort(tmp_path / "c")
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"best_epoch": 3}))
    preds = [["t0", 0, 0.2], ["t1", 1, 0.7], ["t2", 1, 0.1],
             ["t3", 0, 0.6], ["t4", 1, 0.4], ["t5", 1, 0.9]]  # fmt: skip
    res = {"row": "abmil", "rate": 0.05, "seed": 0, "accuracy": 0.5, "auc": 0.6,
           "loc_auc": 0.7, "loc_per_bag": {"t1": 0.9, "t2": 0.5, "t4": 0.8},
           "predictions": preds, "epoch_seconds": 1.0, "peak_gib": 0.5,
           "spec": {"run_dir": str(run)}}  # fmt: skip
    table = tmp_path / "t.md"
    args = argparse.Namespace(argv=["--reduced"], reduced=True, size="small", n_train=10,
                              n_test=6, max_epochs=12, cohort_seed=0, lr=5e-4, seeds=[0],
                              accelerator="cpu", threads=1, rates=[0.05], models=["abmil"],
                              table=table)  # fmt: skip
    ss.write_table(args, {0.05: tmp_path / "c"}, [res])
    text = table.read_text()
    small = roc_auc_score([0, 1, 1], [0.2, 0.7, 0.1])
    large = roc_auc_score([0, 1, 1], [0.6, 0.4, 0.9])
    assert f"| ABMIL | {small:.3f} | {large:.3f} | 0.700 (2) | 0.800 (1) |" in text
    assert "| 4 of 12 |" in text  # best_epoch 3 (0-based) is epoch 4 of 12
    # hand-written findings below the marker are kept when the tables are rewritten
    table.write_text(text + "\n" + ss.FINDINGS + "\n\nMMIL wins nowhere here.\n")
    ss.write_table(args, {0.05: tmp_path / "c"}, [{**res, "accuracy": 0.9}])
    text = table.read_text()
    assert "MMIL wins nowhere here." in text and text.count(ss.FINDINGS) == 1
    assert "| 0.900 |" in text
