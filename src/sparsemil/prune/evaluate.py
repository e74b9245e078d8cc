"""Full-dataset evaluation of a classifier in large batches (no autograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def evaluate_split(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192
) -> dict[str, float]:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy of ``model`` on ``(x, y)``.

    Args:
        model: maps ``(B, *in_shape)`` to logits ``(B, K)``; put in eval mode here.
        x: ``(N, *in_shape)`` on the model's device.
        y: ``(N,)`` int64 labels.
        batch_size: evaluation batch size (large; only memory matters).

    Returns:
        ``{"acc": float, "loss": float}``. The loss is summed in float64 over batches.
    """
    model.eval()
    n = int(y.shape[0])
    correct = 0
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            logits = model(x[start : start + batch_size])
            yb = y[start : start + batch_size]
            total += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += int((logits.argmax(dim=1) == yb).sum())
    return {"acc": correct / max(n, 1), "loss": float(total) / max(n, 1)}


def batch_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Mean cross-entropy of each consecutive (non-shuffled) mini-batch, float64 ``(n_batches,)``.

    The last, possibly smaller, batch is kept. The std of this vector at w* is the official
    choice of the loss tolerance epsilon.
    """
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, int(y.shape[0]), batch_size):
            logits = model(x[start : start + batch_size])
            out.append(F.cross_entropy(logits, y[start : start + batch_size]).double())
    return torch.stack(out).cpu()
