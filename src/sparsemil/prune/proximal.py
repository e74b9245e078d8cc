"""A proximal finishing phase: on to a certified stationary point of CE + lmbda ||theta_S||_1.

The pruning-limit theory (:mod:`sparsemil.limit.premises`) assumes that w* minimises
``F(theta) = f(theta) + lmbda ||theta_S||_1`` (``f``: the mean training loss, ``S``: the
penalised coordinates). Stochastic training with AdamW (decoupled weight decay, an L1
*subgradient* that never yields exact zeros, a learning rate that ends before convergence) stops
near, not at, such a point. :func:`proximal_finish` continues from there with deterministic
full-batch proximal gradient (ISTA / forward-backward splitting)::

    theta_S   <- soft_threshold(theta_S - eta grad f(theta), eta lmbda)
    theta_~S  <- theta_~S - eta grad f(theta)

with a Barzilai-Borwein trial step (the short one, ``s.y / y.y``, by default) and
backtracking: a step is accepted only when the majorisation
``f(theta+) <= f(theta) + g.s + ||s||^2 / (2 eta)`` holds *and* ``F`` did not rise
(``s = theta+ - theta``), so ``F`` is monotone non-increasing by construction. A trial costs
one loss-only pass over the batches, an accepted step one loss-and-gradient pass. It stops when the
KKT residual (:func:`kkt_residual`, the same quantity ``limit.json`` reports) is at most
``tol * lmbda sqrt(|S|)``, after ``max_iter`` iterations, or when no step size down to
``min_step`` decreases ``F`` (float round-off: ``stalled``).

The residual lives here, one layer below :mod:`sparsemil.limit.premises`, which re-exports it,
so that the finishing phase and the premise check share one definition.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsemil.errors import SparsemilError

#: the KKT residual may be at most this share of lmbda sqrt(D) (premise 1 of the theory)
KKT_MAX_SHARE = 0.5
#: default stopping tolerance of the finishing phase, as a share of lmbda sqrt(D_S)
FINISH_TOL = 0.1


def kkt_residual(theta: Tensor, grad: Tensor, lmbda: float, penalised: Tensor) -> dict[str, Any]:
    """Stationarity of ``CE + lmbda ||theta_S||_1`` (S = ``penalised`` coordinates).

    The subdifferential condition ``0 in grad CE + lmbda d|theta|`` gives the residual per
    coordinate: ``grad_i + lmbda sign(theta_i)`` for non-zero penalised weights,
    ``max(|grad_i| - lmbda, 0)`` for zero ones, ``grad_i`` for unpenalised ones. Reported:
    its norm (``residual``), the magnitude part ``||max(|grad_i| - lmbda, 0)||`` over the
    non-zero penalised weights, the share of those whose gradient has the wrong sign (it should
    oppose ``sign(theta_i)``), ``||grad CE||``, and the scale ``lmbda sqrt(D_S)``: the norm of the
    penalty's own gradient, the largest a stationary CE gradient can be. A point where the CE
    gradient vanishes (the L1 term ignored) has residual ``lmbda sqrt(n)``, ``n`` its non-zero
    penalised weights (``lmbda sqrt(D_S)`` when none is zero), so the
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


def soft_threshold(x: Tensor, t: float | Tensor) -> Tensor:
    """``sign(x) max(|x| - t, 0)``: the proximal map of ``t ||.||_1``."""
    return torch.sign(x) * (x.abs() - t).clamp_min(0.0)


@dataclass
class ProximalResult:
    """What :func:`proximal_finish` did.

    Attributes:
        iterations: accepted proximal-gradient steps.
        converged: the KKT residual reached ``tol_abs``.
        stop_reason: ``converged``, ``max_iter`` or ``stalled`` (no step size down to
            ``min_step`` lowered ``F``, or the step vanished at the parameters' precision).
        kkt_before, kkt_after: :func:`kkt_residual` at the start and at the end.
        loss_before, loss_after: the mean loss ``f`` (no penalty).
        objective_before, objective_after: ``F = f + lmbda ||theta_S||_1``.
        tol, tol_abs: the tolerance as a share of ``lmbda sqrt(D_S)`` and in absolute terms.
        zeros_before, zeros_after: exact zeros among the penalised coordinates.
        evaluations: loss-and-gradient passes over all batches (one per accepted step, and the
            start).
        forward_passes: loss-only passes over all batches (one per trial step).
        step_last: the last accepted step size.
        seconds: wall time.
        objective_trace: ``F`` after every accepted step (first entry: the start).
        residual_trace: the KKT residual at every iterate (first entry: the start).
    """

    iterations: int
    converged: bool
    stop_reason: str
    kkt_before: dict[str, Any]
    kkt_after: dict[str, Any]
    loss_before: float
    loss_after: float
    objective_before: float
    objective_after: float
    tol: float
    tol_abs: float
    zeros_before: int
    zeros_after: int
    evaluations: int
    forward_passes: int
    step_last: float
    seconds: float
    objective_trace: list[float] = field(default_factory=list)
    residual_trace: list[float] = field(default_factory=list)

    def to_dict(self, traces: bool = False) -> dict[str, Any]:
        """JSON-able dict (the per-iteration traces only when ``traces``)."""
        out = asdict(self)
        if not traces:
            out.pop("objective_trace")
            out.pop("residual_trace")
        return out


LossFn = Callable[[nn.Module, Any], Tensor]


def _tensors(items: Sequence[Any] | None, model: nn.Module, where: str) -> list[Tensor]:
    """Parameters from tensors or ``(name, tensor)`` pairs, each once (default: every
    trainable parameter of ``model``)."""
    if items is None:
        out = [p for p in model.parameters() if p.requires_grad]
    else:
        out = [it[1] if isinstance(it, tuple) else it for it in items]
    seen: set[int] = set()
    uniq = []
    for t in out:
        if not isinstance(t, Tensor):
            raise SparsemilError(f"{where}: expected parameters, got {type(t).__name__}")
        if id(t) not in seen:
            seen.add(id(t))
            uniq.append(t)
    if not uniq:
        raise SparsemilError(f"{where}: no parameters")
    return uniq


class _Objective:
    """``f`` and its gradient over all batches at the current parameters (model in eval mode)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: list[Tensor],
        weights: list[float],
        chunk: int = 16,
    ) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.params, self.weights, self.chunk = params, weights, max(int(chunk), 1)
        self.evaluations = 0
        self.forwards = 0

    def value(self) -> float:
        """``f`` alone (no graph): the cheap test of a trial step."""
        total = 0.0
        with torch.no_grad():
            for b, w in zip(self.batches, self.weights, strict=True):
                if w != 0.0:
                    total += w * float(self.loss_fn(self.model, b).detach().double())
        self.forwards += 1
        return total

    def value_and_grad(self) -> tuple[float, Tensor]:
        """``(f, grad f)``: one backward pass per group of ``chunk`` batches."""
        total = 0.0
        grad = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64)
        pairs = [(b, w) for b, w in zip(self.batches, self.weights, strict=True) if w != 0.0]
        for i in range(0, len(pairs), self.chunk):
            with torch.enable_grad():
                losses = [w * self.loss_fn(self.model, b) for b, w in pairs[i : i + self.chunk]]
                loss = torch.stack([v.reshape(()) for v in losses]).sum()
                gs = torch.autograd.grad(loss, self.params, allow_unused=True)
            total += float(loss.detach().double())
            grad += torch.cat(
                [
                    torch.zeros(p.numel(), dtype=torch.float64)
                    if g is None
                    else g.detach().reshape(-1).double().cpu()
                    for g, p in zip(gs, self.params, strict=True)
                ]
            )
        self.evaluations += 1
        return total, grad

    def flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])

    def assign(self, theta: Tensor) -> Tensor:
        """Write ``theta`` into the parameters; returns it as stored (rounded to their dtype)."""
        with torch.no_grad():
            pos = 0
            for p in self.params:
                n = p.numel()
                p.copy_(theta[pos : pos + n].reshape(p.shape).to(device=p.device, dtype=p.dtype))
                pos += n
        return self.flat()


def proximal_finish(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    lmbda: float,
    params: Sequence[Any] | None = None,
    penalised: Sequence[Any] | None = None,
    weights: Sequence[float] | None = None,
    tol: float = FINISH_TOL,
    max_iter: int = 300,
    step: float = 1.0,
    min_step: float = 1e-10,
    max_step: float = 1e6,
    backtrack: float = 0.5,
    bb: str = "short",
) -> ProximalResult:
    """Proximal-gradient finishing phase on ``F = f + lmbda ||theta_S||_1`` (module docstring).

    The model's weights are changed in place (and left at the last accepted iterate). The
    model is put in eval mode for every pass (dropout off; BatchNorm uses its running
    statistics) and its mode restored afterwards; a model with a random forward pass (e.g.
    random sub-bag grouping) must be made deterministic by the caller.

    Args:
        model: the trained network.
        loss_fn: ``(model, batch) -> scalar`` mean loss of one batch (no penalty).
        batches: every training batch (full batch: ``f`` is their weighted mean).
        lmbda: the L1 strength (> 0).
        params: the parameters being optimised (tensors or ``(name, tensor)`` pairs; default
            every trainable parameter); the others stay fixed.
        penalised: the subset under the L1 penalty (default: all of ``params``); tensors
            outside ``params`` are ignored.
        weights: each batch's share of ``f`` (normalised; default equal: one bag per batch
            gives the mean over bags).
        tol: stop when the KKT residual is at most ``tol * lmbda sqrt(D_S)``.
        max_iter: most accepted steps.
        step: the first trial step size (later trials: Barzilai-Borwein, safeguarded).
        min_step, max_step: range of the step size; below ``min_step`` the phase stops.
        backtrack: step shrink factor on a rejected trial.
        bb: the Barzilai-Borwein trial step after an accepted step: ``short`` (``s.y / y.y``,
            fewer rejected trials) or ``long`` (``s.s / s.y``); after a step along negative
            curvature (``s.y <= 0``) the trial is twice the last step.

    Raises:
        SparsemilError: ``lmbda <= 0``, no batches, non-finite losses, bad settings.
    """
    if not lmbda > 0:
        raise SparsemilError(
            f"proximal finish: lmbda {lmbda:g}: needs an L1 strength > 0 (the objective "
            "CE + lmbda ||theta||_1 has no L1 term otherwise)"
        )
    if not batches:
        raise SparsemilError("proximal finish: no batches")
    if bb not in ("short", "long"):
        raise SparsemilError(f"proximal finish: bb {bb!r}: use 'short' or 'long'")
    if not (tol > 0 and max_iter >= 0 and 0 < min_step <= step <= max_step and 0 < backtrack < 1):
        raise SparsemilError(
            "proximal finish: need tol > 0, max_iter >= 0, 0 < min_step <= step <= max_step "
            "and 0 < backtrack < 1"
        )
    t0 = time.perf_counter()
    ps = _tensors(params, model, "proximal finish params")
    pen_ids = (
        {id(p) for p in ps}
        if penalised is None
        else {id(t) for t in _tensors(penalised, model, "proximal finish penalised")}
    )
    pen = torch.cat([torch.full((p.numel(),), id(p) in pen_ids, dtype=torch.bool) for p in ps])
    n_pen = int(pen.sum())
    if n_pen == 0:
        raise SparsemilError("proximal finish: none of the parameters is penalised")
    w = [1.0] * len(batches) if weights is None else [float(x) for x in weights]
    if len(w) != len(batches) or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise SparsemilError("proximal finish weights: one non-negative number per batch")
    w = [x / sum(w) for x in w]
    obj = _Objective(model, loss_fn, list(batches), ps, w)
    tol_abs = float(tol) * float(lmbda) * math.sqrt(n_pen)

    def penalty(th: Tensor) -> float:
        return float(lmbda) * float(th[pen].abs().sum())

    def prox_step(th: Tensor, g: Tensor, eta: float) -> Tensor:
        z = th - eta * g
        z[pen] = soft_threshold(z[pen], eta * float(lmbda))
        return z

    was_training = model.training
    model.eval()
    theta = obj.flat()
    try:
        f, g = obj.value_and_grad()
        _check_finite(f, "start")
        kkt0 = kkt_residual(theta, g, lmbda, pen)
        F = f + penalty(theta)
        f0, F0, zeros0 = f, F, int((theta[pen] == 0).sum())
        F_trace, r_trace = [F], [kkt0["residual"]]
        eta, it, reason, step_last = float(step), 0, "max_iter", 0.0
        kkt = kkt0
        while True:
            if kkt["residual"] <= tol_abs:
                reason = "converged"
                break
            if it >= max_iter:
                break
            accepted = False
            while eta >= min_step:
                trial = obj.assign(prox_step(theta, g, eta))  # as the model stores it
                s = trial - theta
                f_t = obj.value()
                F_t = f_t + penalty(trial) if math.isfinite(f_t) else math.inf
                majorised = f_t <= f + float(g @ s) + float(s @ s) / (2.0 * eta)
                if math.isfinite(f_t) and majorised and F_t <= F:
                    accepted = True
                    break
                eta *= backtrack
            if not accepted or not float(s @ s) > 0:  # no step lowers F, or a fixed point
                obj.assign(theta)
                reason = "stalled"
                break
            _, g_t = obj.value_and_grad()  # the gradient at the accepted trial
            y = g_t - g
            sy = float(s @ y)
            theta, f, g, F = trial, f_t, g_t, F_t
            it, step_last = it + 1, eta
            kkt = kkt_residual(theta, g, lmbda, pen)
            F_trace.append(F)
            r_trace.append(kkt["residual"])
            # Barzilai-Borwein trial for the next step (positive curvature along s), else grow
            if bb == "short":
                eta = sy / float(y @ y) if sy > 0 else 2.0 * eta
            else:
                eta = float(s @ s) / sy if sy > 0 else 2.0 * eta
            eta = min(max(eta, min_step), max_step)
    except BaseException:
        obj.assign(theta)  # never leave the model at a rejected trial
        raise
    finally:
        model.train(was_training)
    return ProximalResult(
        iterations=it,
        converged=reason == "converged",
        stop_reason=reason,
        kkt_before=kkt0,
        kkt_after=kkt,
        loss_before=f0,
        loss_after=f,
        objective_before=F0,
        objective_after=F,
        tol=float(tol),
        tol_abs=tol_abs,
        zeros_before=zeros0,
        zeros_after=int((theta[pen] == 0).sum()),
        evaluations=obj.evaluations,
        forward_passes=obj.forwards,
        step_last=step_last,
        seconds=time.perf_counter() - t0,
        objective_trace=F_trace,
        residual_trace=r_trace,
    )


def _check_finite(f: float, where: str) -> None:
    if not math.isfinite(f):
        raise SparsemilError(
            f"proximal finish: the training loss is {f} at the {where}; the weights or the "
            "features are not finite"
        )
