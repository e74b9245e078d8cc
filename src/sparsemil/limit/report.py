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
) -> dict[str, Any]:
    """Write ``limit.json``, ``predict.png``, ``acc_loss.png``, ``esd.png`` and
    ``spectrum.json`` (Ritz pairs) to ``out_dir``, atomically. Returns the JSON object.

    ``warnings`` (e.g. :func:`sparsemil.limit.predict.chance_warning`) go to ``limit.json``'s
    ``"warnings"`` list (empty when none)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spectrum = result.spectrum
    pred = result.predicted_ratio
    plot_prediction(
        out / "predict.png",
        result.R_curve,
        result.gw_curve,
        sweep.distance,
        sweep.ratios,
        pred,
        title or "Gaussian width prediction",
    )
    plot_sweep(sweep, out / "acc_loss.png", predicted_ratio=pred, actual=actual, title=title)
    density = plot_spectral_density(
        out / "esd.png", spectrum, density_bins, title or "Hessian ESD (SLQ)"
    )
    atomic_write_json(out / "spectrum.json", spectrum.to_dict())
    doc = {
        "predicted_ratio": pred,
        "actual_ratio": dict(actual),
        "default_criterion": DEFAULT_CRITERION,
        "abs_error": (
            None
            if pred is None or actual.get(DEFAULT_CRITERION) is None
            else abs(pred - float(actual[DEFAULT_CRITERION]))
        ),
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
        "warnings": list(warnings or []),
    }
    atomic_write_json(out / "limit.json", doc)
    return doc
