"""validate_bags / load_bag_source refuse bad bags with one-line errors, before training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sparsemil.data import (
    Bag,
    BagRef,
    as_bag,
    load_bag_source,
    validate_bags,
    write_h5_file,
)
from sparsemil.errors import SparsemilError


def copy_bags(bags: list[Bag], n: int) -> list[Bag]:
    return [dataclasses.replace(b, features=b.features.copy()) for b in bags[:n]]


def error_of(bags, n_classes: int = 2, **kw) -> str:
    with pytest.raises(SparsemilError, match=r"^(musk1\.csv: |n_classes)") as e:
        validate_bags(bags, n_classes, source="musk1.csv", **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(("musk1.csv: ", "n_classes"))
    assert "fix" in msg
    return msg


def test_real_bags_pass(musk1_bags: list[Bag]):
    assert validate_bags(musk1_bags, 2, source="musk1.csv") is None


def test_empty_bag(musk1_bags: list[Bag]):
    bags = copy_bags(musk1_bags, 5)
    bags[2] = dataclasses.replace(bags[2], features=np.zeros((0, 166), np.float32))
    msg = error_of(bags)
    assert f"bag '{bags[2].slide_id}' ({bags[2].path}) is empty (0 instances)" in msg


def test_nan_and_inf_counted(musk1_bags: list[Bag]):
    bags = copy_bags(musk1_bags, 6)
    f = bags[4].features
    f[0, :3] = np.nan
    f[1, 5] = np.inf
    f[1, 6] = -np.inf
    bags[5].features[0, 0] = np.nan
    msg = error_of(bags)
    assert (
        f"bag '{bags[4].slide_id}' ({bags[4].path}) has 5 non-finite feature values "
        f"(3 NaN, 2 Inf) in 2 of its {f.shape[0]} instances" in msg
    )
    assert "(and 1 more bag with the same problem)" in msg


def test_dimension_mismatch_names_both_bags(musk1_bags: list[Bag]):
    bags = copy_bags(musk1_bags, 4)
    bags[3] = dataclasses.replace(bags[3], features=bags[3].features[:, :100])
    msg = error_of(bags)
    assert (
        f"feature dimension mismatch: bag '{bags[3].slide_id}' ({bags[3].path}) has 100 "
        f"features per instance but bag '{bags[0].slide_id}' ({bags[0].path}) has 166" in msg
    )


def test_labels_out_of_range(musk1_bags: list[Bag]):
    bags = copy_bags(musk1_bags, 4)
    bags[1] = dataclasses.replace(bags[1], label=2)
    msg = error_of(bags)
    assert f"bag '{bags[1].slide_id}' ({bags[1].path}) has label 2, outside 0..1" in msg
    assert "set 'n_classes' to 3" in msg
    validate_bags(bags, 3, source="musk1.csv")  # fine with three classes
    bags[1] = dataclasses.replace(bags[1], label=-1)
    assert "has no label" in error_of(bags)
    assert "n_classes must be >= 2" in error_of(musk1_bags, n_classes=1)


def test_missing_data_file(tmp_path: Path, musk1_bags: list[Bag]):
    refs = [BagRef(tmp_path / f"s{i}.h5", 0, f"s{i}") for i in range(3)]
    msg = error_of(refs)
    assert f"data file {tmp_path / 's0.h5'} of slide 's0' does not exist" in msg
    assert "(and 2 more bags with the same problem)" in msg


def _h5(path: Path, feats: np.ndarray) -> Path:
    return write_h5_file(path, feats)


def test_h5_refs_checked_by_shape_then_values_on_load(tmp_path: Path, musk1_bags: list[Bag]):
    good = _h5(tmp_path / "good.h5", musk1_bags[0].features)
    nan_feats = musk1_bags[1].features.copy()
    nan_feats[2, 7] = np.nan
    noisy = _h5(tmp_path / "noisy.h5", nan_feats)
    refs = [BagRef(good, 1, "good"), BagRef(noisy, 1, "noisy")]
    validate_bags(refs, 2, source="folder")  # shapes only: NaN not seen yet
    with pytest.raises(SparsemilError, match=r"bag 'noisy' \(.*noisy\.h5\) has 1 non-finite"):
        as_bag(refs[1])
    msg = error_of(refs, deep=True)
    assert "has 1 non-finite feature values (1 NaN, 0 Inf) in 1 of its" in msg
    narrow = _h5(tmp_path / "narrow.h5", musk1_bags[2].features[:, :10])
    with pytest.raises(SparsemilError, match="feature dimension mismatch") as e:
        validate_bags(refs[:1] + [BagRef(narrow, 0, "narrow")], 2, source="folder")
    assert (
        f"bag 'narrow' ({narrow}) has 10 features per instance but bag 'good' ({good}) has 166"
        in str(e.value)
    )
    empty = _h5(tmp_path / "empty.h5", np.zeros((0, 166), np.float32))
    with pytest.raises(SparsemilError, match=r"bag 'empty' \(.*empty\.h5\) is empty"):
        validate_bags([BagRef(empty, 0, "empty")], 2, source="folder")


def test_corrupt_h5_in_folder_stops_before_training(tmp_path: Path, musk1_bags: list[Bag]):
    d = tmp_path / "feats"
    d.mkdir()
    for i in range(3):
        _h5(d / f"s{i}.h5", musk1_bags[44 + i].features)
    data = (d / "s1.h5").read_bytes()
    (d / "s1.h5").write_bytes(data[: len(data) // 3])
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,label\ns0,1\ns1,1\ns2,0\n")
    with pytest.raises(SparsemilError, match=rf"{d / 's1.h5'}: corrupt or unreadable HDF5 file"):
        load_bag_source(d, labels=lab)


def test_load_bag_source_validates_mil_csv(tmp_path: Path, mil_csv_dir: Path):
    lines = (mil_csv_dir / "musk1.csv").read_text().splitlines()
    cells = [ln.split(",") for ln in lines]
    lines = [
        ",".join(["2", *c[1:]]) if c[1] == "2" else ln for c, ln in zip(cells, lines, strict=True)
    ]
    p = tmp_path / "three.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        SparsemilError, match=r"bag '2' \(.*three\.csv:5\) has label 2, outside 0\.\.1"
    ):
        load_bag_source(p, n_classes=2)
    src = load_bag_source(p)  # n_classes inferred as max label + 1
    assert src.n_classes == 3
    nan = [
        ln if i != 10 else ",".join(ln.split(",")[:5] + ["nan"] + ln.split(",")[6:])
        for i, ln in enumerate(lines)
    ]
    q = tmp_path / "nan.csv"
    q.write_text("\n".join(nan) + "\n")
    with pytest.raises(SparsemilError, match=r"has 1 non-finite feature values \(1 NaN, 0 Inf\)"):
        load_bag_source(q)


def test_small_h5_folder_values_checked_up_front(tmp_path: Path, musk1_bags: list[Bag]):
    d = tmp_path / "feats"
    d.mkdir()
    feats = musk1_bags[0].features.copy()
    feats[1, 1] = np.inf
    _h5(d / "a.h5", musk1_bags[47].features)
    _h5(d / "b.h5", feats)
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,label\na,0\nb,1\n")
    with pytest.raises(
        SparsemilError, match=r"bag 'b' \(.*b\.h5\) has 1 non-finite .*\(0 NaN, 1 Inf\)"
    ):
        load_bag_source(d, labels=lab)
    assert len(load_bag_source(d, labels=lab, deep=False)) == 2  # shapes only


def test_a_gap_in_integer_labels_is_refused_not_a_silent_k_class_model(
    tmp_path: Path, mil_csv_dir: Path
):
    """A newcomer's typo: one bag labelled 5 in a binary CSV used to give a 6-class model with
    four empty classes (exit 0). Labels must be 0..K-1 unless n_classes says otherwise."""
    lines = (mil_csv_dir / "musk1.csv").read_text().splitlines()
    cells = [ln.split(",") for ln in lines]
    first = cells[0][1]  # columns: label, bag id, features; the first bag gets label 5
    p = tmp_path / "typo.csv"
    p.write_text(
        "\n".join(",".join(["5", *c[1:]]) if c[1] == first else ln
                  for c, ln in zip(cells, lines, strict=True)) + "\n"
    )  # fmt: skip
    with pytest.raises(
        SparsemilError,
        match=r"typo\.csv: labels go up to 5 but no bag has label 2, 3, 4; .*--n-classes 6",
    ):
        load_bag_source(p)
    assert load_bag_source(p, n_classes=6).n_classes == 6  # said explicitly: accepted
