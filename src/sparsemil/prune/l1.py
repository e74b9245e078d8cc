"""The L1 (or L2) penalty: one definition for vision and MIL training.

``penalty = sum_{theta in P} |theta|`` (L1) or ``sum theta^2`` (L2), where ``P`` is, by default
(``scope="all"``), every parameter whose name ends in ``weight`` or ``bias`` (and every prunable
tensor, e.g. an RNN's ``weight_ih_l0``) -- the official choice
(QiaozheZhang/Global-One-shot-Pruning), which includes BatchNorm affine parameters;
``scope="weights"`` restricts it to the prunable set
(:func:`sparsemil.prune.magnitude.prunable_set`: trainable Linear/Conv/attention/RNN weights,
each tensor once). Frozen parameters never carry the penalty, and a tied tensor is counted once
in either scope. Multiply by the strength ``lmbda``.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsemil.errors import SparsemilError


def l1_params(model: nn.Module, scope: str = "all") -> list[tuple[str, nn.Parameter]]:
    """Parameters that carry the penalty.

    Args:
        model: the network.
        scope: ``"all"`` (official: every parameter named ``*weight`` / ``*bias``, and every
            prunable tensor) or ``"weights"`` (only the prunable set). Frozen parameters
            (``requires_grad=False``) never carry the penalty; tied tensors appear once.
    """
    from sparsemil.prune.magnitude import prunable_set

    if scope == "weights":
        pset = prunable_set(model)
        return [(n, getattr(m, a)) for n, (m, a) in zip(pset.names, pset.refs, strict=True)]
    if scope == "all":
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        named = [n.rsplit(".", 1)[-1].endswith(("weight", "bias")) for n, _ in trainable]
        if all(named):
            return trainable
        prunable = {id(getattr(m, a)) for m, a in prunable_set(model).refs}
        return [
            (n, p) for (n, p), ok in zip(trainable, named, strict=True) if ok or id(p) in prunable
        ]
    raise SparsemilError(f"l1_scope {scope!r}: must be 'all' or 'weights'")


def l1_penalty(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]] | list[nn.Parameter] | None = None,
    regularizer: str = "L1",
) -> torch.Tensor:
    """Unscaled penalty ``sum |theta|`` (L1) or ``sum theta^2`` (L2) over ``params``.

    ``params`` defaults to :func:`l1_params` ``(model)``; multiply by ``lmbda`` yourself.
    Returns a 0-dim tensor (differentiable).
    """
    if params is None:
        params = l1_params(model)
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    if not tensors:
        return torch.zeros(())
    if regularizer == "L1":
        return torch.stack([t.abs().sum() for t in tensors]).sum()
    if regularizer == "L2":
        return torch.stack([t.pow(2).sum() for t in tensors]).sum()
    raise SparsemilError(f"regularizer {regularizer!r}: must be 'L1' or 'L2'")
