"""The predicted pruning limit: Hessian spectrum + Gaussian width + sweep -> a prediction.

Model-agnostic core (the vision pipeline :func:`sparsemil.experiments.vision.run.run_limit`
and the MIL bridge :func:`sparsemil.experiments.mil_bridge.mil_limit` call it with their own
model, loss and sweep):

- :func:`loss_epsilon` -- epsilon = the std (ddof 0, ``np.std`` as the official code) of the
  per-mini-batch training losses at w*. A fixed rule, never fitted to the measured ratio;
- :func:`important_flat_fraction` -- the optional important-eigenvalue (flat-row) correction;
- :func:`predict_limit` -- SLQ of the Hessian (any
  :class:`~sparsemil.curvature.operator.CurvatureOperator`), then the root of
  ``rho = gw(R(rho))`` (bisection on the interpolated R(rho); also the grid solution and the
  official grid-density/integer-R variant) as a :class:`LimitPrediction`;
- :func:`sparsemil.limit.report.write_limit` turns a prediction into ``limit.json`` and plots.

Options beyond the official keys live in the config section ``limit:`` (:class:`LimitOptions`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemil.curvature.operator import CurvatureOperator, PerBatchCurvatureOperator
from sparsemil.curvature.slq import SpectrumResult, slq
from sparsemil.errors import SparsemilError
from sparsemil.limit.width import (
    NEGATIVE,
    gaussian_width,
    gaussian_width_grid,
    official_density,
    official_predicted_ratio,
    predicted_ratio,
    trace_bounds,
)
from sparsemil.prune.proximal import KKT_MAX_SHARE

DEFAULT_CRITERION = "drop_1pt"
#: ``limit.finish`` values: no finishing phase, or the proximal-gradient finish
FINISH = ("none", "proximal")


@dataclass
class LimitOptions:
    """The ``limit:`` section of a prune config (all optional).

    Attributes:
        hessian_samples: size of the seeded training subset for the Hessian (None: all).
        hessian_batch_size: samples per Hessian-vector-product batch (only speed/memory;
            the operator is the mean over samples whatever the split).
        negative: ``abs`` (official) or ``flat`` for non-positive eigenvalues.
        important: apply the important-eigenvalue (flat-fraction) correction.
        important_ratios: number of ratios ``i / n`` whose threshold weight is tested.
        important_tol: Hessian-row L1 norm below which a direction counts as flat.
        hvp_method: ``auto``, ``linearize``, ``func`` or ``autograd``.
        density_bins: grid points of the plotted density.
        official_grid: also compute the official grid-density / integer-R prediction.
        threads: torch CPU threads (None: leave torch's default).
        epsilon_batch_size: mini-batch size of the per-batch training losses whose std is
            epsilon (official: 128, over the shuffled training loader).
        premises: check the theory's premises (:mod:`sparsemil.limit.premises`): KKT
            residual, first- vs second-order loss change, anisotropy of the pruning direction.
        trace_probes: Hutch++ products for the trace in the anisotropy check (None: 5 % of
            the SLQ products, between 3 and 24, so the diagnostics stay a small share of the
            spectrum's cost; :func:`diagnostic_trace_probes`).
        finish: ``none`` or ``proximal``: before the sweep, continue training with
            deterministic full-batch proximal gradient until w* is a stationary point of
            ``CE + lmbda ||theta||_1`` (:func:`sparsemil.prune.proximal.proximal_finish`; MIL
            bridge only).
        finish_tol: stop the finish when the KKT residual is at most ``finish_tol`` x
            ``lmbda sqrt(D)``.
        finish_max_iter: most proximal-gradient steps of the finish (a finish that stops
            above the tolerance is a warning in ``limit.json``).
        layer_random: random directions per layer group in the per-layer anisotropy
            (:func:`sparsemil.limit.premises.layer_anisotropy`; MIL bridge; 0: off).
    """

    hessian_samples: int | None = None
    hessian_batch_size: int = 2048
    negative: str = "abs"
    important: bool = False
    important_ratios: int = 100
    important_tol: float = 1e-7
    hvp_method: str = "auto"
    density_bins: int = 2000
    official_grid: bool = True
    threads: int | None = None
    epsilon_batch_size: int = 128
    premises: bool = True
    trace_probes: int | None = None
    finish: str = "none"
    finish_tol: float = 0.1
    finish_max_iter: int = 200
    layer_random: int = 3

    def validate(self, where: str = "config [limit]") -> None:
        """Raise :class:`SparsemilError` naming the ``limit.<key>`` that is out of range."""

        def bad(field: str, msg: str) -> SparsemilError:
            return SparsemilError(f"{where}: key 'limit.{field}' {msg}")

        if self.hessian_samples is not None and self.hessian_samples < 1:
            raise bad("hessian_samples", "must be >= 1 or null")
        if self.hessian_batch_size < 1:
            raise bad("hessian_batch_size", "must be >= 1")
        if self.negative not in NEGATIVE:
            raise bad("negative", f"must be one of {', '.join(NEGATIVE)}")
        if self.important_ratios < 1:
            raise bad("important_ratios", "must be >= 1")
        if not self.important_tol > 0:
            raise bad("important_tol", "must be > 0")
        if self.hvp_method not in ("auto", "linearize", "func", "autograd"):
            raise bad("hvp_method", "must be auto, linearize, func or autograd")
        if self.density_bins < 10:
            raise bad("density_bins", "must be >= 10")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", "must be >= 1 or null")
        if self.epsilon_batch_size < 1:
            raise bad("epsilon_batch_size", "must be >= 1")
        if self.trace_probes is not None and self.trace_probes < 3:
            raise bad("trace_probes", "must be >= 3 (Hutch++) or null")
        if self.finish not in FINISH:
            raise bad("finish", f"must be one of {', '.join(FINISH)}")
        if not 0 < self.finish_tol <= KKT_MAX_SHARE:
            raise bad(
                "finish_tol",
                f"must be in (0, {KKT_MAX_SHARE:g}] (a share of lmbda sqrt(D); above "
                f"{KKT_MAX_SHARE:g} a 'converged' finish would still fail the KKT premise)",
            )
        if self.finish_max_iter < 0:
            raise bad("finish_max_iter", "must be >= 0")
        if self.layer_random < 0:
            raise bad("layer_random", "must be >= 0")


def diagnostic_trace_probes(opts: LimitOptions, slq_products: int) -> int:
    """Hutch++ products for the premise checks: ``limit.trace_probes``, or 5 % of the SLQ
    products clipped to [3, 24] (24 at the official 128 steps x 4 probes)."""
    if opts.trace_probes is not None:
        return int(opts.trace_probes)
    return int(min(24, max(3, round(0.05 * slq_products))))


@dataclass
class LimitPrediction:
    """What :func:`predict_limit` predicts (arrays are float64).

    Attributes:
        predicted_ratio: the root of ``rho = gw(R(rho))`` by bisection on the interpolated
            R(rho); None when there is no root on the swept range.
        predicted_ratio_grid: the largest swept ratio with ``gw(R(rho)) >= rho`` (or None).
        predicted_bound: when ``predicted_ratio`` is None, on which side of the swept range
            the root lies: ``{"side": ">=" | "<=", "ratio": r}``; else None.
        R_at_prediction: ``R(predicted_ratio)`` (None without a prediction).
        R_curve: 400 distances from 0 to the largest swept distance.
        gw_curve: ``gw(R_curve)``.
        gw_at_actual: ``gw`` at every swept distance.
        spectrum: the SLQ result the prediction used.
        predicted_ratio_official: the official grid-density / integer-R variant (None when
            not computed, or when the official density is empty).
        official_grid_nonzero_bins: non-empty bins of the official density (None when not
            computed).
        bounds: :func:`trace_bracket`'s dict (the ratios solved with the trace-based lower
            and upper bounds on gw).
        uncertainty: :func:`prediction_spread`'s dict (spread over probes, ``abs``/``flat``,
            the non-positive Ritz mass, the prediction per Lanczos step count).
    """

    predicted_ratio: float | None
    predicted_ratio_grid: float | None
    predicted_bound: dict[str, Any] | None
    R_at_prediction: float | None
    R_curve: np.ndarray
    gw_curve: np.ndarray
    gw_at_actual: np.ndarray
    spectrum: SpectrumResult
    predicted_ratio_official: float | None = None
    official_grid_nonzero_bins: int | None = None
    uncertainty: dict[str, Any] | None = None
    bounds: dict[str, Any] | None = None


# --------------------------------------------------------------------------- pieces


def loss_epsilon(batch_losses: np.ndarray | torch.Tensor) -> float:
    """epsilon = std (ddof 0) of the per-mini-batch training losses at w* (official rule)."""
    arr = np.asarray(batch_losses, dtype=np.float64).reshape(-1)
    if arr.size < 2:
        raise SparsemilError(
            "epsilon: need at least 2 mini-batches of training loss (lower batch_size)"
        )
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise SparsemilError(
            f"epsilon: {bad} of {arr.size} per-batch training losses are NaN/Inf; the model's "
            "weights or outputs are not finite (the training diverged: lower config key 'lr')"
        )
    eps = float(np.std(arr))
    if not eps > 0:
        raise SparsemilError("epsilon: the per-batch training losses are all equal (eps = 0)")
    return eps


def chance_warning(accuracy: float, labels: Any, name: str = "test") -> str | None:
    """A warning when ``accuracy`` is at chance level on ``labels``, else ``None``.

    Chance is the accuracy of always predicting the most frequent class of ``labels`` (1/K for
    balanced classes). The accuracy counts as chance level when it is at most chance plus
    ``max(0.02, 3 sigma)``, sigma = ``sqrt(c (1 - c) / n)`` being the binomial spread of a
    chance predictor on ``n`` samples: the model has learned nothing measurable, and a
    pruning limit of such a model says nothing about the network.
    """
    y = np.asarray(labels).reshape(-1)
    if y.size == 0 or accuracy is None or not math.isfinite(float(accuracy)):
        return None
    _, counts = np.unique(y, return_counts=True)
    chance = float(counts.max() / y.size)
    margin = max(0.02, 3.0 * math.sqrt(chance * (1.0 - chance) / y.size))
    if float(accuracy) > chance + margin:
        return None
    return (
        f"chance-level accuracy: the dense model's {name} accuracy {float(accuracy):.4f} is "
        f"within {margin:.3f} of chance ({chance:.4f}, {counts.size} classes, n={y.size}); "
        "the model has not learned, so its predicted pruning limit is not meaningful "
        "(train longer or with a larger lr)"
    )


def censored_abs_error(
    predicted: float | None, bound: dict[str, Any] | None, actual: float | None
) -> float | None:
    """``|predicted - actual|``; when the root of rho = gw(R(rho)) lies outside the swept
    range (``predicted`` None, ``bound`` = ``{"side": ">=" | "<=", "ratio": r}``), the
    smallest error consistent with the bound: 0 when ``actual`` lies on the bound's side
    (e.g. both censored at the largest swept ratio), else its distance to ``r``.
    ``None`` when there is nothing to compare.
    """
    if actual is None:
        return None
    if predicted is not None:
        return abs(float(predicted) - float(actual))
    if not bound:
        return None
    r = float(bound["ratio"])
    return max(0.0, r - actual) if bound["side"] == ">=" else max(0.0, actual - r)


def actual_censoring(actual: float | None, rho_max: float, tol: float = 1e-9) -> str | None:
    """Why a measured limit cannot be scored (``None``: it can): undefined, or at the largest
    swept ratio ``rho_max`` (the accuracy or loss never crossed the threshold, so the limit is
    only known to be ``>= rho_max``). Censored limits are counted, never scored as error 0."""
    if actual is None:
        return "actual undefined"
    if actual >= rho_max - tol:
        return "actual at rho_max"
    return None


def threshold_indices(
    op: PerBatchCurvatureOperator, prunable: list[tuple[nn.Module, str]], num_ratios: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat operator indices of the pruning-threshold weight for ratios ``i / num_ratios``.

    The threshold weight at ratio rho is the k-th smallest |w| over the prunable weights,
    ``k = max(1, ceil(rho N_w))`` (first occurrence on ties, as the official code).
    """
    from sparsemil.prune.magnitude import num_to_prune

    offsets = {}
    pos = 0
    for p, n in zip(op.params, op.numels, strict=True):
        offsets[id(p)] = pos
        pos += n
    tensors = [getattr(m, name) for m, name in prunable]
    missing = [i for i, t in enumerate(tensors) if id(t) not in offsets]
    if missing:
        raise SparsemilError("important eigenvalues: a prunable weight is not in the Hessian")
    flat_idx = torch.cat(
        [torch.arange(t.numel()) + offsets[id(t)] for t in tensors]
    )  # prunable order -> operator index
    mags = torch.cat([t.detach().abs().reshape(-1).cpu() for t in tensors]).double()
    order = torch.sort(mags, stable=True).indices
    ratios = np.arange(num_ratios, dtype=np.float64) / num_ratios
    ks = np.array([num_to_prune(r, mags.numel()) for r in ratios])
    return ratios, flat_idx[order[ks - 1]].numpy()


def important_flat_fraction(
    op: PerBatchCurvatureOperator,
    prunable: list[tuple[nn.Module, str]],
    num_ratios: int = 100,
    tol: float = 1e-7,
    batch_samples: list[int] | None = None,
) -> dict[str, Any]:
    """The important-eigenvalue correction: fraction f of threshold weights with a flat row.

    For each ratio ``i / num_ratios`` the Hessian row of the threshold weight is computed
    batch by batch; its L1 norm is, as in the official ``gradient.py``, the sum over batches
    of ``||H_b e_j||_1`` (``H_b`` the Hessian of batch b's mean loss) divided by the number
    of *samples*, so ``tol`` (official 1e-7) has the authors' calibration at their batch size
    (128). ``f`` = fraction of rows with norm < ``tol``.

    Args:
        batch_samples: samples in each of ``op``'s batches (default: the leading dimension
            of each batch, :func:`~sparsemil.curvature.hvp.batch_size_of`; MIL passes 1 per
            bag).
    """
    from sparsemil.curvature.hvp import batch_size_of

    ratios, idx = threshold_indices(op, prunable, num_ratios)
    if batch_samples is None:
        batch_samples = [int(batch_size_of(b)) for b in getattr(op, "batches", [])]
    uniq, inverse = np.unique(idx, return_inverse=True)
    E = torch.zeros(op.shape[0], uniq.size, dtype=torch.float64)
    E[torch.as_tensor(uniq), torch.arange(uniq.size)] = 1.0
    total = torch.zeros(uniq.size, dtype=torch.float64)
    n_batches = 0
    for _, HE in op.per_batch_matmat(E):
        total += HE.abs().sum(dim=0).cpu()
        n_batches += 1
    n_samples = int(sum(batch_samples)) if batch_samples else n_batches
    norms = (total / max(n_samples, 1)).numpy()[inverse]
    flat = norms < tol
    return {
        "fraction": float(flat.mean()),
        "ratios": ratios.tolist(),
        "row_l1_norms": norms.tolist(),
        "tol": tol,
        "num_batches": n_batches,
        "num_samples": n_samples,
        "normalisation": "sum over batches of ||H_b e_j||_1 / samples (official gradient.py)",
    }


# --------------------------------------------------------------------------- spread

#: absolute change (in ratio) below which the prediction counts as stable in the step count
STEP_TOL = 0.01


def _root_or_end(
    ratios: np.ndarray, distance: np.ndarray, gw: GwFunction
) -> tuple[float | None, bool]:
    """``(ratio, censored)``: the root of rho = gw(R(rho)); when it lies outside the swept
    range, the end of the range it lies beyond and ``censored = True``."""
    pred = predicted_ratio(ratios, distance, gw, method="bisect")
    if pred is not None:
        return pred, False
    bound = _predicted_bound(ratios, distance, gw, pred)
    return (None, False) if bound is None else (float(bound["ratio"]), True)


def _solve(
    spectrum: SpectrumResult,
    ratios: np.ndarray,
    distance: np.ndarray,
    eps: float,
    negative: str,
    flat_fraction: float,
) -> tuple[float | None, bool]:
    """:func:`_root_or_end` for the width of ``spectrum``."""
    return _root_or_end(ratios, distance, _gw_function(spectrum, eps, negative, flat_fraction))


def _interval(values: list[float | None]) -> dict[str, Any]:
    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return {"min": None, "max": None, "q05": None, "q95": None}
    return {
        "min": float(vals.min()),
        "max": float(vals.max()),
        "q05": float(np.quantile(vals, 0.05)),
        "q95": float(np.quantile(vals, 0.95)),
    }


def prediction_spread(
    spectrum: SpectrumResult,
    ratios: np.ndarray,
    distance: np.ndarray,
    eps: float,
    negative: str = "abs",
    flat_fraction: float = 0.0,
    n_boot: int = 500,
    seed: int = 0,
    step_tol: float = STEP_TOL,
) -> dict[str, Any]:
    """How sure the prediction is: its spread over the SLQ probes and its sensitivity.

    Computed from the Ritz pairs already in ``spectrum`` (no Hessian products):

    - ``per_probe``: the prediction from each probe's quadrature alone, with ``min``/``max``;
    - ``interval_90``: the 5 %% and 95 %% quantiles of the pooled prediction over ``n_boot``
      bootstrap resamples of the probes (Efron's percentile interval; seeded). With one
      probe there is no spread to measure: ``None`` and a note;
    - ``by_negative``: the prediction under ``abs`` (official) and under ``flat``, and
      ``nonpositive_mass`` (weight of Ritz values <= 0; the two agree when it is ~0);
    - ``by_steps``: the pooled prediction from the first k Lanczos steps, k = 8, 16, 32, ...
      and the full count; ``stable_at_steps``: the smallest k from which every prediction is
      within ``step_tol`` (absolute, in ratio) of the full-step one (None when only the last
      count agrees with itself); ``stable`` is False when still moving (raise
      ``lanczos_iter``), None with a single count (fewer than 16 steps: nothing to compare,
      and a warning says so).

    A root outside the swept range counts as the range's end it lies beyond (``censored``).

    Source: SLQ's error is dominated by the probe variance (Ubaru, Chen & Saad 2017, Thm 4.1);
    resampling probes estimates it without new products.
    """
    args = (
        np.asarray(ratios, np.float64),
        np.asarray(distance, np.float64),
        eps,
        negative,
        flat_fraction,
    )
    runs = int(spectrum.ritz_values.shape[0])
    central, _ = _solve(spectrum, *args)
    per_probe, censored = [], 0
    for r in range(runs):
        v, c = _solve(spectrum.select_runs([r]), *args)
        per_probe.append(v)
        censored += int(c)
    out: dict[str, Any] = {
        "central": central,
        "num_probes": runs,
        "per_probe": per_probe,
        "per_probe_censored": censored,
        **{k: v for k, v in _interval(per_probe).items() if k in ("min", "max")},
        "interval_90": None,
        "bootstrap_resamples": 0,
    }
    if runs > 1:
        gen = np.random.default_rng(seed)
        boot = [
            _solve(spectrum.select_runs(gen.integers(0, runs, runs)), *args)[0]
            for _ in range(n_boot)
        ]
        iv = _interval(boot)
        out["interval_90"] = [iv["q05"], iv["q95"]]
        out["bootstrap_resamples"] = int(n_boot)
    else:
        out["note"] = "one SLQ probe: no spread can be measured (raise lanczos_num to >= 4)"
    nodes, weights = spectrum.nodes_weights()
    out["nonpositive_mass"] = float(weights[nodes <= 0].sum())
    out["by_negative"] = {
        neg: _solve(spectrum, args[0], args[1], eps, neg, flat_fraction)[0] for neg in NEGATIVE
    }
    out.update(_by_steps(spectrum, args, step_tol))
    return out


def _by_steps(spectrum: SpectrumResult, args: tuple, step_tol: float) -> dict[str, Any]:
    """The prediction per Lanczos step count and where it stopped moving."""
    if spectrum.alpha is None:
        return {"by_steps": None, "stable_at_steps": None}
    full = int(spectrum.alpha.shape[1])
    steps = [k for k in (8, 16, 32, 64, 128, 256, 512) if k < full] + [full]
    preds = [_solve(spectrum.truncated(k), *args)[0] for k in steps]
    final = preds[-1]
    stable = None
    if final is not None:
        for i, k in enumerate(steps):
            if all(p is not None and abs(p - final) <= step_tol for p in preds[i:]):
                stable = k
                break
    if stable == full and len(steps) > 1:
        stable = None  # only the last count agrees with itself: still moving
    return {
        "by_steps": {"steps": steps, "predicted_ratio": preds},
        "stable_at_steps": stable,
        "step_tol": step_tol,
        # None: a single step count, nothing to compare
        "stable": None if len(steps) < 2 else stable is not None,
    }


def trace_bracket(
    spectrum: SpectrumResult,
    ratios: np.ndarray,
    distance: np.ndarray,
    eps: float,
    negative: str = "abs",
    flat_fraction: float = 0.0,
) -> dict[str, Any]:
    """The bracket of the predicted ratio from the trace bounds on gw
    (:func:`sparsemil.limit.width.trace_bounds`): ``rho = bound(R(rho))`` solved for the
    Jensen lower bound (also the trace-only, isotropic-spectrum predictor) and the chord
    upper bound. ``lower``/``upper`` are ratios (a root outside the swept range counts as the
    range's end it lies beyond). The trace is the SLQ quadrature's ``Tr|H|`` under ``abs``.
    """
    nodes, weights = spectrum.nodes_weights()
    tb = trace_bounds(nodes, weights, eps, negative, flat_fraction)
    r = np.asarray(ratios, np.float64)
    dist = np.asarray(distance, np.float64)
    lower = _root_or_end(r, dist, tb["lower"])[0]
    return {
        "lower": lower,
        "upper": _root_or_end(r, dist, tb["upper"])[0],
        "trace_only": lower,
        "mean_curvature": tb["mean_curvature"],
        "max_curvature": tb["max_curvature"],
        "trace": "Tr|H| (SLQ quadrature)" if negative == "abs" else "Tr(H_+) (SLQ quadrature)",
        "nonpositive_mass": tb["nonpositive_mass"],
        "rule": "Jensen (lower) and chord 0..lambda_max (upper) on the convex "
        "c -> 2 eps / (2 eps + R^2 c)",
    }


def anisotropy_extension(
    spectrum: SpectrumResult,
    ratios: np.ndarray,
    distance: np.ndarray,
    eps: float,
    q: float,
    negative: str = "abs",
    flat_fraction: float = 0.0,
) -> dict[str, Any]:
    """EXTENSION, not the paper's formula: the prediction with the spectrum scaled by the
    measured anisotropy ``q`` = Rayleigh quotient of the pruning direction at the paper's
    predicted ratio over ``Tr(H)/D`` (:func:`sparsemil.limit.premises.premise_checks`).

    The Gaussian width averages the curvature over random directions; when the magnitude-
    pruning direction is ``q`` times as curved as an average one, the loss along it rises as
    if every eigenvalue were ``q`` times larger. Since gw depends on ``R^2 lambda`` only, that
    is ``rho = gw(sqrt(q) R(rho))``. ``q`` is measured once, at the paper's prediction (one
    step, not iterated to a fixed point). Reported next to, never instead of, the paper's
    prediction.
    """
    label = (
        "extension (not the paper's formula): rho = gw(sqrt(q) R(rho)), q = "
        "d.Hd / d.d over Tr(H)/D at the paper's predicted ratio"
    )
    if not (math.isfinite(float(q)) and float(q) > 0):
        # negative (or zero) curvature along the pruning direction: the scaled quadratic
        # model predicts nothing; no number rather than gw(0)
        return {"predicted_ratio": None, "predicted_bound": None, "q": float(q),
                "label": label,
                "reason": f"q = {float(q):.3g} <= 0: no positive curvature along the "
                "pruning direction"}  # fmt: skip
    gw = _gw_function(spectrum, eps, negative, flat_fraction)
    root = math.sqrt(float(q))

    def scaled(R: np.ndarray) -> np.ndarray:
        return gw(root * np.asarray(R, dtype=np.float64))

    r = np.asarray(ratios, np.float64)
    dist = np.asarray(distance, np.float64)
    pred = predicted_ratio(r, dist, scaled, method="bisect")
    return {
        "predicted_ratio": pred,
        "predicted_bound": _predicted_bound(r, dist, scaled, pred),
        "q": float(q),
        "label": label,
    }


# --------------------------------------------------------------------------- core


GwFunction = Callable[[np.ndarray], np.ndarray]


def _gw_function(
    spectrum: SpectrumResult, eps: float, negative: str, flat_fraction: float
) -> GwFunction:
    """``R -> gw(R)`` from the SLQ nodes and weights."""
    nodes, weights = spectrum.nodes_weights()

    def gw(R: np.ndarray) -> np.ndarray:
        return np.asarray(
            gaussian_width(R, nodes, weights, eps, negative=negative, flat_fraction=flat_fraction)
        )

    return gw


def _predicted_bound(
    ratios: np.ndarray, distance: np.ndarray, gw: GwFunction, pred: float | None
) -> dict[str, Any] | None:
    """When rho = gw(R(rho)) has no root on the swept range, say on which side it lies:
    gw above every swept ratio -> the predicted limit is >= the largest swept ratio."""
    if pred is not None:
        return None
    ends = np.array([ratios.min(), ratios.max()])
    h_ends = gw(np.interp(ends, ratios, distance)) - ends
    if h_ends[-1] > 0:
        return {"side": ">=", "ratio": float(ratios.max())}
    if h_ends[0] < 0:
        return {"side": "<=", "ratio": float(ratios.min())}
    return None


def _official_prediction(
    spectrum: SpectrumResult,
    ratios: np.ndarray,
    distance: np.ndarray,
    eps: float,
    negative: str,
    flat_fraction: float,
    r_max: float,
) -> tuple[float | None, int]:
    """The official grid-density / integer-R prediction and the density's non-empty bins."""
    grid, dens = official_density(spectrum.ritz_values, spectrum.ritz_weights)
    pred = None
    if dens.sum() > 0:
        R_int = np.arange(0, int(math.ceil(r_max)) + 2)
        gw_int = np.asarray(gaussian_width_grid(R_int, grid, dens, eps, negative, flat_fraction))
        pred = official_predicted_ratio(ratios, distance, gw_int)
    return pred, int((dens > 0).sum())


def predict_limit(
    op: CurvatureOperator,
    ratios: np.ndarray,
    distance: np.ndarray,
    eps: float,
    num_runs: int = 1,
    num_steps: int = 128,
    seed: int = 0,
    negative: str = "abs",
    flat_fraction: float = 0.0,
    official_grid: bool = True,
    spectrum: SpectrumResult | None = None,
    progress: bool = False,
    spread: bool = True,
) -> LimitPrediction:
    """Spectrum (unless given) + gw + solver. Model-agnostic: ``op`` is any operator.

    Args:
        op: Hessian operator at w* (a :class:`~sparsemil.curvature.operator.CurvatureOperator`).
        ratios, distance: the sweep's ratio grid and ``R(rho)``.
        eps: loss tolerance epsilon.
        num_runs, num_steps, seed: SLQ settings (``lanczos_num``, ``lanczos_iter``).
        negative: ``abs`` or ``flat``.
        flat_fraction: important-eigenvalue fraction f (0: off).
        official_grid: also the official grid-density / integer-R prediction.
        spectrum: reuse an SLQ result instead of computing one.
        spread: also :func:`prediction_spread` (``result.uncertainty``; no extra products).

    Returns:
        :class:`LimitPrediction`: ``predicted_ratio`` (bisection), ``predicted_ratio_grid``,
        ``predicted_ratio_official`` (or None), the ``spectrum`` and the gw curve on the R range.
    """
    if spectrum is None:
        spectrum = slq(op, num_runs=num_runs, num_steps=num_steps, seed=seed, progress=progress)
    gw = _gw_function(spectrum, eps, negative, flat_fraction)
    ratios = np.asarray(ratios, dtype=np.float64)
    distance = np.asarray(distance, dtype=np.float64)
    pred = predicted_ratio(ratios, distance, gw, method="bisect")
    r_max = float(np.nanmax(distance)) if distance.size else 0.0
    R_curve = np.linspace(0.0, max(r_max, 1e-12), 400)
    result = LimitPrediction(
        predicted_ratio=pred,
        predicted_ratio_grid=predicted_ratio(ratios, distance, gw, method="grid"),
        predicted_bound=_predicted_bound(ratios, distance, gw, pred),
        R_at_prediction=None if pred is None else float(np.interp(pred, ratios, distance)),
        R_curve=R_curve,
        gw_curve=gw(R_curve),
        gw_at_actual=gw(distance),
        spectrum=spectrum,
    )
    if official_grid:
        result.predicted_ratio_official, result.official_grid_nonzero_bins = _official_prediction(
            spectrum, ratios, distance, eps, negative, flat_fraction, r_max
        )
    result.bounds = trace_bracket(spectrum, ratios, distance, eps, negative, flat_fraction)
    if spread:
        result.uncertainty = prediction_spread(
            spectrum, ratios, distance, eps, negative, flat_fraction, seed=seed
        )
    return result
