"""From a :class:`~sparsemil.train.config.MILTrainConfig` to validated bags, splits and loaders.

Everything here runs before any training starts, so bad input fails fast with a one-line
:class:`~sparsemil.errors.SparsemilError` and no output.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsemil.data.bags import Bag, BagDataset, BagRef, as_bag
from sparsemil.errors import SparsemilError
from sparsemil.train.config import FOLDER_FORMATS, MILTrainConfig


@dataclass
class MILData:
    """Bags plus what the trainer needs to know about them.

    Attributes:
        bags: in-memory bags or lazy per-slide references.
        in_dim: C, the feature dimension.
        n_classes: K.
        source: a short description for messages and metrics.json.
        split: train/val/test indices from a split file, or ``None`` (then folds are drawn).
        standardize: whether to z-score features with training statistics.
    """

    bags: list[Bag | BagRef]
    in_dim: int
    n_classes: int
    source: str
    split: dict[str, list[int]] | None = None
    standardize: bool = False

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(b.label) for b in self.bags], dtype=np.int64)

    @property
    def slide_ids(self) -> list[str]:
        return [b.slide_id for b in self.bags]


@dataclass
class Fold:
    """Indices into ``MILData.bags`` for one train/val/test split."""

    train: list[int]
    val: list[int]
    test: list[int]
    index: int = 0
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- format detection
def _sniff_header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as fh:
            row = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError) as err:
        raise SparsemilError(f"data file {path} cannot be read ({err}); check the path") from None
    return [c.strip().lower() for c in row]


def detect_format(cfg: MILTrainConfig) -> str:
    """Resolve ``format: auto`` from the ``data`` path."""
    if cfg.format != "auto":
        return cfg.format
    from sparsemil.data.mil_benchmarks import MIL_BENCHMARKS

    data = str(cfg.data)
    if data.lower() in MIL_BENCHMARKS:
        return "mil-csv"
    path = Path(data)
    if path.is_dir():
        return "folder"
    header = _sniff_header(path)
    if {"train", "train_label"} <= set(header):
        return "split"
    if "slide_id" in header and "label" in header:
        return "clam"
    from sparsemil.data.sources import guess_format

    try:
        guessed = guess_format(path)[0]
    except SparsemilError:
        guessed = "mil-csv"  # read_mil_csv names the problem
    return "dsmil-csv" if guessed == "dsmil-csv" else "mil-csv"


def _resolve_data_path(cfg: MILTrainConfig) -> Path:
    from sparsemil.data.mil_benchmarks import MIL_BENCHMARKS, mil_csv_path

    if cfg.data is None:
        raise SparsemilError("no data given; pass --data PATH (or set 'data' in the config)")
    if str(cfg.data).lower() in MIL_BENCHMARKS and not Path(cfg.data).exists():
        return mil_csv_path(str(cfg.data))
    path = Path(cfg.data)
    if not path.exists():
        raise SparsemilError(
            f"data path {path} does not exist; fix the path (or use a benchmark name: "
            f"{', '.join(MIL_BENCHMARKS)})"
        )
    return path


def _refs_from_pairs(pairs: Sequence[Any]) -> list[BagRef]:
    refs = []
    for item in pairs:
        if isinstance(item, BagRef):
            refs.append(item)
        else:
            p = Path(item[0])
            refs.append(BagRef(path=p, label=int(item[1]), slide_id=p.stem))
    return refs


def _check_refs(refs: Sequence[BagRef], n_classes: int, source: str) -> int:
    """Validate every referenced file (exists, readable, non-empty, finite, one C, labels in
    range) before training; returns C."""
    from sparsemil.data.readers import bag_info
    from sparsemil.data.validate import validate_bags

    validate_bags(list(refs), n_classes=n_classes, source=source, deep=True)
    return int(bag_info(refs[0].path)[1])


def load_mil_data(cfg: MILTrainConfig) -> MILData:
    """Read and validate the bags named by ``cfg`` (see :class:`MILTrainConfig`)."""
    from sparsemil.data.validate import validate_bags

    fmt = detect_format(cfg)
    path = _resolve_data_path(cfg)
    k = int(cfg.n_classes)
    if fmt == "mil-csv":
        if path.is_dir():
            raise SparsemilError(f"--format mil-csv needs one CSV file, but {path} is a folder")
        from sparsemil.data.readers import read_mil_csv

        bags: list[Bag | BagRef] = list(read_mil_csv(path))
        validate_bags(bags, n_classes=k, source=str(path))
        std = True if cfg.standardize is None else bool(cfg.standardize)
        return MILData(bags, bags[0].dim, k, str(path), None, std)
    std = False if cfg.standardize is None else bool(cfg.standardize)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else path.parent
    if not data_dir.is_dir():
        raise SparsemilError(f"data_dir {data_dir} is not a folder; fix --data-dir")
    if fmt == "split":
        from sparsemil.data.splits import read_official_split

        parts = read_official_split(path, data_dir)
        refs: list[BagRef] = []
        split: dict[str, list[int]] = {}
        seen: dict[str, int] = {}
        for name in ("train", "val", "test"):
            idx = []
            for ref in _refs_from_pairs(parts.get(name) or []):
                key = str(ref.path)
                if key not in seen:
                    seen[key] = len(refs)
                    refs.append(ref)
                idx.append(seen[key])
            split[name] = idx
        if not split["train"]:
            raise SparsemilError(f"split {path}: the 'train' column lists no slides; add rows")
        c = _check_refs(refs, k, str(path))
        return MILData(list(refs), c, k, str(path), split, std)
    if fmt == "clam":
        from sparsemil.data.splits import read_clam_csv

        refs = _refs_from_pairs(read_clam_csv(path, data_dir))
        if not refs:
            raise SparsemilError(f"{path}: the dataset CSV lists no slides; add rows")
        c = _check_refs(refs, k, str(path))
        return MILData(list(refs), c, k, str(path), None, std)
    if fmt in FOLDER_FORMATS:
        return _load_folder(cfg, fmt, path, k, std)
    raise SparsemilError(f"--format {fmt!r} is not supported for {path}; pass --format auto")


def _load_folder(cfg: MILTrainConfig, fmt: str, path: Path, k: int, std: bool) -> MILData:
    """Per-slide ``.h5``/``.pt``/DSMIL ``.csv`` files (or a DSMIL bag list) through
    :func:`sparsemil.data.sources.load_bag_source`: bags stay lazy :class:`BagRef` s and are
    validated now (``.h5`` values up front for folders up to ``DEEP_CHECK_BYTES``, else as
    each bag is loaded)."""
    from sparsemil.data.sources import load_bag_source

    if path.is_dir():
        if not cfg.labels:
            raise SparsemilError(
                f"--data {path} is a folder of per-slide files but no labels were given; pass "
                f"--labels labels.csv (columns slide_id,label)"
            )
    elif fmt == "dsmil-csv":
        if cfg.labels:
            raise SparsemilError(
                f"--labels {cfg.labels} is not used with the DSMIL bag list {path} (labels are "
                f"its column 2); drop --labels"
            )
    else:
        raise SparsemilError(
            f"--format {fmt} needs a folder of per-slide feature files, but {path} is a file; "
            f"pass the folder as --data (or use --format clam/split for a CSV)"
        )
    if cfg.labels and not Path(cfg.labels).is_file():
        raise SparsemilError(f"labels CSV {cfg.labels} does not exist; fix --labels")
    src = load_bag_source(
        path,
        format="auto" if fmt == "folder" else fmt,
        n_classes=k,
        label_csv=cfg.labels if path.is_dir() else None,
    )
    return MILData(list(src.bags), int(src.dim), k, str(path), None, std)


# --------------------------------------------------------------------------- splits
def _inner_val(
    train: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Hold out a stratified ``fraction`` of ``train`` for validation (split files without
    a validation column); at least one bag per class when the class has two or more."""
    if fraction <= 0 or len(train) < 4:
        return [int(i) for i in train], []
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(labels[train]):
        members = train[labels[train] == c]
        members = members[rng.permutation(len(members))]
        n_val = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        val.extend(int(i) for i in members[:n_val])
    val_set = set(val)
    return [int(i) for i in train if int(i) not in val_set], sorted(val)


def cv_folds(data: MILData, n_folds: int, seed: int, val_fraction: float) -> list[Fold]:
    """Stratified k-fold test folds with a stratified validation part of each training part
    (:func:`sparsemil.data.splits.stratified_kfold`)."""
    from sparsemil.data.splits import stratified_kfold

    folds = []
    for i, (train, val, test) in enumerate(
        stratified_kfold(data.labels, n_folds, seed, val_fraction)
    ):
        folds.append(
            Fold([int(j) for j in train], [int(j) for j in val], [int(j) for j in test], index=i)
        )
    return folds


def replay_folds(data: MILData, folds_csv: str | Path) -> list[Fold]:
    """The folds of an earlier run's ``folds.csv``
    (:func:`sparsemil.data.splits.write_folds_csv`), as indices into ``data.bags``.

    The CSV must list exactly the data's slide ids (and, when it has a ``label`` column, the
    same labels); anything else is a one-line error naming the file.
    """
    from sparsemil.data.splits import read_folds_csv

    path = Path(folds_csv)
    if not path.is_file():
        raise SparsemilError(f"folds CSV {path} does not exist; fix --folds-csv")
    ids = data.slide_ids
    if len(set(ids)) != len(ids):
        dup = next(s for i, s in enumerate(ids) if s in ids[:i])
        raise SparsemilError(
            f"folds CSV {path} cannot be replayed: slide id {dup!r} occurs twice in "
            f"{data.source}; give every bag a unique id"
        )
    read = read_folds_csv(path, slide_ids=ids)
    if read.labels is not None:
        bad = np.flatnonzero(np.asarray(read.labels) != data.labels)
        if bad.size:
            i = int(bad[0])
            raise SparsemilError(
                f"folds CSV {path}: slide {ids[i]!r} has label {int(read.labels[i])} but "
                f"{data.source} says {int(data.labels[i])} ({bad.size} such); use the folds "
                f"CSV written for this data set"
            )
    if not read:
        raise SparsemilError(f"folds CSV {path} has no fold_0.. columns; fix --folds-csv")
    return [
        Fold(
            [int(j) for j in f.train],
            [int(j) for j in f.val],
            [int(j) for j in f.test],
            index=i,
            info={"folds_csv": str(path)},
        )
        for i, f in enumerate(read)
    ]


def run_folds(data: MILData, cfg: MILTrainConfig) -> list[Fold]:
    """The folds ``mil cv`` runs: replayed from ``cfg.folds_csv``, else drawn with
    :func:`cv_folds` (``cfg.folds``, ``cfg.seed``)."""
    if cfg.folds_csv:
        if data.split is not None:
            raise SparsemilError(
                f"--folds-csv {cfg.folds_csv} cannot be combined with the split CSV "
                f"{data.source}; drop one of them"
            )
        return replay_folds(data, cfg.folds_csv)
    return cv_folds(data, cfg.folds, cfg.seed, cfg.val_fraction)


def holdout_fold(data: MILData, cfg: MILTrainConfig) -> Fold:
    """The split ``mil train`` uses: the split file's, else fold ``cfg.fold`` of
    ``cfg.folds_csv`` or of ``cfg.folds`` freshly drawn folds."""
    if cfg.folds_csv:
        folds = run_folds(data, cfg)
        if cfg.fold >= len(folds):
            raise SparsemilError(
                f"--fold {cfg.fold} is out of range: folds CSV {cfg.folds_csv} has "
                f"{len(folds)} folds (0..{len(folds) - 1})"
            )
        return folds[cfg.fold]
    if data.split is not None:
        s = data.split
        train = np.asarray(s["train"], dtype=np.int64)
        if s.get("val"):
            return Fold(list(map(int, train)), list(s["val"]), list(s.get("test", [])))
        tr, va = _inner_val(train, data.labels, cfg.val_fraction, cfg.seed)
        return Fold(tr, va, list(s.get("test", [])))
    return cv_folds(data, cfg.folds, cfg.seed, cfg.val_fraction)[cfg.fold]


# --------------------------------------------------------------------------- standardisation
@dataclass
class Standardizer:
    """Per-feature z-scoring ``(x - mean) / std`` with statistics of the training instances."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, bags: Sequence[Bag | BagRef], indices: Sequence[int]) -> Standardizer:
        total = None
        sq = None
        n = 0
        for i in indices:
            x = np.asarray(as_bag(bags[i]).features, dtype=np.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
            n += x.shape[0]
        if total is None or n == 0:
            raise SparsemilError("cannot standardise: the training split has no instances")
        mean = total / n
        var = np.maximum(sq / n - mean * mean, 0.0)
        std = np.sqrt(var)
        std[std < 1e-8] = 1.0  # constant features stay constant (0 after centring)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def to_meta(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Standardizer | None:
        if not meta:
            return None
        return cls(np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype)
        std = torch.as_tensor(self.std, dtype=x.dtype)
        return (x - mean) / std


class MILDataset(Dataset):
    """:class:`~sparsemil.data.bags.BagDataset` with optional standardisation."""

    def __init__(
        self,
        bags: Sequence[Bag | BagRef],
        indices: Sequence[int],
        standardizer: Standardizer | None = None,
    ) -> None:
        self.base = BagDataset(bags, indices)
        self.standardizer = standardizer

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if self.standardizer is not None:
            item["X"] = self.standardizer(item["X"])
        return item

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels
