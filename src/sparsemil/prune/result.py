"""The result of a pruning sweep and the criteria for the "actual" pruning limit.

Shared by :func:`~sparsemil.prune.sweep.pruning_sweep` and
:func:`~sparsemil.prune.batched_sweep.batched_pruning_sweep` (both import this module; it
imports neither).

Criteria for the "actual" pruning limit (:func:`actual_ratio`, ratios ascending, accuracies as
fractions in [0, 1], ``dense`` = the unpruned model):

- ``drop_1pt`` (default): the largest ratio before test accuracy first falls more than 1 percentage
  point (0.01) below the dense accuracy; the last ratio if it never does; ``None`` if already the
  first ratio does.
- ``official``: scanning from the largest ratio down, the first ratio whose test accuracy is
  strictly above the dense accuracy; ``None`` when no ratio is (undefined, reported, no crash).
- ``train_loss_eps``: the largest ratio before the training loss first exceeds ``L(w*) + eps``;
  ``eps`` defaults to ``dense["train_loss_std"]`` (std, ddof 0 as ``np.std``, of the
  per-mini-batch training losses at w*, the official epsilon).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsemil.errors import SparsemilError

CRITERIA = ("drop_1pt", "official", "train_loss_eps")
DEFAULT_CRITERION = "drop_1pt"
_BASE_COLUMNS = ("ratio", "num_pruned", "distance", "test_acc", "test_loss", "train_loss")


@dataclass
class SweepResult:
    """Metrics per pruning ratio (all arrays ``(R,)``).

    Attributes:
        ratios: pruning ratios, as given (ascending for the criteria).
        test_acc: test accuracy, fraction in [0, 1].
        test_loss: mean test cross-entropy.
        train_loss: mean training cross-entropy (no penalty term).
        distance: ``||w* - w_pruned||_2`` over all trainable parameters.
        num_pruned: number of weights actually set to zero (ties included).
        n_weights: number of prunable weights ``N_w``.
        dense: metrics of the unpruned model (same keys as the evaluation, plus
            ``train_loss_std`` when known).
        extra: further per-ratio metrics returned by the evaluation (e.g. ``train_acc``).
    """

    ratios: np.ndarray
    test_acc: np.ndarray
    test_loss: np.ndarray
    train_loss: np.ndarray
    distance: np.ndarray
    num_pruned: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    n_weights: int = 0
    dense: dict[str, float] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def columns(self) -> dict[str, np.ndarray]:
        """Every per-ratio array by column name (CSV order)."""
        cols = {
            "ratio": self.ratios,
            "num_pruned": self.num_pruned,
            "distance": self.distance,
            "test_acc": self.test_acc,
            "test_loss": self.test_loss,
            "train_loss": self.train_loss,
        }
        cols.update(self.extra)
        return cols

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per ratio, atomically."""
        from sparsemil.io import atomic_path

        cols = self.columns()
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(cols))
            for i in range(len(self.ratios)):
                w.writerow([_fmt(cols[c][i]) for c in cols])
        return Path(path)

    @classmethod
    def from_csv(
        cls, path: str | Path, dense: Mapping[str, float] | None = None, n_weights: int = 0
    ) -> SweepResult:
        """Read a CSV written by :meth:`to_csv` (``dense`` is not stored in the CSV)."""
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise SparsemilError(f"{path}: empty sweep CSV")
        missing = [c for c in _BASE_COLUMNS if c not in rows[0]]
        if missing:
            raise SparsemilError(f"{path}: sweep CSV lacks columns {', '.join(missing)}")

        def col(name: str, dtype: Any = np.float64) -> np.ndarray:
            return np.array([float(r[name]) for r in rows], dtype=dtype)

        extra = {k: col(k) for k in rows[0] if k not in _BASE_COLUMNS}
        return cls(
            col("ratio"),
            col("test_acc"),
            col("test_loss"),
            col("train_loss"),
            col("distance"),
            col("num_pruned", np.int64),
            n_weights,
            dict(dense or {}),
            extra,
        )

    def summary(self, eps: float | None = None) -> dict[str, Any]:
        """JSON-able summary: dense metrics, ``N_w`` and the actual ratio of every criterion."""
        return {
            "n_ratios": int(len(self.ratios)),
            "n_weights": int(self.n_weights),
            "dense": dict(self.dense),
            "actual_ratio": actual_ratios(self, eps=eps),
            "default_criterion": DEFAULT_CRITERION,
        }


def _fmt(v: Any) -> str:
    if isinstance(v, np.integer | int):
        return str(int(v))
    return repr(float(v))


def sweep_result(
    ratios: np.ndarray,
    metrics: dict[str, list[float]],
    distance: np.ndarray,
    n_pruned: np.ndarray,
    n_w: int,
    dense: dict[str, float],
) -> SweepResult:
    """Assemble a :class:`SweepResult` from per-ratio metric lists (standard keys missing from
    ``metrics`` become NaN; other keys go to ``extra``)."""
    metrics = dict(metrics)

    def take(key: str) -> np.ndarray:
        vals = metrics.pop(key, None)
        return np.asarray(vals if vals is not None else [math.nan] * len(ratios), dtype=np.float64)

    test_acc, test_loss, train_loss = take("test_acc"), take("test_loss"), take("train_loss")
    extra = {k: np.asarray(v, dtype=np.float64) for k, v in metrics.items()}
    return SweepResult(
        ratios, test_acc, test_loss, train_loss, distance, n_pruned, n_w, dense, extra
    )


def _ascending(sweep: SweepResult) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(sweep.ratios, kind="stable")
    return sweep.ratios[order], order


def actual_ratio(
    sweep: SweepResult, criterion: str = DEFAULT_CRITERION, eps: float | None = None
) -> float | None:
    """The "actual" pruning limit of ``sweep`` by ``criterion`` (see module docstring).

    Returns ``None`` when the criterion is undefined for this sweep.
    """
    if criterion not in CRITERIA:
        raise SparsemilError(
            f"criterion: unknown {criterion!r}; choose one of {', '.join(CRITERIA)}"
        )
    ratios, order = _ascending(sweep)
    if criterion in ("drop_1pt", "official"):
        if "test_acc" not in sweep.dense:
            raise SparsemilError("criterion: the sweep has no dense test accuracy")
        acc = sweep.test_acc[order]
        dense = float(sweep.dense["test_acc"])
        if criterion == "official":
            above = np.nonzero(acc > dense)[0]
            return float(ratios[above[-1]]) if above.size else None
        failed = np.nonzero(dense - acc > 0.01 + 1e-12)[0]
    else:
        if eps is None:
            eps = sweep.dense.get("train_loss_std")
        if eps is None or not math.isfinite(float(eps)):
            raise SparsemilError("criterion train_loss_eps: give eps (no train_loss_std known)")
        if "train_loss" not in sweep.dense:
            raise SparsemilError("criterion: the sweep has no dense training loss")
        loss = sweep.train_loss[order]
        failed = np.nonzero(~(loss <= float(sweep.dense["train_loss"]) + float(eps)))[0]
    if failed.size == 0:
        return float(ratios[-1])
    first = int(failed[0])
    return float(ratios[first - 1]) if first > 0 else None


def actual_ratios(sweep: SweepResult, eps: float | None = None) -> dict[str, float | None]:
    """``{criterion: actual_ratio(...)}`` for every criterion (undefined -> ``None``)."""
    out: dict[str, float | None] = {}
    for c in CRITERIA:
        try:
            out[c] = actual_ratio(sweep, c, eps=eps)
        except SparsemilError:
            out[c] = None
    return out
