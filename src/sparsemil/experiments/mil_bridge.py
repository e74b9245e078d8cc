"""The bridge: how sparse can a trained MIL model be pruned?

The same theory as for vision models (:mod:`sparsemil.limit.predict`), with MIL pieces:

- **Model:** any checkpoint written by the MIL trainer (MMIL-Transformer or a torchmil
  baseline), rebuilt with :func:`sparsemil.mil.checkpoint.load_mil_checkpoint`; features are
  standardised with the training statistics stored in the checkpoint.
- **Pruning:** one global magnitude threshold over the prunable set
  (:func:`sparsemil.prune.magnitude.prunable_set`: trainable ``Linear``/``Conv``/attention/RNN
  weights, each tensor once; biases, tokens and position embeddings untouched and listed in
  ``limit.json`` under ``parameters``).
- **Sweep:** bag-level accuracy, AUC and loss on the evaluation bags (the checkpoint's test
  fold by default), training loss on its training bags.
- **Hessian:** of the mean per-bag loss over the training bags, one bag per batch, so bags of
  different sizes need no padding. The grouping is forced to ``sequential`` (deterministic)
  and the model is in eval mode (no sub-bag masking), so two products with the same vector
  are identical even for a model trained with random grouping.
- **epsilon:** the std (ddof 0) of the mean training loss of mini-batches of the training
  batch size (``batch_size`` bags of the MIL config), over a seeded shuffle of the training
  bags at w* -- the vision rule at the batch the model was trained with (:func:`bag_epsilon`;
  batch 1 is the per-bag std). Never fitted to the measured ratio.
- **Finish** (``limit.finish: proximal``): before anything is measured, the trained weights
  are moved to a stationary point of ``CE + lmbda ||theta||_1`` (the theory's premise 1) by
  deterministic full-batch proximal gradient over all training bags, eval mode, sequential
  grouping (:func:`finish_model`, :func:`sparsemil.prune.proximal.proximal_finish`); the
  sweep, epsilon, the Hessian and the prediction then all use the finished w*.
  ``limit.json`` ``"finish"`` holds the KKT residual before and after against
  ``lmbda sqrt(D)``; a finish that stops above its tolerance is a warning.
- **Per-layer anisotropy** (``premises.layers``): the Rayleigh quotient of the
  magnitude-pruning direction restricted to each layer group (MMIL: ``proj``, ``to_qkv``,
  ``to_out``, ``classifier``; ABMIL: ``pool.fc1``, ``pool.fc2``, ``classifier``) against
  random directions of the same support size in that layer and against ``Tr(H)/D``
  (:func:`sparsemil.limit.premises.layer_anisotropy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsemil.curvature.hvp import HessianOperator, hessian_parameters
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.limit.predict import (
    LimitOptions,
    LimitPrediction,
    anisotropy_extension,
    chance_warning,
    diagnostic_trace_probes,
    important_flat_fraction,
    loss_epsilon,
    predict_limit,
)
from sparsemil.limit.premises import layer_groups, premise_checks
from sparsemil.limit.report import write_limit
from sparsemil.prune.l1 import l1_params
from sparsemil.prune.magnitude import prunable_set
from sparsemil.prune.proximal import proximal_finish
from sparsemil.prune.result import SweepResult
from sparsemil.prune.sweep import actual_ratios, pruning_sweep, sweep_ratios

MILBatch = dict[str, torch.Tensor]


@dataclass
class MILBags:
    """Standardised bags for the bridge: lists of ``X (1, N_i, C)`` and ``Y (1,)``."""

    train: list[MILBatch]
    eval: list[MILBatch]
    n_classes: int
    source: str
    eval_split: str


@contextlib.contextmanager
def deterministic_grouping(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily use sequential grouping (MMIL) so every forward pass is deterministic."""
    old = getattr(model, "grouping", None)
    if old is not None and old != "precomputed":
        model.grouping = "sequential"
    try:
        yield model
    finally:
        if old is not None:
            model.grouping = old


def bag_loss_fn(model: nn.Module, batch: MILBatch) -> torch.Tensor:
    """Mean loss of one bag ``batch = {"X": (1,N,C), "Y": (1,)}`` -- the HVP loss callable."""
    from sparsemil.mil.factory import bag_loss

    return bag_loss(model(batch["X"]), batch["Y"]).mean()


def _outputs(model: nn.Module, bags: Sequence[MILBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bag losses ``(n,)`` and class probabilities ``(n, K)``."""
    from sparsemil.mil.factory import bag_loss, bag_probabilities

    losses, probs = [], []
    with torch.inference_mode():
        for b in bags:
            out = model(b["X"])
            losses.append(bag_loss(out, b["Y"]))
            probs.append(bag_probabilities(out))
    return torch.cat(losses), torch.cat(probs)


def bag_epsilon(model: nn.Module, bags: MILBags, batch_size: int = 1, seed: int = 0) -> float:
    """epsilon of a MIL model: the std (ddof 0) of the mean training loss of mini-batches of
    ``batch_size`` bags (the training batch size), over one seeded shuffle of the training
    bags -- the vision rule at the batch the model was trained with. ``batch_size`` 1 is the
    std of the per-bag losses.

    Raises:
        SparsemilError: fewer than two mini-batches, or non-finite losses.
    """
    was = model.training
    model.eval()
    with deterministic_grouping(model):
        losses, _ = _outputs(model, bags.train)
    model.train(was)
    order = np.random.default_rng(seed).permutation(len(losses))
    vals = losses.double().cpu().numpy()[order]
    b = max(int(batch_size), 1)
    if math.ceil(vals.size / b) < 2:
        raise SparsemilError(
            f"epsilon: {vals.size} training bags give one mini-batch of {b}; need at least 2 "
            "(lower the training batch_size)"
        )
    return loss_epsilon(np.array([vals[i : i + b].mean() for i in range(0, vals.size, b)]))


def make_evaluator(bags: MILBags):
    """``evaluate(model) -> {test_acc, test_auc, test_loss, train_loss, train_loss_std}``."""
    from sklearn.metrics import roc_auc_score

    y_eval = np.array([int(b["Y"].item()) for b in bags.eval])

    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        with deterministic_grouping(model):
            tr_loss, _ = _outputs(model, bags.train)
            ev_loss, probs = _outputs(model, bags.eval)
        model.train(was)
        p = probs.double().cpu().numpy()
        if not np.all(np.isfinite(p)):
            auc = float("nan")
        elif bags.n_classes == 2:
            auc = _safe_auc(roc_auc_score, y_eval, p[:, 1])
        else:
            auc = _safe_auc(roc_auc_score, y_eval, p, multi_class="ovr")
        return {
            "test_acc": float((p.argmax(1) == y_eval).mean()),
            "test_auc": auc,
            "test_loss": float(ev_loss.mean()),
            "train_loss": float(tr_loss.mean()),
            "train_loss_std": float(tr_loss.double().std(unbiased=False)),
        }

    return evaluate


def _safe_auc(fn, y, p, **kw) -> float:
    try:
        return float(fn(y, p, **kw))
    except ValueError:  # one class only in the evaluation bags
        return float("nan")


PATH_KEYS = ("data", "data_dir", "labels", "folds_csv")


def portable_paths(cfg_dict: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """The data paths of a stored training config, usable from any working directory: a
    relative path that does not exist here but does next to the checkpoint (``base``) is
    taken from there. Old checkpoints' ``l1`` key is read as ``lmbda``."""
    out = dict(cfg_dict)
    if "l1" in out and "lmbda" not in out:
        out["lmbda"] = out.pop("l1")
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        if not Path(value).exists() and base is not None and (base / value).exists():
            out[key] = str(base / value)
    return out


def load_bridge_bags(
    meta: dict[str, Any],
    data: str | None = None,
    eval_split: str = "test",
    base: Path | None = None,
    **overrides: Any,
) -> MILBags:
    """Bags of the checkpoint's own fold (or of ``data``), standardised as in training.

    ``eval_split`` is ``test`` or ``val`` (bags the sweep evaluates); the Hessian and epsilon
    always use the training bags. ``base`` is the checkpoint's folder: stored relative data
    paths are also looked up there (:func:`portable_paths`). ``overrides`` replace stored
    keys (``data_dir``, ``format``, ``labels``, ...).
    """
    from sparsemil.train.config import MILTrainConfig
    from sparsemil.train.data import MILDataset, Standardizer, holdout_for, load_mil_data

    if eval_split not in ("test", "val"):
        raise SparsemilError(f"eval_split {eval_split!r}: use 'test' or 'val'")
    cfg_dict = portable_paths(dict(meta.get("train_config") or {}), base)
    if data is not None:
        cfg_dict["data"] = str(data)
    cfg_dict.update({k: v for k, v in overrides.items() if v is not None})
    if not cfg_dict.get("data"):
        raise SparsemilError(
            "data: the checkpoint records no training data (train_config.data); give the bag "
            "source the model was trained on"
        )
    if "fold" in meta and meta["fold"] is not None:
        cfg_dict["fold"] = int(meta["fold"])
    cfg = MILTrainConfig.from_dict(cfg_dict, source="checkpoint train_config")
    mdata = load_mil_data(cfg)
    if mdata.dim != int(meta["in_dim"]):
        raise SparsemilError(
            f"data {cfg.data}: features have {mdata.dim} dims but the checkpoint expects "
            f"{meta['in_dim']}; pass the data the model was trained on"
        )
    fold = holdout_for(mdata, cfg)
    idx_eval = fold.test if eval_split == "test" else fold.val
    if not len(idx_eval):
        raise SparsemilError(
            f"eval_split: the {eval_split} split is empty for this checkpoint; use eval_split "
            f"{'val' if eval_split == 'test' else 'test'}"
        )
    std = Standardizer.from_meta(meta.get("standardize"))

    def batches(indices: Sequence[int]) -> list[MILBatch]:
        ds = MILDataset(mdata.bags, indices, std)
        out = []
        for i in range(len(ds)):
            item = ds[i]
            out.append({"X": item["X"].unsqueeze(0).float(), "Y": item["Y"].reshape(1).long()})
        return out

    return MILBags(
        train=batches(fold.train),
        eval=batches(idx_eval),
        n_classes=mdata.n_classes,
        source=mdata.source,
        eval_split=eval_split,
    )


def _hessian_bags(bags: Sequence[MILBatch], samples: int | None, seed: int) -> list[MILBatch]:
    """The training bags of the Hessian: all, or a seeded subset of ``samples`` in order."""
    if samples is None or samples >= len(bags):
        return list(bags)
    gen = torch.Generator().manual_seed(int(seed))
    keep = torch.sort(torch.randperm(len(bags), generator=gen)[:samples]).values.tolist()
    return [bags[i] for i in keep]


def _to_device(bags: Sequence[MILBatch], device: str) -> list[MILBatch]:
    return [{k: v.to(device) for k, v in b.items()} for b in bags]


FINISH_RULE = (
    "deterministic full-batch proximal gradient (ISTA: soft-threshold on the penalised "
    "parameters, plain gradient step on the others; Barzilai-Borwein trial step, backtracking "
    "until the step is majorised and CE + lmbda ||theta||_1 does not rise) over all training "
    "bags, eval mode, sequential grouping"
)


def finish_model(
    model: nn.Module, bags: MILBags, lmbda: float | None, opts: LimitOptions
) -> tuple[dict[str, Any], list[str]]:
    """The proximal finishing phase of ``model`` on its training bags (in place): a
    stationary point of ``mean per-bag CE + lmbda ||theta_S||_1``, S = the MIL trainer's
    penalised set (:func:`sparsemil.prune.l1.l1_params`), over the Hessian's parameters.

    Returns ``(limit.json "finish" object, warnings)``.

    Raises:
        SparsemilError: ``lmbda`` missing or 0 (nothing to be stationary for).
    """
    if not lmbda or lmbda <= 0:
        raise SparsemilError(
            "limit.finish: proximal needs the L1 strength the model was trained with (lmbda "
            "> 0); the checkpoint records none -- use limit.finish: none"
        )
    was = model.training
    model.eval()
    with deterministic_grouping(model):
        res = proximal_finish(
            model,
            bag_loss_fn,
            bags.train,
            float(lmbda),
            params=hessian_parameters(model),  # the operator's coordinates (premise checks)
            penalised=[p for _, p in l1_params(model)],
            tol=opts.finish_tol,
            max_iter=opts.finish_max_iter,
        )
    model.train(was)
    doc = {"method": "proximal", "rule": FINISH_RULE, "bags": len(bags.train)}
    doc.update(res.to_dict(traces=True))  # the residual and objective after every step
    warnings = []
    if not res.converged:
        after = res.kkt_after
        warnings.append(
            f"finish: the proximal phase stopped ({res.stop_reason}) after {res.iterations} "
            f"steps with KKT residual {after['residual']:.3g} = {after['ratio']:.2g} x lmbda "
            f"sqrt(D), above its tolerance {res.tol:g} x (it started at "
            f"{res.kkt_before['ratio']:.2g} x); raise limit.finish_max_iter"
        )
    return doc, warnings


def mil_limit(
    model: nn.Module,
    bags: MILBags,
    out_dir: str | Path,
    options: LimitOptions | None = None,
    n_ratios: int = 200,
    lanczos_iter: int = 64,
    lanczos_num: int = 4,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    title: str = "",
    lmbda: float | None = None,
    epsilon_batch_size: int = 1,
    checkpoint_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """(Finish +) sweep + spectrum + prediction for a trained MIL ``model``; writes
    ``limit.json``, ``sweep.csv`` and the plots into ``out_dir``. Returns the ``limit.json``
    object.

    Args:
        model: a MIL model (torchmil contract); moved to ``device`` and put in eval mode.
        bags: training and evaluation bags (:func:`load_bridge_bags`).
        out_dir: output folder.
        options: the ``limit:`` section; every key is honoured: ``hessian_samples`` (seeded
            subset of training bags), ``hvp_method``, ``negative``, ``important`` /
            ``important_ratios`` / ``important_tol``, ``density_bins``, ``official_grid``,
            ``premises``, ``trace_probes``, ``finish`` / ``finish_tol`` / ``finish_max_iter``
            (:func:`finish_model`: ``model``'s weights are changed in place),
            ``layer_random``; not ``epsilon_batch_size``: a MIL model's epsilon
            uses its training batch size (``epsilon_batch_size`` below).
            ``hessian_batch_size`` must stay at its default: one bag is one Hessian batch
            (bags differ in size and are never padded). ``threads`` is applied by the caller.
        n_ratios, lanczos_iter, lanczos_num, seed: sweep grid and SLQ settings.
        device: torch device of the sweep and the Hessian.
        epsilon_batch_size: bags per mini-batch for epsilon (the training batch size; 1:
            the std of the per-bag losses), see :func:`bag_epsilon`.
        lmbda: the L1 strength the model was trained with, for the premise checks
            (``limit.premises``; None: taken as 0 -- the checks then warn that the model is
            outside the theory's premises). Required by ``limit.finish: proximal``.
        checkpoint_meta: the checkpoint's metadata; with a finish, the finished weights are
            written to ``out_dir/finished.safetensors`` with it.

    Raises:
        SparsemilError: ``n_ratios < 2``, no ``nn.Linear`` weights, a non-default
            ``limit.hessian_batch_size``, or ``limit.finish: proximal`` without ``lmbda``.
    """
    opts = _checked_options(options, n_ratios)
    model, params, bags = _on_device(model, bags, device)
    out = Path(out_dir)
    timings: dict[str, float] = {}
    finish, warnings = None, []
    if opts.finish == "proximal":
        t0 = time.perf_counter()
        finish, warnings = finish_model(model, bags, lmbda, opts)
        timings["finish_s"] = time.perf_counter() - t0
        if checkpoint_meta is not None:
            _save_finished(out / "finished.safetensors", model, checkpoint_meta, finish)
    else:  # an earlier run's finished weights would pass for this run's
        (out / "finished.safetensors").unlink(missing_ok=True)
    evaluate = make_evaluator(bags)
    t0 = time.perf_counter()
    sweep = pruning_sweep(model, evaluate, sweep_ratios(n_ratios), params=params, progress=progress)
    timings["sweep_s"] = time.perf_counter() - t0
    eps = bag_epsilon(model, bags, epsilon_batch_size, seed)
    out.mkdir(parents=True, exist_ok=True)
    sweep.to_csv(out / "sweep.csv")
    actual = actual_ratios(sweep, eps=eps)
    t0 = time.perf_counter()
    slq_settings = {"lanczos_iter": lanczos_iter, "lanczos_num": lanczos_num, "seed": seed}
    op, hess_bags, important, result = _mil_prediction(
        model, bags, params, sweep, eps, opts, **slq_settings, progress=progress
    )
    timings["spectrum_s"] = time.perf_counter() - t0
    premises = None
    if opts.premises:
        t0 = time.perf_counter()
        with deterministic_grouping(model):
            full_grad = None  # the Hessian's subset is not the training objective: use all bags
            if len(hess_bags) < len(bags.train):
                full_grad = HessianOperator(
                    model, bag_loss_fn, bags.train, method="autograd", check=False
                ).gradient()
            premises = premise_checks(
                op,
                params,
                result.predicted_ratio,  # None (root outside the sweep): no direction checks
                eps,
                float(lmbda or 0.0),
                penalised=[p for _, p in l1_params(model)],  # the MIL trainer's penalty
                trace_probes=diagnostic_trace_probes(opts, lanczos_num * lanczos_iter),
                seed=seed,
                samples=len(hess_bags),
                groups=_layer_groups(model) if opts.layer_random > 0 else None,
                layer_random=opts.layer_random,
                gradient=full_grad,
            )
            premises["gradient_bags"] = len(bags.train)
        timings["diagnostics_s"] = time.perf_counter() - t0
    info = _mil_info(
        op, len(hess_bags), sweep, bags, opts, important, timings, slq_settings, device
    )
    info["finish"] = finish
    aniso = (premises or {}).get("anisotropy")
    q = aniso.get("ratio") if aniso else None
    info["extension_anisotropy"] = None
    if q is not None and math.isfinite(q):
        flat = important["fraction"] if important else 0.0
        info["extension_anisotropy"] = anisotropy_extension(
            result.spectrum, sweep.ratios, sweep.distance, eps, q, opts.negative, flat
        )
    info["epsilon_batch_size"] = int(epsilon_batch_size)
    y_eval = np.array([int(b["Y"].reshape(-1)[0]) for b in bags.eval])
    warning = chance_warning(sweep.dense.get("test_acc"), y_eval, "evaluation-bag")
    return write_limit(
        out,
        result,
        sweep,
        eps,
        actual,
        extra={**info, **(extra or {})},
        title=title,
        density_bins=opts.density_bins,
        warnings=[*warnings, *([warning] if warning else [])],
        premises=premises,
    )


def _layer_groups(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """The prunable tensors by layer group (:func:`sparsemil.limit.premises.layer_group`)."""
    pset = prunable_set(model)
    return layer_groups(list(pset.names), list(pset.refs))


def _save_finished(
    path: Path, model: nn.Module, meta: dict[str, Any], finish: dict[str, Any]
) -> None:
    """The finished weights as a MIL checkpoint (the training metadata plus the finish)."""
    from sparsemil.mil.checkpoint import save_mil_checkpoint

    rebuild = ("model", "in_dim", "n_classes", "model_kwargs")
    extra = {k: v for k, v in meta.items() if k not in rebuild}
    extra["finish"] = {k: finish[k] for k in ("iterations", "converged", "stop_reason", "tol")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_mil_checkpoint(
        path, model, meta["model"], dict(meta.get("model_kwargs") or {}), extra=extra,
        in_dim=int(meta["in_dim"]), n_classes=int(meta["n_classes"]),
    )  # fmt: skip


def _checked_options(options: LimitOptions | None, n_ratios: int) -> LimitOptions:
    """The ``limit:`` options (default when None), validated for a MIL model."""
    opts = options or LimitOptions()
    opts.validate()
    if opts.hessian_batch_size != LimitOptions().hessian_batch_size:
        raise SparsemilError(
            "limit.hessian_batch_size: a MIL Hessian takes one bag per batch (bags differ "
            "in size and are never padded); remove the key, or use limit.hessian_samples "
            "to bound the number of bags"
        )
    if n_ratios < 2:
        raise SparsemilError(f"n_ratios {n_ratios}: must be at least 2")
    return opts


def _on_device(
    model: nn.Module, bags: MILBags, device: str
) -> tuple[nn.Module, list[tuple[nn.Module, str]], MILBags]:
    """The model in eval mode and the bags on ``device``; the prunable weights (the one
    prunable set, :func:`sparsemil.prune.magnitude.prunable_set`)."""
    model = model.to(device).eval()
    pset = prunable_set(model)
    if not pset.refs:
        raise SparsemilError(
            "the MIL model has no prunable weights (trainable Linear/Conv/attention/RNN weights)"
        )
    params = pset.refs
    bags = dataclasses.replace(
        bags, train=_to_device(bags.train, device), eval=_to_device(bags.eval, device)
    )
    return model, params, bags


def _mil_prediction(
    model: nn.Module,
    bags: MILBags,
    params: list[tuple[nn.Module, str]],
    sweep: SweepResult,
    eps: float,
    opts: LimitOptions,
    lanczos_iter: int,
    lanczos_num: int,
    seed: int,
    progress: bool = False,
) -> tuple[HessianOperator, list[MILBatch], dict[str, Any] | None, LimitPrediction]:
    """The Hessian over the (seeded subset of) training bags, one bag per batch, with
    deterministic grouping; the important-eigenvalue correction (``limit.important``); the
    prediction."""
    hess_bags = _hessian_bags(bags.train, opts.hessian_samples, seed)
    important = None
    with deterministic_grouping(model):
        op = HessianOperator(
            model,
            bag_loss_fn,
            hess_bags,
            method=opts.hvp_method,
            expected_products=lanczos_num * lanczos_iter
            + diagnostic_trace_probes(opts, lanczos_num * lanczos_iter)
            + 1,
        )
        if opts.important:
            important = important_flat_fraction(
                op,
                params,
                opts.important_ratios,
                opts.important_tol,
                batch_samples=[1] * len(hess_bags),  # one bag = one sample
            )
        result = predict_limit(
            op,
            sweep.ratios,
            sweep.distance,
            eps,
            num_runs=lanczos_num,
            num_steps=lanczos_iter,
            seed=seed,
            negative=opts.negative,
            flat_fraction=important["fraction"] if important else 0.0,
            official_grid=opts.official_grid,
            progress=progress,
        )
    return op, hess_bags, important, result


def _mil_info(
    op: HessianOperator,
    n_bags: int,
    sweep: SweepResult,
    bags: MILBags,
    opts: LimitOptions,
    important: dict[str, Any] | None,
    timings: dict[str, float],
    slq_settings: dict[str, int],
    device: str,
) -> dict[str, Any]:
    """The MIL-specific keys of ``limit.json``."""
    return {
        "timings": timings,
        "hessian": {
            "bags": n_bags,
            "loss": "mean over training bags of the per-bag loss (one bag per batch, no padding)",
            "grouping": "sequential (deterministic)",
            "hvp_backend": op.backend,
            "backend_choice": op.backend_choice,
            "determinism": op.determinism,
            "num_products": int(op.num_products),
        },
        "epsilon_rule": "std (ddof 0) of the mean training loss of mini-batches of "
        "epsilon_batch_size bags (the training batch size) over a seeded shuffle, at w*",
        "pruned": "global magnitude threshold over the prunable set",
        "parameters": {"prunable": prunable_set(op.model).summary()},
        "n_weights": int(sweep.n_weights),
        "dense": dict(sweep.dense),
        "eval_split": bags.eval_split,
        "n_eval_bags": len(bags.eval),
        "data": bags.source,
        **slq_settings,
        "negative": opts.negative,
        "important": important,
        "device": device,
        "options": dataclasses.asdict(opts),
    }


def run_mil_limit(
    cfg: PruneConfig, out_dir: str | Path, eval_split: str = "test", progress: bool = True
) -> dict[str, Any]:
    """``prune run`` with a ``mil:`` section: train that MIL model with its ``lmbda`` (L1 strength), then
    :func:`mil_limit` with the config's ``limit:`` section and official keys.

    The MIL config's ``seed`` is set to ``cfg.seed`` (also the SLQ probe seed); the model goes
    to ``out_dir/train/model.safetensors``, the limit files to ``out_dir``. The device is
    ``cfg.device`` for the Hessian and sweep.

    Raises:
        SparsemilError: ``cfg.mil`` is missing or has no ``data``.
    """
    from sparsemil.mil.checkpoint import load_mil_checkpoint
    from sparsemil.train.data import holdout_for, load_mil_data
    from sparsemil.train.trainer import fit_fold, preflight

    device = cfg.resolved_device()  # a missing CUDA device fails here, before training
    if cfg.mil is None:
        raise SparsemilError("config: the MIL bridge needs a 'mil:' section")
    if cfg.mil.data is None:
        raise SparsemilError("config [mil]: key 'data' is required (a bag source)")
    mil_cfg = dataclasses.replace(cfg.mil, seed=cfg.seed, progress=progress)
    data = load_mil_data(mil_cfg)  # validates every bag before training
    preflight(mil_cfg, data)
    out = Path(out_dir)
    t0 = time.perf_counter()
    fit_fold(mil_cfg, data, holdout_for(data, mil_cfg), out / "train")
    train_s = time.perf_counter() - t0
    model, meta = load_mil_checkpoint(out / "train" / "model.safetensors")
    bags = load_bridge_bags(meta, eval_split=eval_split)
    return mil_limit(
        model,
        bags,
        out,
        options=cfg.limit,
        n_ratios=cfg.sparse_epoch,
        lanczos_iter=cfg.lanczos_iter,
        lanczos_num=cfg.lanczos_num,
        seed=int(cfg.seed),
        device=device,
        progress=progress,
        title=f"{mil_cfg.model} on {Path(str(mil_cfg.data)).stem} "
        f"(lmbda {mil_cfg.lmbda:g}, seed {mil_cfg.seed})",
        lmbda=mil_cfg.lmbda,
        epsilon_batch_size=mil_cfg.batch_size * max(int(mil_cfg.accumulate_grad_batches), 1),
        checkpoint_meta=meta,
        extra={
            "model": mil_cfg.model,
            "lmbda": mil_cfg.lmbda,
            "train_s": train_s,
            "train_config": mil_cfg.to_dict(),
        },
    )
