"""The training side of the data: :class:`MILTrainConfig` -> the data layer, standardisation,
the torch dataset.

Loading, validation and folds live in :mod:`sparsemil.data` (one loader, one
:class:`~sparsemil.data.splits.Fold`); the adapters here only pass the config's fields on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsemil.data.bags import Bag, BagRef
from sparsemil.data.readers import BagDataset, as_bag
from sparsemil.data.sources import BagSource, load_bag_source
from sparsemil.data.splits import Fold, holdout_fold, run_folds
from sparsemil.errors import SparsemilError
from sparsemil.train.config import MILTrainConfig


def load_mil_data(cfg: MILTrainConfig) -> BagSource:
    """The bags of ``cfg`` (fields ``data``, ``format``, ``data_dir``, ``labels``,
    ``n_classes``) through :func:`sparsemil.data.sources.load_bag_source`: read, or indexed
    as lazy :class:`~sparsemil.data.bags.BagRef` s, and validated before any training."""
    return load_bag_source(
        cfg.data,
        cfg.format,
        data_dir=cfg.data_dir,
        labels=cfg.labels,
        n_classes=cfg.n_classes,
    )


def folds_for(data: BagSource, cfg: MILTrainConfig) -> list[Fold]:
    """The folds ``mil cv`` runs (:func:`sparsemil.data.splits.run_folds`): replayed from
    ``cfg.folds_csv``, else ``cfg.folds`` stratified folds drawn with ``cfg.seed``."""
    return run_folds(data, cfg.folds, cfg.seed, cfg.val_fraction, cfg.folds_csv)


def holdout_for(data: BagSource, cfg: MILTrainConfig) -> Fold:
    """The split ``mil train`` uses (:func:`sparsemil.data.splits.holdout_fold`): fold
    ``cfg.fold`` of ``cfg.folds_csv``, else the data's predefined split, else fold
    ``cfg.fold`` of ``cfg.folds`` freshly drawn folds."""
    return holdout_fold(data, cfg.fold, cfg.folds, cfg.seed, cfg.val_fraction, cfg.folds_csv)


def standardize_for(data: BagSource, cfg: MILTrainConfig) -> bool:
    """Whether training z-scores the features: ``cfg.standardize``, by default yes for
    classic-MIL CSVs and no for slide features."""
    return data.format == "mil-csv" if cfg.standardize is None else bool(cfg.standardize)


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
    """:class:`~sparsemil.data.readers.BagDataset` with optional standardisation."""

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
