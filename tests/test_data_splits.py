"""Splits: seeded stratified k-fold, folds CSVs, official MMIL/TransMIL and CLAM CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from sparsemil.data import (
    Bag,
    Fold,
    holdout_fold,
    load_bag_source,
    read_clam_csv,
    read_folds_csv,
    read_official_split,
    run_folds,
    stratified_holdout,
    stratified_kfold,
    write_folds_csv,
    write_h5_file,
)
from sparsemil.errors import SparsemilError


def test_stratified_kfold_on_musk1(musk1_bags: list[Bag]):
    y = np.array([b.label for b in musk1_bags])
    folds = stratified_kfold(y, n_splits=10, seed=0, val_fraction=0.1)
    assert len(folds) == 10
    tests = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(tests), np.arange(92))  # every bag tested exactly once
    # the test parts are exactly scikit-learn's StratifiedKFold(shuffle, seed)
    skf = StratifiedKFold(10, shuffle=True, random_state=0).split(np.zeros((92, 1)), y)
    for fold, (_, te) in zip(folds, skf, strict=True):
        assert np.array_equal(fold.test, np.sort(te))
    for train, val, test in folds:
        assert np.intersect1d(train, val).size == 0 and np.intersect1d(train, test).size == 0
        assert np.intersect1d(val, test).size == 0
        assert train.size + val.size + test.size == 92
        # stratified: 47/92 positives -> 4 or 5 of the ~9 test bags, val has both classes
        assert abs(y[test].mean() - 47 / 92) < 0.1
        assert set(y[val]) == {0, 1}
        for c in (0, 1):  # documented rule: round(val_fraction * n_c) of each class
            n_c = int((y[np.concatenate([train, val])] == c).sum())
            assert int((y[val] == c).sum()) == round(0.1 * n_c)
    again = stratified_kfold(y.tolist(), 10, 0)
    assert all(
        np.array_equal(a, b)
        for fa, fb in zip(folds, again, strict=True)
        for a, b in zip(fa, fb, strict=True)
    )
    other = stratified_kfold(y, 10, seed=1)
    assert any(not np.array_equal(fa.test, fb.test) for fa, fb in zip(folds, other, strict=True))
    no_val = stratified_kfold(y, 5, seed=0, val_fraction=0.0)
    assert all(f.val.size == 0 and f.train.size + f.test.size == 92 for f in no_val)


def test_stratified_kfold_too_few_members():
    y = [0, 0, 0] + [1] * 10
    with pytest.raises(SparsemilError, match="class 0 has only 3 bags") as e:
        stratified_kfold(y, n_splits=5, seed=0)
    msg = str(e.value)
    assert "class 0 has only 3 bags, fewer than the 5 folds" in msg and "set 'folds' to 3" in msg
    with pytest.raises(SparsemilError, match="integer >= 2"):
        stratified_kfold(y, n_splits=1, seed=0)
    with pytest.raises(SparsemilError, match="at least two classes"):
        stratified_kfold([1] * 6, n_splits=2, seed=0)


def test_folds_csv_roundtrip(tmp_path: Path, musk1_bags: list[Bag]):
    y = [b.label for b in musk1_bags]
    ids = [b.slide_id for b in musk1_bags]
    folds = stratified_kfold(y, 4, seed=3)
    p = write_folds_csv(tmp_path / "folds.csv", folds, ids, labels=y)
    with open(p, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["slide_id", "label", "fold_0", "fold_1", "fold_2", "fold_3"]
    assert len(rows) == 93 and all(r[2] in ("train", "val", "test") for r in rows[1:])
    back = read_folds_csv(p)
    assert back.slide_ids == ids and back.labels.tolist() == y
    for a, b in zip(folds, back, strict=True):
        for pa, pb in zip(a, b, strict=True):
            assert np.array_equal(pa, pb)
    # indices follow the data's order when slide_ids are given
    rev = ids[::-1]
    back_rev = read_folds_csv(p, slide_ids=rev)
    assert sorted(rev[i] for i in back_rev[0].test) == sorted(ids[i] for i in folds[0].test)
    with pytest.raises(SparsemilError, match=r"has no row for slide 'extra'"):
        read_folds_csv(p, slide_ids=ids + ["extra"])
    # load_bag_source reproduces the folds from the CSV
    src = load_bag_source("musk1", split_csv=p)
    assert len(src.splits) == 4 and np.array_equal(src.splits[2].val, folds[2].val)


def _write_columns(path: Path, columns: dict[str, list], index_col: bool = True) -> Path:
    """Write columns of different lengths, padding with blank cells (like pandas does)."""
    n = max(len(v) for v in columns.values())
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(([""] if index_col else []) + list(columns))
        for i in range(n):
            row = [str(i)] if index_col else []
            w.writerow(row + [str(v[i]) if i < len(v) else "" for v in columns.values()])
    return path


def _h5_dir(tmp_path: Path, bags: list[Bag], names: list[str]) -> Path:
    d = tmp_path / "h5"
    d.mkdir(exist_ok=True)
    for b, name in zip(bags, names, strict=True):
        write_h5_file(d / f"{name}.h5", b.features, np.zeros((b.n_instances, 2), np.int64))
    return d


def _official_split(tmp_path: Path, bags: list[Bag]) -> tuple[Path, Path, list[str]]:
    names = [f"{'tumor' if b.label else 'normal'}_{i:03d}" for i, b in enumerate(bags)]
    d = _h5_dir(tmp_path, bags, names)
    tr, va, te = range(0, 8), range(8, 10), range(10, 13)
    split = _write_columns(
        tmp_path / "fold0.csv",
        {
            "train": [names[i] for i in tr],
            # pandas writes float labels when a column is padded with NaN
            "train_label": [float(bags[i].label) for i in tr],
            "val": [names[i] for i in va],
            "val_label": [float(bags[i].label) for i in va],
            "test": [names[i] + ".tif" for i in te],  # slide file names are accepted too
            "test_label": [float(bags[i].label) for i in te],
        },
    )
    return split, d, names


def test_official_split_csv(tmp_path: Path, musk1_bags: list[Bag]):
    bags = musk1_bags[40:53]
    split, d, names = _official_split(tmp_path, bags)
    got = read_official_split(split, d)
    assert [len(got[k]) for k in ("train", "val", "test")] == [8, 2, 3]
    assert got["train"][0] == (d / f"{names[0]}.h5", bags[0].label)
    assert got["test"][2] == (d / f"{names[12]}.h5", bags[12].label)
    assert [lab for _, lab in got["val"]] == [bags[8].label, bags[9].label]
    # as a bag source: the split defines the bags and one predefined fold
    src = load_bag_source(d, split_csv=split)
    assert src.format == "h5" and len(src) == 13 and src.slide_ids == names
    (fold,) = src.splits
    assert fold.train.tolist() == list(range(8)) and fold.test.tolist() == [10, 11, 12]
    assert src.labels.tolist() == [b.label for b in bags]


def test_official_split_missing_file(tmp_path: Path, musk1_bags: list[Bag]):
    bags = musk1_bags[40:53]
    split, d, names = _official_split(tmp_path, bags)
    (d / f"{names[9]}.h5").unlink()  # val row 2 -> line 3 of the CSV
    for call in (
        lambda: read_official_split(split, d),
        lambda: load_bag_source(d, split_csv=split),
    ):
        with pytest.raises(SparsemilError, match="has no feature file") as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg
        assert f"split CSV {split}:3: val slide '{names[9]}' has no feature file" in msg
        assert f"{d / names[9]}.h5 does not exist" in msg


def test_split_csv_with_overlapping_train_and_test(tmp_path: Path, musk1_bags: list[Bag]):
    ids = [b.slide_id for b in musk1_bags]
    split = _write_columns(
        tmp_path / "leak.csv",
        {"train": ids[:50], "val": ids[50:60], "test": ids[45:]},
        index_col=False,
    )
    with pytest.raises(SparsemilError, match=r"slide '46' is in both train and test \(5 such\)"):
        load_bag_source("musk1", split_csv=split)
    bad = _write_columns(tmp_path / "unknown.csv", {"train": ids[:5] + ["999"], "test": ids[5:8]})
    with pytest.raises(
        SparsemilError, match=r"unknown\.csv:7: train slide '999' is not in the data"
    ):
        load_bag_source("musk1", split_csv=bad)


def test_clam_dataset_csv_string_labels(tmp_path: Path, musk1_bags: list[Bag]):
    bags = musk1_bags[44:50]  # 3 musk, 3 non-musk
    names = [f"slide-{i}" for i in range(6)]
    d = _h5_dir(tmp_path, bags, names)
    cls = {0: "normal_tissue", 1: "tumor_tissue"}
    lab = tmp_path / "tumor_vs_normal.csv"
    lab.write_text(
        "case_id,slide_id,label\n"
        + "".join(
            f"p{i},{n},{cls[b.label]}\n" for i, (n, b) in enumerate(zip(names, bags, strict=True))
        )
    )
    refs = read_clam_csv(lab, d)
    # sorted-unique rule: normal_tissue -> 0, tumor_tissue -> 1
    assert [r.label for r in refs] == [b.label for b in bags]
    assert [r.slide_id for r in refs] == names and refs[0].path == d / "slide-0.h5"
    flipped = read_clam_csv(lab, d, label_map={"tumor_tissue": 0, "normal_tissue": 1})
    assert [r.label for r in flipped] == [1 - b.label for b in bags]
    with pytest.raises(
        SparsemilError, match=r"tumor_vs_normal\.csv:\d: label '\w+' is not in the label mapping"
    ):
        read_clam_csv(lab, d, label_map={"tumor_tissue": 1})
    (d / "slide-4.h5").unlink()
    with pytest.raises(
        SparsemilError,
        match=rf"{lab}:6: slide 'slide-4' has no feature file: .*slide-4\.h5 does not exist",
    ):
        read_clam_csv(lab, d)


def test_clam_splits_csv_with_label_csv(tmp_path: Path, musk1_bags: list[Bag]):
    """CLAM's splits_k.csv (train,val,test without labels) + the dataset CSV for labels."""
    bags = musk1_bags[40:50]
    names = [f"s{i}" for i in range(10)]
    d = _h5_dir(tmp_path, bags, names)
    lab = tmp_path / "ds.csv"
    lab.write_text(
        "slide_id,label\n" + "".join(f"{n},{b.label}\n" for n, b in zip(names, bags, strict=True))
    )
    split = _write_columns(
        tmp_path / "splits_0.csv", {"train": names[:6], "val": names[6:8], "test": names[8:]}
    )
    src = load_bag_source(d, "h5", split_csv=split, labels=lab)
    assert src.splits[0].val.tolist() == [6, 7] and src.splits[0].test.tolist() == [8, 9]
    with pytest.raises(SparsemilError, match="no train_label column"):
        read_official_split(split, d)


def test_dataset_csv_saved_by_excel_with_bom(tmp_path: Path, musk1_bags: list[Bag]):
    bags = musk1_bags[45:49]
    d = _h5_dir(tmp_path, bags, [f"s{i}" for i in range(4)])
    lab = tmp_path / "excel.csv"
    text = "slide_id,label\r\n" + "".join(f"s{i},{b.label}\r\n" for i, b in enumerate(bags))
    lab.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r.label for r in read_clam_csv(lab, d)] == [b.label for b in bags]


def test_fold_is_sorted_int64_and_unpacks():
    f = Fold([3, 1], np.array([5]), (4, 0), index=2)
    train, val, test = f
    assert train.tolist() == [1, 3] and val.dtype == np.int64 and test.tolist() == [0, 4]
    assert f.index == 2 and [p.size for p in f] == [2, 1, 2]


def test_one_holdout_rule_for_kfold_and_split_files(tmp_path: Path, musk1_bags: list[Bag]):
    """A split file without a val column gets its validation part by the k-fold rule."""
    bags = musk1_bags[30:60]
    names = [f"s{i:02d}" for i in range(len(bags))]
    d = _h5_dir(tmp_path, bags, names)
    split = _write_columns(
        tmp_path / "noval.csv",
        {
            "train": names[:24],
            "train_label": [b.label for b in bags[:24]],
            "test": names[24:],
            "test_label": [b.label for b in bags[24:]],
        },
    )
    src = load_bag_source(split, "split", data_dir=d)  # data: the split CSV, files in data_dir
    assert src.format == "split" and src.slide_ids == names
    fold = holdout_fold(src, fold=0, n_folds=5, seed=3, val_fraction=0.25)
    y = src.labels
    want_val = stratified_holdout(np.arange(24), y, 0.25, np.random.default_rng([3, 0]))
    assert fold.val.tolist() == want_val.tolist()
    assert fold.train.tolist() == sorted(set(range(24)) - set(want_val.tolist()))
    assert fold.test.tolist() == list(range(24, 30))
    for c in (0, 1):
        assert int((y[fold.val] == c).sum()) == round(0.25 * int((y[:24] == c).sum()))
    # the same rule inside stratified_kfold: fold f's val is drawn with rng [seed, f]
    k = stratified_kfold(y, 3, seed=3, val_fraction=0.25)[1]
    trval = np.sort(np.concatenate([k.train, k.val]))
    again = stratified_holdout(trval, y, 0.25, np.random.default_rng([3, 1]))
    assert k.val.tolist() == again.tolist() and k.index == 1


def test_folds_of_a_run(tmp_path: Path, musk1_bags: list[Bag]):
    src = load_bag_source("musk1")
    drawn = run_folds(src, 4, seed=5, val_fraction=0.1)
    p = write_folds_csv(tmp_path / "folds.csv", drawn, src.slide_ids, src.labels)
    replayed = run_folds(src, 10, seed=99, val_fraction=0.5, folds_csv=p)
    assert [f.index for f in replayed] == [0, 1, 2, 3]
    for a, b in zip(drawn, replayed, strict=True):
        assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert holdout_fold(src, 2, 10, 0, 0.1, folds_csv=p).test.tolist() == drawn[2].test.tolist()
    with pytest.raises(SparsemilError, match=r"fold 4 is out of range: folds CSV .* has 4 folds"):
        holdout_fold(src, 4, 10, 0, 0.1, folds_csv=p)
    assert holdout_fold(src, 1, 4, 5, 0.1).test.tolist() == drawn[1].test.tolist()
    with pytest.raises(
        SparsemilError, match=r"folds CSV .*nope\.csv does not exist; fix: check 'folds_csv'"
    ):
        run_folds(src, 4, 0, 0.1, folds_csv=tmp_path / "nope.csv")
    with_split = load_bag_source("musk1", split_csv=p)
    with pytest.raises(SparsemilError, match=r"folds_csv .* cannot be combined with the"):
        run_folds(with_split, 4, 0, 0.1, folds_csv=p)


def test_dataset_and_split_csvs_as_data(tmp_path: Path, musk1_bags: list[Bag]):
    """``clam`` and ``split`` formats (auto-detected): data is the CSV, files in data_dir."""
    bags = musk1_bags[40:50]
    names = [f"s{i}" for i in range(10)]
    d = _h5_dir(tmp_path, bags, names)
    lab = tmp_path / "ds.csv"
    lab.write_text(
        "slide_id,label\n" + "".join(f"{n},{b.label}\n" for n, b in zip(names, bags, strict=True))
    )
    clam = load_bag_source(lab, data_dir=d)
    assert clam.format == "clam" and clam.slide_ids == names and clam.splits is None
    assert "auto-detected as 'clam'" in clam.notes[0]
    splits_k = _write_columns(
        tmp_path / "splits_0.csv", {"train": names[:6], "val": names[6:8], "test": names[8:]}
    )
    split = load_bag_source(splits_k, data_dir=d, labels=lab)  # CLAM splits_k + dataset CSV
    assert split.format == "split" and split.splits[0].val.tolist() == [6, 7]
    with pytest.raises(
        SparsemilError, match=r"data_dir .*nowhere is not a folder; fix: set 'data_dir'"
    ):
        load_bag_source(lab, "clam", data_dir=tmp_path / "nowhere")
    with pytest.raises(SparsemilError, match=r"labels .*ds\.csv is not used with format clam"):
        load_bag_source(lab, "clam", data_dir=d, labels=lab)


def test_a_class_with_one_bag_gets_a_fix_that_can_work():
    """A lone bag of a class cannot be stratified at any number of folds: the fix is the data,
    not 'set folds to 2 or fewer' when folds is already 2."""
    y = np.array([0, 0, 1, 1, 2])
    with pytest.raises(
        SparsemilError,
        match=r"class 2 has only 1 bag, fewer than the 2 folds; fix: add bags of class 2",
    ) as e:
        stratified_kfold(y, n_splits=2, seed=0)
    assert "set 'folds'" not in str(e.value)
