"""The L1 (or L2) penalty: one definition for vision and MIL training.

``penalty = sum_{theta in P} |theta|`` (L1) or ``sum theta^2`` (L2), where ``P`` is, by default
(``scope="all"``), every parameter whose name ends in ``weight`` or ``bias`` -- the official
choice (QiaozheZhang/Global-One-shot-Pruning), which includes BatchNorm affine parameters;
``scope="weights"`` restricts it to Conv/Linear weights. Multiply by the strength ``lmbda``.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsemil.errors import SparsemilError


def l1_params(model: nn.Module, scope: str = "all") -> list[tuple[str, nn.Parameter]]:
    """Parameters that carry the penalty.

    Args:
        model: the network.
        scope: ``"all"`` (official: every parameter named ``*weight`` / ``*bias``) or
            ``"weights"`` (only Conv2d/Linear weights). Frozen parameters
            (``requires_grad=False``) never carry the penalty.
    """
    if scope == "all":
        return [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and n.rsplit(".", 1)[-1] in ("weight", "bias")
        ]
    if scope == "weights":
        out = []
        for mname, m in model.named_modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.requires_grad:
                out.append((f"{mname}.weight" if mname else "weight", m.weight))
        return out
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










