"""No leakage between training and evaluation: slides of one patient stay on one side.

Issue example (K2): a CLAM dataset CSV with a ``case_id`` column (several slides per
patient). Folds and validation hold-outs are grouped by case; folds.csv and metrics.json say
so; a replayed split that puts one case on two sides is refused, naming the case.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sparsemil.cli.main import main
from sparsemil.data.h5 import write_h5_file
from sparsemil.data.sources import load_bag_source
from sparsemil.data.splits import case_groups, replay_folds, run_folds, stratified_kfold
from sparsemil.errors import SparsemilError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_CASES, PER_CASE, C = 12, 3, 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 patients x 3 slides; the label is the patient's; every slide of a patient carries
    that patient's feature signature (what a slide-level split lets a model memorise)."""
    root = tmp_path_factory.mktemp("cases")
    feats = root / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    rows = [("case_id", "slide_id", "label")]
    for p in range(N_CASES):
        signature = rng.normal(size=C) * 3
        label = "tumor" if p % 2 else "normal"
        for s in range(PER_CASE):
            sid = f"P{p:02d}-S{s}"
            x = (signature + rng.normal(scale=0.1, size=(20, C))).astype(np.float32)
            coords = np.stack([np.arange(20) * 256, np.zeros(20)], 1).astype(np.int64)
            write_h5_file(feats / f"{sid}.h5", x, coords, coords_attrs={"patch_size": 256})
            rows.append((f"P{p:02d}", sid, label))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return feats, labels


def _sides(fold, groups):
    return [set(groups[np.asarray(part)]) for part in fold]


def test_folds_and_holdouts_never_split_a_case(cohort):
    feats, labels = cohort
    source = load_bag_source(feats, "folder", labels=labels)
    groups = case_groups(source)
    assert groups is not None and len(set(groups)) == N_CASES
    for seed in range(3):
        folds = run_folds(source, 4, seed, val_fraction=0.25)
        assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(36))
        for fold in folds:
            train, val, test = _sides(fold, groups)
            assert not (train & val or train & test or val & test), fold.index
            assert len(fold.val) > 0
    # per-slide folds of the same data put patients on both sides: the leak being closed
    plain = stratified_kfold(source.labels, 4, 0, 0.25)
    assert any(_sides(f, groups)[0] & _sides(f, groups)[2] for f in plain)


def test_a_replayed_split_that_splits_a_case_is_refused(cohort, tmp_path):
    feats, labels = cohort
    source = load_bag_source(feats, "folder", labels=labels)
    bad = tmp_path / "folds.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "fold_0"])
        for i, sid in enumerate(source.slide_ids):
            w.writerow([sid, "test" if i == 1 else "train"])  # P00-S1 tested, P00-S0 trained
    with pytest.raises(SparsemilError, match="puts case 'P00' in both train and test"):
        run_folds(source, 4, 0, 0.1, folds_csv=bad)
    assert len(replay_folds(source, bad)) == 1  # the file itself is well-formed


def test_mil_cv_groups_by_case_and_says_so(cohort, tmp_path):
    feats, labels = cohort
    out = tmp_path / "cv"
    rc = main([
        "mil", "cv", "--data", str(feats), "--labels", str(labels), "--model", "abmil",
        "--folds", "3", "--max-epochs", "1", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["grouped_by"] == "case_id"
    assert metrics["class_names"] == ["normal", "tumor"]
    with open(out / "folds.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[:3] == ["slide_id", "case_id", "label"]
    for k in range(3):
        sides: dict[str, set[str]] = {}
        for row in table:
            sides.setdefault(row["case_id"], set()).add(row[f"fold_{k}"])
        assert all(len(s) == 1 for s in sides.values()), k
