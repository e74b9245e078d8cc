"""The predicted pruning limit: spectrum + Gaussian width + sweep -> ``limit.json`` and plots.

Pipeline (:func:`run_limit`, used by ``sparsemil prune run``):

1. train with the L1 penalty (:func:`sparsemil.prune.l1.train_l1`);
2. the pruning sweep (:func:`sparsemil.prune.sweep.vision_sweep`): accuracy/loss and the
   continuous distance ``R(rho) = ||w* - w_rho||_2`` over all trainable parameters;
3. epsilon = the std (ddof 0, ``np.std`` as the official code) of the per-mini-batch training
   cross-entropy at w*, mini-batches of ``batch_size`` in the fixed, non-shuffled order.
   A fixed rule, never fitted to the measured ratio;
4. the Hessian of the training cross-entropy at w* (the L1 term has no curvature) over a
   fixed, seeded subset of the training set (``limit.hessian_samples``, default all), model in
   eval mode, BatchNorm parameters excluded; SLQ with ``lanczos_num`` runs x ``lanczos_iter``
   steps;
5. the predicted ratio: the root of ``rho = gw(R(rho))`` (bisection on the interpolated R(rho);
   also reported: the grid solution and the official grid-density/integer-R variant).

The model-agnostic core is :func:`predict_limit` (operator + sweep + epsilon -> result) and
:func:`write_limit` (result -> files); the MIL bridge calls them with its own model, loss and
sweep. Options beyond the official keys live in the config section ``limit:``
(:class:`LimitOptions`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemil.errors import SparsemilError
from sparsemil.prune.config import register_config_section
from sparsemil.prune.slq import SpectrumResult, slq, spectral_density
from sparsemil.prune.width import (
    NEGATIVE,
    gaussian_width,
    gaussian_width_grid,
    official_density,
    official_predicted_ratio,
    predicted_ratio,
)
from sparsemil.utils.io import atomic_path, atomic_write_json

DEFAULT_CRITERION = "drop_1pt"


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

    def validate(self) -> None:
        def bad(field: str, msg: str) -> SparsemilError:
            return SparsemilError(f"limit.{field}: {msg}")

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


register_config_section("limit", LimitOptions)


# --------------------------------------------------------------------------- pieces


def loss_epsilon(batch_losses: np.ndarray | torch.Tensor) -> float:
    """epsilon = std (ddof 0) of the per-mini-batch training losses at w* (official rule)."""
    arr = np.asarray(batch_losses, dtype=np.float64).reshape(-1)
    if arr.size < 2:
        raise SparsemilError(
            "epsilon: need at least 2 mini-batches of training loss (lower batch_size)"
        )
    eps = float(np.std(arr))
    if not eps > 0:
        raise SparsemilError("epsilon: the per-batch training losses are all equal (eps = 0)")
    return eps


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


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``loss_fn`` for classifiers: mean cross-entropy of ``(x, y)``."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def fixed_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, samples: int | None = None, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of a fixed (optionally seeded-subset, order-preserving) dataset."""
    n = int(y.shape[0])
    if samples is not None and samples < n:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.sort(torch.randperm(n, generator=gen)[:samples]).values.to(x.device)
        x, y = x[idx], y[idx]
        n = samples
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def threshold_indices(
    op: Any, prunable: list[tuple[nn.Module, str]], num_ratios: int
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
    op: Any, prunable: list[tuple[nn.Module, str]], num_ratios: int = 100, tol: float = 1e-7
) -> dict[str, Any]:
    """The important-eigenvalue correction: fraction f of threshold weights with a flat row.

    For each ratio ``i / num_ratios`` the Hessian row of the threshold weight is computed
    batch by batch; its L1 norm is the mean over the batches of ``||H_b e_j||_1`` (divided by
    the number of batches -- the official code divides by the number of samples, making the
    norms ``batch_size`` times too small). ``f`` = fraction of rows with norm < ``tol``.
    """
    ratios, idx = threshold_indices(op, prunable, num_ratios)
    uniq, inverse = np.unique(idx, return_inverse=True)
    E = torch.zeros(op.dim, uniq.size, dtype=torch.float64)
    E[torch.as_tensor(uniq), torch.arange(uniq.size)] = 1.0
    total = torch.zeros(uniq.size, dtype=torch.float64)
    n_batches = 0
    for _, HE in op.per_batch_matmat(E):
        total += HE.abs().sum(dim=0)
        n_batches += 1
    norms = (total / max(n_batches, 1)).numpy()[inverse]
    flat = norms < tol
    return {
        "fraction": float(flat.mean()),
        "ratios": ratios.tolist(),
        "row_l1_norms": norms.tolist(),
        "tol": tol,
        "num_batches": n_batches,
    }


# --------------------------------------------------------------------------- core


def predict_limit(
    op: Any,
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
) -> dict[str, Any]:
    """Spectrum (unless given) + gw + solver. Model-agnostic: ``op`` is any operator.

    Args:
        op: Hessian operator (``.dim``, ``.matmat``) at w*.
        ratios, distance: the sweep's ratio grid and ``R(rho)``.
        eps: loss tolerance epsilon.
        num_runs, num_steps, seed: SLQ settings (``lanczos_num``, ``lanczos_iter``).
        negative: ``abs`` or ``flat``.
        flat_fraction: important-eigenvalue fraction f (0: off).
        official_grid: also the official grid-density / integer-R prediction.
        spectrum: reuse an SLQ result instead of computing one.

    Returns:
        dict with ``predicted_ratio`` (bisection), ``predicted_ratio_grid``,
        ``predicted_ratio_official`` (or None), ``spectrum`` (SpectrumResult) and the gw
        curve on the R range.
    """
    if spectrum is None:
        spectrum = slq(op, num_runs=num_runs, num_steps=num_steps, seed=seed)
    nodes, weights = spectrum.nodes_weights()

    def gw(R: np.ndarray) -> np.ndarray:
        return gaussian_width(
            R, nodes, weights, eps, negative=negative, flat_fraction=flat_fraction
        )

    ratios = np.asarray(ratios, dtype=np.float64)
    distance = np.asarray(distance, dtype=np.float64)
    pred = predicted_ratio(ratios, distance, gw, method="bisect")
    pred_grid = predicted_ratio(ratios, distance, gw, method="grid")
    # When rho = gw(R(rho)) has no root on the swept range, say on which side it lies:
    # gw above every swept ratio -> the predicted limit is >= the largest swept ratio.
    h_ends = gw(np.interp([ratios.min(), ratios.max()], ratios, distance)) - np.array(
        [ratios.min(), ratios.max()]
    )
    bound = None
    if pred is None and h_ends[-1] > 0:
        bound = {"side": ">=", "ratio": float(ratios.max())}
    elif pred is None and h_ends[0] < 0:
        bound = {"side": "<=", "ratio": float(ratios.min())}
    r_max = float(np.nanmax(distance)) if distance.size else 0.0
    R_curve = np.linspace(0.0, max(r_max, 1e-12), 400)
    out: dict[str, Any] = {
        "predicted_ratio": pred,
        "predicted_ratio_grid": pred_grid,
        "predicted_bound": bound,
        "R_at_prediction": None if pred is None else float(np.interp(pred, ratios, distance)),
        "R_curve": R_curve,
        "gw_curve": gw(R_curve),
        "gw_at_actual": gw(distance),
        "spectrum": spectrum,
        "predicted_ratio_official": None,
    }
    if official_grid:
        grid, dens = official_density(spectrum.ritz_values, spectrum.ritz_weights)
        R_int = np.arange(0, int(math.ceil(r_max)) + 2)
        if dens.sum() > 0:
            gw_int = np.asarray(
                gaussian_width_grid(R_int, grid, dens, eps, negative, flat_fraction)
            )
            out["predicted_ratio_official"] = official_predicted_ratio(ratios, distance, gw_int)
        out["official_grid_nonzero_bins"] = int((dens > 0).sum())
    return out


def _plot_predict(path: Path, R_curve, gw_curve, distance, ratios, pred, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(distance, ratios, c="tab:blue", label="actual (R(rho), rho)")
    ax.plot(R_curve, gw_curve, c="tab:green", label="theory gw(R)")
    if pred is not None:
        ax.axhline(pred, ls="--", c="k", lw=0.8, label=f"predicted ratio {pred:.3f}")
    ax.set_xlabel("R = ||w* - w_rho||")
    ax.set_ylabel("pruning ratio")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)


def _plot_esd(path: Path, spectrum: SpectrumResult, bins: int, title: str) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, dens = spectral_density(spectrum.ritz_values, spectrum.ritz_weights, num_bins=bins)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.semilogy(grid, dens + 1e-7, c="tab:blue")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    step = float(grid[1] - grid[0])
    return {
        "bins": int(bins),
        "grid_min": float(grid[0]),
        "grid_max": float(grid[-1]),
        "bin_width": step,
    }


def write_limit(
    out_dir: str | Path,
    result: dict[str, Any],
    sweep: Any,
    eps: float,
    actual: dict[str, float | None],
    extra: dict[str, Any] | None = None,
    title: str = "",
    density_bins: int = 2000,
) -> dict[str, Any]:
    """Write ``limit.json``, ``predict.png``, ``acc_loss.png``, ``esd.png`` and
    ``spectrum.json`` (Ritz pairs) to ``out_dir``, atomically. Returns the JSON object."""
    from sparsemil.prune.plots import plot_sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spectrum: SpectrumResult = result["spectrum"]
    pred = result["predicted_ratio"]
    _plot_predict(
        out / "predict.png",
        result["R_curve"],
        result["gw_curve"],
        sweep.distance,
        sweep.ratios,
        pred,
        title or "Gaussian width prediction",
    )
    plot_sweep(sweep, out / "acc_loss.png", predicted_ratio=pred, actual=actual, title=title)
    density = _plot_esd(out / "esd.png", spectrum, density_bins, title or "Hessian ESD (SLQ)")
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
        "predicted_ratio_grid": result["predicted_ratio_grid"],
        "predicted_bound": result.get("predicted_bound"),
        "predicted_ratio_official": result["predicted_ratio_official"],
        "R_at_prediction": result["R_at_prediction"],
        "epsilon": eps,
        "epsilon_rule": "std (ddof 0) of the per-mini-batch training cross-entropy at w*",
        "D": int(spectrum.dim),
        "spectrum": spectrum.summary(),
        "density": density,
        "R_max": float(np.nanmax(sweep.distance)),
        **(extra or {}),
    }
    atomic_write_json(out / "limit.json", doc)
    return doc


# --------------------------------------------------------------------------- end to end


def run_limit(
    cfg: Any,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train with L1 -> sweep -> spectrum -> prediction for a vision config; writes files.

    ``cfg`` is a :class:`~sparsemil.prune.config.PruneConfig`; its ``limit`` section (if any)
    holds :class:`LimitOptions`. Also writes ``model.safetensors``, ``sweep.csv`` and
    ``history.json``. Returns the ``limit.json`` object.
    """
    from sparsemil.prune.evaluate import batch_losses
    from sparsemil.prune.export import save_checkpoint
    from sparsemil.prune.hvp import HessianOperator
    from sparsemil.prune.l1 import model_metadata, train_from_config
    from sparsemil.prune.magnitude import prunable_parameters
    from sparsemil.prune.sweep import actual_ratios, vision_sweep

    say = log or (lambda _msg: None)
    opts: LimitOptions = cfg.sections.get("limit") or LimitOptions()
    opts.validate()
    if opts.threads is not None:
        torch.set_num_threads(int(opts.threads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    device = cfg.resolved_device()

    t0 = time.perf_counter()
    model, data, hist = train_from_config(cfg, progress=progress, device=device)
    timings["train_s"] = time.perf_counter() - t0
    say(f"trained {cfg.model} on {data.name}: test acc {hist['test_acc'][-1]:.4f}")
    model.eval()
    save_checkpoint(out / "model.safetensors", model.cpu(), model_metadata(cfg, data))
    model.to(device)
    atomic_write_json(out / "history.json", hist)

    t0 = time.perf_counter()
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    eps = loss_epsilon(batch_losses(model, x_tr, y_tr, cfg.batch_size).numpy())
    sweep = vision_sweep(
        model,
        data,
        n_ratios=cfg.sparse_epoch,
        batch_size=cfg.eval_batch_size,
        loss_batch_size=cfg.batch_size,
        progress=progress,
    )
    sweep.to_csv(out / "sweep.csv")
    actual = actual_ratios(sweep, eps=cfg.loss_eps if cfg.loss_eps is not None else eps)
    timings["sweep_s"] = time.perf_counter() - t0
    say(f"sweep: actual {actual}")

    t0 = time.perf_counter()
    batches = fixed_batches(x_tr, y_tr, opts.hessian_batch_size, opts.hessian_samples, cfg.seed)
    op = HessianOperator(model, cross_entropy_loss, batches, method=opts.hvp_method)
    flat = 0.0
    important = None
    if opts.important:
        imp_op = HessianOperator(
            model,
            cross_entropy_loss,
            fixed_batches(x_tr, y_tr, cfg.batch_size, opts.hessian_samples, cfg.seed),
            method=opts.hvp_method,
        )
        important = important_flat_fraction(
            imp_op, prunable_parameters(model), opts.important_ratios, opts.important_tol
        )
        flat = important["fraction"]
    timings["important_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = predict_limit(
        op,
        sweep.ratios,
        sweep.distance,
        eps,
        num_runs=cfg.lanczos_num,
        num_steps=cfg.lanczos_iter,
        seed=cfg.seed,
        negative=opts.negative,
        flat_fraction=flat,
        official_grid=opts.official_grid,
    )
    timings["spectrum_s"] = time.perf_counter() - t0
    say(
        f"spectrum: {result['spectrum'].num_products} HVPs ({op.backend}) in "
        f"{timings['spectrum_s']:.1f}s; predicted ratio {result['predicted_ratio']}"
    )
    extra = {
        "timings": timings,
        "hessian": {
            "samples": int(sum(int(b[1].shape[0]) for b in batches)),
            "batch_size": opts.hessian_batch_size,
            "hvp_backend": op.backend,
            "num_products": int(op.num_products),
            "excluded": "BatchNorm parameters",
            "loss": "mean cross-entropy over samples (L1 term has zero curvature)",
        },
        "negative": opts.negative,
        "important": important,
        "flat_fraction": flat,
        "dense": dict(sweep.dense),
        "model": cfg.model,
        "dataset": data.name,
        "n_train": int(data.y_train.shape[0]),
        "lmbda": cfg.lmbda,
        "seed": cfg.seed,
        "epoch": cfg.epoch,
        "lanczos_iter": cfg.lanczos_iter,
        "lanczos_num": cfg.lanczos_num,
        "options": asdict(opts),
    }
    return write_limit(
        out,
        result,
        sweep,
        eps,
        actual,
        extra=extra,
        title=f"{cfg.model} on {data.name}, l1 {cfg.lmbda:g}, seed {cfg.seed}",
        density_bins=opts.density_bins,
    )
