"""Validate bags before any training starts.

:func:`validate_bags` checks, over all bags: the data files exist and are readable, no bag
is empty, no feature is NaN/Inf, all bags share one feature dimension, and every label is
in ``0..n_classes-1``. The first problem found becomes a one-line
:class:`~sparsemil.errors.SparsemilError` that names the bag, its file and the fix (and
how many other bags share the problem).

For :class:`~sparsemil.data.bags.BagRef` s to ``.h5`` files only the dataset shapes are
read (fast, for folders of thousands of slides); their values are checked when each bag
is loaded (:meth:`BagRef.load`) or here with ``deep=True``. ``.pt`` and ``.csv`` files
have no cheap shape probe, so they are read in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparsemil.data.bags import Bag, BagRef
from sparsemil.data.readers import h5_info
from sparsemil.errors import SparsemilError


def _more(k: int) -> str:
    return f" (and {k} more bag{'s' if k != 1 else ''} with the same problem)" if k else ""


def _empty_msg(source: str, where: str) -> str:
    return (
        f"{source}: bag {where} is empty (0 instances); fix: drop the slide from the dataset/"
        f"split CSV or re-run feature extraction for it"
    )


def _nonfinite_msg(source: str, where: str, feats: np.ndarray) -> str | None:
    bad = ~np.isfinite(feats)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    n_nan = int(np.isnan(feats).sum())
    rows = int(bad.any(axis=1).sum())
    return (
        f"{source}: bag {where} has {n_bad} non-finite feature values ({n_nan} NaN, "
        f"{n_bad - n_nan} Inf) in {rows} of its {feats.shape[0]} instances; fix: re-extract "
        f"the features or drop those instances"
    )


def check_bag_values(bag: Bag, source: str) -> None:
    """Per-bag checks that need the values: (N, C) shape, N > 0, all features finite."""
    if bag.features.ndim != 2:
        raise SparsemilError(
            f"{source}: bag {bag.where()} has features of shape {tuple(bag.features.shape)}, "
            f"expected (N, C); fix: store one (instances x features) matrix per bag"
        )
    if bag.n_instances == 0:
        raise SparsemilError(_empty_msg(source, bag.where()))
    msg = _nonfinite_msg(source, bag.where(), bag.features)
    if msg:
        raise SparsemilError(msg)


def _probe(item: Bag | BagRef, deep: bool) -> tuple[int, int, np.ndarray | None]:
    """(N, C, features-or-None) without reading h5 arrays unless ``deep``."""
    if isinstance(item, Bag):
        return item.n_instances, item.dim, item.features
    path = Path(item.path)
    if path.suffix.lower() in (".h5", ".hdf5") and not deep:
        n, c, _ = h5_info(path)
        return n, c, None
    from sparsemil.data.readers import read_bag

    bag = read_bag(path, label=item.label, slide_id=item.slide_id)
    return bag.n_instances, bag.dim, bag.features


def validate_bags(
    bags: Sequence[Bag | BagRef], n_classes: int, source: str, *, deep: bool = False
) -> None:
    """Check every bag before training; raise a one-line SparsemilError on the first problem.

    Args:
        bags: in-memory bags and/or references to per-slide files.
        n_classes: number of classes; labels must lie in ``0..n_classes-1``.
        source: what the bags came from (a file or folder), the prefix of every message.
        deep: also read the arrays of ``.h5`` references to check for NaN/Inf.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise SparsemilError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if n_classes < 2:
        raise SparsemilError(
            f"n_classes must be >= 2, got {n_classes}; fix: pass --n-classes 2 or more"
        )
    if len(bags) == 0:
        raise SparsemilError(f"{source}: no bags found; fix: check the data path and the CSVs")

    # 1. every data file exists (cheap, before any reading)
    missing = [b for b in bags if isinstance(b, BagRef) and not Path(b.path).is_file()]
    if missing:
        b = missing[0]
        raise SparsemilError(
            f"{source}: data file {b.path} of slide '{b.slide_id}' does not exist"
            f"{_more(len(missing) - 1)}; fix: check the data folder and the slide ids in the CSV"
        )

    # 2. shapes, emptiness, finiteness, one feature dimension
    first: dict[str, tuple[str, int]] = {}
    ref_dim: tuple[int, str] | None = None
    for item in bags:
        n, c, feats = _probe(item, deep)
        where = item.where()
        if feats is not None and feats.ndim != 2:
            raise SparsemilError(
                f"{source}: bag {where} has features of shape {tuple(feats.shape)}, expected "
                f"(N, C); fix: store one (instances x features) matrix per bag"
            )
        if n == 0:
            _note(first, "empty", _empty_msg(source, where))
        elif feats is not None:
            msg = _nonfinite_msg(source, where, feats)
            if msg:
                _note(first, "nonfinite", msg)
        if ref_dim is None:
            ref_dim = (c, where)
        elif c != ref_dim[0]:
            _note(
                first,
                "dim",
                f"{source}: feature dimension mismatch: bag {where} has {c} features per "
                f"instance but bag {ref_dim[1]} has {ref_dim[0]}; fix: extract every bag with "
                f"the same feature extractor",
            )
    for kind in ("empty", "nonfinite", "dim"):
        if kind in first:
            msg, count = first[kind]
            raise SparsemilError(msg + _more(count - 1))

    # 3. labels
    labels = np.array([int(b.label) for b in bags], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        b = bags[int(bad[0])]
        if int(b.label) == -1:
            raise SparsemilError(
                f"{source}: bag {b.where()} has no label{_more(bad.size - 1)}; fix: give every "
                f"slide a label in the dataset/split CSV (--label-csv / --split-csv)"
            )
        hi = int(labels.max())
        fix = (
            f"pass --n-classes {hi + 1} if there really are {hi + 1} classes, or relabel to 0.."
            f"{n_classes - 1}"
            if hi >= n_classes
            else f"relabel to 0..{n_classes - 1}"
        )
        raise SparsemilError(
            f"{source}: bag {b.where()} has label {int(b.label)}, outside 0..{n_classes - 1} "
            f"(n_classes={n_classes}){_more(bad.size - 1)}; fix: {fix}"
        )


def _note(first: dict[str, tuple[str, int]], kind: str, msg: str) -> None:
    """Remember the first message of each kind and count the occurrences."""
    if kind in first:
        first[kind] = (first[kind][0], first[kind][1] + 1)
    else:
        first[kind] = (msg, 1)
