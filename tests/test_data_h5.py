"""The CLAM/Trident h5 layout: one writer, one reader (real Musk1 features)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsemil.data import Bag, read_bag, read_mil_csv
from sparsemil.data.h5 import h5_info, patch_size_level0, read_h5_file, write_h5_file
from sparsemil.errors import SparsemilError


@pytest.fixture(scope="module")
def bag(mil_csv_dir: Path) -> Bag:
    return read_mil_csv(mil_csv_dir / "musk1.csv")[7]


def _coords(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 512, np.arange(n) * 256], 1)


def test_roundtrip_keeps_every_part(tmp_path: Path, bag: Bag):
    n = bag.n_instances
    labels = np.arange(n) % 2
    coords_attrs = {"patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0])}
    p = write_h5_file(
        tmp_path / "sub" / "slide.h5",
        bag.features,
        _coords(n),
        labels=labels,
        attrs={"slide": "slide.svs"},
        features_attrs={"backbone": "resnet50"},
        coords_attrs=coords_attrs,
    )
    got = read_h5_file(p)
    np.testing.assert_array_equal(got.features, bag.features)
    assert got.features.dtype == np.float32
    assert got.coords.dtype == np.int64 and np.array_equal(got.coords, _coords(n))
    assert got.labels.tolist() == labels.tolist()
    assert got.attrs["slide"] == "slide.svs" and got.features_attrs["backbone"] == "resnet50"
    assert int(got.coords_attrs["patch_level"]) == 1
    assert got.patch_size_level0() == 512  # CLAM: patch_size x downsample
    assert h5_info(p) == (n, 166, True)
    read = read_bag(p, label=1)
    assert read.instance_labels.tolist() == labels.tolist() and read.coords.shape == (n, 2)
    assert sorted(q.name for q in p.parent.iterdir()) == ["slide.h5"]  # no temporary left


def test_failed_write_leaves_the_old_file(tmp_path: Path, bag: Bag):
    p = write_h5_file(tmp_path / "slide.h5", bag.features, _coords(bag.n_instances))
    before = p.read_bytes()
    with pytest.raises(TypeError, match="Object dtype"):
        write_h5_file(p, bag.features[:2], attrs={"bad": object()})
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["slide.h5"]


def test_writer_refuses_broken_layouts(tmp_path: Path, bag: Bag):
    p = tmp_path / "x.h5"
    with pytest.raises(SparsemilError, match=r"x\.h5: features has shape \(166,\), expected"):
        write_h5_file(p, bag.features[0])
    n = bag.n_instances
    with pytest.raises(SparsemilError, match=rf"x\.h5: labels has shape \({n + 1},\), expected"):
        write_h5_file(p, bag.features, labels=np.zeros(n + 1))
    assert not p.exists()


def test_missing_coords_when_needed(tmp_path: Path, bag: Bag):
    p = write_h5_file(tmp_path / "nocoords.h5", bag.features)
    assert read_h5_file(p).coords is None
    with pytest.raises(SparsemilError, match=r"nocoords\.h5: no 'coords' dataset \(the file has"):
        read_h5_file(p, need_coords=True)
    with pytest.raises(SparsemilError, match=r"nocoords\.h5: coords have neither"):
        read_h5_file(p).patch_size_level0()


def test_patch_size_level0_rules():
    assert patch_size_level0({"patch_size_level0": 1024, "patch_size": 256}) == 1024  # Trident
    assert patch_size_level0({"patch_size": 256, "downsample": [4.0, 4.0]}) == 1024  # CLAM
    assert patch_size_level0({"patch_size": 256, "patch_level": 2}, [1.0, 4.0, 16.0]) == 4096
    assert patch_size_level0({"patch_size": 256}) == 256
    with pytest.raises(SparsemilError, match="neither patch_size_level0 nor patch_size"):
        patch_size_level0({"name": "x"})
