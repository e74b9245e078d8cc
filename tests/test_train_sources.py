"""``sparsemil mil`` on folders of per-slide files (.h5 / .pt / DSMIL .csv + --labels), folds-CSV
replay (``--folds-csv``) and the batch-size rule for models that ignore part of the mask.

All data are real Musk1 bags written into per-slide files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from miltrain_helpers import write_subset
from sparsemil.cli.main import main
from sparsemil.data.bags import BagRef
from sparsemil.data.h5 import write_h5_file
from sparsemil.data.mil_benchmarks import load_mil_benchmark
from sparsemil.data.readers import as_bag
from sparsemil.data.splits import stratified_kfold
from sparsemil.train.config import MILTrainConfig
from sparsemil.train.data import load_mil_data, standardize_for

FAST = ["--max-epochs", "1", "--no-progress", "--threads", "1", "--model", "abmil"]
PER_CLASS = 5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def musk_bags():
    """The first PER_CLASS bags of each class of Musk1, renamed slide_00, slide_01, ..."""
    bags = load_mil_benchmark("musk1")
    chosen = [b for b in bags if b.label == 0][:PER_CLASS]
    chosen += [b for b in bags if b.label == 1][:PER_CLASS]
    return {f"slide_{i:02d}": b for i, b in enumerate(chosen)}


def _write_slides(folder, bags, fmt):
    folder.mkdir(parents=True, exist_ok=True)
    for sid, b in bags.items():
        x = np.asarray(b.features, dtype=np.float32)
        if fmt == "h5":
            write_h5_file(folder / f"{sid}.h5", x, np.arange(2 * len(x)).reshape(-1, 2))
        elif fmt == "pt":
            torch.save({"features": torch.from_numpy(x)}, folder / f"{sid}.pt")
        else:  # DSMIL per-slide CSV with the pandas header 0..C-1; %.9g round-trips float32
            header = ",".join(str(j) for j in range(x.shape[1]))
            np.savetxt(folder / f"{sid}.csv", x, fmt="%.9g", delimiter=",", header=header,
                       comments="")  # fmt: skip
    return folder


def _write_labels(path, bags):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["case_id", "slide_id", "label"])
        for sid, b in bags.items():
            w.writerow([f"case_{sid}", sid, int(b.label)])
    return path


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _test_ids(out, n_folds):
    """Per fold, the slide ids predicted (= the fold's test part), from predictions.csv."""
    rows = _read_csv(out / "predictions.csv")
    return [sorted(r["slide_id"] for r in rows if int(r["fold"]) == f) for f in range(n_folds)]


@pytest.mark.parametrize("fmt", ["h5", "pt", "dsmil-csv", "folder"])
def test_folder_formats_read_the_real_bags(tmp_path, musk_bags, fmt):
    kind = "h5" if fmt == "folder" else fmt  # "folder" lets the data layer guess the type
    folder = _write_slides(tmp_path / "feats", musk_bags, kind)
    labels = _write_labels(tmp_path / "labels.csv", musk_bags)
    cfg = MILTrainConfig(data=str(folder), format=fmt, labels=str(labels))
    data = load_mil_data(cfg)
    assert data.dim == 166 and data.n_classes == 2 and not standardize_for(data, cfg)
    assert all(isinstance(b, BagRef) for b in data.bags)  # lazy: read per bag on demand
    assert data.slide_ids == list(musk_bags)
    for ref in data.bags:
        want = musk_bags[ref.slide_id]
        assert ref.label == want.label
        np.testing.assert_array_equal(as_bag(ref).features, want.features)
    # auto-detection of a folder goes the same way
    auto = load_mil_data(MILTrainConfig(data=str(folder), labels=str(labels)))
    assert auto.slide_ids == data.slide_ids


def test_dsmil_bag_list_is_auto_detected(tmp_path, musk_bags):
    folder = _write_slides(tmp_path / "dsmil" / "feats", musk_bags, "dsmil-csv")
    listing = tmp_path / "dsmil" / "bags.csv"
    rows = [f"feats/{sid}.csv,{int(b.label)}" for sid, b in musk_bags.items()]
    listing.write_text("0,label\n" + "\n".join(rows) + "\n")
    data = load_mil_data(MILTrainConfig(data=str(listing)))  # format auto
    assert data.slide_ids == list(musk_bags)
    assert list(data.labels) == [b.label for b in musk_bags.values()]
    np.testing.assert_array_equal(as_bag(data.bags[-1]).features, musk_bags["slide_09"].features)
    assert folder.is_dir()


def test_cv_on_h5_folder_and_folds_csv_replay(tmp_path, musk_bags):
    folder = _write_slides(tmp_path / "h5", musk_bags, "h5")
    labels = _write_labels(tmp_path / "labels.csv", musk_bags)
    base = ["mil", "cv", "--data", str(folder), "--format", "folder", "--labels", str(labels),
            "--folds", "2"] + FAST  # fmt: skip
    out1 = tmp_path / "cv1"
    assert main(base + ["--seed", "0", "--out", str(out1)]) == 0
    m1 = json.loads((out1 / "metrics.json").read_text())
    assert {"mean", "std"} <= set(m1["accuracy"]) and len(m1["folds"]) == 2
    assert m1["protocol"]["n_bags"] == 2 * PER_CLASS and m1["protocol"]["in_dim"] == 166
    preds = _read_csv(out1 / "predictions.csv")
    assert sorted(r["slide_id"] for r in preds) == sorted(musk_bags)
    assert all(int(r["label"]) == musk_bags[r["slide_id"]].label for r in preds)

    # replay with another seed: the very same folds (a fresh draw with that seed differs)
    out2 = tmp_path / "cv2"
    args = base + ["--seed", "1", "--folds-csv", str(out1 / "folds.csv"), "--out", str(out2)]
    assert main(args) == 0
    assert (out2 / "folds.csv").read_text() == (out1 / "folds.csv").read_text()
    assert _test_ids(out2, 2) == _test_ids(out1, 2)
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["protocol"]["folds_csv"] == str(out1 / "folds.csv")
    data = load_mil_data(MILTrainConfig(data=str(folder), labels=str(labels)))
    drawn = stratified_kfold(data.labels, 2, 1, 0.1)
    fresh = [sorted(data.slide_ids[i] for i in f.test) for f in drawn]
    assert fresh != _test_ids(out1, 2)

    # mil train --fold 1 --folds-csv trains and tests on that fold of the file
    out3 = tmp_path / "train"
    args = ["mil", "train", "--data", str(folder), "--labels", str(labels), "--fold", "1",
            "--folds-csv", str(out1 / "folds.csv"), "--out", str(out3)] + FAST  # fmt: skip
    assert main(args) == 0
    rows = _read_csv(out1 / "folds.csv")
    want_test = sorted(r["slide_id"] for r in rows if r["fold_1"] == "test")
    assert sorted(r["slide_id"] for r in _read_csv(out3 / "predictions.csv")) == want_test
    want_train = sum(r["fold_1"] == "train" for r in rows)
    assert json.loads((out3 / "metrics.json").read_text())["n_train"] == want_train


def test_folds_csv_with_other_slides_is_one_line_error(tmp_path, musk_bags, capsys):
    data = write_subset(tmp_path / "musk1_sub.csv", per_class=4)
    bad = tmp_path / "folds.csv"
    bad.write_text("slide_id,fold_0,fold_1\nnot_a_bag,train,test\n")
    out = tmp_path / "o"
    args = ["mil", "cv", "--data", str(data), "--format", "mil-csv", "--folds-csv", str(bad),
            "--out", str(out)] + FAST  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsemil: error:") and len(err.splitlines()) == 1
    assert str(bad) in err and "not_a_bag" in err
    assert not (out / "metrics.json").exists()
    # a folder without labels names the missing field
    folder = _write_slides(tmp_path / "pt", dict(list(musk_bags.items())[:2]), "pt")
    args = ["mil", "cv", "--data", str(folder), "--out", str(tmp_path / "o2")] + FAST
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no labels were given; fix: set 'labels'" in err and len(err.splitlines()) == 1
    assert "(flag: --data, --labels" in err  # the CLI names the flags of the fields


@pytest.mark.parametrize("model", ["dsmil", "clam_sb", "dtfdmil"])
def test_partial_mask_models_reject_padded_batches(tmp_path, model, capsys):
    data = write_subset(tmp_path / "musk1_sub.csv", per_class=4)
    out = tmp_path / "o"
    args = ["mil", "cv", "--data", str(data), "--format", "mil-csv", "--folds", "2",
            "--max-epochs", "1", "--no-progress", "--model", model, "--batch-size", "4",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert model in err and "batch_size must be 1" in err and "--accumulate-grad-batches" in err
    assert not (out / "metrics.json").exists()
