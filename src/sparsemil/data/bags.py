"""Bags: the unit of multiple-instance learning.

A :class:`Bag` holds one slide's (or one classic-MIL bag's) instance features in memory.
A :class:`BagRef` points at a per-slide file and reads it on demand, so a folder of
thousands of CLAM/Trident ``.h5`` files never has to fit in memory at once.
:class:`BagDataset` and :func:`collate_bags` turn either into padded PyTorch batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class Bag:
    """One bag of instances.

    Attributes:
        features: float32 array (N, C), one row per instance.
        label: bag label in 0..n_classes-1 (-1 = unknown).
        slide_id: the bag's name (slide id, or the bag id of a classic-MIL CSV).
        coords: optional (N, 2) patch coordinates (level-0 pixels for CLAM/Trident).
        path: optional file the bag was read from (used in error messages).
    """

    features: np.ndarray
    label: int
    slide_id: str
    coords: np.ndarray | None = None
    path: str | None = None

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
    """A per-slide file that is read when needed.

    Attributes:
        path: the ``.h5`` / ``.pt`` / ``.csv`` file of one slide.
        label: the slide's label (from a dataset or split CSV).
        slide_id: the slide's name.
    """

    path: Path
    label: int
    slide_id: str

    def load(self) -> Bag:
        """Read the file (see :func:`sparsemil.data.readers.read_bag`) and check it.

        Raises :class:`~sparsemil.errors.SparsemilError` for an unreadable file, an empty
        bag or NaN/Inf features.
        """
        from sparsemil.data.readers import read_bag
        from sparsemil.data.validate import check_bag_values

        bag = read_bag(self.path, label=self.label, slide_id=self.slide_id)
        check_bag_values(bag, source=str(self.path))
        return bag

    def where(self) -> str:
        """``'<slide_id>' (<path>)`` for error messages."""
        return f"'{self.slide_id}' ({self.path})"


def as_bag(item: Bag | BagRef) -> Bag:
    """``item`` itself if it is a :class:`Bag`, else ``item.load()``."""
    return item if isinstance(item, Bag) else item.load()


class BagDataset(Dataset):
    """A map-style dataset over bags (in memory or :class:`BagRef`, read per item).

    Item ``i`` is a dict ``{"X": FloatTensor (N, C), "Y": LongTensor (), "slide_id": str}``
    plus ``"coords": FloatTensor (N, 2)`` when the bag has coordinates.

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


def collate_bags(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of :class:`BagDataset` items into one batch.

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
