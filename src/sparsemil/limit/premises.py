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
import time
from typing import Any

import torch
from torch import Tensor, nn

from sparsemil.curvature.operator import PerBatchCurvatureOperator
from sparsemil.curvature.slq import hutchinson_trace

#: the KKT residual may be at most this share of lmbda sqrt(D) (premise 1)
KKT_MAX_SHARE = 0.5
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


def kkt_residual(theta: Tensor, grad: Tensor, lmbda: float, penalised: Tensor) -> dict[str, Any]:
    """Stationarity of ``CE + lmbda ||theta_S||_1`` (S = ``penalised`` coordinates).

    The subdifferential condition ``0 in grad CE + lmbda d|theta|`` gives the residual per
    coordinate: ``grad_i + lmbda sign(theta_i)`` for non-zero penalised weights,
    ``max(|grad_i| - lmbda, 0)`` for zero ones, ``grad_i`` for unpenalised ones. Reported:
    its norm (``residual``), the magnitude part ``||max(|grad_i| - lmbda, 0)||`` over the
    non-zero penalised weights, the share of those whose gradient has the wrong sign (it should
    oppose ``sign(theta_i)``), ``||grad CE||``, and the scale ``lmbda sqrt(D_S)``: the norm of the
    penalty's own gradient, the largest a stationary CE gradient can be. A point where the CE
    gradient vanishes (the L1 term ignored) has residual exactly ``lmbda sqrt(D_S)``, so the
    check passes only below ``KKT_MAX_SHARE`` (one half) of that scale; ``ratio`` is
    ``residual / bound``.
    """
    theta, grad = theta.double().cpu(), grad.double().cpu()
    pen = penalised.cpu()
    nz = pen & (theta != 0)
    zero = pen & (theta == 0)
    r = grad.clone()
    r[nz] = grad[nz] + lmbda * torch.sign(theta[nz])
    r[zero] = (grad[zero].abs() - lmbda).clamp_min(0.0)
    mag = (grad[nz].abs() - lmbda).clamp_min(0.0)
    wrong = (torch.sign(grad[nz]) == torch.sign(theta[nz])) & (grad[nz] != 0)
    n_pen = int(pen.sum())
    return {
        "residual": float(r.norm()),
        "magnitude_residual": float(mag.norm()),
        "wrong_sign_fraction": float(wrong.double().mean()) if int(nz.sum()) else 0.0,
        "grad_norm": float(grad.norm()),
        "bound": float(lmbda * math.sqrt(max(n_pen, 1))),
        "lmbda": float(lmbda),
        "n_penalised": n_pen,
        "ratio": float(r.norm()) / (lmbda * math.sqrt(max(n_pen, 1))) if lmbda > 0 else None,
        "threshold": KKT_MAX_SHARE,
        "passed": bool(
            lmbda > 0 and float(r.norm()) <= KKT_MAX_SHARE * lmbda * math.sqrt(max(n_pen, 1))
        ),
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

    Returns:
        ``{"kkt", "order", "anisotropy", "trace", "determinism", "samples", "passed",
        "verdict", "warnings", "products", "seconds"}``; ``warnings`` are one-line strings.
    """
    t0 = time.perf_counter()
    before = int(getattr(op, "num_products", 0))
    theta = op.flat_params().detach().double().cpu()
    grad = op.gradient().double().cpu()
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
    doc: dict[str, Any] = {"kkt": kkt, "order": None, "anisotropy": None}
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
