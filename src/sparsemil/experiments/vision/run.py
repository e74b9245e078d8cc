"""``sparsemil prune run`` for a vision config: train with L1 -> sweep -> spectrum -> prediction.

Pipeline (:func:`run_limit`):

1. train with the L1 penalty (:func:`sparsemil.experiments.vision.train.train_l1`);
2. the pruning sweep (:func:`sparsemil.prune.sweep.vision_sweep`): accuracy/loss and the
   continuous distance ``R(rho) = ||w* - w_rho||_2`` over all trainable parameters;
3. epsilon = the std (ddof 0, ``np.std`` as the official code) of the per-mini-batch training
   cross-entropy at w*, mini-batches of ``limit.epsilon_batch_size`` (official 128) over one
   seeded shuffle of the training set, augmented as in training (:func:`training_epsilon`);
4. the Hessian of the training cross-entropy at w* over the whole training set (official;
   ``limit.hessian_samples`` takes a seeded subset, printed and stated in ``limit.json``),
   model in eval mode, BatchNorm parameters excluded; SLQ with ``lanczos_num`` probes (default
   4, official 1) x ``lanczos_iter`` steps;
5. the predicted ratio with its spread over probes
   (:func:`sparsemil.limit.predict.predict_limit`), the premise checks
   (:func:`sparsemil.limit.premises.premise_checks`) and the report
   (:func:`sparsemil.limit.report.write_limit`).

**One set of parameters.** Every step uses the trainable parameters, each tensor once: the
sweep, R(rho) and the export prune the prunable set
(:func:`sparsemil.prune.magnitude.prunable_set`), which lies inside the Hessian's parameters
(:func:`sparsemil.curvature.hvp.hessian_parameters`: the trainable ones minus BatchNorm's,
as the official code) and inside the L1 penalty's (``l1_scope``). Frozen weights are in none of
them; tied weights are counted once in all. ``limit.json`` states the three sets under
``"parameters"`` (with every left-out weight tensor and its reason), and the run prints them.

**Warnings** (``limit.json`` ``"warnings"``, printed): a dense model at chance-level test
accuracy (:func:`sparsemil.limit.predict.chance_warning`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsemil.curvature.hvp import (
    HessianOperator,
    cross_entropy_loss,
    fixed_batches,
    hessian_parameters,
)
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.experiments.vision.models import load_checkpoint
from sparsemil.experiments.vision.train import (
    check_epsilon_batches,
    config_dataset,
    model_metadata,
    train_from_config,
)
from sparsemil.io import atomic_write_json
from sparsemil.limit.plots import plot_sweep
from sparsemil.limit.predict import (
    LimitOptions,
    LimitPrediction,
    chance_warning,
    diagnostic_trace_probes,
    important_flat_fraction,
    loss_epsilon,
    predict_limit,
)
from sparsemil.limit.premises import premise_checks
from sparsemil.limit.report import write_limit
from sparsemil.prune.evaluate import batch_losses
from sparsemil.prune.export import save_checkpoint, save_sparse
from sparsemil.prune.l1 import l1_params
from sparsemil.prune.magnitude import PrunableSet, prunable_set, prune_model
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
    device = cfg.resolved_device()  # a missing CUDA device fails here, before any work
    out = Path(out_dir)
    t0 = time.perf_counter()
    # checks (epsilon mini-batches, augmentation) run before training; nothing is written
    # until the model is trained
    model, data, hist = train_from_config(cfg, progress=progress, device=device, min_batches=2)
    out.mkdir(parents=True, exist_ok=True)
    train_s = time.perf_counter() - t0
    say(f"trained {cfg.model} on {data.name}: test acc {hist['test_acc'][-1]:.4f}")
    _save_trained(cfg, model, data, hist, out, device)
    return _config_limit(cfg, model, data, out, train_s, progress, log)


def _config_limit(
    cfg: PruneConfig,
    model: nn.Module,
    data: Any,
    out: Path,
    train_s: float,
    progress: bool,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """:func:`model_limit` of a model trained from ``cfg`` (its L1 strength, its title)."""
    return model_limit(
        model,
        data,
        cfg,
        out,
        lmbda=cfg.lmbda if cfg.l1 and cfg.regularizer == "L1" else 0.0,
        progress=progress,
        log=log,
        timings={"train_s": train_s},
        title=f"{cfg.model} on {data.name}, l1 {cfg.lmbda:g}, seed {cfg.seed}",
    )


def resume_limit(
    cfg: Any,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Steps 2-5 of :func:`run_limit` for a run whose training finished (``model.safetensors``
    and ``history.json`` in ``out_dir``) but whose limit step did not (killed, out of memory):
    the saved model, not a new training. ``limit.json`` then records ``"resumed": true``.

    Raises:
        SparsemilError: no trained model in ``out_dir``, or one of another input shape.
    """
    out = Path(out_dir)
    ckpt, hist_f = out / "model.safetensors", out / "history.json"
    if not (ckpt.is_file() and hist_f.is_file()):
        raise SparsemilError(f"{out}: no model.safetensors + history.json to resume from")
    model, meta = load_checkpoint(ckpt, device=cfg.resolved_device())
    data = config_dataset(cfg)
    if tuple(meta["in_shape"]) != data.in_shape:
        raise SparsemilError(
            f"{ckpt}: input shape {meta['in_shape']} does not match {data.name} "
            f"{list(data.in_shape)}"
        )
    hist = json.loads(hist_f.read_text())
    (log or (lambda _m: None))(f"resumed {cfg.model} from {ckpt} (trained earlier)")
    doc = _config_limit(
        cfg, model.eval(), data, out, float(hist.get("seconds", 0.0)), progress, log
    )
    doc["resumed"] = True
    atomic_write_json(out / "limit.json", doc)
    return doc


def model_limit(
    model: nn.Module,
    data: Any,
    cfg: PruneConfig,
    out_dir: str | Path,
    lmbda: float,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """The predicted and measured pruning limit of an already trained classifier.

    Steps 2-5 of the module docstring for any ``model`` mapping ``(B, *data.in_shape)`` to
    logits ``(B, K)`` -- including one trained elsewhere, without the L1 penalty: the
    premise checks then say so in ``limit.json``'s ``warnings`` (never a bare number).

    Args:
        model: the trained network (moved to ``cfg``'s device, put in eval mode).
        data: a :class:`~sparsemil.data.vision.VisionData` (training set for epsilon and the
            Hessian, test set for the sweep).
        cfg: a :class:`PruneConfig` for the settings (``sparse_epoch``, ``lanczos_iter``,
            ``lanczos_num``, ``seed``, ``l1_scope``, ``eval_batch_size``, ``limit:``).
        out_dir: where ``limit.json``, ``sweep.csv``, ``spectrum.json`` and the plots go.
        lmbda: the L1 strength ``model`` was trained with (0: without L1).
        timings: earlier timings to report with these (e.g. ``train_s``).

    Returns:
        The ``limit.json`` object.

    Raises:
        SparsemilError: no prunable weight, non-finite weights or losses, fewer than two
            epsilon mini-batches.
    """
    from sparsemil.data.vision import check_augment

    say = log or (lambda _msg: None)
    device = cfg.resolved_device()
    check_augment(cfg.augment, data)
    out = Path(out_dir)
    timings = dict(timings or {})
    model = model.to(device).eval()
    params = parameter_sets(model, cfg.l1_scope)
    for line in params["lines"]:
        say(line)
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    with _timed(timings, "epsilon_s"):
        eps = training_epsilon(cfg, model, x_tr, y_tr, data.black)
    # the operator (and its determinism check: a random forward is refused) before any file
    with _timed(timings, "hessian_setup_s"):
        # the training set as the Hessian sees it (augmented once when augment: official)
        x_h = _augmented(cfg, x_tr, torch.Generator().manual_seed(int(cfg.seed) + 2), data.black)
        op, batches = _hessian(cfg, model, x_h, y_tr)
    out.mkdir(parents=True, exist_ok=True)
    with _timed(timings, "sweep_s"):
        sweep, actual = _sweep(cfg, model, data, eps, out, progress)
    say(f"sweep: actual {actual}")
    n_hess = int(sum(int(b[1].shape[0]) for b in batches))
    say(f"Hessian over {n_hess} of {int(y_tr.shape[0])} training samples ({op.backend} backend)")
    with _timed(timings, "important_s"):
        important = _important(cfg, model, x_h, y_tr)
    flat = important["fraction"] if important is not None else 0.0
    with _timed(timings, "spectrum_s"):
        result = _predict(cfg, op, sweep, eps, flat, progress)
    spread = result.uncertainty or {}
    say(
        f"spectrum: {result.spectrum.num_products} HVPs in {timings['spectrum_s']:.1f}s; "
        f"predicted ratio {result.predicted_ratio} (90% interval over "
        f"{cfg.lanczos_num} probes: {spread.get('interval_90')})"
    )
    premises = None
    if cfg.limit.premises:
        with _timed(timings, "diagnostics_s"):
            premises = premise_checks(
                op,
                params["prunable"].refs,
                result.predicted_ratio,  # None (root outside the sweep): no direction checks
                eps,
                float(lmbda),
                penalised=[p for _, p in l1_params(model, cfg.l1_scope)],
                trace_probes=diagnostic_trace_probes(cfg.limit, cfg.lanczos_num * cfg.lanczos_iter),
                seed=cfg.seed,
                samples=n_hess,
            )
        say(f"premises: {premises['verdict']}")
    extra = _limit_extra(cfg, data, op, batches, sweep, important, flat, timings)
    extra["parameters"] = params["summary"]
    extra["lmbda"] = float(lmbda)
    warning = chance_warning(sweep.dense.get("test_acc"), data.y_test.numpy())
    return write_limit(
        out,
        result,
        sweep,
        eps,
        actual,
        extra=extra,
        title=title or f"{type(model).__name__} on {data.name}",
        density_bins=cfg.limit.density_bins,
        warnings=[warning] if warning else [],
        premises=premises,
    )


def training_epsilon(
    cfg: PruneConfig, model: nn.Module, x: Tensor, y: Tensor, fill: Any = None
) -> float:
    """epsilon = std (ddof 0) of the mean training cross-entropy of the mini-batches of
    ``limit.epsilon_batch_size`` (official 128) over one seeded shuffle of the training set,
    augmented as in training (``augment``), at w* -- the official loader's rule
    (``cal_loss`` over the shuffled, augmented ``train_loader``)."""
    n = int(y.shape[0])
    check_epsilon_batches(cfg, n)
    gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    perm = torch.randperm(n, generator=gen).to(x.device)
    xs = _augmented(cfg, x[perm], gen, fill)
    return loss_epsilon(batch_losses(model, xs, y[perm], cfg.limit.epsilon_batch_size).numpy())


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a parameterless model)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def _augmented(cfg: PruneConfig, x: Tensor, gen: torch.Generator, fill: Any) -> Tensor:
    """``x`` augmented once (seeded) when ``augment`` is ``official`` (padding with the
    standardised black value ``fill``, :attr:`~sparsemil.data.vision.VisionData.black`), else
    ``x``."""
    if cfg.augment == "none":
        return x
    from sparsemil.data.vision import augment_batch

    return augment_batch(x, cfg.augment, gen, fill=fill)


def parameter_sets(model: nn.Module, l1_scope: str = "all") -> dict[str, Any]:
    """The prunable, Hessian and L1 parameter sets of ``model`` (see the module docstring):
    ``{"prunable": PrunableSet, "summary": JSON-able dict, "lines": console lines}``.

    Raises:
        SparsemilError: a prunable weight outside the Hessian's or the penalty's parameters
            (the sets would disagree), or no prunable weight at all.
    """
    pset: PrunableSet = prunable_set(model)
    if not pset.refs:
        raise SparsemilError(
            "model: no prunable weights (trainable Linear/Conv/attention/RNN weights); "
            f"left out: {', '.join(f'{n} ({r})' for n, r in pset.left_out.items()) or 'none'}"
        )
    hess = hessian_parameters(model)
    hess_ids = {id(p) for _, p in hess}
    pen = l1_params(model, l1_scope)
    pen_ids = {id(p) for _, p in pen}
    for name, (m, a) in zip(pset.names, pset.refs, strict=True):
        t = getattr(m, a)
        if id(t) not in hess_ids or id(t) not in pen_ids:
            where = "the Hessian's" if id(t) not in hess_ids else "the L1 penalty's"
            raise SparsemilError(f"model: prunable weight {name!r} is not among {where} parameters")
    hess_names = {n for n, _ in hess}
    hess_left = {
        n: ("frozen (requires_grad=False)" if not p.requires_grad else "BatchNorm parameter")
        for n, p in model.named_parameters()
        if n not in hess_names
    }
    summary = {
        "prunable": pset.summary(),
        "hessian": {
            "rule": "trainable parameters minus BatchNorm's (official), each tensor once",
            "n_tensors": len(hess),
            "D": int(sum(p.numel() for _, p in hess)),
            "left_out": hess_left,
        },
        "l1": {
            "scope": l1_scope,
            "n_tensors": len(pen),
            "n_params": int(sum(p.numel() for _, p in pen)),
        },
        "R": "||w* - w_rho||_2 over the prunable set (only pruned weights change)",
    }
    lines = [
        *pset.describe(),
        f"Hessian over {summary['hessian']['D']} parameters in {len(hess)} tensors "
        f"(trainable, BatchNorm excluded); L1 ({l1_scope}) over {summary['l1']['n_params']}",
    ]
    return {"prunable": pset, "summary": summary, "lines": lines}


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


def config_sweep(cfg: PruneConfig, model: nn.Module, data: Any, progress: bool) -> SweepResult:
    """:func:`sparsemil.prune.sweep.vision_sweep` with the config's ratio count
    (``sparse_epoch``) and batch sizes (``eval_batch_size``; ``batch_size`` for the
    per-batch training loss)."""
    return vision_sweep(
        model,
        data,
        n_ratios=cfg.sparse_epoch,
        batch_size=cfg.eval_batch_size,
        loss_batch_size=cfg.batch_size,
        progress=progress,
    )


def _sweep(
    cfg: PruneConfig, model: nn.Module, data: Any, eps: float, out: Path, progress: bool
) -> tuple[SweepResult, dict[str, float | None]]:
    """The pruning sweep over ``sparse_epoch`` ratios (written to ``sweep.csv``) and the
    actual ratio of every criterion (``loss_eps`` when set, else ``eps``)."""
    sweep = config_sweep(cfg, model, data, progress)
    sweep.to_csv(out / "sweep.csv")
    actual = actual_ratios(sweep, eps=cfg.loss_eps if cfg.loss_eps is not None else eps)
    return sweep, actual


def _hessian(
    cfg: PruneConfig, model: nn.Module, x_h: Tensor, y_tr: Tensor
) -> tuple[HessianOperator, list[tuple[Tensor, Tensor]]]:
    """The Hessian operator of the training cross-entropy over ``x_h`` (the training set,
    augmented once with a seeded draw when ``augment`` is ``official``: the official code
    feeds the Hessian from the augmented training loader) -- all of it (official) or the
    seeded ``limit.hessian_samples`` subset -- and its batches."""
    opts: LimitOptions = cfg.limit
    batches = fixed_batches(x_h, y_tr, opts.hessian_batch_size, opts.hessian_samples, cfg.seed)
    op = HessianOperator(
        model,
        cross_entropy_loss,
        batches,
        method=opts.hvp_method,
        expected_products=cfg.lanczos_num * cfg.lanczos_iter
        + diagnostic_trace_probes(opts, cfg.lanczos_num * cfg.lanczos_iter)
        + 1,
    )
    return op, batches


def _important(
    cfg: PruneConfig, model: nn.Module, x_h: Tensor, y_tr: Tensor
) -> dict[str, Any] | None:
    """(``limit.important``) the important-eigenvalue correction over the Hessian's samples
    ``x_h``, rows taken per training mini-batch of ``batch_size`` as in the official
    ``gradient.py``."""
    opts: LimitOptions = cfg.limit
    if not opts.important:
        return None
    imp_op = HessianOperator(
        model,
        cross_entropy_loss,
        fixed_batches(x_h, y_tr, cfg.batch_size, opts.hessian_samples, cfg.seed),
        method="autograd",  # each batch is visited once: no cache (op's may fill memory)
        check=False,  # same model and loss as the Hessian operator, already checked
    )
    return important_flat_fraction(
        imp_op, prunable_set(model).refs, opts.important_ratios, opts.important_tol
    )


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
            "of_training_samples": int(data.y_train.shape[0]),
            "subset": opts.hessian_samples is not None
            and opts.hessian_samples < int(data.y_train.shape[0]),
            "batch_size": opts.hessian_batch_size,
            "hvp_backend": op.backend,
            "num_products": int(op.num_products),
            "determinism": op.determinism,
            "backend_choice": op.backend_choice,
            "excluded": "BatchNorm parameters and frozen parameters",
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
    device = cfg.resolved_device()  # a missing CUDA device fails here, before any work
    model, data, hist = train_from_config(cfg, progress=progress, device=device)
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
    exists, ``pruned_sparse.safetensors``. Returns the ``sweep.json`` object plus ``"lines"``
    (the parameter sets, for the console).

    Raises:
        SparsemilError: a ``mil:`` section, or a checkpoint whose input shape differs from
            the dataset's.
    """
    _vision_only(cfg, "prune sweep")
    model, meta = load_checkpoint(checkpoint, device=cfg.resolved_device())
    data = config_dataset(cfg)
    if tuple(meta["in_shape"]) != data.in_shape:
        raise SparsemilError(
            f"checkpoint {checkpoint}: input shape {meta['in_shape']} does not "
            f"match dataset {data.name} {list(data.in_shape)}"
        )
    eps = (
        cfg.loss_eps
        if cfg.loss_eps is not None
        else training_epsilon(
            cfg, model, data.x_train.to(model_device(model)), data.y_train.to(model_device(model)),
            data.black,
        )
    )  # fmt: skip
    res = config_sweep(cfg, model, data, progress)
    summary = res.summary(eps=eps)
    summary["criterion"] = cfg.actual_criterion
    summary["loss_eps"] = eps
    summary["epsilon_rule"] = (
        "config key loss_eps"
        if cfg.loss_eps is not None
        else f"std of per-mini-batch training losses at batch {cfg.limit.epsilon_batch_size}"
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res.to_csv(out / "sweep.csv")
    plot_sweep(
        res, out / "sweep.png", actual=summary["actual_ratio"], title=f"{cfg.model} on {data.name}"
    )
    params = parameter_sets(model, cfg.l1_scope)
    summary["parameters"] = params["summary"]
    ratio = summary["actual_ratio"].get(cfg.actual_criterion)
    if ratio is not None:
        summary["export"] = _prune_and_save(
            model.cpu(), ratio, meta, out / "pruned_sparse.safetensors"
        )
    atomic_write_json(out / "sweep.json", summary)
    return {**summary, "lines": params["lines"]}


def _prune_and_save(model: nn.Module, ratio: float, meta: dict, path: Path) -> dict[str, Any]:
    """Prune ``model`` in place at ``ratio`` over its prunable set and write the sparse
    export; returns ``{"ratio", "n_weights", "n_pruned", "pruned_fraction", "dense_bytes",
    "sparse_bytes"}`` (``pruned_fraction`` is over the prunable set, ties included)."""
    masks = prune_model(model, ratio)
    n_weights = int(sum(m.numel() for m in masks.values()))
    n_pruned = int(sum(int((~m).sum()) for m in masks.values()))
    sizes = save_sparse(path, model, meta)
    return {
        "ratio": ratio,
        "n_weights": n_weights,
        "n_pruned": n_pruned,
        "pruned_fraction": n_pruned / max(n_weights, 1),
        **sizes,
    }


def run_export(checkpoint: str | Path, ratio: float, out: str | Path) -> dict[str, Any]:
    """``prune export``: prune a checkpoint globally by magnitude at ``ratio`` over its
    prunable set and write the compressed file ``out``. Returns :func:`_prune_and_save`'s
    dict plus ``"parameters"`` (the prunable set and every left-out weight tensor).

    Raises:
        SparsemilError: an unreadable or non-finite checkpoint, or a ratio outside [0, 1].
    """
    model, meta = load_checkpoint(checkpoint)
    params = parameter_sets(model, (meta.get("config") or {}).get("l1_scope", "all"))
    doc = _prune_and_save(model, ratio, meta, Path(out))
    return {**doc, "parameters": params["summary"], "lines": params["lines"]}
