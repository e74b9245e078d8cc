"""``sparsemil prune run`` for a vision config: train with L1 -> sweep -> spectrum -> prediction.

Pipeline (:func:`run_limit`):

1. train with the L1 penalty (:func:`sparsemil.experiments.vision.train.train_l1`);
2. the pruning sweep (:func:`sparsemil.prune.sweep.vision_sweep`): accuracy/loss and the
   continuous distance ``R(rho) = ||w* - w_rho||_2`` over all trainable parameters;
3. epsilon = the std (ddof 0, ``np.std`` as the official code) of the per-mini-batch training
   cross-entropy at w*, mini-batches of ``batch_size`` in the fixed, non-shuffled order;
4. the Hessian of the training cross-entropy at w* over a fixed, seeded subset of the training
   set (``limit.hessian_samples``, default all), model in eval mode, BatchNorm parameters
   excluded; SLQ with ``lanczos_num`` runs x ``lanczos_iter`` steps;
5. the predicted ratio (:func:`sparsemil.limit.predict.predict_limit`) and the report
   (:func:`sparsemil.limit.report.write_limit`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from sparsemil.curvature.hvp import HessianOperator, cross_entropy_loss, fixed_batches
from sparsemil.data.vision import load_vision_dataset
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.experiments.vision.models import load_checkpoint
from sparsemil.experiments.vision.train import model_metadata, train_from_config
from sparsemil.io import atomic_write_json
from sparsemil.limit.plots import plot_sweep
from sparsemil.limit.predict import (
    LimitOptions,
    LimitPrediction,
    important_flat_fraction,
    loss_epsilon,
    predict_limit,
)
from sparsemil.limit.report import write_limit
from sparsemil.prune.evaluate import batch_losses
from sparsemil.prune.export import save_checkpoint, save_sparse
from sparsemil.prune.magnitude import prunable_parameters, prune_model
from sparsemil.prune.result import SweepResult
from sparsemil.prune.sweep import actual_ratios, vision_sweep


def run_limit(
    cfg: Any,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train with L1 -> sweep -> spectrum -> prediction for a vision config; writes files.

    ``cfg`` is a :class:`~sparsemil.experiments.vision.config.PruneConfig`; its ``limit``
    section (if any) holds :class:`LimitOptions`. Also writes ``model.safetensors``,
    ``sweep.csv`` and ``history.json``. Returns the ``limit.json`` object.
    """
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    device = cfg.resolved_device()
    with _timed(timings, "train_s"):
        model, data, hist = train_from_config(cfg, progress=progress, device=device)
    say(f"trained {cfg.model} on {data.name}: test acc {hist['test_acc'][-1]:.4f}")
    _save_trained(cfg, model, data, hist, out, device)
    with _timed(timings, "sweep_s"):
        x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
        eps = loss_epsilon(batch_losses(model, x_tr, y_tr, cfg.batch_size).numpy())
        sweep, actual = _sweep(cfg, model, data, eps, out, progress)
    say(f"sweep: actual {actual}")
    with _timed(timings, "important_s"):
        op, batches, important = _hessian(cfg, model, x_tr, y_tr)
    flat = important["fraction"] if important is not None else 0.0
    with _timed(timings, "spectrum_s"):
        result = _predict(cfg, op, sweep, eps, flat, progress)
    say(
        f"spectrum: {result.spectrum.num_products} HVPs ({op.backend}) in "
        f"{timings['spectrum_s']:.1f}s; predicted ratio {result.predicted_ratio}"
    )
    extra = _limit_extra(cfg, data, op, batches, sweep, important, flat, timings)
    return write_limit(
        out,
        result,
        sweep,
        eps,
        actual,
        extra=extra,
        title=f"{cfg.model} on {data.name}, l1 {cfg.lmbda:g}, seed {cfg.seed}",
        density_bins=cfg.limit.density_bins,
    )


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Store the wall time of the ``with`` block as ``timings[key]`` (seconds)."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def _save_trained(
    cfg: PruneConfig, model: nn.Module, data: Any, hist: dict[str, Any], out: Path, device: Any
) -> None:
    """``model.safetensors`` (weights + metadata) and ``history.json``; the model stays in eval
    mode on ``device``."""
    model.eval()
    save_checkpoint(out / "model.safetensors", model.cpu(), model_metadata(cfg, data))
    model.to(device)
    atomic_write_json(out / "history.json", hist)


def _sweep(
    cfg: PruneConfig, model: nn.Module, data: Any, eps: float, out: Path, progress: bool
) -> tuple[SweepResult, dict[str, float | None]]:
    """The pruning sweep over ``sparse_epoch`` ratios (written to ``sweep.csv``) and the
    actual ratio of every criterion (``loss_eps`` when set, else ``eps``)."""
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
    return sweep, actual


def _hessian(
    cfg: PruneConfig, model: nn.Module, x_tr: Tensor, y_tr: Tensor
) -> tuple[HessianOperator, list[tuple[Tensor, Tensor]], dict[str, Any] | None]:
    """The Hessian operator of the training cross-entropy over the seeded ``limit.hessian_samples``
    subset, its batches, and (``limit.important``) the important-eigenvalue correction, whose
    rows are taken per training mini-batch of ``batch_size``."""
    opts: LimitOptions = cfg.limit
    batches = fixed_batches(x_tr, y_tr, opts.hessian_batch_size, opts.hessian_samples, cfg.seed)
    op = HessianOperator(model, cross_entropy_loss, batches, method=opts.hvp_method)
    if not opts.important:
        return op, batches, None
    imp_op = HessianOperator(
        model,
        cross_entropy_loss,
        fixed_batches(x_tr, y_tr, cfg.batch_size, opts.hessian_samples, cfg.seed),
        method=opts.hvp_method,
    )
    important = important_flat_fraction(
        imp_op, prunable_parameters(model), opts.important_ratios, opts.important_tol
    )
    return op, batches, important


def _predict(
    cfg: PruneConfig,
    op: HessianOperator,
    sweep: SweepResult,
    eps: float,
    flat: float,
    progress: bool = False,
) -> LimitPrediction:
    """SLQ with ``lanczos_num`` runs x ``lanczos_iter`` steps, then the prediction."""
    return predict_limit(
        op,
        sweep.ratios,
        sweep.distance,
        eps,
        num_runs=cfg.lanczos_num,
        num_steps=cfg.lanczos_iter,
        seed=cfg.seed,
        negative=cfg.limit.negative,
        flat_fraction=flat,
        official_grid=cfg.limit.official_grid,
        progress=progress,
    )


def _limit_extra(
    cfg: PruneConfig,
    data: Any,
    op: HessianOperator,
    batches: list[tuple[Tensor, Tensor]],
    sweep: SweepResult,
    important: dict[str, Any] | None,
    flat: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The vision-specific keys of ``limit.json``."""
    opts: LimitOptions = cfg.limit
    return {
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


def _vision_only(cfg: PruneConfig, what: str) -> None:
    if cfg.mil is not None:
        raise SparsemilError(
            f"config key 'mil': {what} trains vision models only; use 'prune run' for a MIL "
            "config, or 'prune mil' for a trained MIL checkpoint"
        )


def run_train(cfg: PruneConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """``prune train``: L1 training of a zoo model; writes ``model.safetensors`` (weights +
    metadata), ``config.json`` and ``history.json`` to ``out_dir``. Returns the metadata with
    ``final_test_acc`` and ``seconds``.

    Raises:
        SparsemilError: the config has a ``mil:`` section.
    """
    _vision_only(cfg, "prune train")
    model, data, hist = train_from_config(cfg, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = model_metadata(cfg, data)
    meta["final_test_acc"] = hist["test_acc"][-1] if hist["test_acc"] else None
    save_checkpoint(out / "model.safetensors", model.cpu(), meta)
    atomic_write_json(out / "config.json", cfg.to_dict())
    atomic_write_json(out / "history.json", hist)
    return {**meta, "seconds": hist["seconds"], "dataset_name": data.name}


def run_sweep(
    cfg: PruneConfig, checkpoint: str | Path, out_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """``prune sweep``: the pruning sweep of a ``prune train`` checkpoint over
    ``sparse_epoch`` ratios. Writes ``sweep.csv``, ``sweep.png``, ``sweep.json`` (dense
    metrics, the actual ratio of every criterion) and, when the configured criterion's ratio
    exists, ``pruned_sparse.safetensors``. Returns the ``sweep.json`` object.

    Raises:
        SparsemilError: a ``mil:`` section, or a checkpoint whose input shape differs from
            the dataset's.
    """
    _vision_only(cfg, "prune sweep")
    model, meta = load_checkpoint(checkpoint, device=cfg.resolved_device())
    data = load_vision_dataset(cfg.dataset, cfg.data_path, subset=cfg.subset, seed=cfg.seed)
    if tuple(meta["in_shape"]) != data.in_shape:
        raise SparsemilError(
            f"checkpoint {checkpoint}: input shape {meta['in_shape']} does not "
            f"match dataset {data.name} {list(data.in_shape)}"
        )
    res = vision_sweep(
        model,
        data,
        n_ratios=cfg.sparse_epoch,
        batch_size=cfg.eval_batch_size,
        loss_batch_size=cfg.batch_size,
        progress=progress,
    )
    summary = res.summary(eps=cfg.loss_eps)
    summary["criterion"] = cfg.actual_criterion
    summary["loss_eps"] = (
        cfg.loss_eps if cfg.loss_eps is not None else res.dense.get("train_loss_std")
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res.to_csv(out / "sweep.csv")
    plot_sweep(
        res, out / "sweep.png", actual=summary["actual_ratio"], title=f"{cfg.model} on {data.name}"
    )
    ratio = summary["actual_ratio"].get(cfg.actual_criterion)
    if ratio is not None:
        prune_model(model, ratio)
        sizes = save_sparse(out / "pruned_sparse.safetensors", model.cpu(), meta)
        summary["export"] = {"ratio": ratio, **sizes}
    atomic_write_json(out / "sweep.json", summary)
    return summary
