"""The limit report: ``limit.json``, ``spectrum.json`` and the three plots of one prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparsemil.io import atomic_write_json
from sparsemil.limit.plots import plot_prediction, plot_spectral_density, plot_sweep
from sparsemil.limit.predict import LimitPrediction
from sparsemil.prune.result import DEFAULT_CRITERION, SweepResult


def write_limit(
    out_dir: str | Path,
    result: LimitPrediction,
    sweep: SweepResult,
    eps: float,
    actual: dict[str, float | None],
    extra: dict[str, Any] | None = None,
    title: str = "",
    density_bins: int = 2000,
    warnings: list[str] | None = None,
    premises: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``limit.json``, ``predict.png``, ``acc_loss.png``, ``esd.png`` and
    ``spectrum.json`` (Ritz pairs) to ``out_dir``, atomically. Returns the JSON object.

    ``warnings`` (e.g. :func:`sparsemil.limit.predict.chance_warning`) go to ``limit.json``'s
    ``"warnings"`` list (empty when none), as do the failed premises
    (:func:`sparsemil.limit.premises.premise_checks`, stored under ``"premises"``) and a
    prediction still moving with the Lanczos step count.

    ``"official"`` and ``"drop_1pt"`` appear side by side in ``"actual_ratio"``, in
    ``"abs_error"`` (one per criterion) and in the sweep plot; ``"uncertainty"`` holds the
    spread over probes (:func:`sparsemil.limit.predict.prediction_spread`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spectrum = result.spectrum
    pred = result.predicted_ratio
    spread = result.uncertainty or {}
    interval = spread.get("interval_90")
    plot_prediction(
        out / "predict.png",
        result.R_curve,
        result.gw_curve,
        sweep.distance,
        sweep.ratios,
        pred,
        title or "Gaussian width prediction",
        interval=interval,
    )
    plot_sweep(
        sweep,
        out / "acc_loss.png",
        predicted_ratio=pred,
        actual=actual,
        title=title,
        interval=interval,
    )
    density = plot_spectral_density(
        out / "esd.png", spectrum, density_bins, title or "Hessian ESD (SLQ)"
    )
    atomic_write_json(out / "spectrum.json", spectrum.to_dict())
    doc = {
        "predicted_ratio": pred,
        "actual_ratio": dict(actual),
        "default_criterion": DEFAULT_CRITERION,
        "abs_error": _abs_error(pred, actual.get(DEFAULT_CRITERION)),
        "abs_error_by_criterion": {c: _abs_error(pred, v) for c, v in actual.items()},
        "kept_fraction_rel_error": {c: _kept_error(pred, v) for c, v in actual.items()},
        "uncertainty": result.uncertainty,
        "bounds": result.bounds,
        "predicted_ratio_grid": result.predicted_ratio_grid,
        "predicted_bound": result.predicted_bound,
        "predicted_ratio_official": result.predicted_ratio_official,
        "R_at_prediction": result.R_at_prediction,
        "epsilon": eps,
        "epsilon_rule": "std (ddof 0) of the per-mini-batch training cross-entropy at w*",
        "D": int(spectrum.dim),
        "spectrum": spectrum.summary(),
        "density": density,
        "R_max": float(np.nanmax(sweep.distance)),
        **(extra or {}),
        "premises": premises,
        "warnings": [
            *(warnings or []),
            *_spread_warnings(spread),
            *(premises or {}).get("warnings", []),
        ],
    }
    atomic_write_json(out / "limit.json", doc)
    return doc


def _abs_error(pred: float | None, actual: float | None) -> float | None:
    return None if pred is None or actual is None else abs(pred - float(actual))


def _kept_error(pred: float | None, actual: float | None) -> float | None:
    """``|(1 - pred) - (1 - actual)| / (1 - actual)``: the error in the kept fraction,
    relative to the kept fraction actually reached (what compression is about)."""
    if pred is None or actual is None or float(actual) >= 1.0:
        return None
    return abs(float(actual) - pred) / (1.0 - float(actual))


def _spread_warnings(spread: dict[str, Any]) -> list[str]:
    """A one-probe prediction and one still moving with the Lanczos step count."""
    out = []
    if spread.get("num_probes") == 1:
        out.append("uncertainty: " + spread.get("note", "one SLQ probe: no spread"))
    if spread.get("by_steps") and spread.get("stable") is None:
        steps = spread["by_steps"]["steps"]
        out.append(
            f"uncertainty: {steps[-1]} Lanczos steps give one step count, so whether the "
            "prediction has stopped moving cannot be judged; use lanczos_iter >= 16"
        )
    if spread.get("by_steps") and spread.get("stable") is False:
        steps = spread["by_steps"]
        out.append(
            "uncertainty: the prediction still moves with the Lanczos step count ("
            + ", ".join(
                f"{k}: {'-' if p is None else f'{p:.3f}'}"
                for k, p in zip(steps["steps"], steps["predicted_ratio"], strict=True)
            )
            + "); raise lanczos_iter"
        )
    return out
