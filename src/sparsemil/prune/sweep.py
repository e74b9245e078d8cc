"""The pruning sweep: metrics of the globally magnitude-pruned model at many ratios.

The magnitudes are sorted **once**. For each ratio the threshold is read from the sorted array
(``k``-th smallest, ties pruned, see :mod:`sparsemil.prune.magnitude`), and the weights are set
*in place*: the ones newly pruned since the previous ratio are zeroed, the ones un-pruned (if the
ratios go down) are restored from a saved copy of w*. The model is never deep-copied and nothing
is written per ratio; w* is restored at the end (also on error).

``distance[i]`` is the L2 distance between w* and the pruned model over all trainable parameters.
Only pruned weights change, so it is ``sqrt(sum of the squared pruned magnitudes)``, computed from
the sorted array (float64 cumulative sum).

Criteria for the "actual" pruning limit (:func:`actual_ratio`, ratios ascending, accuracies as
fractions in [0, 1], ``dense`` = the unpruned model):

- ``drop_1pt`` (default): the largest ratio before test accuracy first falls more than 1 percentage
  point (0.01) below the dense accuracy; the last ratio if it never does; ``None`` if already the
  first ratio does.
- ``official``: scanning from the largest ratio down, the first ratio whose test accuracy is
  strictly above the dense accuracy; ``None`` when no ratio is (undefined, reported, no crash).
- ``train_loss_eps``: the largest ratio before the training loss first exceeds ``L(w*) + eps``;
  ``eps`` defaults to ``dense["train_loss_std"]`` (std, ddof 0 as ``np.std``, of the per-mini-batch training losses at
  w*, the official epsilon).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemil.errors import SparsemilError
from sparsemil.prune.magnitude import ParamRef, num_to_prune, prunable_parameters

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


def sweep_ratios(n: int) -> np.ndarray:
    """The official grid ``i / n`` for ``i = 0..n-1`` (float64)."""
    if n < 1:
        raise SparsemilError(f"sparse_epoch: must be >= 1, got {n}")
    return np.arange(n, dtype=np.float64) / n


def _check_params(params: Sequence[ParamRef]) -> list[torch.Tensor]:
    tensors = []
    for module, name in params:
        t = getattr(module, name)
        if not isinstance(t, nn.Parameter):
            raise SparsemilError(
                f"pruning sweep: {type(module).__name__}.{name} is not a plain Parameter "
                f"(remove torch.nn.utils.prune hooks first)"
            )
        tensors.append(t)
    if not tensors:
        raise SparsemilError("pruning sweep: no prunable parameters (Conv2d/Linear weights)")
    return tensors


def counts_from_sorted(
    sorted_np: np.ndarray, ratios: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, n_pruned, distance)`` per ratio from the ascending magnitudes ``sorted_np`` (N_w,):
    ``k = ceil(rho * N_w)`` (at least 1), ``n_pruned`` = every ``|w| <=`` the k-th smallest
    (ties pruned), ``distance = sqrt(sum of the pruned squared magnitudes)`` (float64)."""
    ks = np.array([num_to_prune(r, sorted_np.size) for r in ratios], dtype=np.int64)
    n_pruned = np.searchsorted(sorted_np, sorted_np[ks - 1], side="right").astype(np.int64)
    cum_sq = np.concatenate([[0.0], np.cumsum(sorted_np**2)])
    return ks, n_pruned, np.sqrt(cum_sq[n_pruned])


def pruned_counts_and_distances(
    model: nn.Module,
    ratios: Sequence[float] | np.ndarray,
    params: Sequence[ParamRef] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Number of pruned weights and ``||w* - w_rho||_2`` for each ratio, without evaluating.

    Same rule and the same numbers as :func:`pruning_sweep` (one sort; the model is not
    modified). Useful for R(rho) on a finer grid than the sweep's, e.g. for a bisection.
    """
    params = list(params) if params is not None else prunable_parameters(model)
    tensors = _check_params(params)
    with torch.no_grad():
        mags = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
        sorted_np = torch.sort(mags).values.double().cpu().numpy()
    ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
    _, n_pruned, distance = counts_from_sorted(sorted_np, ratios)
    return n_pruned, distance


def pruning_sweep(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    ratios: Sequence[float] | np.ndarray,
    params: Sequence[ParamRef] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Evaluate the globally magnitude-pruned ``model`` at each of ``ratios``.

    Args:
        model: the trained network w*; modified in place during the sweep and restored after.
        evaluate: ``evaluate(model) -> {"test_acc", "test_loss", "train_loss", ...}``; called
            once on the dense model and once per ratio. Missing standard keys become NaN; other
            keys are kept in :attr:`SweepResult.extra`.
        ratios: pruning ratios in [0, 1] (any order; the official grid is ascending).
        params: the prunable weights (default: all Conv2d/Linear weights).
        progress: show a tqdm bar (stderr).
    """
    from tqdm.auto import tqdm

    params = list(params) if params is not None else prunable_parameters(model)
    tensors = _check_params(params)
    ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if ratios.size == 0:
        raise SparsemilError("pruning sweep: no ratios given")

    sizes = [t.numel() for t in tensors]
    n_w = int(sum(sizes))
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]  # w*
        mags = torch.cat([s.abs().reshape(-1) for s in saved])
        sorted_mags, order = torch.sort(mags, stable=True)
    # Number pruned for each ratio: all |w| <= t_k, with t_k the k-th smallest.
    _, n_pruned, distance = counts_from_sorted(sorted_mags.double().cpu().numpy(), ratios)

    # For each parameter: the sorted positions of its entries (ascending) and their flat indices
    # in that order, so the entries whose sorted position lies in [lo, hi) are one slice.
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    order_np = order.cpu().numpy()
    pid_sorted = np.searchsorted(offsets, order_np, side="right") - 1
    positions, locals_ = [], []
    for p, t in enumerate(tensors):
        pos = np.nonzero(pid_sorted == p)[0]  # ascending sorted positions of param p
        positions.append(pos)
        locals_.append(torch.from_numpy(order_np[pos] - offsets[p]).to(t.device))
    flats = [t.data.view(-1) for t in tensors]
    saved_flat = [s.view(-1) for s in saved]

    def set_range(lo: int, hi: int, zero: bool) -> None:
        for p, pos in enumerate(positions):
            a, b = np.searchsorted(pos, (lo, hi))
            if b <= a:
                continue
            idx = locals_[p][a:b]
            if zero:
                flats[p].index_fill_(0, idx, 0.0)
            else:
                flats[p].index_copy_(0, idx, saved_flat[p].index_select(0, idx))

    metrics: dict[str, list[float]] = {}
    current = 0
    try:
        dense = {k: float(v) for k, v in evaluate(model).items()}
        with torch.no_grad():
            for i in tqdm(
                range(len(ratios)), desc="pruning sweep", disable=not progress, unit="ratio"
            ):
                target = int(n_pruned[i])
                if target > current:
                    set_range(current, target, zero=True)
                elif target < current:
                    set_range(target, current, zero=False)
                current = target
                out = evaluate(model)
                for key, val in out.items():
                    metrics.setdefault(key, [math.nan] * i).append(float(val))
                for key in metrics:
                    if len(metrics[key]) < i + 1:
                        metrics[key].append(math.nan)
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)

    return sweep_result(ratios, metrics, distance, n_pruned, n_w, dense)


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


def vision_evaluator(
    data: Any,
    device: str | torch.device = "cpu",
    batch_size: int = 8192,
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model)`` on a :class:`~sparsemil.data.vision.VisionData`: test acc/loss and
    train loss/acc over the full sets, in batches of ``batch_size``, under inference mode."""
    from sparsemil.prune.evaluate import evaluate_split

    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)

    def evaluate(model: nn.Module) -> dict[str, float]:
        te = evaluate_split(model, x_te, y_te, batch_size)
        tr = evaluate_split(model, x_tr, y_tr, batch_size)
        return {
            "test_acc": te["acc"],
            "test_loss": te["loss"],
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
        }

    return evaluate


def vision_sweep(
    model: nn.Module,
    data: Any,
    n_ratios: int = 1000,
    ratios: Sequence[float] | np.ndarray | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8192,
    loss_batch_size: int = 128,
    progress: bool = True,
    chunk: int | None = None,
) -> SweepResult:
    """:func:`pruning_sweep` on a vision dataset with the official ratio grid.

    Args:
        model: trained network (moved to ``device``).
        data: :class:`~sparsemil.data.vision.VisionData`.
        n_ratios: grid size ``sparse_epoch`` (ratios ``i/n``) unless ``ratios`` is given.
        ratios: explicit ratios.
        device: default: the model's device.
        batch_size: evaluation batch size.
        loss_batch_size: mini-batch size for ``dense["train_loss_std"]`` (the std of the
            per-mini-batch training losses at w*, non-shuffled order; use the training
            ``batch_size``).
        progress: tqdm bar.
        chunk: ratios per forward pass (:func:`~sparsemil.prune.batched_sweep.batched_pruning_sweep`,
            each pass then takes ``chunk`` times ``batch_size`` samples x weight sets);
            ``None``: 32 on CUDA devices (evaluation there is launch-bound), else 1 (the
            in-place sequential sweep; a CPU is compute-bound and gains nothing).
    """
    from sparsemil.prune.evaluate import batch_losses

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    grid = sweep_ratios(n_ratios) if ratios is None else np.asarray(ratios, dtype=np.float64)
    if chunk is None:
        chunk = 32 if device.type == "cuda" else 1
    if chunk > 1:
        from sparsemil.prune.batched_sweep import batched_pruning_sweep, vision_evaluator_many

        evaluate_many = vision_evaluator_many(data, device, batch_size * chunk)
        result = batched_pruning_sweep(model, evaluate_many, grid, chunk=chunk, progress=progress)
    else:
        result = pruning_sweep(
            model, vision_evaluator(data, device, batch_size), grid, progress=progress
        )
    losses = batch_losses(model, data.x_train.to(device), data.y_train.to(device), loss_batch_size)
    result.dense["train_loss_std"] = (
        float(losses.double().std(unbiased=False)) if len(losses) > 1 else 0.0
    )
    return result


# --------------------------------------------------------------------------- criteria


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
