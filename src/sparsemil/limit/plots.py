"""Plots of the pruning sweep and the limit prediction (matplotlib ``Figure`` objects, no
pyplot and no global backend switch; atomic PNG writes).

Every plot is :data:`WIDTH_IN` inches wide with text of 9-10 pt (:data:`FONTS`) and is
saved at :data:`DPI` (about twice a screen's 96 px per inch, so it stays sharp on dense
screens). Shown at its physical size -- ``pixels * 96 / DPI`` CSS pixels wide, as the demo
report shows every figure (:func:`display_width`) -- its text reads at 9-10 pt; two plots
fit side by side in a 1000-pixel page.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sparsemil.curvature.slq import SpectrumResult, spectral_density
from sparsemil.io import atomic_path
from sparsemil.prune.result import SweepResult

WIDTH_IN = 4.9
"""Width of every plot in inches (before ``bbox_inches="tight"`` trims or extends it)."""
DPI = 200
"""Pixels per inch of the written PNGs."""
FONTS: dict[str, float] = {
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9,
}  # fmt: skip
"""Text sizes in points (matplotlib rc keys) of every plot."""


def plot_style() -> Any:
    """A context in which new figures get :data:`FONTS` (matplotlib's ``rc_context``)."""
    from matplotlib import rc_context

    return rc_context(FONTS)


def display_width(png: str | Path) -> int | None:
    """CSS pixels that show ``png`` (or a JPEG) at its physical size (``width * 96 / dpi``,
    from the file's recorded resolution), so its text reads at the point size it was drawn
    with; ``None`` when the file records no resolution."""
    from PIL import Image

    with Image.open(png) as im:
        dpi = im.info.get("dpi")
        width = im.size[0]
    if not dpi or not dpi[0]:
        return None
    return max(1, int(round(width * 96.0 / float(dpi[0]))))


def plot_sweep(
    sweep: SweepResult,
    path: str | Path,
    predicted_ratio: float | None = None,
    actual: Mapping[str, float | None] | None = None,
    title: str | None = None,
    interval: tuple[float, float] | list[float] | None = None,
) -> Path:
    """Accuracy (left axis) and losses relative to the dense loss (right axis) against ratio.

    Args:
        sweep: the sweep.
        path: output PNG.
        predicted_ratio: draws a dashed vertical line "predicted" when given.
        actual: ``{criterion: ratio or None}``; a dotted line per defined criterion (the
            official criterion and ``drop_1pt`` are both drawn when given).
        title: figure title.
        interval: the prediction's 90 % interval over SLQ probes, drawn as a band.
    """
    with plot_style():
        return _plot_sweep(sweep, path, predicted_ratio, actual, title, interval)


def _plot_sweep(sweep, path, predicted_ratio, actual, title, interval) -> Path:
    from matplotlib.figure import Figure

    order = np.argsort(sweep.ratios, kind="stable")
    r = sweep.ratios[order]
    fig = Figure(figsize=(WIDTH_IN, 3.2), dpi=DPI)
    ax = fig.subplots()
    ax.plot(r, sweep.test_acc[order], c="tab:red", label="test accuracy")
    if "train_acc" in sweep.extra:
        ax.plot(r, sweep.extra["train_acc"][order], c="k", lw=0.8, label="train accuracy")
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    for key, colour, label in (
        ("test_loss", "tab:blue", "test loss"),
        ("train_loss", "tab:green", "train loss"),
    ):
        vals = getattr(sweep, key)[order]
        base = sweep.dense.get(key, vals[0] if len(vals) else 1.0)
        if np.isfinite(vals).any() and base:
            ax2.plot(r, vals / base, c=colour, lw=1, label=f"{label} / dense")
    ax2.set_yscale("log")
    ax2.set_ylabel("loss / dense loss (log)")
    colours = {"drop_1pt": "tab:purple", "official": "tab:orange", "train_loss_eps": "tab:olive"}
    for name, val in (actual or {}).items():
        if val is not None:
            ax.axvline(val, ls=":", c=colours.get(name, "grey"), label=f"actual ({name}) {val:.3f}")
    if predicted_ratio is not None:
        ax.axvline(predicted_ratio, ls="--", c="tab:cyan", label=f"predicted {predicted_ratio:.3f}")
    _band(ax, interval, vertical=True)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # below the axes, so no curve is hidden however many lines there are
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
              frameon=False, columnspacing=1.0, handlelength=1.6)  # fmt: skip
    if title:
        ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def _band(ax: Any, interval: Any, vertical: bool) -> None:
    """Shade the prediction's 90 % interval over probes (nothing when absent)."""
    if not interval or interval[0] is None or interval[1] is None:
        return
    lo, hi = float(interval[0]), float(interval[1])
    label = f"90% interval over probes [{lo:.3f}, {hi:.3f}]"
    if vertical:
        ax.axvspan(lo, hi, color="tab:cyan", alpha=0.15, label=label)
    else:
        ax.axhspan(lo, hi, color="grey", alpha=0.2, label=label)


def plot_prediction(
    path: Path, R_curve, gw_curve, distance, ratios, pred, title, interval=None
) -> None:
    """gw(R) against the sweep's (R(rho), rho); the predicted ratio and its interval."""
    with plot_style():
        _plot_prediction(path, R_curve, gw_curve, distance, ratios, pred, title, interval)


def _plot_prediction(path, R_curve, gw_curve, distance, ratios, pred, title, interval) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, 3.4), dpi=DPI)
    ax = fig.subplots()
    ax.plot(distance, ratios, c="tab:blue", label="actual (R(rho), rho)")
    ax.plot(R_curve, gw_curve, c="tab:green", label="theory gw(R)")
    if pred is not None:
        ax.axhline(pred, ls="--", c="k", lw=0.8, label=f"predicted ratio {pred:.3f}")
    _band(ax, interval, vertical=False)
    ax.set_xlabel("R = ||w* - w_rho||")
    ax.set_ylabel("pruning ratio")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")


def plot_spectral_density(
    path: Path, spectrum: SpectrumResult, bins: int, title: str
) -> dict[str, Any]:
    from matplotlib.figure import Figure

    grid, dens = spectral_density(spectrum.ritz_values, spectrum.ritz_weights, num_bins=bins)
    with plot_style():
        fig = Figure(figsize=(WIDTH_IN, 3.4), dpi=DPI)
        ax = fig.subplots()
        ax.semilogy(grid, dens + 1e-7, c="tab:blue")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.grid(alpha=0.3)
        ax.set_title(title)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight")
    step = float(grid[1] - grid[0])
    return {
        "bins": int(bins),
        "grid_min": float(grid[0]),
        "grid_max": float(grid[-1]),
        "bin_width": step,
    }
