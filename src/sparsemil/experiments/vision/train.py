"""Training with an L1 (or L2) penalty, as in the official code (the vision reproduction).

Loss per mini-batch: ``CE(model(x), y) + lmbda * penalty`` with the penalty of
:func:`sparsemil.prune.l1.l1_penalty` over :func:`sparsemil.prune.l1.l1_params` (``l1_scope``).

Optimiser: SGD with momentum (or Adam), ``weight_decay`` as given. Learning rate: linear warm-up
over the first ``warm`` epochs (per iteration, as the official ``WarmUpLR``), then -- if
``schedu`` -- a multistep (``milestones``/``gamma``) or cosine (``T_max = epoch``) schedule
evaluated **per epoch**. (The official code calls ``scheduler.step()`` every iteration while its
milestones are epoch numbers, so its decays happen after that many *iterations*.)

Determinism: shuffling uses a ``torch.Generator`` seeded with ``cfg.seed``; no global RNG.

Divergence: training stops at the first non-finite (NaN/Inf) mini-batch loss with a one-line
:class:`~sparsemil.errors.SparsemilError` (epoch, iteration, learning rate), and a model whose
weights end non-finite is refused the same way -- nothing is written.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsemil.data.vision import VisionData
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.experiments.vision.models import build_model, check_finite_weights
from sparsemil.prune.evaluate import evaluate_split
from sparsemil.prune.l1 import l1_params, l1_penalty


def lr_at(cfg: PruneConfig, epoch: int, it: int, iters_per_epoch: int) -> float:
    """Learning rate at iteration ``it`` of ``epoch`` (warm-up per iteration, schedule per epoch)."""
    lr = cfg.lr
    if cfg.schedu:
        if cfg.schedumode == "multistep":
            lr *= cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
        else:  # cosine annealing with T_max = cfg.epoch, eta_min = 0
            lr *= 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epoch, 1)))
    if cfg.warm > 0 and epoch < cfg.warm:
        lr *= (epoch * iters_per_epoch + it) / (cfg.warm * iters_per_epoch + 1e-8)
    return lr


def make_optimizer(model: nn.Module, cfg: PruneConfig) -> torch.optim.Optimizer:
    """SGD (momentum, no Nesterov) or Adam over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_l1(
    model: nn.Module,
    data: VisionData,
    cfg: PruneConfig,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``data`` with the penalised loss; returns the history.

    Args:
        model: network mapping ``(B, *data.in_shape)`` to ``(B, data.num_classes)``.
        data: tensors of the dataset (moved to ``device`` here).
        cfg: batch_size, optim, lr, momentum, weight_decay, epoch, l1, lmbda, regularizer,
            schedu, schedumode, milestones, gamma, warm, l1_scope, seed, eval_batch_size.
        progress: show a tqdm bar per epoch (stderr).
        device: defaults to ``cfg.resolved_device()``.

    Returns:
        dict of per-epoch lists ``epoch, lr, train_loss`` (mean penalised loss over the epoch's
        batches), ``train_ce``, ``penalty`` (unscaled, at epoch end), ``test_acc``, ``test_loss``,
        and ``seconds`` (total wall time).
    """
    from tqdm.auto import tqdm

    device = torch.device(device or cfg.resolved_device())
    model.to(device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    n = int(y.shape[0])
    iters = max(1, math.ceil(n / cfg.batch_size))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    opt = make_optimizer(model, cfg)
    pen_params = [p for _, p in l1_params(model, cfg.l1_scope)]
    use_pen = cfg.l1 and cfg.lmbda > 0
    hist: dict[str, Any] = {
        k: [] for k in ("epoch", "lr", "train_loss", "train_ce", "penalty", "test_acc", "test_loss")
    }
    t0 = time.perf_counter()
    for epoch in range(cfg.epoch):
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        tot_loss = torch.zeros((), dtype=torch.float64, device=device)
        tot_ce = torch.zeros((), dtype=torch.float64, device=device)
        bar = tqdm(
            range(iters),
            desc=f"epoch {epoch + 1}/{cfg.epoch}",
            disable=not progress,
            leave=False,
            unit="it",
        )
        for it in bar:
            lr = lr_at(cfg, epoch, it, iters)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[it * cfg.batch_size : (it + 1) * cfg.batch_size]
            ce = F.cross_entropy(model(x[idx]), y[idx])
            loss = (
                (ce + cfg.lmbda * l1_penalty(model, pen_params, cfg.regularizer)) if use_pen else ce
            )
            if not bool(torch.isfinite(loss)):
                raise SparsemilError(
                    f"training diverged: the loss is {float(loss.detach())} at epoch {epoch + 1}, "
                    f"iteration {it + 1} (lr {lr:g}); lower config key 'lr'"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.detach().double()
            tot_ce += ce.detach().double()
        ev = evaluate_split(model, x_te, y_te, cfg.eval_batch_size)
        with torch.no_grad():
            pen = float(l1_penalty(model, pen_params, cfg.regularizer))
        hist["epoch"].append(epoch + 1)
        hist["lr"].append(lr_at(cfg, epoch, 0, iters))
        hist["train_loss"].append(float(tot_loss) / iters)
        hist["train_ce"].append(float(tot_ce) / iters)
        hist["penalty"].append(pen)
        hist["test_acc"].append(ev["acc"])
        hist["test_loss"].append(ev["loss"])
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epoch}: train loss {hist['train_loss'][-1]:.4f} "
                f"test acc {ev['acc']:.4f}"
            )
    model.eval()
    check_finite_weights(model, "training diverged: after the last step")
    hist["seconds"] = time.perf_counter() - t0
    return hist


def model_metadata(cfg: PruneConfig, data: VisionData) -> dict[str, Any]:
    """What :func:`sparsemil.prune.export.load_checkpoint` needs to rebuild the model."""
    return {
        "model": cfg.model,
        "in_shape": list(data.in_shape),
        "num_classes": data.num_classes,
        "widths": cfg.widths,
        "init": cfg.init,
        "dataset": data.name,
        "config": cfg.to_dict(),
    }


def train_from_config(
    cfg: PruneConfig,
    progress: bool = True,
    device: str | torch.device | None = None,
    min_batches: int = 1,
) -> tuple[nn.Module, VisionData, dict[str, Any]]:
    """Load ``cfg``'s dataset, build ``cfg``'s model and train it with the L1 penalty.

    Returns ``(model, data, history)``; the model is on ``device`` (default: the config's).

    Raises:
        SparsemilError: the training set gives fewer than ``min_batches`` mini-batches of
            ``batch_size`` (``prune run`` needs 2 for epsilon), checked before training.
    """
    from sparsemil.data.vision import load_vision_dataset

    data = load_vision_dataset(cfg.dataset, cfg.data_path, subset=cfg.subset, seed=cfg.seed)
    n = int(data.y_train.shape[0])
    if math.ceil(n / cfg.batch_size) < min_batches:
        raise SparsemilError(
            f"config key 'batch_size' {cfg.batch_size}: the {n} training samples give "
            f"{math.ceil(n / cfg.batch_size)} mini-batch(es); epsilon (the std of the "
            f"per-mini-batch training losses) needs at least {min_batches}: lower batch_size "
            "or raise subset"
        )
    model = build_model(
        cfg.model, data.in_shape, data.num_classes, widths=cfg.widths, init=cfg.init, seed=cfg.seed
    )
    hist = train_l1(model, data, cfg, progress=progress, device=device)
    return model, data, hist
