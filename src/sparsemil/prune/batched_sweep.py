"""The pruning sweep with many ratios per forward pass (for GPUs).

:func:`~sparsemil.prune.sweep.pruning_sweep` evaluates one pruned model per ratio. On a GPU a
small network's evaluation is launch-bound (FC5 on digits: ~0.7 ms per ratio on an H200 at a
few percent of the chip's throughput), so :func:`batched_pruning_sweep` evaluates ``chunk``
ratios at once: the pruned weights of each ratio are stacked, ``(K, *shape)``, and the network
runs once under :func:`torch.func.vmap` over :func:`torch.func.functional_call`.

Same pruning rule and the same numbers as the sequential sweep: one sort, ``k = ceil(rho * N_w)``,
every weight with ``|w| <=`` the k-th smallest magnitude set to zero (ties pruned), the model
never copied nor modified. Accuracies are identical; losses agree to float32 rounding (the
batched matrix products sum in another order). On a CPU, which is compute-bound here, batching
gains nothing: :func:`~sparsemil.prune.sweep.vision_sweep` uses it on CUDA devices only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsemil.errors import SparsemilError
from sparsemil.prune.magnitude import (
    ParamRef,
    counts_from_sorted,
    plain_parameters,
    resolve_params,
)
from sparsemil.prune.result import SweepResult, sweep_result

#: ``evaluate_many(model, stacked) -> {metric: (K,) array}`` where ``stacked`` maps qualified
#: parameter names to ``(K, *shape)`` weights (one pruned version per ratio).
EvaluateMany = Callable[[nn.Module, Mapping[str, torch.Tensor]], Mapping[str, np.ndarray]]


def qualified_names(model: nn.Module, params: Sequence[ParamRef]) -> list[str]:
    """``"layer.weight"``-style names of ``(module, name)`` pairs, for ``functional_call``."""
    where = {id(m): prefix for prefix, m in model.named_modules()}
    out = []
    for module, name in params:
        if id(module) not in where:
            raise SparsemilError(f"batched sweep: {type(module).__name__} is not in the model")
        prefix = where[id(module)]
        out.append(f"{prefix}.{name}" if prefix else name)
    return out


def _stacked_pruned(
    names: Sequence[str],
    weights: Sequence[torch.Tensor],
    magnitudes: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``name -> (K, *shape)``: each weight with ``|w| <= thresholds[k]`` zeroed in copy k."""
    out = {}
    for name, t, a in zip(names, weights, magnitudes, strict=True):
        keep = a.unsqueeze(0) > thresholds.view(-1, *([1] * t.dim()))
        out[name] = torch.where(
            keep, t.unsqueeze(0), torch.zeros((), dtype=t.dtype, device=t.device)
        )
    return out


def _evaluate_chunks(
    model: nn.Module,
    evaluate_many: EvaluateMany,
    names: Sequence[str],
    weights: Sequence[torch.Tensor],
    magnitudes: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    chunk: int,
    progress: bool,
) -> dict[str, list[float]]:
    """Per-ratio metrics, ``chunk`` thresholds per call of ``evaluate_many`` (a key missing
    from a call is NaN for its ratios)."""
    from tqdm.auto import tqdm

    n = int(thresholds.numel())
    metrics: dict[str, list[float]] = {}
    for s in tqdm(range(0, n, chunk), desc="pruning sweep", disable=not progress, unit="chunk"):
        e = min(s + chunk, n)
        out = evaluate_many(model, _stacked_pruned(names, weights, magnitudes, thresholds[s:e]))
        for key, val in out.items():
            metrics.setdefault(key, [math.nan] * s).extend(
                np.asarray(val, dtype=np.float64).tolist()
            )
        for key in metrics:
            metrics[key].extend([math.nan] * (e - len(metrics[key])))
    return metrics


def batched_pruning_sweep(
    model: nn.Module,
    evaluate_many: EvaluateMany,
    ratios: Sequence[float] | np.ndarray,
    params: Sequence[ParamRef] | None = None,
    chunk: int = 32,
    progress: bool = True,
) -> SweepResult:
    """:func:`~sparsemil.prune.sweep.pruning_sweep` evaluating ``chunk`` ratios per call.

    Args:
        model: the trained network w* (not modified).
        evaluate_many: see :data:`EvaluateMany`; e.g. :func:`vision_evaluator_many`.
        ratios: pruning ratios in [0, 1].
        params: the prunable weights (default: the model's prunable set,
            :func:`~sparsemil.prune.magnitude.prunable_set`; see
            :func:`~sparsemil.prune.magnitude.resolve_params` for the accepted forms).
        chunk: ratios per evaluation (memory grows linearly with it).
        progress: tqdm bar (stderr).

    Returns:
        :class:`~sparsemil.prune.result.SweepResult`; ``dense`` is the unpruned model's
        metrics (evaluated through the same batched path).
    """
    if chunk < 1:
        raise SparsemilError(f"batched sweep: chunk must be >= 1, got {chunk}")
    params = resolve_params(model, params)
    tensors = plain_parameters(params)
    names = qualified_names(model, params)
    ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if ratios.size == 0:
        raise SparsemilError("pruning sweep: no ratios given")
    with torch.no_grad():
        w = [t.detach() for t in tensors]
        absw = [t.abs() for t in w]
        sorted_mags = torch.sort(torch.cat([a.reshape(-1) for a in absw])).values
    n_w = int(sorted_mags.numel())
    ks, n_pruned, distance = counts_from_sorted(sorted_mags.double().cpu().numpy(), ratios)
    # prune |w| <= threshold (the k-th smallest magnitude, in the weights' own dtype)
    thresholds = sorted_mags[torch.as_tensor(ks - 1, device=sorted_mags.device)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dense_out = evaluate_many(
                model, {n: t.unsqueeze(0) for n, t in zip(names, w, strict=True)}
            )
            dense = {k: float(np.asarray(v)[0]) for k, v in dense_out.items()}
            metrics = _evaluate_chunks(
                model, evaluate_many, names, w, absw, thresholds, chunk, progress
            )
    finally:
        model.train(was_training)

    return sweep_result(ratios, metrics, distance, n_pruned, n_w, dense)


def _split_many(
    model: nn.Module,
    stacked: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-ratio accuracy and mean cross-entropy ``(K,)`` of the stacked weights on ``(x, y)``.

    Each pass takes ``max(1, batch_size // K)`` samples through all K weight sets, so its
    memory matches one unbatched pass of ``batch_size`` samples."""
    from torch.func import functional_call, vmap

    k = next(iter(stacked.values())).shape[0]
    run = vmap(lambda p, xb: functional_call(model, p, (xb,)), in_dims=(0, None))
    correct = torch.zeros(k, dtype=torch.int64, device=y.device)
    total = torch.zeros(k, dtype=torch.float64, device=y.device)
    n = int(y.shape[0])
    step = max(1, batch_size // k)
    for start in range(0, n, step):
        xb, yb = x[start : start + step], y[start : start + step]
        logits = run(dict(stacked), xb)  # (K, B, C)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), yb.repeat(k), reduction="none"
        ).view(k, -1)
        total += nll.sum(dim=1).double()
        correct += (logits.argmax(dim=-1) == yb).sum(dim=1)
    n = max(n, 1)
    return correct.cpu().numpy() / n, total.cpu().numpy() / n


def vision_evaluator_many(
    data: Any, device: str | torch.device = "cpu", batch_size: int = 8192
) -> EvaluateMany:
    """Batched twin of :func:`~sparsemil.prune.sweep.vision_evaluator`: test acc/loss and
    train loss/acc of every stacked weight set, over the full splits. ``batch_size`` counts
    (samples x weight sets) per pass."""
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)

    def evaluate_many(
        model: nn.Module, stacked: Mapping[str, torch.Tensor]
    ) -> dict[str, np.ndarray]:
        te_acc, te_loss = _split_many(model, stacked, x_te, y_te, batch_size)
        tr_acc, tr_loss = _split_many(model, stacked, x_tr, y_tr, batch_size)
        return {
            "test_acc": te_acc,
            "test_loss": te_loss,
            "train_loss": tr_loss,
            "train_acc": tr_acc,
        }

    return evaluate_many
