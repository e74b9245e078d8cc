"""Pruning: L1 training, global magnitude pruning, sweeps, sparse export (and the limit).

Modules (imported lazily, so ``import sparsemil.prune`` is cheap):

- :mod:`~sparsemil.prune.models` -- ``build_model`` (fc, fc12, fc2, mlp, lenet, alexnet, vgg16,
  resnet18, resnet50);
- :mod:`~sparsemil.prune.config` -- ``PruneConfig``, ``load_prune_config``,
  ``register_config_section``;
- :mod:`~sparsemil.prune.l1` -- ``l1_params``, ``l1_penalty``, ``train_l1``;
- :mod:`~sparsemil.prune.magnitude` -- ``prunable_parameters``, ``global_magnitude_masks``,
  ``apply_masks``, ``remove_masks``, ``prune_model``;
- :mod:`~sparsemil.prune.sweep` -- ``SweepResult``, ``pruning_sweep``, ``vision_sweep``,
  ``actual_ratio``, ``CRITERIA``;
- :mod:`~sparsemil.prune.export` -- checkpoints and ``save_sparse`` / ``load_sparse``;
- :mod:`~sparsemil.prune.plots` -- ``plot_sweep``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "models",
    "PruneConfig": "config",
    "load_prune_config": "config",
    "register_config_section": "config",
    "l1_params": "l1",
    "l1_penalty": "l1",
    "train_l1": "l1",
    "prunable_parameters": "magnitude",
    "global_magnitude_masks": "magnitude",
    "apply_masks": "magnitude",
    "remove_masks": "magnitude",
    "prune_model": "magnitude",
    "SweepResult": "sweep",
    "pruning_sweep": "sweep",
    "vision_sweep": "sweep",
    "actual_ratio": "sweep",
    "actual_ratios": "sweep",
    "CRITERIA": "sweep",
    "save_checkpoint": "export",
    "load_checkpoint": "export",
    "save_sparse": "export",
    "load_sparse": "export",
    "plot_sweep": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sparsemil.prune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sparsemil.prune.{mod}"), name)
