"""Global one-shot magnitude pruning with the official semantics.

One threshold over all prunable weights (by default every ``Conv2d`` / ``Linear`` weight; biases
and BatchNorm are never pruned). For a ratio ``rho`` and ``N_w`` prunable weights:

    k = max(1, ceil(rho * N_w))          (clipped to N_w)
    t = the k-th smallest |w|
    keep w  <=>  |w| > t

so every weight whose magnitude ties with ``t`` is pruned as well: the number of pruned weights is
``#{|w| <= t} >= k``. ``ceil`` is taken with a tolerance of 1e-6 (``ceil(rho*N_w - 1e-6)``) so
that a ratio like 0.3 written in binary floating point does not prune one extra weight.

Masks are ``{(module, "weight"): BoolTensor}`` with True = keep, directly usable with
``torch.nn.utils.prune.custom_from_mask`` (:func:`apply_masks`) and made permanent with
``torch.nn.utils.prune.remove`` (:func:`remove_masks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparsemil.errors import SparsemilError

ParamRef = tuple[nn.Module, str]
_CEIL_TOL = 1e-6


def prunable_parameters(
    model: nn.Module, include: Sequence[type[nn.Module]] | type[nn.Module] = (nn.Conv2d, nn.Linear)
) -> list[ParamRef]:
    """``(module, "weight")`` for every module of the given types, in ``model.modules()`` order."""
    include = tuple(include) if isinstance(include, Sequence) else (include,)
    return [(m, "weight") for m in model.modules() if isinstance(m, include)]


def num_to_prune(ratio: float, n_weights: int) -> int:
    """``k = max(1, ceil(ratio * n_weights))`` (tolerance 1e-6), clipped to ``n_weights``."""
    ratio = float(ratio)
    if not (0.0 <= ratio <= 1.0) or math.isnan(ratio):
        raise SparsemilError(f"ratio: must be in [0, 1], got {ratio!r}")
    if n_weights < 1:
        raise SparsemilError("pruning: the model has no prunable weights")
    return min(n_weights, max(1, math.ceil(ratio * n_weights - _CEIL_TOL)))


def plain_parameters(params: Sequence[ParamRef]) -> list[torch.Tensor]:
    """The tensors of ``params``, each checked to be a plain ``nn.Parameter`` (no
    ``torch.nn.utils.prune`` reparametrisation, which the sweeps would bypass)."""
    tensors: list[torch.Tensor] = []
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


def _tensor(ref: ParamRef) -> torch.Tensor:
    module, name = ref
    return getattr(module, name)


def flat_magnitudes(params: Sequence[ParamRef]) -> torch.Tensor:
    """``|w|`` of all ``params`` concatenated (flattened in order), detached ``(N_w,)``."""
    if not params:
        raise SparsemilError("pruning: no prunable parameters (Conv2d/Linear weights) found")
    return torch.cat([_tensor(r).detach().abs().reshape(-1) for r in params])


def global_threshold(params: Sequence[ParamRef], ratio: float) -> float:
    """The k-th smallest ``|w|`` over ``params`` for ``ratio`` (see module docstring)."""
    mags = flat_magnitudes(params)
    k = num_to_prune(ratio, mags.numel())
    return float(torch.kthvalue(mags.float().cpu(), k).values)


def global_magnitude_masks(
    params: Sequence[ParamRef], ratio: float
) -> dict[ParamRef, torch.Tensor]:
    """Keep-masks (True = keep) of one global magnitude threshold at ``ratio``.

    Args:
        params: ``(module, name)`` pairs, e.g. from :func:`prunable_parameters`.
        ratio: pruning ratio rho in [0, 1].

    Returns:
        dict ``(module, name) -> BoolTensor`` shaped like the weight, on its device.
    """
    mags = flat_magnitudes(params)
    k = num_to_prune(ratio, mags.numel())
    thr = torch.kthvalue(mags.cpu(), k).values.to(mags.device)
    return {ref: _tensor(ref).detach().abs() > thr for ref in params}


def apply_masks(masks: Mapping[ParamRef, torch.Tensor]) -> None:
    """Attach masks with ``torch.nn.utils.prune.custom_from_mask`` (reparametrisation hooks)."""
    for (module, name), mask in masks.items():
        torch_prune.custom_from_mask(module, name, mask)


def remove_masks(refs: Mapping[ParamRef, torch.Tensor] | Iterable[ParamRef]) -> None:
    """Make masks permanent with ``torch.nn.utils.prune.remove`` (pruned entries stay 0)."""
    for module, name in list(refs):
        if torch_prune.is_pruned(module) and hasattr(module, f"{name}_mask"):
            torch_prune.remove(module, name)


def prune_inplace(masks: Mapping[ParamRef, torch.Tensor]) -> None:
    """Zero the masked-out weights directly (no hooks), e.g. before export."""
    with torch.no_grad():
        for (module, name), mask in masks.items():
            getattr(module, name).mul_(mask.to(getattr(module, name).dtype))


def prune_model(
    model: nn.Module,
    ratio: float,
    include: Sequence[type[nn.Module]] = (nn.Conv2d, nn.Linear),
    permanent: bool = True,
) -> dict[ParamRef, torch.Tensor]:
    """Global magnitude pruning of ``model`` at ``ratio``; returns the masks.

    ``permanent=True`` zeroes weights in place; ``False`` attaches ``torch.nn.utils.prune``
    masks (undo with ``prune.remove`` semantics via :func:`remove_masks`).
    """
    masks = global_magnitude_masks(prunable_parameters(model, include), ratio)
    if permanent:
        prune_inplace(masks)
    else:
        apply_masks(masks)
    return masks


def sparsity(params: Sequence[ParamRef]) -> dict[str, float]:
    """``{"n_weights", "n_zero", "ratio"}`` of exact zeros among ``params``."""
    n = sum(_tensor(r).numel() for r in params)
    z = sum(int((_tensor(r) == 0).sum()) for r in params)
    return {"n_weights": n, "n_zero": z, "ratio": z / max(n, 1)}
