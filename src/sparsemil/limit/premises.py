"""Check the premises of the pruning-limit theory at w*, and report them.

The prediction ``rho = gw(R(rho))`` (Zhang, Zhang, Sun & Liu, NeurIPS 2024) assumes that

1. w* is a minimiser of ``CE(theta) + lmbda ||theta||_1`` (it was trained with the L1 penalty
   to a stationary point), so the loss rises from w* at second order;
2. the loss change along the pruning direction ``d_rho = w_rho - w*`` is the quadratic term
   ``1/2 d^T H d`` (the first-order term ``g^T d`` is small against it);
3. the pruning direction is as curved as a typical direction: the Gaussian width averages the
   spectrum over random directions, so a direction much sharper (or flatter) than the mean
   eigenvalue ``Tr(H)/D`` is pruned at a different ratio than predicted;
4. H is a symmetric matrix: the products are deterministic (checked when the operator is built,
   :meth:`sparsemil.curvature.hvp.HessianOperator.check_determinism`).

Premise 3 is also tested per layer (:func:`layer_anisotropy`, when ``premise_checks`` gets
``groups``): the magnitude-pruning direction restricted to one layer group against random
Gaussian directions on a random support of the same size in that layer, and against
``Tr(H)/D`` -- whether magnitude selection picks directions sharper than random ones in the
same layer, or whether the layer itself is sharp. The KKT residual
(:func:`sparsemil.prune.proximal.kkt_residual`, re-exported here) is shared with the proximal
finishing phase that certifies premise 1.

:func:`premise_checks` measures each one with few Hessian products (the gradient, one product
``H d``, a Hutch++ trace with ``trace_probes`` products) and returns numbers, a verdict per
check and one-line warnings for the ones that fail. The thresholds are the constants below;
they are stated in ``limit.json``. Note that at an exact L1-stationary point
``g_i = -lmbda sign(w_i)``, so ``g.d = lmbda ||w_pruned||_1 > 0``: premise 2 asks that this
first-order term be small against the curvature term, which holds when the pruned weights are
small -- the situation L1 training is meant to create.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import torch
from torch import Tensor, nn

from sparsemil.curvature.operator import PerBatchCurvatureOperator
from sparsemil.curvature.slq import hutchinson_trace
from sparsemil.prune.proximal import KKT_MAX_SHARE, kkt_residual

__all__ = [
    "ANISOTROPY_MAX",
    "FIRST_ORDER_MAX_SHARE",
    "KKT_MAX_SHARE",
    "TRACE_PROBES",
    "coordinate_mask",
    "kkt_residual",
    "layer_anisotropy",
    "premise_checks",
    "pruning_direction",
]

#: the first-order term may be at most this share of |g.d| + |1/2 d.Hd| (premise 2)
FIRST_ORDER_MAX_SHARE = 0.5
#: the Rayleigh quotient of d over Tr(H)/D must lie within [1/x, x] (premise 3)
ANISOTROPY_MAX = 3.0
#: Hutch++ probes for the trace (a third sketch the top subspace)
TRACE_PROBES = 24


def _offsets(op: PerBatchCurvatureOperator) -> dict[int, int]:
    offsets, pos = {}, 0
    for p, n in zip(op.params, op.numels, strict=True):
        offsets[id(p)] = pos
        pos += n
    return offsets


def coordinate_mask(op: PerBatchCurvatureOperator, tensors: list[Tensor]) -> Tensor:
    """Boolean (D,) mask of the operator coordinates that belong to ``tensors`` (tensors
    outside the operator are ignored)."""
    mask = torch.zeros(op.shape[0], dtype=torch.bool)
    offsets = _offsets(op)
    for t in tensors:
        start = offsets.get(id(t))
        if start is not None:
            mask[start : start + t.numel()] = True
    return mask


def pruning_direction(
    op: PerBatchCurvatureOperator, prunable: list[tuple[nn.Module, str]], ratio: float
) -> Tensor:
    """``d_rho = w_rho - w*`` in the operator's coordinates, float64 (D,), on the CPU.

    Global magnitude pruning at ``ratio`` over the prunable set (the ``k = ceil(rho N)``
    smallest ``|w|``, stable order on ties -- the official rule; ``prune_model`` also prunes
    weights tied with the threshold, which differs only on ties at non-zero magnitude):
    ``d_i = -w_i`` on the pruned weights, 0 elsewhere. ``ratio <= 0`` gives 0.
    """
    from sparsemil.prune.magnitude import num_to_prune

    d = torch.zeros(op.shape[0], dtype=torch.float64)
    tensors = [getattr(m, name) for m, name in prunable]
    offsets = _offsets(op)
    if ratio <= 0 or not tensors:
        return d
    flat_idx = torch.cat(
        [torch.arange(t.numel()) + offsets[id(t)] for t in tensors if id(t) in offsets]
    )
    vals = torch.cat([t.detach().reshape(-1).cpu().double() for t in tensors if id(t) in offsets])
    k = num_to_prune(float(ratio), int(vals.numel()))
    order = torch.sort(vals.abs(), stable=True).indices[:k]
    d[flat_idx[order]] = -vals[order]
    return d


#: random directions per layer group in :func:`layer_anisotropy`
LAYER_RANDOM_DRAWS = 3
_GENERIC_LAYER = re.compile(r"^(fc\d*|linear\d*|lin\d*|dense\d*|layer\d*|net|mlp)$")


def layer_group(name: str) -> str:
    """The layer group of a parameter name: the name of the module that owns it, with list
    indices and wrapper components (``module``) dropped, so that the same layer of every block
    is one group (``layers.0.msg_attn.to_qkv.weight`` -> ``to_qkv``); a generic module name
    keeps its parent (``pool.fc1.module.weight`` -> ``pool.fc1``)."""
    parts = [p for p in name.split(".")[:-1] if not p.isdigit() and p != "module"]
    if not parts:
        return name
    if len(parts) >= 2 and _GENERIC_LAYER.match(parts[-1]):
        return f"{parts[-2]}.{parts[-1]}"
    return parts[-1]


def layer_groups(
    names: list[str], prunable: list[tuple[nn.Module, str]]
) -> dict[str, list[tuple[nn.Module, str]]]:
    """``{group: [(module, attribute), ...]}`` of the prunable tensors by :func:`layer_group`
    of their names (``names[i]`` names ``prunable[i]``), in first-appearance order."""
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    for n, ref in zip(names, prunable, strict=True):
        out.setdefault(layer_group(n), []).append(ref)
    return out


def layer_anisotropy(
    op: PerBatchCurvatureOperator,
    prunable: list[tuple[nn.Module, str]],
    ratio: float,
    groups: dict[str, list[tuple[nn.Module, str]]],
    mean_eigenvalue: float | None = None,
    n_random: int = LAYER_RANDOM_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-layer curvature of the magnitude-pruning direction (premise 3, layer by layer).

    ``d`` is the global magnitude-pruning direction at ``ratio``
    (:func:`pruning_direction`); for each group ``g`` (prunable tensors, e.g. from
    :func:`layer_groups`) ``d_g`` is ``d`` restricted to that group's coordinates; its support
    is the group's weights that the pruning removes and that are non-zero at w* (``n_pruned``,
    ``pruned_fraction`` of the group), and

    - ``rayleigh_magnitude`` = ``d_g.H d_g / ||d_g||^2``;
    - ``rayleigh_random`` = the same for ``n_random`` Gaussian directions on a uniformly random
      support of ``n_pruned`` coordinates of the group (their mean estimates the mean diagonal
      of ``H`` over the layer);
    - ``rayleigh_random_nonzero`` = the same with the support drawn among the group's weights
      that are non-zero at w* (after an L1 finish many weights are exactly 0: this control
      separates "magnitude selection picks sharp weights" from "surviving weights are sharp");
    - ``magnitude_over_random`` (and ``magnitude_over_random_nonzero``) =
      ``rayleigh_magnitude`` over the mean of those draws: above 1, magnitude selection picks
      sharper directions than random ones in the same layer;
    - ``magnitude_over_mean`` / ``random_over_mean``: against ``mean_eigenvalue``
      (``Tr(H)/D``, the curvature the Gaussian width assumes on average), when given.

    A group with nothing pruned at ``ratio`` gets ``None`` quotients. All vectors go through
    one :meth:`matmat` (``1 + 2 n_random`` products per pruned group).
    """
    d = pruning_direction(op, prunable, ratio)
    theta = op.flat_params().detach().double().cpu()
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    cols: list[Tensor] = []
    info: dict[str, dict[str, Any]] = {}

    def draw(pool: Tensor, k: int) -> list[int]:
        out = []
        for _ in range(int(n_random)):
            pick = pool[torch.randperm(pool.numel(), generator=gen)[:k]]
            r = torch.zeros_like(d)
            r[pick] = torch.randn(pick.numel(), generator=gen, dtype=torch.float64)
            out.append(len(cols))
            cols.append(r)
        return out

    for name, refs in groups.items():
        mask = coordinate_mask(op, [getattr(m, a) for m, a in refs])
        idx = torch.nonzero(mask).reshape(-1)
        alive = torch.nonzero(mask & (theta != 0)).reshape(-1)
        dg = torch.where(mask, d, torch.zeros_like(d))
        k = int((dg != 0).sum())
        info[name] = {
            "tensors": len(refs),
            "n_weights": int(idx.numel()),
            "n_nonzero": int(alive.numel()),
            "n_pruned": k,
            "pruned_fraction": k / max(int(idx.numel()), 1),
        }
        if k == 0:
            continue
        cols.append(dg)
        info[name]["_cols"] = (len(cols) - 1, draw(idx, k), draw(alive, k))
    HV = None
    if cols:
        V = torch.stack(cols, dim=1)
        HV = op.matmat(V).double().cpu()
    mean_ev = None if mean_eigenvalue is None else float(mean_eigenvalue)

    def rq(j: int) -> float:
        return float(V[:, j] @ HV[:, j]) / float(V[:, j] @ V[:, j])

    def ratio_of(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    groups_out: dict[str, Any] = {}
    for name, g in info.items():
        which = g.pop("_cols", None)
        entry: dict[str, Any] = {
            **g,
            "rayleigh_magnitude": None,
            "rayleigh_random": [],
            "rayleigh_random_nonzero": [],
        }
        if which is not None and HV is not None:
            mag = rq(which[0])
            rand = [rq(j) for j in which[1]]
            alive = [rq(j) for j in which[2]]
            mean_rand = sum(rand) / len(rand) if rand else None
            mean_alive = sum(alive) / len(alive) if alive else None
            entry.update(
                {
                    "rayleigh_magnitude": mag,
                    "rayleigh_random": rand,
                    "rayleigh_random_mean": mean_rand,
                    "rayleigh_random_nonzero": alive,
                    "rayleigh_random_nonzero_mean": mean_alive,
                    "magnitude_over_random": ratio_of(mag, mean_rand),
                    "magnitude_over_random_nonzero": ratio_of(mag, mean_alive),
                    "magnitude_over_mean": ratio_of(mag, mean_ev),
                    "random_over_mean": ratio_of(mean_rand, mean_ev),
                }
            )
        groups_out[name] = entry
    return {
        "ratio": float(ratio),
        "mean_eigenvalue": mean_ev,
        "n_random": int(n_random),
        "random": "Gaussian entries on a uniformly random support of the same size in the "
        "group (rayleigh_random) and among the group's non-zero weights "
        "(rayleigh_random_nonzero)",
        "groups": groups_out,
        "products": 0 if HV is None else int(HV.shape[1]),
    }


def premise_checks(
    op: PerBatchCurvatureOperator,
    prunable: list[tuple[nn.Module, str]],
    ratio: float | None,
    eps: float,
    lmbda: float,
    penalised: list[Tensor] | None = None,
    trace_probes: int = TRACE_PROBES,
    seed: int = 0,
    samples: int | None = None,
    groups: dict[str, list[tuple[nn.Module, str]]] | None = None,
    layer_random: int = LAYER_RANDOM_DRAWS,
    gradient: Tensor | None = None,
) -> dict[str, Any]:
    """Measure the theory's premises at w* (see the module docstring).

    Args:
        op: the Hessian operator the prediction used (with ``gradient()`` and ``matmat``).
        prunable: the prunable ``(module, name)`` pairs (inside the operator's parameters).
        ratio: the predicted ratio (the pruning direction is taken there); ``None`` (no
            prediction, or a root outside the swept range) skips the direction checks.
        eps: the loss tolerance epsilon.
        lmbda: the L1 strength w* was trained with (0: trained without L1).
        penalised: the tensors under the L1 penalty (default: every operator parameter).
        trace_probes: Hutch++ products for ``Tr(H)``.
        samples: how many samples (or bags) the Hessian averages over (reported).
        groups: layer groups of the prunable tensors (:func:`layer_groups`): also the
            per-layer anisotropy at ``ratio`` (:func:`layer_anisotropy`, ``layer_random``
            random directions per group) under ``"layers"``; informative, not a pass/fail check.
        gradient: the training-loss gradient in the operator's coordinates (default
            ``op.gradient()``, the gradient of the loss the operator is the Hessian of); pass
            the full-data gradient when the Hessian uses a subset of the training data, so
            that the KKT residual and ``g.d`` refer to the training objective itself.

    Returns:
        ``{"kkt", "order", "anisotropy", "layers", "trace", "determinism", "samples",
        "passed", "verdict", "warnings", "products", "seconds"}``; ``warnings`` are one-line
        strings.
    """
    t0 = time.perf_counter()
    before = int(getattr(op, "num_products", 0))
    theta = op.flat_params().detach().double().cpu()
    grad = (op.gradient() if gradient is None else gradient).double().cpu()
    pen_mask = (
        torch.ones(op.shape[0], dtype=torch.bool)
        if penalised is None
        else coordinate_mask(op, list(penalised))
    )
    kkt = kkt_residual(theta, grad, lmbda, pen_mask)
    warnings: list[str] = []
    if lmbda <= 0:
        warnings.append(
            "premise: the network was trained without the L1 penalty (lmbda = 0); the theory "
            "assumes a minimiser of CE + lmbda ||w||_1, so the predicted limit is outside its "
            "premises"
        )
    elif not kkt["passed"]:
        warnings.append(
            f"premise: w* is not a stationary point of CE + lmbda ||w||_1 (KKT residual "
            f"{kkt['residual']:.3g} = {kkt['ratio']:.2g} x lmbda sqrt(D), above "
            f"{KKT_MAX_SHARE:g} x = {KKT_MAX_SHARE * kkt['bound']:.3g}); train longer or "
            "finish with a proximal (soft-threshold) phase"
        )
    doc: dict[str, Any] = {"kkt": kkt, "order": None, "anisotropy": None, "layers": None}
    trace, trace_se = hutchinson_trace(op, num_probes=trace_probes, seed=seed + 7919)
    D = int(op.shape[0])
    doc["trace"] = {
        "value": trace,
        "stderr": trace_se,
        "method": "hutch++",
        "probes": int(trace_probes),
        "mean_eigenvalue": trace / D,
    }
    if ratio is not None and ratio > 0:
        d = pruning_direction(op, prunable, ratio)
        dd = float(d @ d)
        Hd = op.matmat(d[:, None].to(torch.float64))[:, 0].double().cpu()
        first, second = float(grad @ d), 0.5 * float(d @ Hd)
        share = abs(first) / max(abs(first) + abs(second), 1e-300)
        doc["order"] = {
            "ratio": float(ratio),
            "first_order": first,
            "second_order": second,
            "epsilon": float(eps),
            "first_order_share": share,
            "second_order_over_eps": second / eps if eps > 0 else None,
            "passed": bool(share <= FIRST_ORDER_MAX_SHARE),
            "threshold": FIRST_ORDER_MAX_SHARE,
        }
        if share > FIRST_ORDER_MAX_SHARE:
            warnings.append(
                f"premise: at the predicted ratio {ratio:.3f} the first-order term g.d = "
                f"{first:.3g} is {share:.0%} of the loss change (1/2 d.Hd = {second:.3g}, eps = "
                f"{eps:.3g}); the quadratic model behind the width does not hold there"
            )
        rq = float(d @ Hd) / dd if dd > 0 else float("nan")
        mean_ev = trace / D
        q = rq / mean_ev if mean_ev != 0 else float("nan")
        ok = bool(math.isfinite(q) and 1.0 / ANISOTROPY_MAX <= q <= ANISOTROPY_MAX)
        doc["anisotropy"] = {
            "rayleigh_quotient": rq,
            "mean_eigenvalue": mean_ev,
            "ratio": q,
            "passed": ok,
            "range": [1.0 / ANISOTROPY_MAX, ANISOTROPY_MAX],
        }
        if not ok:
            warnings.append(
                f"premise: the pruning direction is {q:.3g}x as curved as an average direction "
                f"(Rayleigh quotient {rq:.3g} over Tr(H)/D = {mean_ev:.3g}); the width "
                f"averages over random directions, so expect the prediction to be "
                f"{'too high' if q > 1 else 'too low'}"
            )
        if groups:
            doc["layers"] = layer_anisotropy(
                op, prunable, ratio, groups, mean_ev, n_random=layer_random, seed=seed
            )
    det = getattr(op, "determinism", None)
    doc["determinism"] = det
    if det is not None and not det.get("passed", True):
        warnings.append("premise: the Hessian products are not deterministic/symmetric")
    doc["samples"] = samples
    checks = [kkt["passed"]] + [
        doc[k]["passed"] for k in ("order", "anisotropy") if doc[k] is not None
    ]
    doc["passed"] = bool(all(checks) and lmbda > 0)
    doc["verdict"] = (
        "premises hold (stationary w*, second-order loss change, typical curvature)"
        if doc["passed"]
        else f"premises fail ({len(warnings)} of the checks): the prediction is outside the "
        "theory's premises"
    )
    doc["warnings"] = warnings
    doc["products"] = int(getattr(op, "num_products", 0)) - before
    doc["seconds"] = time.perf_counter() - t0
    return doc
