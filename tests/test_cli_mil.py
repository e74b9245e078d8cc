"""``sparsemil mil``: the exact CV form, metrics.json contents, bad input, train/test/predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from miltrain_helpers import write_subset
from sparsemil.cli.main import main

FAST = ["--max-epochs", "1", "--no-progress", "--threads", "1"]
SMALL_MMIL = ["--model-kwargs", '{"embed_dim": 16, "num_subbags": 2}']


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return write_subset(tmp_path_factory.mktemp("cli") / "musk1_sub.csv", per_class=12)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_exact_cv_form_writes_metrics_json(tmp_path, subset):
    out = tmp_path / "cv"
    args = ["mil", "cv", "--data", str(subset), "--format", "mil-csv", "--model", "mmil",
            "--folds", "10", "--seed", "0", "--out", str(out)]  # fmt: skip
    assert main(args + FAST + SMALL_MMIL) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "auc"):
        assert set(m[key]) >= {"mean", "std"}
    assert len(m["folds"]) == 10
    # every bag is predicted exactly once, in its fold's test part
    preds = _read_csv(out / "predictions.csv")
    assert sorted(r["slide_id"] for r in preds) == sorted(
        r["slide_id"] for r in _read_csv(out / "folds.csv")
    )
    assert len(m["predictions"]) == 24
    # fold accuracies recomputed from the per-bag predictions; mean/std over folds
    accs = []
    for f in range(10):
        rows = [r for r in preds if int(r["fold"]) == f]
        acc = np.mean([int(r["pred"]) == int(r["label"]) for r in rows])
        assert m["folds"][f]["metrics"]["accuracy"] == pytest.approx(acc)
        accs.append(acc)
    assert m["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert m["accuracy"]["std"] == pytest.approx(np.std(accs))
    folds = _read_csv(out / "folds.csv")
    for f in range(10):
        assert sum(r[f"fold_{f}"] == "test" for r in folds) == len(
            [r for r in preds if int(r["fold"]) == f]
        )
    # a second run into the same folder is refused; --resume reuses the finished folds
    assert main(args + FAST + SMALL_MMIL) == 2
    assert main(args + FAST + SMALL_MMIL + ["--resume"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["accuracy"] == m["accuracy"] and m2["folds"] == m["folds"]


def _bad_csv(tmp_path, subset, kind):
    lines = subset.read_text().splitlines()
    if kind == "nan":
        cells = lines[3].split(",")
        cells[5] = "nan"
        lines[3] = ",".join(cells)
    elif kind == "label":
        lines = [("2" + ln[1:]) if ln.startswith("1,") else ln for ln in lines]
    elif kind == "ragged":
        lines[4] = lines[4] + ",0.5"
    elif kind == "text":
        cells = lines[2].split(",")
        cells[7] = "abc"
        lines[2] = ",".join(cells)
    p = tmp_path / f"bad_{kind}.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("kind", ["nan", "label", "ragged", "text", "missing"])
def test_bad_input_fails_before_training_and_leaves_no_metrics(tmp_path, subset, capsys, kind):
    data = tmp_path / "nope.csv" if kind == "missing" else _bad_csv(tmp_path, subset, kind)
    out = tmp_path / "out"
    rc = main(["mil", "cv", "--data", str(data), "--format", "mil-csv", "--model", "abmil",
               "--folds", "2", "--out", str(out)] + FAST)  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sparsemil: error:") and str(data.name) in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out / "metrics.json").exists()
    assert not out.exists() or not any(out.glob("fold_*"))


def test_bad_options_are_one_line_errors(tmp_path, subset, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {subset}\nmax_epoch: 2\n")
    assert main(["mil", "train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'max_epochs'" in capsys.readouterr().err
    assert (
        main(
            [
                "mil",
                "cv",
                "--data",
                str(subset),
                "--model",
                "abmil",
                "--folds",
                "13",
                "--out",
                str(tmp_path / "o2"),
            ]
            + FAST
        )
        == 2
    )
    assert "fewer than the 13 folds" in capsys.readouterr().err
    assert (
        main(
            [
                "mil",
                "cv",
                "--data",
                str(subset),
                "--model",
                "transmil",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "o3"),
            ]
            + FAST
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "batch_size must be 1" in err and "--batch-size" in err
    assert not (tmp_path / "o3" / "metrics.json").exists()


def test_train_then_test_then_predict(tmp_path, subset):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data: {subset}\nformat: mil-csv\nmodel: abmil\nmax_epochs: 2\nfolds: 3\nprogress: false\n"
    )
    run = tmp_path / "run"
    assert main(["mil", "train", "--config", str(cfg), "--out", str(run), "--threads", "1"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_test"] == 8 and 0 <= m["accuracy"]["mean"] <= 1
    assert (run / "model.safetensors").is_file() and (run / "metrics.csv").is_file()
    ckpt = run / "model.safetensors"
    args = ["mil", "test", "--checkpoint", str(ckpt), "--data", str(subset)]
    # the 16 train/val bags of this checkpoint are refused: their scores would be optimistic
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "t"), "--allow-seen"]) == 0
    t = json.loads((tmp_path / "t" / "metrics.json").read_text())
    rows = _read_csv(tmp_path / "t" / "predictions.csv")
    assert t["n_bags"] == 24 == len(rows)
    assert t["seen_in_training"]["n_bags"] == 16 and t["class_names"] == ["0", "1"]
    assert sum(r["seen_in_training"] == "True" for r in rows) == 16
    assert t["accuracy"]["mean"] == pytest.approx(np.mean([r["pred"] == r["label"] for r in rows]))
    # the training run's test part, re-evaluated from the checkpoint, gives the same probabilities
    train_rows = {r["slide_id"]: float(r["prob_1"]) for r in _read_csv(run / "predictions.csv")}
    test_rows = {r["slide_id"]: float(r["prob_1"]) for r in rows}
    for sid, p in train_rows.items():
        assert test_rows[sid] == pytest.approx(p, abs=1e-5)
    out = tmp_path / "pred.csv"
    assert (
        main(
            [
                "mil",
                "predict",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(subset),
                "--format",
                "mil-csv",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pred = {r["slide_id"]: float(r["prob_1"]) for r in _read_csv(out)}
    assert pred == pytest.approx(test_rows, abs=1e-6)


def test_help_for_every_command(capsys):
    for cmd in ("train", "cv", "test", "predict", "benchmark"):
        assert main(["mil", cmd, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out


def test_benchmark_command_small_version(tmp_path):
    """CI version of the benchmark: Musk1, 2 folds, 1 epoch, one seed, three models."""
    out, table = tmp_path / "bench", tmp_path / "table.md"
    args = ["mil", "benchmark", "--datasets", "musk1", "--models", "abmil,mmil,clam_sb", "--seeds", "0",
            "--folds", "2", "--max-epochs", "1", "--out", str(out), "--table", str(table)]  # fmt: skip
    assert main(args) == 0
    text = table.read_text()
    for model in ("abmil", "mmil", "clam_sb"):
        m = json.loads((out / "musk1" / model / "seed_0" / "metrics.json").read_text())
        assert m["protocol"]["folds"] == 2 and m["protocol"]["config"]["max_epochs"] == 1
        acc = f"{m['accuracy']['mean']:.3f} ± {m['accuracy']['std']:.3f}"
        auc = f"{m['auc']['mean']:.3f} ± {m['auc']['std']:.3f}"
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| Musk1 | {model} |"))
        assert acc in row and auc in row and "| 2 | 1 / 1 |" in row
        with (out / "musk1" / model / "seed_0" / "predictions.csv").open() as fh:
            preds = list(csv.DictReader(fh))
        pos = np.mean([p["pred"] == "1" for p in preds])
        true = np.mean([p["label"] == "1" for p in preds])
        assert len(preds) == 92 and f"| {pos:.2f} / {true:.2f} |" in row
    assert "| Musk2 | abmil | – |" in text  # not run: no numbers
    assert "0.892" in text  # published ABMIL accuracy beside the rows
    # a second call reuses the finished runs (same numbers, nothing retrained)
    before = (out / "musk1" / "abmil" / "seed_0" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "musk1" / "abmil" / "seed_0" / "metrics.json").stat().st_mtime_ns == before


def _write_slide_features(folder, subset):
    """One CLAM-style .h5 per bag (datasets ``features`` and ``coords``), real Musk1 rows."""
    from sparsemil.data.h5 import write_h5_file
    from sparsemil.data.readers import read_mil_csv

    folder.mkdir()
    bags = read_mil_csv(subset)
    for b in bags:
        xy = np.stack([np.arange(b.n_instances), np.zeros(b.n_instances)], 1)
        write_h5_file(folder / f"slide_{b.slide_id}.h5", b.features, xy)
    return bags


def test_clam_csv_and_official_split_formats(tmp_path, subset):
    bags = _write_slide_features(tmp_path / "h5", subset)
    ds = tmp_path / "dataset.csv"
    ds.write_text("slide_id,label\n" + "".join(f"slide_{b.slide_id},{b.label}\n" for b in bags))
    out = tmp_path / "cv"
    assert main(["mil", "cv", "--data", str(ds), "--format", "clam", "--data-dir", str(tmp_path / "h5"),
                 "--model", "abmil", "--folds", "2", "--out", str(out)] + FAST) == 0  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(r["slide_id"] for r in m["predictions"]) == sorted(
        f"slide_{b.slide_id}" for b in bags
    )
    # official split: train / val / test columns with labels
    pos = [b for b in bags if b.label == 1]
    neg = [b for b in bags if b.label == 0]
    parts = {"train": pos[:8] + neg[:8], "val": pos[8:10] + neg[8:10], "test": pos[10:] + neg[10:]}
    n = max(len(v) for v in parts.values())
    lines = ["train,train_label,val,val_label,test,test_label"]
    for i in range(n):
        cells = []
        for k in ("train", "val", "test"):
            cells += (
                [f"slide_{parts[k][i].slide_id}", str(parts[k][i].label)]
                if i < len(parts[k])
                else ["", ""]
            )
        lines.append(",".join(cells))
    split = tmp_path / "split.csv"
    split.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["mil", "train", "--data", str(split), "--format", "split", "--data-dir", str(tmp_path / "h5"),
                 "--model", "mmil", "--out", str(run)] + FAST + SMALL_MMIL) == 0  # fmt: skip
    r = json.loads((run / "metrics.json").read_text())
    assert (r["n_train"], r["n_val"], r["n_test"]) == (16, 4, 4)
    assert sorted(p["slide_id"] for p in r["predictions"]) == sorted(
        f"slide_{b.slide_id}" for b in parts["test"]
    )
    # a split row naming a missing file fails before training, naming the CSV
    (tmp_path / "h5" / f"slide_{parts['test'][0].slide_id}.h5").unlink()
    assert main(["mil", "train", "--data", str(split), "--format", "split", "--data-dir", str(tmp_path / "h5"),
                 "--model", "abmil", "--out", str(tmp_path / "run2")] + FAST) == 2  # fmt: skip
    assert not (tmp_path / "run2" / "metrics.json").exists()


def test_benchmark_flags_collapsed_predictions():
    """A row predicting one class for most bags is listed; a balanced one is not."""
    from sparsemil.experiments.mil_benchmark import _skew_lines

    rows = [
        {"dataset": "musk1", "model": "dsmil", "positive_share": (0.86, 0.45)},
        {"dataset": "musk1", "model": "abmil", "positive_share": (0.55, 0.51)},
        {"dataset": "musk2", "model": "mmil", "positive_share": None},
    ]
    text = "\n".join(_skew_lines(rows))
    assert "Musk1 / dsmil: predicts class 1 for 86% of test bags, 45% are class 1" in text
    assert "abmil" not in text and "mmil" not in text
    assert _skew_lines(rows[1:]) == []
