"""The pruning sweep: metrics of the globally magnitude-pruned model at many ratios.

The magnitudes are sorted **once**. For each ratio the threshold is read from the sorted array
(``k``-th smallest, ties pruned, see :mod:`sparsemil.prune.magnitude`), and the weights are set
*in place*: the ones newly pruned since the previous ratio are zeroed, the ones un-pruned (if the
ratios go down) are restored from a saved copy of w*. The model is never deep-copied and nothing
is written per ratio; w* is restored at the end (also on error).

``distance[i]`` is the L2 distance between w* and the pruned model over all trainable parameters.
Only pruned weights change, so it is ``sqrt(sum of the squared pruned magnitudes)``, computed from
the sorted array (float64 cumulative sum).

The result (:class:`~sparsemil.prune.result.SweepResult`) and the criteria for the "actual"
pruning limit (:func:`~sparsemil.prune.result.actual_ratio`) live in
:mod:`sparsemil.prune.result`; they are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemil.errors import SparsemilError
from sparsemil.prune.batched_sweep import batched_pruning_sweep, vision_evaluator_many
from sparsemil.prune.magnitude import (
    ParamRef,
    counts_from_sorted,
    plain_parameters,
    resolve_params,
)
from sparsemil.prune.result import (
    CRITERIA,
    DEFAULT_CRITERION,
    SweepResult,
    actual_ratio,
    actual_ratios,
    sweep_result,
)

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERION",
    "SweepResult",
    "actual_ratio",
    "actual_ratios",
    "counts_from_sorted",
    "pruned_counts_and_distances",
    "pruning_sweep",
    "sweep_ratios",
    "sweep_result",
    "vision_evaluator",
    "vision_sweep",
]


def sweep_ratios(n: int) -> np.ndarray:
    """The official grid ``i / n`` for ``i = 0..n-1`` (float64)."""
    if n < 1:
        raise SparsemilError(f"sparse_epoch: must be >= 1, got {n}")
    return np.arange(n, dtype=np.float64) / n


def pruned_counts_and_distances(
    model: nn.Module,
    ratios: Sequence[float] | np.ndarray,
    params: Sequence[ParamRef] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Number of pruned weights and ``||w* - w_rho||_2`` for each ratio, without evaluating.

    Same rule and the same numbers as :func:`pruning_sweep` (one sort; the model is not
    modified). Useful for R(rho) on a finer grid than the sweep's, e.g. for a bisection.
    """
    params = resolve_params(model, params)
    tensors = plain_parameters(params)
    with torch.no_grad():
        mags = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
        sorted_np = torch.sort(mags).values.double().cpu().numpy()
    ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
    _, n_pruned, distance = counts_from_sorted(sorted_np, ratios)
    return n_pruned, distance


class _InPlacePruner:
    """Zeroes and restores weights by their position in the ascending magnitude order.

    For each parameter it keeps the sorted positions of its entries (ascending) and their
    flat indices in that order, so the entries whose sorted position lies in ``[lo, hi)`` are
    one slice. :meth:`prune_to` moves from the current number of pruned weights to another.
    """

    def __init__(
        self, tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor], order: np.ndarray
    ) -> None:
        offsets = np.concatenate([[0], np.cumsum([t.numel() for t in tensors])])
        pid_sorted = np.searchsorted(offsets, order, side="right") - 1
        self.positions: list[np.ndarray] = []
        self.locals: list[torch.Tensor] = []
        for p, t in enumerate(tensors):
            pos = np.nonzero(pid_sorted == p)[0]  # ascending sorted positions of param p
            self.positions.append(pos)
            self.locals.append(torch.from_numpy(order[pos] - offsets[p]).to(t.device))
        self.flats = [t.data.view(-1) for t in tensors]
        self.saved_flat = [s.view(-1) for s in saved]
        self.current = 0

    def set_range(self, lo: int, hi: int, zero: bool) -> None:
        """Zero (``zero``) or restore the weights at sorted positions ``[lo, hi)``."""
        for p, pos in enumerate(self.positions):
            a, b = np.searchsorted(pos, (lo, hi))
            if b <= a:
                continue
            idx = self.locals[p][a:b]
            if zero:
                self.flats[p].index_fill_(0, idx, 0.0)
            else:
                self.flats[p].index_copy_(0, idx, self.saved_flat[p].index_select(0, idx))

    def prune_to(self, target: int) -> None:
        """Leave exactly the ``target`` smallest-magnitude weights zeroed."""
        if target > self.current:
            self.set_range(self.current, target, zero=True)
        elif target < self.current:
            self.set_range(target, self.current, zero=False)
        self.current = target


def _evaluate_ratios(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    n_pruned: np.ndarray,
    pruner: _InPlacePruner,
    progress: bool,
) -> dict[str, list[float]]:
    """``evaluate`` after pruning ``n_pruned[i]`` weights, for each i; a key missing from an
    evaluation is NaN there."""
    from tqdm.auto import tqdm

    metrics: dict[str, list[float]] = {}
    for i in tqdm(range(len(n_pruned)), desc="pruning sweep", disable=not progress, unit="ratio"):
        pruner.prune_to(int(n_pruned[i]))
        out = evaluate(model)
        for key, val in out.items():
            metrics.setdefault(key, [math.nan] * i).append(float(val))
        for key in metrics:
            if len(metrics[key]) < i + 1:
                metrics[key].append(math.nan)
    return metrics


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
        params: the prunable weights (default: the model's prunable set,
            :func:`~sparsemil.prune.magnitude.prunable_set`; see
            :func:`~sparsemil.prune.magnitude.resolve_params` for the accepted forms).
        progress: show a tqdm bar (stderr).
    """
    params = resolve_params(model, params)
    tensors = plain_parameters(params)
    ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if ratios.size == 0:
        raise SparsemilError("pruning sweep: no ratios given")
    n_w = int(sum(t.numel() for t in tensors))
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]  # w*
        mags = torch.cat([s.abs().reshape(-1) for s in saved])
        sorted_mags, order = torch.sort(mags, stable=True)
    # Number pruned for each ratio: all |w| <= t_k, with t_k the k-th smallest.
    _, n_pruned, distance = counts_from_sorted(sorted_mags.double().cpu().numpy(), ratios)

    pruner = _InPlacePruner(tensors, saved, order.cpu().numpy())
    try:
        dense = {k: float(v) for k, v in evaluate(model).items()}
        with torch.no_grad():
            metrics = _evaluate_ratios(model, evaluate, n_pruned, pruner, progress)
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)

    return sweep_result(ratios, metrics, distance, n_pruned, n_w, dense)


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
        chunk: ratios per forward pass
            (:func:`~sparsemil.prune.batched_sweep.batched_pruning_sweep`, each pass then
            takes ``chunk`` times ``batch_size`` samples x weight sets);
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
