"""The official MMIL-Transformer / TransMIL split CSVs exactly as shipped (issue K3).

Facts of the shipped files (MMIL-Transformer ``datacsv/TCGA.csv``, ``camelyon16.csv``):
header ``train,train_label,val,val_label,test,test_label`` without an index column; the
short columns padded with empty cells; ``train_label`` written as ``1`` but ``val_label`` /
``test_label`` as ``1.0``; in the TCGA file every entry prefixed with a folder
(``data_tcga_lung_tree/TCGA-...``), which the official loader joins to the feature folder
before adding ``.h5``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsemil.data import load_bag_source, read_official_split, write_h5_file
from sparsemil.errors import SparsemilError

PREFIX = "data_tcga_lung_tree"
NAMES = [f"TCGA-{i:02d}-4595-01Z-00-DX1" for i in range(10)]
LABELS = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0]
TRAIN, VAL, TEST = range(0, 6), range(6, 8), range(8, 10)


def _features(folder: Path, names: list[str] = NAMES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        write_h5_file(folder / f"{n}.h5", rng.normal(size=(3, 4)), np.zeros((3, 2), np.int64))
    return folder


def _tcga_csv(path: Path, pad: str = "", prefix: str = PREFIX + "/") -> Path:
    """A split CSV in the shipped TCGA layout; ``pad`` fills the short columns."""
    rows = ["train,train_label,val,val_label,test,test_label"]
    for r in range(len(TRAIN)):
        cells = [f"{prefix}{NAMES[TRAIN[r]]}", str(LABELS[TRAIN[r]])]
        for part in (VAL, TEST):
            if r < len(part):
                cells += [f"{prefix}{NAMES[part[r]]}", f"{float(LABELS[part[r]])}"]
            else:
                cells += [pad, pad]
        rows.append(",".join(cells))
    path.write_text("\n".join(rows) + "\n")
    return path


def _check(got: dict, folder: Path) -> None:
    for part, idx in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        assert got[part] == [(folder / f"{NAMES[i]}.h5", LABELS[i]) for i in idx]


def test_prefixed_entries_are_found_as_the_official_loader_joins_them(tmp_path: Path):
    """Issue example: prefixed entries were reported as "does not exist" although the file
    is there. Right: ``<data_dir>/data_tcga_lung_tree/TCGA-XX.h5`` is found."""
    root = tmp_path / "features"
    folder = _features(root / PREFIX)
    split = _tcga_csv(tmp_path / "TCGA.csv")
    _check(read_official_split(split, root), folder)
    src = load_bag_source(split, data_dir=root)  # the split CSV as data, auto-detected
    assert src.format == "split" and len(src) == 10
    assert src.slide_ids == [NAMES[i] for i in [*TRAIN, *VAL, *TEST]]  # last path component
    (fold,) = src.splits
    assert fold.train.tolist() == [0, 1, 2, 3, 4, 5] and fold.val.tolist() == [6, 7]
    assert fold.test.tolist() == [8, 9]
    assert src.labels.tolist() == [LABELS[i] for i in [*TRAIN, *VAL, *TEST]]
    # the same split given as split_csv next to the feature folder
    again = load_bag_source(root, "h5", split_csv=split)
    assert again.slide_ids == src.slide_ids and again.splits[0].test.tolist() == [8, 9]


@pytest.mark.parametrize(
    "layout",
    ["prefix_folder_is_data_dir", "flat_data_dir", "clam_h5_files_under_prefix", "windows"],
)
def test_prefixed_entries_fall_back_to_the_last_path_component(tmp_path: Path, layout: str):
    root = tmp_path / "features"
    prefix = PREFIX + "/"
    if layout == "prefix_folder_is_data_dir":  # data_dir points at data_tcga_lung_tree itself
        folder = _features(root / PREFIX)
        root = folder
    elif layout == "flat_data_dir":  # the files were copied without their folder
        folder = _features(root)
    elif layout == "clam_h5_files_under_prefix":
        folder = _features(root / PREFIX / "h5_files")
    else:  # written on Windows
        folder = _features(root / PREFIX)
        prefix = PREFIX + "\\"
    split = _tcga_csv(tmp_path / "TCGA.csv", prefix=prefix)
    _check(read_official_split(split, root), folder)
    assert load_bag_source(split, data_dir=root).slide_ids[:2] == NAMES[:2]


@pytest.mark.parametrize("pad", ["", "NaN", "nan", "None", "NA", "<NA>"])
def test_padding_cells_are_no_slides(tmp_path: Path, pad: str):
    """Issue example: padding written as ``NaN`` was read as a slide named ``NaN``.
    Right: every cell pandas reads as missing pads the column (10 slides, not 12)."""
    root = tmp_path / "features"
    folder = _features(root / PREFIX)
    split = _tcga_csv(tmp_path / "TCGA.csv", pad=pad)
    got = read_official_split(split, root)
    assert [len(got[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    _check(got, folder)
    src = load_bag_source(split, data_dir=root)
    assert len(src) == 10 and not any(
        s.lower() in ("nan", "none", "na", "<na>") for s in src.slide_ids
    )


def test_shipped_camelyon16_layout_with_blank_padding(tmp_path: Path):
    """``camelyon16.csv``: no folder prefix, float labels everywhere, a short val column."""
    folder = _features(tmp_path / "h5", ["normal_083", "tumor_110", "normal_067", "test_001"])
    split = tmp_path / "camelyon16.csv"
    split.write_text(
        "train,train_label,val,val_label,test,test_label\n"
        "normal_083,0.0,normal_067,0.0,test_001,1.0\n"
        "tumor_110,1.0,,,,\n"
    )
    got = read_official_split(split, folder)
    assert got == {
        "train": [(folder / "normal_083.h5", 0), (folder / "tumor_110.h5", 1)],
        "val": [(folder / "normal_067.h5", 0)],
        "test": [(folder / "test_001.h5", 1)],
    }


def test_missing_file_message_names_where_it_looked(tmp_path: Path):
    root = tmp_path / "features"
    _features(root / PREFIX, NAMES[:-1])  # the last test slide has no features
    split = _tcga_csv(tmp_path / "TCGA.csv", pad="NaN")
    want = (
        rf"split CSV .*TCGA\.csv:3: test slide '{PREFIX}/{NAMES[-1]}' has no feature file: "
        rf".*features/{PREFIX}/{NAMES[-1]}\.h5 does not exist, nor does {NAMES[-1]}\.h5 in "
        rf".*features or its sub-folders; fix: extract its features or remove the row"
    )
    for call in (
        lambda: read_official_split(split, root),
        lambda: load_bag_source(split, data_dir=root),
    ):
        with pytest.raises(SparsemilError, match=want):
            call()


def test_a_slide_with_a_missing_label_is_refused(tmp_path: Path):
    root = tmp_path / "features"
    _features(root / PREFIX)
    split = _tcga_csv(tmp_path / "TCGA.csv")
    text = split.read_text().replace(f"{NAMES[6]},{float(LABELS[6])}", f"{NAMES[6]},NaN", 1)
    split.write_text(text)
    with pytest.raises(
        SparsemilError,
        match=rf"TCGA\.csv:2:4: val slide '{PREFIX}/{NAMES[6]}' has no val_label \(NaN\)",
    ):
        read_official_split(split, root)


def test_prefixed_split_with_a_clam_dataset_csv(tmp_path: Path):
    """CLAM's splits_k layout (no label columns) with prefixed entries, labels from a
    dataset CSV naming the slides without the folder."""
    root = tmp_path / "features"
    _features(root / PREFIX)
    labels = tmp_path / "dataset.csv"
    labels.write_text(
        "case_id,slide_id,label\n"
        + "".join(f"p{i},{n},{y}\n" for i, (n, y) in enumerate(zip(NAMES, LABELS, strict=True)))
    )
    split = tmp_path / "splits_0.csv"
    split.write_text(
        ",train,val,test\n"
        + "".join(
            f"{r},{PREFIX}/{NAMES[r]},"
            + (f"{PREFIX}/{NAMES[6 + r]}" if r < 2 else "NaN")
            + ","
            + (f"{PREFIX}/{NAMES[8 + r]}" if r < 2 else "")
            + "\n"
            for r in range(6)
        )
    )
    src = load_bag_source(split, data_dir=root, labels=labels)
    (fold,) = src.splits
    assert [src.slide_ids[i] for i in fold.val] == NAMES[6:8]
    assert [src.slide_ids[i] for i in fold.test] == NAMES[8:10]
    assert [src.slide_ids[i] for i in fold.train] == NAMES[:6]
