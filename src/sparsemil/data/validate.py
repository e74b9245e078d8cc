"""Validate bags before any training starts.

:func:`validate_bags` checks, over all bags: the data files exist and are readable, no bag
is empty, no feature is NaN/Inf, all bags share one feature dimension, and every label is
in ``0..n_classes-1``. The first problem found becomes a one-line
:class:`~sparsemil.errors.SparsemilError` that names the bag, its file and the fix (and
how many other bags share the problem).

For :class:`~sparsemil.data.bags.BagRef` s to ``.h5`` files only the dataset shapes are
read (fast, for folders of thousands of slides); their values are checked when each bag
is loaded (:func:`~sparsemil.data.readers.as_bag`) or here with ``deep=True``. ``.pt`` and ``.csv`` files
have no cheap shape probe, so they are read in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparsemil.data.bags import Bag, BagRef, empty_bag_message, nonfinite_message
from sparsemil.data.h5 import H5_SUFFIXES, h5_info
from sparsemil.data.readers import read_bag
from sparsemil.errors import SparsemilError


def _more(k: int) -> str:
    return f" (and {k} more bag{'s' if k != 1 else ''} with the same problem)" if k else ""


def _probe(item: Bag | BagRef, deep: bool) -> tuple[int, int, np.ndarray | None]:
    """(N, C, features-or-None) without reading h5 arrays unless ``deep``."""
    if isinstance(item, Bag):
        return item.n_instances, item.dim, item.features
    path = Path(item.path)
    if path.suffix.lower() in H5_SUFFIXES and not deep:
        n, c, _ = h5_info(path)
        return n, c, None
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
            f"n_classes must be >= 2, got {n_classes}; fix: set 'n_classes' to 2 or more"
        )
    if len(bags) == 0:
        raise SparsemilError(f"{source}: no bags found; fix: check the data path and the CSVs")
    _check_files(bags, source)  # cheap, before any reading
    _check_arrays(bags, source, deep)
    _check_labels(bags, n_classes, source)


def _check_files(bags: Sequence[Bag | BagRef], source: str) -> None:
    """Every data file exists."""
    missing = [b for b in bags if isinstance(b, BagRef) and not Path(b.path).is_file()]
    if missing:
        b = missing[0]
        raise SparsemilError(
            f"{source}: data file {b.path} of slide '{b.slide_id}' does not exist"
            f"{_more(len(missing) - 1)}; fix: check the data folder and the slide ids in the CSV"
        )


def _check_arrays(bags: Sequence[Bag | BagRef], source: str, deep: bool) -> None:
    """Shapes, emptiness, finiteness, one feature dimension (first problem of each kind,
    reported in that order with its count)."""
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
            _note(first, "empty", empty_bag_message(source, where))
        elif feats is not None:
            msg = nonfinite_message(source, where, feats)
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


def _check_labels(bags: Sequence[Bag | BagRef], n_classes: int, source: str) -> None:
    """Every label is in ``0..n_classes-1``."""
    labels = np.array([int(b.label) for b in bags], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if not bad.size:
        return
    b = bags[int(bad[0])]
    if int(b.label) == -1:
        raise SparsemilError(
            f"{source}: bag {b.where()} has no label{_more(bad.size - 1)}; fix: give every "
            f"slide a label in the labels (dataset) CSV or the split CSV"
        )
    hi = int(labels.max())
    fix = (
        f"set 'n_classes' to {hi + 1} if there really are {hi + 1} classes, or relabel to 0.."
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
