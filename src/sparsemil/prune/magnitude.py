"""Global one-shot magnitude pruning with the official semantics, over one stated set of weights.

**The prunable set** (:func:`prunable_set`; the one definition the sweeps, the masks, the export,
the L1 penalty's ``weights`` scope and the limit pipeline all use). A weight tensor is pruned when

- it is the weight of a layer of :data:`PRUNABLE_LAYERS`: ``Linear`` (also attention's
  ``out_proj``), ``Bilinear``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, the input
  projections of ``MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``) and the
  ``weight_ih_l*`` / ``weight_hh_l*`` matrices of ``RNN``/``LSTM``/``GRU``;
- it is trainable (``requires_grad``): a frozen weight is left out everywhere -- of the pruning,
  the L1 penalty and the Hessian alike;
- it is counted **once**: a tensor shared by several layers (tied weights) is one entry of the
  set, pruned once, and its other names are listed as aliases.

Biases are never pruned (as in the official code). Every other *weight* tensor -- normalisation
scales (BatchNorm, LayerNorm, ...), embeddings, free ``nn.Parameter`` tensors such as tokens,
frozen weights and layers outside ``include`` -- is listed with its reason in
:attr:`PrunableSet.left_out`; nothing is skipped silently.

**The rule.** One threshold over the set. For a ratio ``rho`` and ``N_w`` prunable weights:

    k = max(1, ceil(rho * N_w))          (clipped to N_w)
    t = the k-th smallest |w|
    keep w  <=>  |w| > t

so every weight whose magnitude ties with ``t`` is pruned as well: the number of pruned weights is
``#{|w| <= t} >= k``. ``ceil`` is taken with a tolerance of 1e-6 (``ceil(rho*N_w - 1e-6)``) so
that a ratio like 0.3 written in binary floating point does not prune one extra weight. A
weight that is NaN or Inf is an error (it would sort last and never be pruned).

Masks are ``{(module, "weight"): BoolTensor}`` with True = keep, directly usable with
``torch.nn.utils.prune.custom_from_mask`` (:func:`apply_masks`) and made permanent with
``torch.nn.utils.prune.remove`` (:func:`remove_masks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparsemil.errors import SparsemilError

ParamRef = tuple[nn.Module, str]
_CEIL_TOL = 1e-6

_LINEAR_LIKE = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)

#: The layer types whose weight tensors are pruned (see the module docstring).
PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (*_LINEAR_LIKE, nn.MultiheadAttention, nn.RNNBase)


def _layer_weights(module: nn.Module) -> list[str]:
    """Names of the prunable weight tensors registered directly on ``module``."""
    if isinstance(module, _LINEAR_LIKE):
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention):
        return [n for n in _ATTENTION_WEIGHTS if _has_weight(module, n)]
    if isinstance(module, nn.RNNBase):
        return [
            n
            for n in module._flat_weights_names
            if n.startswith(("weight_ih_l", "weight_hh_l", "weight_hr_l"))
        ]
    return []


def _has_weight(module: nn.Module, name: str) -> bool:
    params = module._parameters
    return params.get(name) is not None or params.get(f"{name}_orig") is not None


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class PrunableSet:
    """The weights that are pruned, and every weight tensor that is not (with its reason).

    Attributes:
        refs: ``(module, attribute)`` of each prunable tensor, once per tensor, in
            ``model.named_modules()`` order.
        names: the qualified name of each of ``refs`` (e.g. ``"linear.0.weight"``).
        left_out: ``{qualified name: reason}`` for every weight tensor (any parameter but a
            bias) that is not pruned.
        aliases: ``{other name: pruned name}`` of tied tensors (one tensor, several names),
            counted once under the pruned name.
    """

    refs: list[ParamRef]
    names: list[str]
    left_out: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        """``N_w``: the number of prunable weights (each tied tensor once)."""
        return int(sum(getattr(m, n).numel() for m, n in self.refs))

    def summary(self) -> dict[str, Any]:
        """JSON-able description (``limit.json``, ``sweep.json``)."""
        return {
            "rule": "trainable weights of Linear, Bilinear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
            "MultiheadAttention projections and RNN/LSTM/GRU layers, each tensor once",
            "n_tensors": len(self.refs),
            "n_weights": self.n_weights,
            "tensors": list(self.names),
            "left_out": dict(self.left_out),
            "aliases": dict(self.aliases),
        }

    def describe(self, max_names: int = 12) -> list[str]:
        """Lines for the console: the set, then every left-out tensor grouped by reason."""
        lines = [
            f"pruning {self.n_weights} weights in {len(self.refs)} tensors "
            "(trainable Linear/Conv/attention/RNN weights, each tensor once)"
        ]
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.left_out.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:max_names])
            more = f", ... (+{len(names) - max_names})" if len(names) > max_names else ""
            lines.append(f"left out ({reason}): {shown}{more}")
        for alias, kept in self.aliases.items():
            lines.append(f"tied: {alias} is {kept} (counted once)")
        return lines


def prunable_set(
    model: nn.Module, include: Sequence[type[nn.Module]] | type[nn.Module] | None = None
) -> PrunableSet:
    """The prunable weights of ``model`` and every weight tensor left out (module docstring).

    Args:
        model: the network.
        include: restrict to these layer types (default :data:`PRUNABLE_LAYERS`); weights of
            other prunable layers are then listed as left out.

    Raises:
        SparsemilError: ``include`` is not a layer type or a sequence of them.
    """
    if include is None:
        include = PRUNABLE_LAYERS
    elif isinstance(include, type):
        include = (include,)
    if not isinstance(include, Sequence) or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in include
    ):
        raise SparsemilError(
            f"include: must be nn.Module types (e.g. (nn.Linear, nn.Conv2d)), got {include!r}"
        )
    include = tuple(include)
    refs: list[ParamRef] = []
    names: list[str] = []
    left_out: dict[str, str] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}  # id(tensor) -> the name it is pruned under
    _hooked: list[tuple[str, str]] = []  # torch.nn.utils.prune reparametrisations
    for prefix, module in model.named_modules():
        for attr in _layer_weights(module):
            t = module._parameters.get(attr)
            qual = _qualified(prefix, attr)
            if t is None and module._parameters.get(f"{attr}_orig") is not None:
                t = module._parameters[f"{attr}_orig"]  # pruned with hooks: weight = orig * mask
                _hooked.append((prefix, attr))
            if t is None:
                continue
            if isinstance(t, nn.parameter.UninitializedParameter):
                left_out[qual] = "uninitialised lazy layer (run one forward pass first)"
            elif not isinstance(module, include):
                left_out[qual] = f"{type(module).__name__} is not in include"
            elif not t.requires_grad:
                left_out[qual] = "frozen (requires_grad=False)"
            elif id(t) in seen:
                aliases[qual] = seen[id(t)]
            else:
                seen[id(t)] = qual
                refs.append((module, attr))
                names.append(qual)
    hooked = {_qualified(prefix, f"{attr}_orig") for prefix, attr in _hooked}
    listed = set(names) | set(left_out) | set(aliases) | hooked
    for qual, t in model.named_parameters(remove_duplicate=False):
        if qual in listed:
            continue
        if id(t) in seen:
            aliases[qual] = seen[id(t)]
            continue
        leaf = qual.rsplit(".", 1)[-1]
        if "bias" in leaf:
            continue  # biases are never pruned (documented, not listed)
        mod_name = qual.rsplit(".", 1)[0] if "." in qual else ""
        module = model.get_submodule(mod_name) if mod_name else model
        if not t.requires_grad:
            left_out[qual] = "frozen (requires_grad=False)"
        elif isinstance(module, _NORM_TYPES):
            left_out[qual] = f"normalisation scale of {type(module).__name__}"
        elif isinstance(module, nn.Embedding | nn.EmbeddingBag):
            left_out[qual] = "embedding table (not a prunable layer type)"
        elif module is model or not isinstance(module, PRUNABLE_LAYERS):
            left_out[qual] = f"parameter of {type(module).__name__} (not a prunable layer type)"
        else:
            left_out[qual] = f"{type(module).__name__}.{leaf} is not a prunable weight"
    return PrunableSet(refs, names, left_out, aliases)


def prunable_parameters(
    model: nn.Module, include: Sequence[type[nn.Module]] | type[nn.Module] | None = None
) -> list[ParamRef]:
    """``(module, attribute)`` of every prunable weight tensor (:func:`prunable_set`)."""
    return prunable_set(model, include).refs


def resolve_params(model: nn.Module, params: Any, where: str = "params") -> list[ParamRef]:
    """The prunable weights named by ``params`` (``None``: :func:`prunable_parameters`).

    ``params`` may hold ``(module, attribute)`` pairs, parameters of ``model``, their
    qualified names (``"linear.0.weight"``) or ``(name, parameter)`` pairs as
    ``model.named_parameters()`` yields; a tensor given twice (or tied) counts once.

    Raises:
        SparsemilError: another type, a name or tensor that is not in ``model``, or a frozen
            tensor (it is outside the Hessian and the L1 penalty).
    """
    if params is None:
        return prunable_parameters(model)
    if isinstance(params, nn.Module | torch.Tensor | str | bytes | Mapping) or not isinstance(
        params, Iterable
    ):
        raise SparsemilError(
            f"{where}: expected a list of (module, name) pairs, parameters or parameter names, "
            f"got {type(params).__name__}"
        )
    by_id: dict[int, ParamRef] = {}
    by_name: dict[str, ParamRef] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, t in module._parameters.items():
            if t is not None:
                by_id.setdefault(id(t), (module, attr))
                by_name[_qualified(prefix, attr)] = (module, attr)
    out: list[ParamRef] = []
    seen: set[int] = set()
    for i, item in enumerate(params):
        ref: ParamRef | None = None
        if (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], nn.Module)
            and isinstance(item[1], str)
        ):
            if not isinstance(getattr(item[0], item[1], None), torch.Tensor):
                raise SparsemilError(
                    f"{where}[{i}]: {type(item[0]).__name__} has no tensor {item[1]!r}"
                )
            ref = item
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            ref = by_id.get(id(item[1]))
        elif isinstance(item, torch.Tensor):
            ref = by_id.get(id(item))
        elif isinstance(item, str):
            ref = by_name.get(item)
            if ref is None:
                raise SparsemilError(f"{where}[{i}]: the model has no parameter {item!r}")
        else:
            raise SparsemilError(
                f"{where}[{i}]: expected a (module, name) pair, a parameter or a parameter "
                f"name, got {type(item).__name__}"
            )
        if ref is None:
            raise SparsemilError(f"{where}[{i}]: the tensor is not a parameter of the model")
        t = getattr(*ref)
        if isinstance(t, torch.Tensor) and not t.requires_grad:
            raise SparsemilError(
                f"{where}[{i}]: {type(ref[0]).__name__}.{ref[1]} is frozen (requires_grad=False); "
                "frozen weights are outside the Hessian and the L1 penalty, so they are not pruned"
            )
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append(ref)
    if not out:
        raise SparsemilError(f"{where}: empty; give at least one weight tensor to prune")
    return out


def num_to_prune(ratio: float, n_weights: int) -> int:
    """``k = max(1, ceil(ratio * n_weights))`` (tolerance 1e-6), clipped to ``n_weights``."""
    ratio = float(ratio)
    if not (0.0 <= ratio <= 1.0) or math.isnan(ratio):
        raise SparsemilError(f"ratio: must be in [0, 1], got {ratio!r}")
    if n_weights < 1:
        raise SparsemilError("pruning: the model has no prunable weights")
    return min(n_weights, max(1, math.ceil(ratio * n_weights - _CEIL_TOL)))


def check_refs(params: Any, where: str = "pruning") -> list[ParamRef]:
    """``params`` as a list of ``(module, attribute)`` pairs naming tensors, each tensor once.

    Raises:
        SparsemilError: not such pairs (e.g. bare tensors or names: those need the model, see
            :func:`resolve_params`), or empty.
    """
    if isinstance(params, nn.Module | torch.Tensor | str | Mapping) or not isinstance(
        params, Iterable
    ):
        raise SparsemilError(
            f"{where}: params must be a list of (module, name) pairs, got {type(params).__name__}"
        )
    out: list[ParamRef] = []
    seen: set[int] = set()
    for i, item in enumerate(params):
        ok = (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], nn.Module)
            and isinstance(item[1], str)
        )
        if not ok:
            raise SparsemilError(
                f"{where}: params[{i}] must be a (module, name) pair such as (model.fc, 'weight'), "
                f"got {type(item).__name__}"
            )
        t = getattr(item[0], item[1], None)
        if not isinstance(t, torch.Tensor):
            raise SparsemilError(
                f"{where}: params[{i}]: {type(item[0]).__name__} has no tensor {item[1]!r}"
            )
        if id(t) not in seen:  # tied: one tensor, counted once
            seen.add(id(t))
            out.append(item)
    if not out:
        raise SparsemilError(f"{where}: no prunable weights (Linear/Conv/attention/RNN weights)")
    return out


def plain_parameters(params: Sequence[ParamRef]) -> list[torch.Tensor]:
    """The tensors of ``params``, each checked to be a plain ``nn.Parameter`` (no
    ``torch.nn.utils.prune`` reparametrisation, which the sweeps would bypass) with finite
    entries."""
    tensors: list[torch.Tensor] = []
    for module, name in params:
        t = getattr(module, name)
        if not isinstance(t, nn.Parameter):
            raise SparsemilError(
                f"pruning sweep: {type(module).__name__}.{name} is not a plain Parameter "
                f"(remove torch.nn.utils.prune hooks first: torch.nn.utils.prune.remove)"
            )
        tensors.append(t)
    if not tensors:
        raise SparsemilError("pruning sweep: no prunable weights (Linear/Conv/attention/RNN)")
    for (module, name), t in zip(params, tensors, strict=True):
        _check_finite(module, name, t)
    return tensors


def _check_finite(module: nn.Module, name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        bad = int((~torch.isfinite(t.detach())).sum())
        raise SparsemilError(
            f"pruning: weight {type(module).__name__}.{name} has {bad} NaN/Inf entries; the "
            "training diverged (lower config key 'lr') -- a non-finite model cannot be pruned"
        )


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
    """``|w|`` of all ``params`` concatenated (flattened in order), detached ``(N_w,)``.

    Raises:
        SparsemilError: no params, not ``(module, name)`` pairs, or a NaN/Inf weight.
    """
    params = check_refs(params)
    for module, name in params:
        _check_finite(module, name, getattr(module, name))
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
    params = check_refs(params)
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
    include: Sequence[type[nn.Module]] | None = None,
    permanent: bool = True,
    params: Any = None,
) -> dict[ParamRef, torch.Tensor]:
    """Global magnitude pruning of ``model`` at ``ratio`` over its prunable set; returns the
    masks.

    ``permanent=True`` zeroes weights in place; ``False`` attaches ``torch.nn.utils.prune``
    masks (undo with ``prune.remove`` semantics via :func:`remove_masks`). ``params`` (see
    :func:`resolve_params`) replaces the default set (:func:`prunable_set` with ``include``).

    Raises:
        SparsemilError: ``permanent=False`` on tied weights (a hook would untie them).
    """
    if params is None:
        pset = prunable_set(model, include)
        refs, tied = pset.refs, bool(pset.aliases)
    else:
        refs, tied = resolve_params(model, params), False
    if not permanent and tied:
        raise SparsemilError(
            "prune_model: tied weights cannot carry torch.nn.utils.prune hooks (a hook unties "
            "them); use permanent=True"
        )
    masks = global_magnitude_masks(refs, ratio)
    if permanent:
        prune_inplace(masks)
    else:
        apply_masks(masks)
    return masks


def sparsity(params: Sequence[ParamRef]) -> dict[str, float]:
    """``{"n_weights", "n_zero", "ratio"}`` of exact zeros among ``params`` (each tensor once)."""
    params = check_refs(params)
    n = sum(_tensor(r).numel() for r in params)
    z = sum(int((_tensor(r) == 0).sum()) for r in params)
    return {"n_weights": n, "n_zero": z, "ratio": z / max(n, 1)}
