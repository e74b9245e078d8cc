"""Train/validation/test splits.

Three CSV layouts are read (all documented in ``docs/data.md``):

* the official MMIL/TransMIL split CSV -- columns ``train, train_label, val, val_label,
  test, test_label`` of different lengths (blank cells pad the short ones; an unnamed
  leading index column, as pandas writes it, is ignored). The CLAM ``splits_k.csv`` layout
  (``train, val, test`` without label columns) is read by the same code;
* a CLAM-style dataset CSV -- columns ``slide_id, label`` (``case_id`` and others ignored);
  string labels become class indices by the *sorted-unique rule* (see
  :func:`label_indices`) or by an explicit mapping;
* the folds CSV written by :func:`write_folds_csv` -- ``slide_id, label, fold_0, ...,
  fold_{k-1}`` with each cell ``train``, ``val``, ``test`` or blank (unused).

:class:`Fold` is the one train/val/test split type. The folds a run uses are built here
too: :func:`stratified_kfold` (seeded stratified k-fold, scikit-learn's ``StratifiedKFold``)
and :func:`stratified_holdout` (the one rule that takes a stratified validation part from a
training part), :func:`replay_folds` (an earlier run's folds CSV), :func:`split_csv_folds`
(a predefined split CSV), and :func:`run_folds` / :func:`holdout_fold` (what ``mil cv`` /
``mil train`` use).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from sparsemil.data.bags import Bag, BagRef
from sparsemil.data.readers import parse_int
from sparsemil.errors import SparsemilError
from sparsemil.io import atomic_path

PathLike = str | os.PathLike[str]

SPLIT_NAMES = ("train", "val", "test")
WSI_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
)
"""Slide-file suffixes stripped from split/dataset CSV entries before looking for features."""
NA_CELLS = frozenset(
    {"", "nan", "-nan", "none", "null", "na", "n/a", "<na>", "#n/a", "#n/a n/a", "#na"}
    | {"-1.#ind", "-1.#qnan", "1.#ind", "1.#qnan"}
)
"""Cells (lower-cased) that pad a short split column: the values ``pandas.read_csv`` reads
as missing, as the official loaders do."""


@dataclass(frozen=True, eq=False)
class Fold:
    """One train/val/test split: sorted int64 indices into a list of bags.

    Unpacks as ``train, val, test``. ``index`` is the fold's number (it seeds training).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    index: int = 0

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:
            part = np.asarray(getattr(self, name), dtype=np.int64).reshape(-1)
            object.__setattr__(self, name, np.sort(part))

    def __iter__(self):
        return iter((self.train, self.val, self.test))


class LabelledBags(Protocol):
    """What the fold builders need of a bag collection (e.g.
    :class:`~sparsemil.data.sources.BagSource`)."""

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def slide_ids(self) -> list[str]: ...

    @property
    def splits(self) -> list[Fold] | None: ...

    @property
    def source(self) -> str: ...


class Folds(list):
    """A ``list[Fold]`` that also carries the ``slide_ids`` (and ``labels``) it indexes."""

    def __init__(
        self,
        folds: Sequence[Fold] = (),
        slide_ids: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(folds)
        self.slide_ids = list(slide_ids) if slide_ids is not None else None
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------- small helpers
def _read_table(path: Path, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header (lower-cased, stripped) and (line number, cells) of the non-blank rows."""
    if not path.exists():
        raise SparsemilError(f"{what} {path} does not exist; fix: check the path")
    if not path.is_file():
        raise SparsemilError(f"{what} {path} is not a file; fix: point at a CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise SparsemilError(f"{what} {path} is not a text CSV file; fix: point at a CSV") from None
    except csv.Error as exc:
        raise SparsemilError(f"{what} {path}: malformed CSV ({exc})") from None
    if not rows:
        raise SparsemilError(f"{what} {path} is empty; fix: it needs a header row and data rows")
    header = [c.strip().lower() for c in rows[0][1]]
    return header, rows[1:]


def _cell(row: list[str], j: int) -> str:
    return row[j].strip() if j < len(row) else ""


def label_indices(
    raw: Sequence[str], label_map: dict[str, int] | None = None
) -> tuple[list[int], list[str] | None]:
    """Class indices of raw label cells, and the class names (``None`` for integer labels).

    Rule: with ``label_map``, each cell is looked up in it (missing -> ``KeyError``);
    otherwise if every cell is an integer (``"1"``, ``"1.0"``) the integers are the labels;
    otherwise the sorted unique strings are classes ``0..K-1`` (e.g. ``normal`` -> 0,
    ``tumor`` -> 1). Strings are compared after stripping spaces.
    """
    cells = [c.strip() for c in raw]
    if label_map is not None:
        lm = {str(k).strip(): int(v) for k, v in label_map.items()}
        out = []
        for c in cells:
            if c in lm:
                out.append(lm[c])
            elif parse_int(c) is not None and str(parse_int(c)) in lm:
                out.append(lm[str(parse_int(c))])
            else:
                raise KeyError(c)
        names: list[str | None] = [None] * (max(lm.values()) + 1 if lm else 0)
        for k, v in lm.items():
            if 0 <= v < len(names) and names[v] is None:
                names[v] = k
        return out, [n if n is not None else str(i) for i, n in enumerate(names)]
    ints = [parse_int(c) for c in cells]
    if all(v is not None for v in ints):
        return [int(v) for v in ints], None  # type: ignore[arg-type]
    classes = sorted(set(cells))
    index = {c: i for i, c in enumerate(classes)}
    return [index[c] for c in cells], classes


def bag_file_index(data_dir: PathLike, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map slide name -> feature file for the files directly in ``data_dir``, then in its
    CLAM sub-folders ``h5_files``/``pt_files`` and other sub-folders (one level, e.g. the
    DSMIL class folders). Earlier places win; the name is the file name minus the suffix.
    """
    data_dir = Path(data_dir)
    suffixes = tuple(s.lower() for s in suffixes)
    index: dict[str, Path] = {}

    def add(folder: Path) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.is_file():
                low = e.name.lower()
                for s in suffixes:
                    if low.endswith(s):
                        index.setdefault(e.name[: -len(s)], Path(e.path))
                        break

    add(data_dir)
    subdirs = sorted((p for p in data_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
    preferred = [p for p in subdirs if p.name in ("h5_files", "pt_files")]
    for p in preferred + [p for p in subdirs if p not in preferred]:
        add(p)
    return index


def lookup_bag_file(index: dict[str, Path], slide: str) -> Path | None:
    """The feature file of ``slide`` (a name, maybe with a WSI or feature suffix)."""
    s = slide.strip()
    if s in index:
        return index[s]
    low = s.lower()
    for suf in WSI_SUFFIXES + (".h5", ".hdf5", ".pt", ".pth", ".csv"):
        if low.endswith(suf) and s[: -len(suf)] in index:
            return index[s[: -len(suf)]]
    return None


def slide_name(entry: str) -> str:
    """A split/dataset CSV entry without a slide-file or feature-file suffix."""
    s = entry.strip()
    low = s.lower()
    for suf in WSI_SUFFIXES + (".h5", ".hdf5", ".pt", ".pth", ".csv"):
        if low.endswith(suf):
            return s[: -len(suf)]
    return s


def entry_slide_id(entry: str) -> str:
    """The slide name of a split/dataset CSV entry: its last path component without a
    slide-file or feature-file suffix (``data_tcga_lung_tree/TCGA-XX.svs`` -> ``TCGA-XX``)."""
    return slide_name(entry.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])


def is_padding(cell: str) -> bool:
    """True for a cell that pads a short split column: blank, or one of the cells pandas
    reads as missing (``NaN``, ``nan``, ``None``, ``NA``, ``N/A``, ``NULL``, ``<NA>``, ...;
    the official loaders read the split CSVs with ``pandas.read_csv``)."""
    return cell.strip().lower() in NA_CELLS


def find_bag_file(
    entry: str,
    data_dir: Path,
    index: dict[str, Path],
    suffixes: Sequence[str],
    folders: dict[Path, dict[str, Path]] | None = None,
) -> Path | None:
    """The feature file of a split/dataset CSV entry, found as the official loaders do, then
    by name.

    In order: ``<data_dir>/<entry><suffix>`` (the MMIL-Transformer/TransMIL/CLAM loaders join
    the entry to the feature folder and add the suffix, so ``data_tcga_lung_tree/TCGA-XX``
    is ``<data_dir>/data_tcga_lung_tree/TCGA-XX.h5``); the entry in ``index`` (a
    :func:`bag_file_index` of ``data_dir``); the entry's own sub-folder's index (with its
    ``h5_files``/``pt_files``); the entry's last path component in ``index``. ``folders``
    caches the sub-folder indices between calls.
    """
    s = entry.strip()
    if not s:
        return None
    rel = slide_name(s)
    exact = data_dir / s
    if s.lower().endswith(tuple(x.lower() for x in suffixes)) and exact.is_file():
        return exact
    for suf in suffixes:
        p = data_dir / (rel + suf)
        if p.is_file():
            return p
    f = lookup_bag_file(index, s)
    if f is not None:
        return f
    name = entry_slide_id(s)
    sub = (data_dir / rel).parent
    if sub != data_dir and sub.is_dir():
        cache = folders if folders is not None else {}
        if sub not in cache:
            cache[sub] = bag_file_index(sub, suffixes)
        f = lookup_bag_file(cache[sub], name)
        if f is not None:
            return f
    return lookup_bag_file(index, name) if name != rel else None


def missing_bag_file(entry: str, data_dir: Path, suffixes: Sequence[str]) -> str:
    """Where :func:`find_bag_file` looked, for the message about an entry without a file."""
    rel, name = slide_name(entry), entry_slide_id(entry)
    first = f"{data_dir / (rel + suffixes[0])} does not exist"
    if name == rel:
        return first
    return f"{first}, nor does {name}{suffixes[0]} in {data_dir} or its sub-folders"


# --------------------------------------------------------------------------- split tables
class SplitEntry(NamedTuple):
    """One non-blank cell of a split CSV."""

    slide: str
    label: int | None
    line: int
    column: int  # 1-based


def is_split_header(header: Sequence[str]) -> bool:
    """True for the official/CLAM layout: a ``train`` column and a ``val`` or ``test`` one."""
    h = [c.strip().lower() for c in header]
    return "train" in h and ("val" in h or "test" in h)


def is_folds_header(header: Sequence[str]) -> bool:
    """True for the folds CSV layout of :func:`write_folds_csv`."""
    h = [c.strip().lower() for c in header]
    return "slide_id" in h and any(c.startswith("fold_") for c in h)


def read_split_table(csv_path: PathLike) -> dict[str, list[SplitEntry]]:
    """Parse an official MMIL/TransMIL (or CLAM ``splits_k``) split CSV without touching data.

    Short columns are padded: a blank cell or one that pandas reads as missing (``NaN``,
    ``nan``, ``None``, ...: :func:`is_padding`) is no slide. Labels may be written as floats
    (``1.0``, as pandas writes a column padded with NaN).

    Returns ``{"train": [...], "val": [...], "test": [...]}`` (missing columns give empty
    lists); labels are ``None`` when the CSV has no ``<split>_label`` column.
    """
    path = Path(csv_path)
    header, rows = _read_table(path, "split CSV")
    if not is_split_header(header):
        raise SparsemilError(
            f"split CSV {path}: header {','.join(header)!r} has no 'train' and 'val'/'test' "
            f"columns; fix: use the official layout train,train_label,val,val_label,test,"
            f"test_label (or CLAM's train,val,test with a labels CSV)"
        )
    out: dict[str, list[SplitEntry]] = {k: [] for k in SPLIT_NAMES}
    for name in SPLIT_NAMES:
        if name not in header:
            continue
        j = header.index(name)
        jl = header.index(f"{name}_label") if f"{name}_label" in header else None
        for line, row in rows:
            slide = _cell(row, j)
            if is_padding(slide):
                if jl is not None and not is_padding(_cell(row, jl)):
                    raise SparsemilError(
                        f"split CSV {path}:{line}:{jl + 1}: {name}_label is set but {name} is "
                        f"blank; fix: fill in the slide name or clear the label"
                    )
                continue
            label = None
            if jl is not None:
                cell = _cell(row, jl)
                if is_padding(cell):
                    raise SparsemilError(
                        f"split CSV {path}:{line}:{jl + 1}: {name} slide {slide!r} has no "
                        f"{name}_label ({cell or 'blank'}); fix: fill in its class label"
                    )
                label = parse_int(cell)
                if label is None:
                    raise SparsemilError(
                        f"split CSV {path}:{line}:{jl + 1}: {name}_label {cell!r} of slide "
                        f"{slide!r} is not an integer; fix: write integer class labels "
                        f"0..n_classes-1"
                    )
            out[name].append(SplitEntry(slide, label, line, j + 1))
    if not any(out.values()):
        raise SparsemilError(f"split CSV {path} lists no slides; fix: fill in the split columns")
    return out


def read_official_split(
    csv: PathLike,
    data_dir: PathLike,
    *,
    suffixes: Sequence[str] = (".h5", ".pt"),
    check_exists: bool = True,
) -> dict[str, list[tuple[Path, int]]]:
    """Resolve an official MMIL/TransMIL split CSV to feature files.

    Each entry maps to ``<data_dir>/<entry>.h5`` (else ``.pt``), as the official loader joins
    it; else it is looked up by name in ``data_dir``, CLAM's ``h5_files``/``pt_files`` and
    the other sub-folders, falling back to its last path component
    (:func:`find_bag_file`; a WSI suffix such as ``.tif`` is dropped).

    Returns:
        ``{"train": [(path, label), ...], "val": [...], "test": [...]}``.

    Raises:
        SparsemilError: a row names a slide with no feature file (the message names the
            split CSV, the row and the missing path), or the CSV has no label columns.
    """
    path = Path(csv)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SparsemilError(
            f"data folder {data_dir} (for split CSV {path}) does not exist; fix: pass the folder "
            f"holding the per-slide feature files"
        )
    table = read_split_table(path)
    index = bag_file_index(data_dir, suffixes)
    folders: dict[Path, dict[str, Path]] = {}
    out: dict[str, list[tuple[Path, int]]] = {}
    for name, entries in table.items():
        out[name] = []
        for e in entries:
            if e.label is None:
                raise SparsemilError(
                    f"split CSV {path}: no {name}_label column; fix: use the official layout "
                    f"with label columns, or give labels with a CLAM dataset CSV ('labels')"
                )
            f = find_bag_file(e.slide, data_dir, index, suffixes, folders)
            if f is None:
                if check_exists:
                    raise SparsemilError(
                        f"split CSV {path}:{e.line}: {name} slide {e.slide!r} has no feature "
                        f"file: {missing_bag_file(e.slide, data_dir, suffixes)}; fix: extract "
                        f"its features or remove the row"
                    )
                f = data_dir / (slide_name(e.slide) + suffixes[0])
            out[name].append((f, e.label))
    return out


# --------------------------------------------------------------------------- CLAM dataset CSV
class LabelRow(NamedTuple):
    """One row of a CLAM-style dataset CSV after label mapping."""

    slide_id: str
    label: int
    line: int
    case_id: str | None = None


def read_label_csv(
    csv_path: PathLike, label_map: dict[str, int] | None = None
) -> tuple[list[LabelRow], list[str] | None]:
    """Parse a CLAM-style dataset CSV (``slide_id, label``, optional ``case_id``; other
    columns ignored).

    Returns the rows with class indices (see :func:`label_indices` for string labels) and
    the class names (``None`` when the labels were integers). With a ``case_id`` column
    every row needs one: folds and hold-outs are then grouped by case.
    """
    path = Path(csv_path)
    header, rows = _read_table(path, "dataset CSV")
    missing = [c for c in ("slide_id", "label") if c not in header]
    if missing:
        raise SparsemilError(
            f"dataset CSV {path}: no {' or '.join(repr(c) for c in missing)} column (header: "
            f"{','.join(header)}); fix: use the CLAM layout with columns slide_id,label"
        )
    js, jl = header.index("slide_id"), header.index("label")
    jc = header.index("case_id") if "case_id" in header else None
    ids, raw, lines, cases = [], [], [], []
    seen: dict[str, int] = {}
    for line, row in rows:
        sid, lab = _cell(row, js), _cell(row, jl)
        if not sid:
            raise SparsemilError(f"dataset CSV {path}:{line}: blank slide_id; fix: fill it in")
        if not lab:
            raise SparsemilError(
                f"dataset CSV {path}:{line}: slide {sid!r} has a blank label; fix: fill it in "
                f"or remove the row"
            )
        if sid in seen:
            raise SparsemilError(
                f"dataset CSV {path}:{line}: slide {sid!r} repeats line {seen[sid]}; fix: list "
                f"each slide once"
            )
        seen[sid] = line
        case = _cell(row, jc) if jc is not None else None
        if jc is not None and not case:
            raise SparsemilError(
                f"dataset CSV {path}:{line}: slide {sid!r} has a blank case_id; fix: fill it in "
                f"(slides of one patient share it)"
            )
        cases.append(case)
        ids.append(sid)
        raw.append(lab)
        lines.append(line)
    if not ids:
        raise SparsemilError(f"dataset CSV {path} has no rows; fix: list slide_id,label rows")
    try:
        labels, names = label_indices(raw, label_map)
    except KeyError as exc:
        bad = exc.args[0]
        line = lines[[c.strip() for c in raw].index(bad)]
        keys = ", ".join(sorted(map(str, (label_map or {}).keys())))
        raise SparsemilError(
            f"dataset CSV {path}:{line}: label {bad!r} is not in the label mapping ({keys}); "
            f"fix: add it to the mapping"
        ) from None
    rows_out = [
        LabelRow(s, y, ln, c) for s, y, ln, c in zip(ids, labels, lines, cases, strict=True)
    ]
    return rows_out, names


def read_clam_csv(
    csv: PathLike,
    data_dir: PathLike,
    label_map: dict[str, int] | None = None,
    *,
    suffixes: Sequence[str] = (".h5", ".pt"),
    check_exists: bool = True,
) -> list[BagRef]:
    """Resolve a CLAM-style dataset CSV (``slide_id, label``) to :class:`BagRef` s.

    Each slide maps to ``<data_dir>/<slide_id>.h5`` (else ``.pt``, also in ``h5_files`` /
    ``pt_files``). String labels follow :func:`label_indices` (sorted unique names -> 0..K-1)
    unless ``label_map`` is given.
    """
    path = Path(csv)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SparsemilError(
            f"data folder {data_dir} (for dataset CSV {path}) does not exist; fix: pass the "
            f"folder holding the per-slide feature files"
        )
    index = bag_file_index(data_dir, suffixes)
    refs, _ = label_csv_refs(
        path, index, data_dir, suffixes[0], label_map, check_exists=check_exists
    )
    return refs


def label_csv_refs(
    csv_path: PathLike,
    index: dict[str, Path],
    data_dir: Path,
    suffix: str | Sequence[str],
    label_map: dict[str, int] | None = None,
    *,
    check_exists: bool = True,
) -> tuple[list[BagRef], list[str] | None]:
    """The rows of a CLAM dataset CSV as :class:`BagRef` s to the files of ``index`` (a
    :func:`bag_file_index` of ``data_dir``), and the class names (``None`` for integer
    labels). Files are found by :func:`find_bag_file` (``suffix``: one suffix or several,
    the first one named in messages). A slide without a file is an error naming the row
    (or, without ``check_exists``, points at ``<data_dir>/<slide><suffix>``)."""
    path = Path(csv_path)
    suffixes = _suffix_list(suffix)
    rows, names = read_label_csv(path, label_map)
    refs = []
    folders: dict[Path, dict[str, Path]] = {}
    for r in rows:
        f = find_bag_file(r.slide_id, data_dir, index, suffixes, folders)
        if f is None:
            if check_exists:
                raise SparsemilError(
                    f"dataset CSV {path}:{r.line}: slide {r.slide_id!r} has no feature file: "
                    f"{missing_bag_file(r.slide_id, data_dir, suffixes)}; fix: extract its "
                    f"features or remove the row"
                )
            f = data_dir / (slide_name(r.slide_id) + suffixes[0])
        refs.append(BagRef(path=f, label=r.label, slide_id=r.slide_id, case_id=r.case_id))
    return refs, names


def split_csv_refs(
    csv_path: PathLike, index: dict[str, Path], data_dir: Path, suffix: str | Sequence[str]
) -> list[BagRef]:
    """The slides of an official split CSV with label columns as :class:`BagRef` s to the
    files found by :func:`find_bag_file` (train, then val, then test; each slide once, its
    id the entry's last path component without suffix: :func:`entry_slide_id`)."""
    path = Path(csv_path)
    suffixes = _suffix_list(suffix)
    folders: dict[Path, dict[str, Path]] = {}
    seen: dict[str, BagRef] = {}
    for name, entries in read_split_table(path).items():
        for e in entries:
            if e.label is None:
                raise SparsemilError(
                    f"split CSV {path} has no {name}_label column; fix: give labels with a CLAM "
                    f"dataset CSV ('labels': slide_id,label) or use the official layout with label "
                    f"columns"
                )
            f = find_bag_file(e.slide, data_dir, index, suffixes, folders)
            if f is None:
                raise SparsemilError(
                    f"split CSV {path}:{e.line}: {name} slide {e.slide!r} has no feature "
                    f"file: {missing_bag_file(e.slide, data_dir, suffixes)}; fix: extract its "
                    f"features or remove the row"
                )
            ref = BagRef(path=f, label=e.label, slide_id=entry_slide_id(e.slide))
            old = seen.setdefault(ref.slide_id, ref)
            if Path(old.path) != Path(ref.path):
                raise SparsemilError(
                    f"split CSV {path}:{e.line}: {name} slide {e.slide!r} and an earlier row "
                    f"are both named {ref.slide_id!r} but are the files {old.path} and {f}; "
                    f"fix: give every slide a unique file name"
                )
            if old.label != ref.label:
                raise SparsemilError(
                    f"split CSV {path}: slide {ref.slide_id!r} has labels {old.label} and "
                    f"{ref.label}; fix: give each slide one label"
                )
    return list(seen.values())


# --------------------------------------------------------------------------- k-fold
def stratified_holdout(
    idx: np.ndarray,
    labels: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """The one validation hold-out rule: a stratified subset of ``idx`` (sorted int64).

    Each class with ``n_c`` members in ``idx`` gives ``round(fraction * n_c)`` of them, at
    least one when ``n_c >= 2`` and never all (none when ``n_c == 1``), drawn with ``rng``
    (classes in increasing order). ``fraction <= 0`` holds out nothing. With ``groups``
    (one case id per bag) the members are the cases -- a case's class is its largest bag
    label -- and a held-out case takes all its bags, so no patient is on both sides.
    """
    idx = np.asarray(idx, dtype=np.int64)
    y = np.asarray(labels)
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    if groups is not None:
        g = np.asarray(groups)[idx]
        cases, inverse = np.unique(g, return_inverse=True)
        case_y = np.zeros(cases.size, dtype=np.int64)
        np.maximum.at(case_y, inverse, y[idx].astype(np.int64))
        picked = stratified_holdout(np.arange(cases.size), case_y, fraction, rng)
        return np.sort(idx[np.isin(inverse, picked)]).astype(np.int64)
    chosen = []
    for c in np.unique(y[idx]):
        members = idx[y[idx] == c]
        n_c = members.size
        k = int(round(fraction * n_c))
        if n_c >= 2:
            k = min(max(k, 1), n_c - 1)
        else:
            k = 0
        if k:
            chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def case_groups(bags: Any) -> np.ndarray | None:
    """One case id per bag when any bag has a ``case_id`` (a bag without one is its own
    case), else ``None`` (folds are then drawn per slide)."""
    cases = [getattr(b, "case_id", None) for b in getattr(bags, "bags", [])]
    if not any(c is not None for c in cases):
        return None
    ids = [str(b.slide_id) for b in bags.bags]
    return np.array([c if c is not None else f"slide:{s}" for c, s in zip(cases, ids, strict=True)])


def check_cases_not_split(folds: Sequence[Fold], groups: np.ndarray | None, where: str) -> None:
    """Refuse folds that put one case (patient) in two of train/val/test.

    Raises:
        SparsemilError: naming the case, the fold and its slides' parts.
    """
    if groups is None:
        return
    groups = np.asarray(groups)
    for fold in folds:
        seen: dict[str, str] = {}
        for name, part in zip(SPLIT_NAMES, fold, strict=True):
            for case in np.unique(groups[np.asarray(part, dtype=np.int64)]):
                if case in seen and seen[case] != name:
                    raise SparsemilError(
                        f"{where}: fold {fold.index} puts case {str(case)!r} in both "
                        f"{seen[case]} and {name}; its slides would leak between training and "
                        f"evaluation; fix: assign every slide of a case to one part"
                    )
                seen[case] = name


def _fold_rng(seed: int, fold: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(fold)])


def stratified_kfold(
    labels: Sequence[int] | np.ndarray,
    n_splits: int,
    seed: int,
    val_fraction: float = 0.1,
    groups: Sequence[str] | np.ndarray | None = None,
) -> list[Fold]:
    """Seeded stratified k-fold splits with a stratified validation part.

    With ``groups`` (one case/patient id per bag) the folds are
    ``sklearn.model_selection.StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed)`` and the validation part holds out whole cases: no case is ever on
    two sides of a fold. Otherwise:

    The test parts are the folds of ``sklearn.model_selection.StratifiedKFold(n_splits,
    shuffle=True, random_state=seed)``; from each fold's training part, each class gives
    ``round(val_fraction * n_c)`` bags to validation (at least one when it has two or more,
    never all: :func:`stratified_holdout`), drawn with ``numpy.random.default_rng([seed,
    fold])``.

    Returns:
        ``n_splits`` :class:`Fold` s ``(train_idx, val_idx, test_idx)``: disjoint, covering
        all bags, every bag in exactly one test part.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise SparsemilError(f"stratified_kfold needs a 1-D list of labels, got shape {y.shape}")
    y = y.astype(np.int64)
    if isinstance(n_splits, bool) or int(n_splits) != n_splits or n_splits < 2:
        raise SparsemilError(
            f"number of folds must be an integer >= 2, got {n_splits!r}; fix: set 'folds' to 2 or "
            f"more"
        )
    n_splits = int(n_splits)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise SparsemilError(f"val_fraction must be in [0, 1), got {val_fraction}")
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise SparsemilError(
            f"all {y.size} bags have label {classes[0]}; stratified splits need at least two "
            f"classes; fix: check the labels"
        )
    if counts.min() < n_splits:
        c, k = int(classes[counts.argmin()]), int(counts.min())
        fix = (
            f"set 'folds' to {k} or fewer, or add bags of class {c}"
            if k >= 2
            else f"add bags of class {c} (stratified CV needs at least 2 per class) or check its "
            "label"
        )
        raise SparsemilError(
            f"class {c} has only {k} bag{'s' if k != 1 else ''}, fewer than the {n_splits} "
            f"folds; fix: {fix}"
        )
    g = None if groups is None else np.asarray(groups)
    if g is not None:
        from sklearn.model_selection import StratifiedGroupKFold

        n_cases = np.unique(g).size
        if n_cases < n_splits:
            raise SparsemilError(
                f"only {n_cases} cases (case_id) for {n_splits} folds; fix: set 'folds' to "
                f"{max(2, n_cases)} or fewer"
            )
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
        parts = splitter.split(np.zeros((y.size, 1)), y, g)
    else:
        skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
        parts = skf.split(np.zeros((y.size, 1)), y)
    folds = []
    for f, (trval, test) in enumerate(parts):
        trval = np.asarray(trval, dtype=np.int64)
        val = stratified_holdout(trval, y, float(val_fraction), _fold_rng(seed, f), g)
        folds.append(Fold(np.setdiff1d(trval, val), val, test, index=f))
    return folds


def _check_folds(folds: Sequence[Fold], n: int, where: str) -> None:
    for f, fold in enumerate(folds):
        parts = [np.asarray(p, dtype=np.int64) for p in fold]
        allidx = np.concatenate(parts)
        if allidx.size and (allidx.min() < 0 or allidx.max() >= n):
            raise SparsemilError(f"{where}: fold {f} has an index outside 0..{n - 1}")
        if np.unique(allidx).size != allidx.size:
            raise SparsemilError(f"{where}: fold {f} puts a bag in two of train/val/test")


def write_folds_csv(
    path: PathLike,
    folds: Sequence[Fold],
    slide_ids: Sequence[str],
    labels: Sequence[int] | None = None,
    case_ids: Sequence[str] | None = None,
) -> Path:
    """Write folds as ``slide_id[,case_id][,label],fold_0,...`` with cells
    train/val/test/blank (atomic). The ``case_id`` column says the folds were grouped by
    case."""
    path = Path(path)
    n = len(slide_ids)
    if len(set(map(str, slide_ids))) != n:
        raise SparsemilError(f"{path}: slide ids must be unique to write a folds CSV")
    if labels is not None and len(labels) != n:
        raise SparsemilError(f"{path}: {len(labels)} labels for {n} slide ids")
    _check_folds(folds, n, str(path))
    cells = np.full((n, len(folds)), "", dtype=object)
    for f, fold in enumerate(folds):
        for name, part in zip(SPLIT_NAMES, fold, strict=True):
            cells[np.asarray(part, dtype=np.int64), f] = name
    header = ["slide_id"] + (["case_id"] if case_ids is not None else [])
    header += ["label"] if labels is not None else []
    header += [f"fold_{f}" for f in range(len(folds))]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for i in range(n):
            row = [str(slide_ids[i])] + ([str(case_ids[i])] if case_ids is not None else [])
            row += [str(int(labels[i]))] if labels is not None else []
            w.writerow(row + list(cells[i]))
    return path


def read_folds_csv(path: PathLike, slide_ids: Sequence[str] | None = None) -> Folds:
    """Read a folds CSV written by :func:`write_folds_csv`.

    Args:
        slide_ids: when given, indices refer to this order (the data's), and every data
            slide must be in the CSV and vice versa.

    Returns:
        :class:`Folds` (a ``list[Fold]``) with ``.slide_ids`` (and ``.labels`` if the CSV
        has a ``label`` column).
    """
    path = Path(path)
    table = _parse_folds_table(path)
    order, out_ids = list(range(len(table.ids))), table.ids
    if slide_ids is not None:
        order, out_ids = _data_order(path, table.ids, table.lines, slide_ids)
    folds = []
    for f in range(table.n_folds):
        parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
        for r, vals in enumerate(table.cells):
            if vals[f]:
                parts[vals[f]].append(order[r])
        folds.append(Fold(*(np.array(parts[k], dtype=np.int64) for k in SPLIT_NAMES), index=f))
    labels = None
    if table.labels is not None:
        labels = np.zeros(len(out_ids), dtype=np.int64)
        labels[np.array(order, dtype=np.int64)] = table.labels
    return Folds(folds, out_ids, labels)


class _FoldsTable(NamedTuple):
    ids: list[str]
    labels: list[int] | None  # None without a label column
    cells: list[list[str]]  # per row: train/val/test/"" per fold
    lines: dict[str, int]  # line of each slide
    n_folds: int


def _parse_folds_table(path: Path) -> _FoldsTable:
    """The rows of a folds CSV, every cell checked."""
    header, rows = _read_table(path, "folds CSV")
    if not is_folds_header(header):
        raise SparsemilError(
            f"folds CSV {path}: header {','.join(header)!r} lacks slide_id and fold_0..; fix: "
            f"write it with write_folds_csv / `sparsemil mil cv`"
        )
    js = header.index("slide_id")
    jl = header.index("label") if "label" in header else None
    fold_cols = sorted(
        (int(c[5:]), j) for j, c in enumerate(header) if c.startswith("fold_") and c[5:].isdigit()
    )
    if [k for k, _ in fold_cols] != list(range(len(fold_cols))):
        raise SparsemilError(f"folds CSV {path}: fold columns must be fold_0..fold_{{k-1}}")
    ids: list[str] = []
    labs: list[int] = []
    assign: list[list[str]] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        sid = _cell(row, js)
        if not sid:
            raise SparsemilError(f"folds CSV {path}:{line}: blank slide_id; fix: fill it in")
        if sid in seen:
            raise SparsemilError(f"folds CSV {path}:{line}: slide {sid!r} repeats line {seen[sid]}")
        seen[sid] = line
        if jl is not None:
            v = parse_int(_cell(row, jl))
            if v is None:
                raise SparsemilError(
                    f"folds CSV {path}:{line}:{jl + 1}: label {_cell(row, jl)!r} is not an integer"
                )
            labs.append(v)
        vals = [_cell(row, j).lower() for _, j in fold_cols]
        for (_, j), v in zip(fold_cols, vals, strict=True):
            if v not in ("", *SPLIT_NAMES):
                raise SparsemilError(
                    f"folds CSV {path}:{line}:{j + 1}: {v!r} is not train/val/test/blank"
                )
        ids.append(sid)
        assign.append(vals)
    return _FoldsTable(ids, labs if jl is not None else None, assign, seen, len(fold_cols))


def _data_order(
    path: Path, ids: list[str], seen: dict[str, int], slide_ids: Sequence[str]
) -> tuple[list[int], list[str]]:
    """Position in ``slide_ids`` of each CSV row; the CSV must list exactly those slides."""
    want = [str(s) for s in slide_ids]
    pos = {s: i for i, s in enumerate(want)}
    extra = [s for s in ids if s not in pos]
    if extra:
        raise SparsemilError(
            f"folds CSV {path}:{seen[extra[0]]}: slide {extra[0]!r} is not in the data "
            f"({len(extra)} such); fix: use the folds CSV written for this data set"
        )
    absent = [s for s in want if s not in seen]
    if absent:
        raise SparsemilError(
            f"folds CSV {path} has no row for slide {absent[0]!r} ({len(absent)} such); fix: "
            f"use the folds CSV written for this data set"
        )
    return [pos[s] for s in ids], want


# --------------------------------------------------------------------------- folds of a run
def split_csv_folds(
    split_csv: PathLike,
    bags: Sequence[BagRef | Bag],
    index: dict[str, Path] | None = None,
    data_dir: Path | None = None,
    suffix: str | Sequence[str] = ".h5",
    notes: list[str] | None = None,
) -> list[Fold]:
    """Predefined folds (indices into ``bags``) from a split CSV or a folds CSV.

    An official/CLAM split CSV gives one fold; its slides must be bags and its labels (if
    any) must agree with theirs. ``index``/``data_dir``/``suffix`` (the feature-file index
    of a folder) only make the message for an unknown slide more precise; a val/test
    overlap (as in some official splits) is allowed and reported in ``notes``.
    """
    split_csv = Path(split_csv)
    ids = [b.slide_id for b in bags]
    if is_folds_header(_read_table(split_csv, "split CSV")[0]):
        return list(read_folds_csv(split_csv, slide_ids=ids))
    table = read_split_table(split_csv)
    pos: dict[str, int] = {}
    for key in (lambda s: s.strip(), slide_name, entry_slide_id):
        for i, s in enumerate(ids):
            pos.setdefault(key(s), i)
    parts: dict[str, set[int]] = {k: set() for k in SPLIT_NAMES}
    for name, entries in table.items():
        for e in entries:
            keys = (e.slide.strip(), slide_name(e.slide), entry_slide_id(e.slide))
            i = next((pos[k] for k in keys if k in pos), None)
            if i is None:
                why = _why_not_a_bag(e.slide, index, data_dir, suffix)
                raise SparsemilError(
                    f"split CSV {split_csv}:{e.line}: {name} slide {e.slide!r} is not in the data "
                    f"({why}); fix: extract its features / list it, or remove the row"
                )
            if e.label is not None and e.label != bags[i].label:
                raise SparsemilError(
                    f"split CSV {split_csv}:{e.line}: {name} slide {e.slide!r} has label "
                    f"{e.label} but the data says {bags[i].label}; fix: make the labels agree"
                )
            parts[name].add(i)
    for a, b in (("train", "val"), ("train", "test")):
        both = parts[a] & parts[b]
        if both:
            raise SparsemilError(
                f"split CSV {split_csv}: slide {ids[min(both)]!r} is in both {a} and {b} "
                f"({len(both)} such); fix: make the splits disjoint"
            )
    if parts["val"] & parts["test"] and notes is not None:
        notes.append(
            f"split CSV {split_csv}: {len(parts['val'] & parts['test'])} slides are in both val "
            f"and test (as in some official splits)"
        )
    return [Fold(*(np.array(sorted(parts[k]), dtype=np.int64) for k in SPLIT_NAMES))]


def _why_not_a_bag(
    slide: str,
    index: dict[str, Path] | None,
    data_dir: Path | None,
    suffix: str | Sequence[str],
) -> str:
    if data_dir is None:
        return "no bag has this id"
    suffixes = _suffix_list(suffix)
    f = find_bag_file(slide, data_dir, index or {}, suffixes)
    if f is None:
        return missing_bag_file(slide, data_dir, suffixes)
    return f"{f} exists but the slide is not in the dataset CSV"


def _suffix_list(suffix: str | Sequence[str]) -> tuple[str, ...]:
    out = (suffix,) if isinstance(suffix, str) else tuple(suffix)
    return out or (".h5",)


def replay_folds(bags: LabelledBags, folds_csv: PathLike) -> list[Fold]:
    """The folds of an earlier run's ``folds.csv`` (:func:`write_folds_csv`), as indices
    into ``bags``.

    The CSV must list exactly the bags' slide ids (and, when it has a ``label`` column, the
    same labels); anything else is a one-line error naming the file.
    """
    path = Path(folds_csv)
    if not path.is_file():
        raise SparsemilError(f"folds CSV {path} does not exist; fix: check 'folds_csv'")
    ids = list(bags.slide_ids)
    if len(set(ids)) != len(ids):
        dup = next(s for i, s in enumerate(ids) if s in ids[:i])
        raise SparsemilError(
            f"folds CSV {path} cannot be replayed: slide id {dup!r} occurs twice in "
            f"{bags.source}; fix: give every bag a unique id"
        )
    read = read_folds_csv(path, slide_ids=ids)
    labels = np.asarray(bags.labels)
    if read.labels is not None:
        bad = np.flatnonzero(np.asarray(read.labels) != labels)
        if bad.size:
            i = int(bad[0])
            raise SparsemilError(
                f"folds CSV {path}: slide {ids[i]!r} has label {int(read.labels[i])} but "
                f"{bags.source} says {int(labels[i])} ({bad.size} such); fix: use the folds "
                f"CSV written for this data set"
            )
    if not read:
        raise SparsemilError(
            f"folds CSV {path} has no fold_0.. columns; fix: use a folds.csv written by mil cv"
        )
    return list(read)


def run_folds(
    bags: LabelledBags,
    n_folds: int,
    seed: int,
    val_fraction: float,
    folds_csv: PathLike | None = None,
) -> list[Fold]:
    """The folds a cross-validation runs: replayed from ``folds_csv`` when given, else
    :func:`stratified_kfold` over all bags (a predefined split is not used for CV), grouped
    by case when the bags carry ``case_id`` s (:func:`case_groups`)."""
    if folds_csv:
        if bags.splits is not None:
            raise SparsemilError(
                f"folds_csv {folds_csv} cannot be combined with the predefined split of "
                f"{bags.source}; fix: drop one of them"
            )
        folds = replay_folds(bags, folds_csv)
        check_cases_not_split(folds, case_groups(bags), f"folds CSV {folds_csv}")
        return folds
    return stratified_kfold(bags.labels, n_folds, seed, val_fraction, case_groups(bags))


def holdout_fold(
    bags: LabelledBags,
    fold: int,
    n_folds: int,
    seed: int,
    val_fraction: float,
    folds_csv: PathLike | None = None,
) -> Fold:
    """The one split a single training run uses.

    Fold ``fold`` of ``folds_csv`` when given; else the bags' predefined split (fold
    ``fold`` of several), its validation part drawn from its training part with
    :func:`stratified_holdout` (seed ``[seed, fold]``) when it has none; else fold ``fold``
    of :func:`stratified_kfold` with ``n_folds`` folds.
    """
    if folds_csv:
        folds = run_folds(bags, n_folds, seed, val_fraction, folds_csv)
        if fold >= len(folds):
            raise SparsemilError(
                f"fold {fold} is out of range: folds CSV {folds_csv} has {len(folds)} folds "
                f"(0..{len(folds) - 1})"
            )
        return folds[fold]
    if bags.splits is not None:
        splits = bags.splits
        if len(splits) > 1 and fold >= len(splits):
            raise SparsemilError(
                f"fold {fold} is out of range: {bags.source} has {len(splits)} predefined "
                f"folds (0..{len(splits) - 1})"
            )
        pick = splits[fold] if len(splits) > 1 else splits[0]
        if not pick.train.size:
            raise SparsemilError(
                f"{bags.source}: the predefined split lists no train slides; fix: fill in its "
                f"train column"
            )
        groups = case_groups(bags)
        check_cases_not_split([pick], groups, f"the predefined split of {bags.source}")
        if pick.val.size:
            return pick
        val = stratified_holdout(
            pick.train, bags.labels, val_fraction, _fold_rng(seed, pick.index), groups
        )
        return dataclasses.replace(pick, train=np.setdiff1d(pick.train, val), val=val)
    return stratified_kfold(bags.labels, n_folds, seed, val_fraction, case_groups(bags))[fold]
