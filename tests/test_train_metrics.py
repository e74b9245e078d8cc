"""Evaluation metrics against hand-computed values; repeated passes; predictions CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sparsemil.data.bags import Bag, collate_bags
from sparsemil.mil.factory import build_mil_model
from sparsemil.train.data import MILDataset
from sparsemil.train.evaluate import (
    classification_metrics,
    evaluate_predictions,
    mean_std,
    predict_bags,
    prediction_rows,
    write_predictions_csv,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.2, 0.6, 0.7, 0.4, 0.9])
    m = classification_metrics(labels, np.stack([1 - p1, p1], 1))
    # predictions 0,1,1,0,1 -> 3 of 5 right; recalls 1/2 (class 0) and 2/3 (class 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # AUC: positive-negative pairs ranked right: (0.7>0.2,0.7>0.6,0.4>0.2,0.9>both) = 5 of 6
    assert m["auc"] == pytest.approx(5 / 6)
    # F1 of class 1: tp 2, fp 1, fn 1 -> 2*2/(2*2+1+1)
    assert m["f1"] == pytest.approx(4 / 6)
    nll = -np.mean(np.log([0.8, 0.4, 0.7, 0.4, 0.9]))
    assert m["loss"] == pytest.approx(nll)


def test_multiclass_auc_is_one_vs_rest_macro():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.1, 0.8],
            [0.3, 0.4, 0.3],
            [0.5, 0.4, 0.1],
            [0.2, 0.2, 0.6],
        ]
    )
    m = classification_metrics(labels, probs, 3)
    aucs = []
    for c in range(3):
        pos, neg = probs[labels == c, c], probs[labels != c, c]
        aucs.append(np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg]))
    assert m["auc"] == pytest.approx(np.mean(aucs))
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_single_class_auc_is_nan_and_mean_std_skips_it():
    m = classification_metrics(np.array([1, 1]), np.array([[0.3, 0.7], [0.6, 0.4]]))
    assert np.isnan(m["auc"]) and m["accuracy"] == 0.5
    s = mean_std([0.5, float("nan"), 0.7])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)


def _bags(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Bag(rng.normal(size=(int(rng.integers(3, 9)), 6)).astype(np.float32), i % 2, f"b{i}")
        for i in range(n)
    ]


def test_repeated_passes_random_grouping_vary_and_are_reproducible(tmp_path):
    torch.manual_seed(0)
    bags = _bags()
    model = build_mil_model("mmil", 6, 2, embed_dim=16, num_subbags=3, grouping="random", seed=0)
    loader = DataLoader(MILDataset(bags, range(len(bags))), batch_size=1, collate_fn=collate_bags)
    a = predict_bags(model, loader, num_test=4, seed=3)
    b = predict_bags(model, loader, num_test=4, seed=3)
    np.testing.assert_array_equal(a["probs"], b["probs"])  # reproducible
    assert a["probs"].shape == (4, 8, 2)
    assert np.ptp(a["probs"][:, :, 1], axis=0).max() > 0  # random grouping: passes differ
    ev = evaluate_predictions(a, 2)
    accs = [classification_metrics(a["labels"], p)["accuracy"] for p in a["probs"]]
    assert ev["test_time"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert ev["test_time"]["accuracy"]["std"] == pytest.approx(np.std(accs))
    # sequential grouping is deterministic: zero test-time variance
    model.grouping = "sequential"
    c = predict_bags(model, loader, num_test=3, seed=3)
    assert np.ptp(c["probs"], axis=0).max() == 0
    rows = prediction_rows(a, fold=2)
    write_predictions_csv(tmp_path / "p.csv", rows)
    with open(tmp_path / "p.csv") as fh:
        got = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in got] == [f"b{i}" for i in range(8)]
    assert float(got[0]["prob_1"]) == pytest.approx(a["probs"][:, 0, 1].mean(), abs=1e-5)
    assert got[0]["fold"] == "2"
