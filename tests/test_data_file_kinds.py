"""Readable files in an unsupported layout say what they are and how to convert them;
only a damaged file is called corrupt (issue K4, unsupported layouts)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sparsemil.data.h5 import file_kind, h5_info, read_h5_file, write_h5_file
from sparsemil.data.readers import read_pt
from sparsemil.errors import SparsemilError

FEATS = np.arange(24, dtype=np.float32).reshape(6, 4)


def _no_corrupt(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "corrupt" not in msg and "re-copy" not in msg and "re-download" not in msg
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("make", "kind", "fix"),
    [
        (
            lambda p: torch.save({"features": torch.from_numpy(FEATS)}, p),
            "a zip archive (the format torch.save writes)",
            "name it <slide>.pt (format 'pt' reads it)",
        ),
        (
            lambda p: torch.save(torch.from_numpy(FEATS), p, _use_new_zipfile_serialization=False),
            "a Python pickle",
            "name it <slide>.pt (format 'pt' reads it)",
        ),
        (
            lambda p: np.save(p.with_suffix(".npy"), FEATS) or p.with_suffix(".npy").rename(p),
            "a NumPy .npy array",
            "load it with numpy.load and write the CLAM layout with "
            "sparsemil.data.h5.write_h5_file",
        ),
        (
            lambda p: p.write_text("0,1,2,3\n0.1,0.2,0.3,0.4\n"),
            "a text (CSV) file",
            "DSMIL per-slide CSV, name it <slide>.csv (format 'dsmil-csv' reads it)",
        ),
        (
            lambda p: p.write_bytes(b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + bytes(200)),
            "a MATLAB v5 .mat file",
            "scipy.io.loadmat",
        ),
        (
            lambda p: __import__("PIL.Image").Image.new("RGB", (8, 8)).save(p, format="PNG"),
            "a PNG image",
            "it is an image, not features: extract features from the slide first",
        ),
    ],
)
def test_other_files_named_h5(tmp_path: Path, make, kind: str, fix: str):
    p = tmp_path / "slide_1.h5"
    make(p)
    assert file_kind(p).startswith(kind)
    for fn in (read_h5_file, h5_info):
        with pytest.raises(SparsemilError, match="not an HDF5 feature file") as e:
            fn(p)
        msg = _no_corrupt(e)
        assert msg.startswith(f"{p}: {kind}") and fix in msg


def test_other_hdf5_layouts(tmp_path: Path):
    stamp = tmp_path / "stamp.h5"
    with h5py.File(stamp, "w") as f:  # malformed on purpose
        f["feats"] = FEATS
        f["coords"] = np.zeros((6, 2))
    with pytest.raises(SparsemilError, match=r"holding 'feats' \(6, 4\) but no 'features'") as e:
        read_h5_file(stamp)
    assert (
        "fix: rename the dataset: h5py.File(path, 'r+').move('feats', 'features')" in _no_corrupt(e)
    )

    mat = tmp_path / "mat73.h5"
    with h5py.File(mat, "w", userblock_size=512) as f:  # malformed on purpose
        f["x"] = FEATS
    with open(mat, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64")
    assert file_kind(mat) == "an HDF5 file"
    with pytest.raises(SparsemilError, match=r"mat73\.h5: a MATLAB v7\.3 \.mat file; fix: read"):
        h5_info(mat)

    adata = tmp_path / "cells.h5"
    with h5py.File(adata, "w") as f:  # malformed on purpose
        f["X"] = FEATS
        f.create_group("obs")
        f.create_group("var")
    with pytest.raises(SparsemilError, match=r"cells\.h5: an AnnData \(\.h5ad\) file"):
        read_h5_file(adata)

    keras = tmp_path / "model.h5"
    with h5py.File(keras, "w") as f:  # malformed on purpose
        f.create_group("model_weights")
        f.attrs["keras_version"] = "2.15"
    with pytest.raises(SparsemilError, match=r"model\.h5: a Keras model file, not features"):
        read_h5_file(keras)

    group = tmp_path / "grouped.h5"
    with h5py.File(group, "w") as f:  # malformed on purpose
        f.create_group("features")["uni"] = FEATS
    with pytest.raises(SparsemilError, match=r"whose 'features' is a group \(holding uni\)"):
        read_h5_file(group)


def test_damaged_hdf5_is_still_called_corrupt(tmp_path: Path):
    good = write_h5_file(tmp_path / "good.h5", FEATS, np.zeros((6, 2), np.int64))
    bad = tmp_path / "cut.h5"
    bad.write_bytes(good.read_bytes()[:600])
    assert file_kind(bad) == "an HDF5 file"
    with pytest.raises(SparsemilError, match=r"cut\.h5: corrupt or unreadable HDF5 file"):
        read_h5_file(bad)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(SparsemilError, match=r"empty\.h5: empty file; fix: re-copy"):
        h5_info(empty)


def test_hdf5_named_pt(tmp_path: Path):
    p = write_h5_file(tmp_path / "x.h5", FEATS)
    pt = tmp_path / "x.pt"
    pt.write_bytes(p.read_bytes())
    with pytest.raises(SparsemilError, match=r"x\.pt: an HDF5 file, not a torch file; fix: name"):
        read_pt(pt)
