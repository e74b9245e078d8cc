"""Training with an L1 (or L2) penalty, as in the official code (the vision reproduction).

Loss per mini-batch: ``CE(model(x), y) + lmbda * penalty`` with the penalty of
:func:`sparsemil.prune.l1.l1_penalty` over :func:`sparsemil.prune.l1.l1_params` (``l1_scope``).

Optimiser: SGD with momentum (or Adam), ``weight_decay`` as given. Learning rate: see
:func:`lr_at` -- ``scheduler_step: iteration`` (default) reproduces the official loop, where the
warm-up *and* the ``schedu`` schedule are stepped after every mini-batch (so ``milestones`` and
the cosine ``T_max = epoch`` count iterations); ``scheduler_step: epoch`` evaluates the schedule
per epoch. The history's ``lr`` / ``lr_last`` are the rates actually applied at the first / last
mini-batch of each epoch.

Augmentation: with ``augment: official`` every mini-batch goes through
:func:`sparsemil.data.vision.augment_batch` (random crop with 4-pixel black padding + horizontal
flip, the official CIFAR transform) before the forward pass; evaluation uses the plain images.

Determinism: shuffling uses a ``torch.Generator`` seeded with ``cfg.seed``; the augmentation a
second one (:func:`augment_generator`); no global RNG.

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

from sparsemil.data.vision import VisionData, augment_batch, check_augment
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.experiments.vision.models import build_model, check_finite_weights
from sparsemil.prune.evaluate import evaluate_split
from sparsemil.prune.l1 import l1_params, l1_penalty

WARMUP_EPS = 1e-8  # official WarmUpLR: base_lr * last_epoch / (total_iters + 1e-8)
HISTORY_KEYS = (
    "epoch", "lr", "lr_last", "train_loss", "train_ce", "penalty", "test_acc", "test_loss",
)  # fmt: skip


def lr_at(cfg: PruneConfig, epoch: int, it: int, iters_per_epoch: int) -> float:
    """Learning rate applied at mini-batch ``it`` (0-based) of ``epoch`` (0-based).

    ``cfg.scheduler_step == "iteration"`` (default): the official training loop, i.e. with
    ``g = epoch * iters_per_epoch + it`` and ``T = warm * iters_per_epoch``, the rate the
    official code has set after ``g`` optimiser steps, where each step runs
    ``WarmUpLR.step()`` (only while ``epoch < warm``; closed form
    ``lr * k / (T + 1e-8)``, overwriting the rate) and then, if ``schedu``, the chainable
    ``MultiStepLR(milestones, gamma)`` / ``CosineAnnealingLR(T_max=epoch)`` step, both on the
    same optimiser (the cosine scheduler is constructed first, the warm-up second, which sets
    the first rate to 0). Consequences, all reproduced here:

    - milestones and ``T_max`` count iterations; the cosine keeps cycling (period ``2 T_max``
      iterations) when training runs longer than ``T_max`` iterations;
    - during warm-up, a milestone ``m <= T`` scales only iteration ``m``'s rate (the next
      warm-up step overwrites it); milestones ``m > T`` decay the post-warm-up rate
      ``lr * T / (T + 1e-8)``;
    - during warm-up the cosine step multiplies the warm-up rate by
      ``c(k) / c(k - 1)`` (``c(k) = 1 + cos(pi k / T_max)``), or adds
      ``lr (1 - cos(pi / T_max)) / 2`` at its restart points ``k = T_max + 1 (mod 2 T_max)``;
      after warm-up the rate follows ``lr(T) c(g) / c(T)`` until the next restart, then
      ``lr c(g) / 2``.

    ``"epoch"``: ``lr * gamma ** #{milestones <= epoch}`` (multistep) or
    ``lr * (1 + cos(pi epoch / max(epoch_count, 1))) / 2`` (cos), times the linear warm-up
    factor ``g / (T + 1e-8)`` while ``epoch < warm``.
    """
    if cfg.scheduler_step == "iteration":
        return _official_lr(cfg, epoch * iters_per_epoch + it, iters_per_epoch)
    lr = cfg.lr
    if cfg.schedu:
        if cfg.schedumode == "multistep":
            lr *= cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
        else:  # cosine annealing with T_max = cfg.epoch, eta_min = 0
            lr *= 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epoch, 1)))
    if cfg.warm > 0 and epoch < cfg.warm:
        lr *= (epoch * iters_per_epoch + it) / (cfg.warm * iters_per_epoch + WARMUP_EPS)
    return lr


def _official_lr(cfg: PruneConfig, g: int, iters_per_epoch: int) -> float:
    """The official rate after ``g`` optimiser steps (see :func:`lr_at`), in closed form."""
    base = cfg.lr
    warm_iters = cfg.warm * iters_per_epoch
    cos = cfg.schedu and cfg.schedumode == "cos"
    multi = cfg.schedu and cfg.schedumode == "multistep"
    t_max = max(int(cfg.epoch), 1)

    def c(k: int) -> float:  # the expression torch's CosineAnnealingLR evaluates
        return 1.0 + math.cos(math.pi * k / t_max)

    def restart(k: int) -> bool:  # torch's additive branch: (k - 1 - T_max) % (2 T_max) == 0
        return (k - 1 - t_max) % (2 * t_max) == 0

    if warm_iters == 0:
        if multi:
            return base * cfg.gamma ** sum(1 for m in cfg.milestones if m <= g)
        return base * c(g) / 2.0 if cos else base
    if g == 0:
        return 0.0  # WarmUpLR's constructor sets base * 0 / T

    def during_warmup(k: int) -> float:  # 1 <= k <= T: warm-up overwrites, then the schedule
        w = base * k / (warm_iters + WARMUP_EPS)
        if multi:
            return w * cfg.gamma ** sum(1 for m in cfg.milestones if m == k)
        if cos and restart(k):
            return w + base * (1.0 - math.cos(math.pi / t_max)) / 2.0
        if cos:
            return w * c(k) / c(k - 1)
        return w

    if g <= warm_iters:
        return during_warmup(g)
    end = during_warmup(warm_iters)
    if multi:
        return end * cfg.gamma ** sum(1 for m in cfg.milestones if warm_iters < m <= g)
    if cos:
        first_restart = warm_iters + 1 + (t_max - warm_iters) % (2 * t_max)
        return end * c(g) / c(warm_iters) if g < first_restart else base * c(g) / 2.0
    return end


def make_optimizer(model: nn.Module, cfg: PruneConfig) -> torch.optim.Optimizer:
    """SGD (momentum, no Nesterov) or Adam over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def augment_generator(seed: int) -> torch.Generator:
    """The augmentation's generator: seeded from ``seed`` but a stream of its own, so that
    ``augment: official`` leaves the shuffling order unchanged."""
    import numpy as np

    mixed = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xA06])
    return torch.Generator().manual_seed(int(mixed.generate_state(1, np.uint64)[0]))


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
            schedu, schedumode, milestones, gamma, warm, scheduler_step, augment, l1_scope,
            seed, eval_batch_size.
        progress: show a tqdm bar per epoch (stderr).
        device: defaults to ``cfg.resolved_device()``.

    Returns:
        dict of per-epoch lists ``epoch``, ``lr`` / ``lr_last`` (the rates applied at the
        epoch's first / last mini-batch), ``train_loss`` (mean penalised loss over the epoch's
        batches), ``train_ce``, ``penalty`` (unscaled, at epoch end), ``test_acc``,
        ``test_loss``, and ``seconds`` (total wall time).

    Raises:
        SparsemilError: ``augment: official`` on data that are not 32x32 images (before
            training); a non-finite loss or final weights.
    """
    from tqdm.auto import tqdm

    check_augment(cfg.augment, data)
    device = torch.device(device or cfg.resolved_device())
    model.to(device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    n = int(y.shape[0])
    iters = max(1, math.ceil(n / cfg.batch_size))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    aug_gen = augment_generator(cfg.seed)
    fill = torch.tensor(data.black, device=device) if data.black is not None else None
    opt = make_optimizer(model, cfg)
    pen_params = [p for _, p in l1_params(model, cfg.l1_scope)]
    use_pen = cfg.l1 and cfg.lmbda > 0
    hist: dict[str, Any] = {k: [] for k in HISTORY_KEYS}
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
        lr_first = lr = 0.0
        for it in bar:
            lr = lr_at(cfg, epoch, it, iters)
            if it == 0:
                lr_first = lr
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[it * cfg.batch_size : (it + 1) * cfg.batch_size]
            xb = augment_batch(x[idx], cfg.augment, aug_gen, fill=fill)
            ce = F.cross_entropy(model(xb), y[idx])
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
        hist["lr"].append(lr_first)
        hist["lr_last"].append(lr)
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


def check_epsilon_batches(cfg: PruneConfig, n: int, min_batches: int = 2) -> None:
    """Raise :class:`SparsemilError` (naming ``limit.epsilon_batch_size``) when ``n`` training
    samples give fewer than ``min_batches`` epsilon mini-batches."""
    eps_batch = cfg.limit.epsilon_batch_size
    if math.ceil(n / eps_batch) < min_batches:
        raise SparsemilError(
            f"config key 'limit.epsilon_batch_size' {eps_batch}: the {n} training samples give "
            f"{math.ceil(n / eps_batch)} mini-batch(es); epsilon (the std of the "
            f"per-mini-batch training losses) needs at least {min_batches}: lower "
            "limit.epsilon_batch_size or raise subset"
        )


def config_dataset(cfg: PruneConfig) -> VisionData:
    """The dataset ``cfg`` names, with its subsets and layout (``subset``, ``test_subset``,
    ``image_size``, ``channels``; seeded by ``seed``)."""
    from sparsemil.data.vision import load_vision_dataset

    return load_vision_dataset(
        cfg.dataset,
        cfg.data_path,
        subset=cfg.subset,
        seed=cfg.seed,
        image_size=cfg.image_size,
        channels=cfg.channels,
        test_subset=cfg.test_subset,
    )


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
            ``limit.epsilon_batch_size`` (``prune run`` needs 2 for epsilon), or ``augment: official`` on
            images that are not 32x32, checked before training.
    """
    data = config_dataset(cfg)
    check_epsilon_batches(cfg, int(data.y_train.shape[0]), min_batches)
    check_augment(cfg.augment, data)
    model = build_model(
        cfg.model, data.in_shape, data.num_classes, widths=cfg.widths, init=cfg.init, seed=cfg.seed
    )
    hist = train_l1(model, data, cfg, progress=progress, device=device)
    return model, data, hist
