"""A trained model carries everything needed to apply it (issue K1).

Failing example: train on 40 h5 bags labelled by name (``normal_tissue`` / ``tumor_tissue``),
then ``mil test`` an external cohort of 10 new tumour bags whose CSV holds only
``tumor_tissue``. The old loader re-mapped that single name to class 0 and reported accuracy
0.000 for a model that calls every slide right; the right value is 1.000, with the class
named in the outputs.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sparsemil.cli.main import main
from sparsemil.data.h5 import write_h5_file
from sparsemil.train.inference import load_predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")
C = 8


def _cohort(root, name, n_normal, n_tumor, seed):
    """Bags of 10 instances; tumour bags are shifted by +3 in every feature (separable)."""
    rng = np.random.default_rng(seed)
    feats = root / name
    feats.mkdir()
    rows = [("slide_id", "label")]
    for i in range(n_normal + n_tumor):
        tumor = i >= n_normal
        x = rng.normal(size=(10, C)).astype(np.float32) + (3.0 if tumor else 0.0)
        coords = np.stack([np.arange(10) * 256, np.zeros(10)], 1).astype(np.int64)
        sid = f"{name}-{i:03d}"
        write_h5_file(
            feats / f"{sid}.h5", x, coords, coords_attrs={"patch_size": 256},
            features_attrs={"backbone": "resnet50_trunc", "weights_sha256": "ab12"},
        )  # fmt: skip
        rows.append((sid, "tumor_tissue" if tumor else "normal_tissue"))
    labels = root / f"{name}.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return feats, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("k1")
    feats, labels = _cohort(root, "train", 20, 20, seed=0)
    run = root / "run"
    rc = main([
        "mil", "train", "--data", str(feats), "--labels", str(labels), "--model", "abmil",
        "--max-epochs", "15", "--lr", "5e-3", "--no-early-stopping", "--folds", "4",
        "--no-progress", "--out", str(run),
    ])  # fmt: skip
    assert rc == 0
    return root, run / "model.safetensors"


def test_checkpoint_records_classes_slides_and_dimension(trained):
    _, ckpt = trained
    p = load_predictor(ckpt)
    assert p.class_names == ["normal_tissue", "tumor_tissue"] and p.n_classes == 2
    assert p.in_dim == C and p.meta["needs_coords"] is False
    assert p.meta["encoder"] == {"backbone": "resnet50_trunc", "weights_sha256": "ab12"}
    slides = p.meta["slides"]
    assert len(slides["train"]) + len(slides["val"]) == 30  # fold 0 of 4: 10 test bags


def test_external_tumour_only_cohort_keeps_its_class(trained, tmp_path):
    root, ckpt = trained
    feats, labels = _cohort(tmp_path, "external", 0, 10, seed=1)
    out = tmp_path / "t"
    rc = main(["mil", "test", "--checkpoint", str(ckpt), "--data", str(feats),
               "--labels", str(labels), "--out", str(out)])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"]["mean"] == 1.0 and m["class_names"] == ["normal_tissue", "tumor_tissue"]
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and all(r["label"] == "1" and r["pred"] == "1" for r in rows)
    assert "prob_tumor_tissue" in rows[0] and "prob_normal_tissue" in rows[0]
    # mil predict names the class too
    pred = tmp_path / "p.csv"
    assert main(["mil", "predict", "--checkpoint", str(ckpt), "--data", str(feats),
                 "--out", str(pred)]) == 0  # fmt: skip
    with open(pred, newline="") as fh:
        assert {r["pred_class"] for r in csv.DictReader(fh)} == {"tumor_tissue"}


def test_a_label_the_checkpoint_does_not_know_is_named(trained, tmp_path, capsys):
    _, ckpt = trained
    feats, labels = _cohort(tmp_path, "odd", 0, 3, seed=2)
    labels.write_text(labels.read_text().replace("tumor_tissue", "necrosis"))
    rc = main(["mil", "test", "--checkpoint", str(ckpt), "--data", str(feats),
               "--labels", str(labels), "--out", str(tmp_path / "t")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "'necrosis'" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_n_classes_defaults_to_the_labels_and_a_disagreeing_one_is_refused(trained, capsys):
    root, _ = trained
    rc = main([
        "mil", "train", "--data", str(root / "train"), "--labels", str(root / "train.csv"),
        "--model", "mmil", "--n-classes", "3", "--max-epochs", "1", "--out", str(root / "x"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "n_classes 3 disagrees with the 2 distinct labels" in err
    assert "normal_tissue, tumor_tissue" in err and "--n-classes" in err


def test_grouping_that_needs_coords_is_checked_before_fold_0(tmp_path, capsys):
    """Issue example (K5): k-means-on-coords grouping with one h5 lacking coords fails before
    anything trains, names the slide, and leaves no output folder."""
    feats, labels = _cohort(tmp_path, "nocoords", 6, 6, seed=3)
    x = np.zeros((10, C), np.float32)
    write_h5_file(feats / "nocoords-004.h5", x)  # same slide, now without coords
    out = tmp_path / "cv"
    rc = main([
        "mil", "cv", "--data", str(feats), "--labels", str(labels), "--model", "mmil",
        "--model-kwargs", '{"grouping": "kmeans_coords"}', "--folds", "3", "--out", str(out),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "nocoords-004" in err and "needs patch coordinates" in err
    assert err.count("\n") == 1 and not out.exists()


def test_checkpoint_data_paths_work_from_any_folder(tmp_path, monkeypatch, capsys):
    """Issue example (K6): train in ``ud/`` with relative paths, then run ``prune mil`` on
    ``ud/runs/m/model.safetensors`` from the parent folder."""
    ud = tmp_path / "ud"
    ud.mkdir()
    _cohort(ud, "bags", 8, 8, seed=4)
    monkeypatch.chdir(ud)
    assert main([
        "mil", "train", "--data", "bags", "--labels", "bags.csv", "--model", "abmil",
        "--max-epochs", "2", "--folds", "4", "--no-progress", "--out", "runs/m",
    ]) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)
    rc = main([
        "prune", "mil", "--checkpoint", "ud/runs/m/model.safetensors", "--out", "limit",
        "--n-ratios", "5", "--lanczos-iter", "4", "--no-progress", "--device", "cpu",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads((tmp_path / "limit" / "limit.json").read_text())
    assert doc["device"] == "cpu" and doc["n_eval_bags"] == 4
    # bad flags are refused before any bag is read or file written (one line, exit 2);
    # the checkpoint was trained without L1, so there is nothing for a proximal finish
    (tmp_path / "afile").write_text("x")
    for flags, msg in (
        (["--lanczos-num", "0"], "--lanczos-num 0: must be >= 1"),
        (["--n-ratios", "1"], "--n-ratios 1: must be >= 2"),
        (["--finish-tol", "0.9"], "finish_tol"),
        (["--out", "afile"], "is a file"),
        (["--finish", "proximal"], "trained without L1"),
    ):
        args = ["prune", "mil", "--checkpoint", "ud/runs/m/model.safetensors", "--out",
                "bad", "--no-progress", *flags]  # fmt: skip
        assert main(args) == 2, flags
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()


def test_diverging_mil_training_stops_with_one_line(tmp_path, capsys):
    """NaN training never passes through: a diverging run (lr 1e12) stops at the first
    non-finite loss with a one-line error naming the fix, and writes no model."""
    feats, labels = _cohort(tmp_path, "div", 6, 6, seed=5)
    out = tmp_path / "run"
    rc = main([
        "mil", "train", "--data", str(feats), "--labels", str(labels), "--model", "abmil",
        "--lr", "1e12", "--max-epochs", "30", "--no-early-stopping", "--folds", "3",
        "--no-progress", "--out", str(out),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "training loss is" in err and "lower 'lr'" in err, err[-500:]
    assert not (out / "model.safetensors").exists()
