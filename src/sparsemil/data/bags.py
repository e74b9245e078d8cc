"""Bags: the unit of multiple-instance learning (a leaf module: nothing else from ``data``).

A :class:`Bag` holds one slide's (or one classic-MIL bag's) instance features in memory.
A :class:`BagRef` points at a per-slide file that is read on demand (see
:func:`sparsemil.data.readers.as_bag`), so a folder of thousands of CLAM/Trident ``.h5``
files never has to fit in memory at once. :func:`collate_bags` pads bag items into one
batch. The shape and value rules every bag obeys live here too: :func:`bag_arrays` and
:func:`check_bag_values`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsemil.errors import SparsemilError


@dataclass
class Bag:
    """One bag of instances.

    Attributes:
        features: float32 array (N, C), one row per instance.
        label: bag label in 0..n_classes-1 (-1 = unknown).
        slide_id: the bag's name (slide id, or the bag id of a classic-MIL CSV).
        coords: optional (N, 2) patch coordinates (level-0 pixels for CLAM/Trident).
        path: optional file the bag was read from (used in error messages).
        instance_labels: optional (N,) instance labels (the h5 ``labels`` dataset).
        case_id: the patient/case the slide belongs to (CLAM's ``case_id``), if known.
    """

    features: np.ndarray
    label: int
    slide_id: str
    coords: np.ndarray | None = None
    path: str | None = None
    instance_labels: np.ndarray | None = None
    case_id: str | None = None

    @property
    def n_instances(self) -> int:
        """N, the number of instances."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """C, the feature dimension."""
        return int(self.features.shape[1]) if self.features.ndim == 2 else -1

    def where(self) -> str:
        """``'<slide_id>' (<path>)`` for error messages."""
        return f"'{self.slide_id}'" + (f" ({self.path})" if self.path else "")


@dataclass(frozen=True)
class BagRef:
    """A per-slide file that is read when needed (:func:`sparsemil.data.readers.as_bag`).

    Attributes:
        path: the ``.h5`` / ``.pt`` / ``.csv`` file of one slide.
        label: the slide's label (from a dataset or split CSV).
        slide_id: the slide's name.
        case_id: the patient/case of the slide (CLAM's ``case_id`` column), if known.
    """

    path: Path
    label: int
    slide_id: str
    case_id: str | None = None

    def where(self) -> str:
        """``'<slide_id>' (<path>)`` for error messages."""
        return f"'{self.slide_id}' ({self.path})"


# --------------------------------------------------------------------------- shape rules
def bag_arrays(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray | None = None,
    what: str = "features",
) -> tuple[np.ndarray, np.ndarray | None]:
    """The shape rules of a bag's arrays, with one-line errors naming ``path``.

    ``features`` must be (N, C) or (1, N, C) real numbers and becomes float32 (N, C);
    ``coords``, when given, (N, 2) or (1, N, 2) with the same N (its dtype is kept).
    ``what`` names the features in messages (e.g. the dict key of a ``.pt`` file).
    """
    features = np.asarray(features)
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
        coords = np.asarray(coords)
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
            raise SparsemilError(
                f"{path}: coords has shape {tuple(coords.shape)} but features has "
                f"{features.shape[0]} instances; fix: coords must be (N, 2) with the same N "
                f"as features (or remove coords)"
            )
    return features, coords


# --------------------------------------------------------------------------- value rules
def empty_bag_message(source: str, where: str) -> str:
    """The message for a bag with no instances."""
    return (
        f"{source}: bag {where} is empty (0 instances); fix: drop the slide from the dataset/"
        f"split CSV or re-run feature extraction for it"
    )


def nonfinite_message(source: str, where: str, feats: np.ndarray) -> str | None:
    """The message for NaN/Inf features, or ``None`` when all are finite."""
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
        raise SparsemilError(empty_bag_message(source, bag.where()))
    msg = nonfinite_message(source, bag.where(), bag.features)
    if msg:
        raise SparsemilError(msg)


# --------------------------------------------------------------------------- batching
def collate_bags(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of bag items (``{"X": (N, C), "Y": (), "slide_id": str[, "coords": (N, 2)]}``,
    as :class:`~sparsemil.data.readers.BagDataset` yields them) into one batch.

    Returns:
        ``{"X": (B, Nmax, C) float32 zero-padded, "mask": (B, Nmax) bool (True = real
        instance), "Y": (B,) long, "slide_id": list[str]}`` plus ``"coords": (B, Nmax, 2)``
        when every item has coordinates.
    """
    if len(items) == 0:
        raise ValueError("collate_bags needs at least one item")
    sizes = [int(it["X"].shape[0]) for it in items]
    dims = {int(it["X"].shape[1]) for it in items}
    if len(dims) != 1:
        raise ValueError(f"collate_bags got bags of different feature dimensions {sorted(dims)}")
    c = dims.pop()
    n_max = max(sizes)
    b = len(items)
    x = items[0]["X"].new_zeros((b, n_max, c))
    mask = torch.zeros((b, n_max), dtype=torch.bool)
    for k, (it, n) in enumerate(zip(items, sizes, strict=True)):
        x[k, :n] = it["X"]
        mask[k, :n] = True
    out: dict[str, Any] = {
        "X": x,
        "mask": mask,
        "Y": torch.stack([torch.as_tensor(it["Y"], dtype=torch.long) for it in items]),
        "slide_id": [it["slide_id"] for it in items],
    }
    if all("coords" in it for it in items):
        coords = items[0]["coords"].new_zeros((b, n_max, 2))
        for k, (it, n) in enumerate(zip(items, sizes, strict=True)):
            coords[k, :n] = it["coords"]
        out["coords"] = coords
    return out
