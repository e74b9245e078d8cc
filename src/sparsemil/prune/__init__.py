"""Torch-level pruning: magnitude masks, the L1 penalty, sweeps, criteria, sparse export.

Modules (imported lazily, so ``import sparsemil.prune`` is cheap). This package imports only
torch/numpy and :mod:`sparsemil.errors` / :mod:`sparsemil.io`:

- :mod:`~sparsemil.prune.l1` -- ``l1_params``, ``l1_penalty``;
- :mod:`~sparsemil.prune.magnitude` -- ``prunable_parameters``, ``global_magnitude_masks``,
  ``apply_masks``, ``remove_masks``, ``prune_model``;
- :mod:`~sparsemil.prune.result` -- ``SweepResult`` and the criteria (``actual_ratio``,
  ``CRITERIA``), shared by both sweeps;
- :mod:`~sparsemil.prune.sweep` -- ``pruning_sweep``, ``vision_sweep`` (re-exports the
  result names); :mod:`~sparsemil.prune.batched_sweep` on GPUs;
- :mod:`~sparsemil.prune.export` -- checkpoints and ``save_sparse`` / ``load_sparse``;
- :mod:`~sparsemil.prune.proximal` -- ``proximal_finish`` (full-batch proximal gradient to a
  stationary point of CE + lmbda ||theta||_1) and its ``kkt_residual``.

``sparsemil.prune.hvp`` and ``sparsemil.prune.limit`` are re-exports of
:mod:`sparsemil.curvature.hvp` and :mod:`sparsemil.limit.predict` kept for old import paths.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "l1_params": "l1",
    "l1_penalty": "l1",
    "prunable_parameters": "magnitude",
    "global_magnitude_masks": "magnitude",
    "apply_masks": "magnitude",
    "remove_masks": "magnitude",
    "prune_model": "magnitude",
    "SweepResult": "result",
    "pruning_sweep": "sweep",
    "vision_sweep": "sweep",
    "actual_ratio": "result",
    "actual_ratios": "result",
    "CRITERIA": "result",
    "save_checkpoint": "export",
    "save_sparse": "export",
    "load_sparse": "export",
    "proximal_finish": "proximal",
    "kkt_residual": "proximal",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sparsemil.prune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sparsemil.prune.{mod}"), name)
