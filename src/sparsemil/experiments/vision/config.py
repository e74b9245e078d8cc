"""Configuration of the pruning-limit experiments (accepts the official config keys).

``load_prune_config(path) -> PruneConfig`` (through :mod:`sparsemil.config`).

Top-level keys are the fields of :class:`PruneConfig`. The official keys (``model, dataset,
data_path, batch_size, optim, lr, momentum, weight_decay, epoch, l1, lmbda, regularizer, schedu,
schedumode, milestones, gamma, warm, sparse_epoch, lanczos_iter, lanczos_num``) have the official
meaning (QiaozheZhang/Global-One-shot-Pruning, ``configs/*.yml``); the official files'
bookkeeping keys (``init, use_full_data, gpu, criterion, mode, sparse, file_path, save_model``)
are accepted so official configs load unchanged; ``init`` and ``criterion`` are honoured, the
others have no effect here (outputs go to the output folder; the device is ``device``).

Two nested sections are fields like any other:

- ``limit:`` -- :class:`sparsemil.limit.predict.LimitOptions` (Hessian subset, HVP backend,
  negative eigenvalues, important-eigenvalue correction, threads, ...), honoured by the vision
  run and the MIL bridge alike;
- ``mil:`` -- a :class:`sparsemil.train.config.MILTrainConfig`; when present, ``prune run``
  trains that MIL model (its ``l1`` is the L1 strength) instead of a vision model, and the
  official keys ``sparse_epoch``, ``lanczos_iter``, ``lanczos_num``, ``seed`` and ``device``
  apply to it.

Recipe keys added here (official defaults where the official code has one):

- ``scheduler_step`` (``iteration`` | ``epoch``, default ``iteration``): the unit in which the
  ``schedu`` schedule advances. ``iteration`` reproduces the official training loop exactly: both
  its ``WarmUpLR`` and its ``MultiStepLR``/``CosineAnnealingLR`` are stepped after *every*
  mini-batch, so ``milestones`` and the cosine ``T_max = epoch`` count iterations.
  ``epoch`` evaluates the schedule per epoch (milestones in epochs, the warm-up per iteration).
  See :func:`sparsemil.experiments.vision.train.lr_at`.
- ``augment`` (``none`` | ``official``, default ``none``): ``official`` is the official CIFAR
  training transform, RandomCrop(32, padding=4) + RandomHorizontalFlip(0.5), for 32x32 images
  (:func:`sparsemil.data.vision.augment_batch`).
- ``image_size`` (int or null): zero-pad (black) the images to ``image_size x image_size``
  (e.g. Fashion-MNIST 28x28 -> 32x32); ``channels`` (1, 3 or null): replicate a grey channel to
  3 (CIFAR-layout input ``3x32x32``). Both are applied by
  :func:`sparsemil.data.vision.load_vision_dataset`.

An unknown key anywhere raises :class:`~sparsemil.errors.SparsemilError` naming the nearest
valid key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sparsemil import config as config_system
from sparsemil.errors import SparsemilError, resolve_device
from sparsemil.limit.predict import LimitOptions
from sparsemil.train.config import MILTrainConfig


@dataclass
class PruneConfig:
    """Settings of L1 training, the pruning sweep and the spectrum (official names)."""

    model: str = "fc"
    dataset: str = "digits"
    data_path: str | None = None
    batch_size: int = 128
    optim: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epoch: int = 20
    l1: bool = True
    lmbda: float = 5e-5
    regularizer: str = "L1"
    schedu: bool = False
    schedumode: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [60, 120, 180])
    gamma: float = 0.2
    warm: int = 0
    sparse_epoch: int = 1000
    lanczos_iter: int = 128
    lanczos_num: int = 4  # official 1; >= 4 so the spread over probes is measured
    seed: int = 0
    # --- sparsemil additions
    widths: list[int] | None = None
    subset: int | None = None
    test_subset: int | None = None
    l1_scope: str = "all"
    device: str = "auto"
    eval_batch_size: int = 8192
    actual_criterion: str = "drop_1pt"
    loss_eps: float | None = None
    scheduler_step: str = "iteration"
    augment: str = "none"
    image_size: int | None = None
    channels: int | None = None
    # --- official bookkeeping keys
    init: str = "kaiming_normal"
    criterion: str = "cross_entropy"
    use_full_data: bool = True
    gpu: int | None = None
    mode: str = "train"
    sparse: bool = True
    file_path: str | None = None
    save_model: bool = True
    # --- nested sections
    limit: LimitOptions = field(default_factory=LimitOptions)
    mil: MILTrainConfig | None = None

    def validate(self, where: str = "config") -> None:
        """Raise :class:`SparsemilError` naming the key of an out-of-range value."""
        from sparsemil.data.vision import canonical_dataset_name
        from sparsemil.experiments.vision.models import INITS, canonical_model_name

        self.model = canonical_model_name(self.model)
        self.dataset = canonical_dataset_name(self.dataset)
        _check(where, self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(where, self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _check(where, self.optim.lower() in ("sgd", "adam"), "optim", "must be 'sgd' or 'adam'")
        self.optim = self.optim.lower()
        _check(where, self.lr > 0, "lr", "must be > 0")
        _check(where, 0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _check(where, self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(where, self.epoch >= 0, "epoch", "must be >= 0")
        _check(where, self.lmbda >= 0, "lmbda", "must be >= 0")
        _check(where, self.regularizer in ("L1", "L2"), "regularizer", "must be 'L1' or 'L2'")
        _check(
            where, self.schedumode in ("multistep", "cos"), "schedumode", "must be multistep or cos"
        )
        _check(
            where,
            self.scheduler_step in ("iteration", "epoch"),
            "scheduler_step",
            "must be 'iteration' (official: milestones and T_max count iterations) or 'epoch'",
        )
        _check(where, all(m >= 0 for m in self.milestones), "milestones", "must be >= 0")
        _check(where, self.gamma > 0, "gamma", "must be > 0")
        _check(where, self.warm >= 0, "warm", "must be >= 0")
        _check(where, self.sparse_epoch >= 1, "sparse_epoch", "must be >= 1")
        _check(where, self.lanczos_iter >= 1, "lanczos_iter", "must be >= 1")
        _check(where, self.lanczos_num >= 1, "lanczos_num", "must be >= 1")
        _check(where, self.subset is None or self.subset >= 1, "subset", "must be >= 1")
        _check(
            where, self.test_subset is None or self.test_subset >= 1, "test_subset", "must be >= 1"
        )
        _check(where, self.l1_scope in ("all", "weights"), "l1_scope", "must be 'all' or 'weights'")
        _check(where, self.init in INITS, "init", f"must be one of {', '.join(INITS)}")
        _check(
            where, self.criterion == "cross_entropy", "criterion", "only cross_entropy is supported"
        )
        _check(where, self.loss_eps is None or self.loss_eps > 0, "loss_eps", "must be > 0")
        _check(
            where,
            self.augment in ("none", "official"),
            "augment",
            "must be 'none' or 'official' (RandomCrop(32, padding=4) + horizontal flip)",
        )
        _check(where, self.image_size is None or self.image_size >= 1, "image_size", "must be >= 1")
        _check(where, self.channels in (None, 1, 3), "channels", "must be 1, 3 or null")
        _check(
            where,
            self.augment != "official" or self.image_size in (None, 32),
            "augment",
            f"'official' is the CIFAR recipe for 32x32 images but image_size is "
            f"{self.image_size}; set image_size: 32 or augment: none",
        )
        from sparsemil.prune.sweep import CRITERIA

        _check(
            where,
            self.actual_criterion in CRITERIA,
            "actual_criterion",
            f"must be one of {', '.join(CRITERIA)}",
        )
        _check(
            where,
            _device_syntax_ok(self.device),
            "device",
            "must be auto, cpu, cuda, cuda:N or mps",
        )
        _check(
            where,
            self.mil is not None or self.limit.finish == "none",
            "limit.finish",
            "'proximal' is implemented for the MIL bridge (a 'mil:' section) only; use 'none'",
        )
        _check(
            where,
            self.limit.finish == "none" or self.mil is None or self.mil.lmbda > 0,
            "limit.finish",
            "'proximal' finishes CE + lmbda ||w||_1 and needs mil.lmbda > 0; set an L1 "
            "strength or use 'none'",
        )
        if self.model == "mlp":
            _check(
                where, bool(self.widths), "widths", "the mlp model needs widths, e.g. [256, 128]"
            )

    def resolved_device(self) -> str:
        """``device`` with ``auto`` resolved to ``cuda`` when available, else ``cpu``."""
        return resolve_device(self.device, "config key 'device'")

    def to_dict(self) -> dict:
        """JSON-able dict (sections as nested dicts) that :func:`config_from_dict` reads back."""
        return config_system.to_mapping(self)


def _device_syntax_ok(device: str) -> bool:
    """``device`` names a CPU/CUDA/MPS torch device (whether one is present is checked when a
    command starts, :meth:`PruneConfig.resolved_device`, so that ``--device`` can override a
    file written for another machine)."""
    import torch

    if device in ("auto", "gpu"):
        return True
    try:
        return torch.device(device).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError):
        return False


def _check(where: str, cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise SparsemilError(f"{where} key {key!r}: {msg}")


def config_from_dict(data: dict | None, where: str = "config") -> PruneConfig:
    """Build a validated :class:`PruneConfig` from a mapping (sections included)."""
    return config_system.from_mapping(PruneConfig, data, where)


def load_prune_config(path: str | os.PathLike[str]) -> PruneConfig:
    """Read a YAML/JSON config file into a validated :class:`PruneConfig`."""
    return config_system.load(PruneConfig, path, path_keys=("data_path",))
