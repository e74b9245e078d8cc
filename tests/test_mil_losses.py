"""CLAM-SB's instance loss: the smooth top-1 SVM, checked against a per-row hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from sparsemil.mil.factory import build_mil_model
from sparsemil.mil.losses import SmoothTop1SVM


def _by_hand(x: list[list[float]], y: list[int], alpha=1.0, tau=1.0, thresh=1e3) -> float:
    """The loss of Berrada et al. (2018), k = 1, one row at a time in plain Python."""
    total = 0.0
    for row, t in zip(x, y, strict=True):
        aug = [s + (alpha if j != t else 0.0) - row[t] for j, s in enumerate(row)]
        top = sorted(row, reverse=True)
        if top[0] - top[1] >= tau * math.log(thresh):
            total += max(aug)
        else:
            total += tau * math.log(sum(math.exp(a / tau) for a in aug))
    return total / len(x)


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_smooth_top1_svm_matches_hand_computation(shape):
    # rows 0-2 smooth, rows 3-4 confident (gap >= log 1000 = 6.9) -> hard branch
    x = [[0.3, -0.2], [1.0, 1.5], [-2.0, 0.5], [9.0, -1.0], [-4.0, 5.0]]
    y = [0, 1, 0, 1, 1]
    yt = (
        torch.tensor(y) if shape == "flat" else torch.tensor(y)[:, None].float()
    )  # CLAM passes (n, 1)
    got = SmoothTop1SVM(n_classes=2)(torch.tensor(x), yt)
    assert got.shape == ()
    assert got.item() == pytest.approx(_by_hand(x, y), rel=1e-6)


def test_smooth_top1_svm_three_classes_and_temperature():
    x = [[0.1, 0.4, -0.3], [2.0, -1.0, 0.5]]
    y = [2, 0]
    got = SmoothTop1SVM(n_classes=3, alpha=0.5, tau=0.7)(torch.tensor(x), torch.tensor(y))
    assert got.item() == pytest.approx(_by_hand(x, y, alpha=0.5, tau=0.7), rel=1e-6)


def test_smooth_top1_svm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="scores of shape"):
        SmoothTop1SVM(2)(torch.zeros(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="targets"):
        SmoothTop1SVM(2)(torch.zeros(3, 2), torch.zeros(4))


def test_clam_sb_trains_with_a_confident_instance_classifier():
    """torchmil's own loss crashes here (hard branch with != 2 rows); ours must not."""
    torch.manual_seed(0)
    model = build_mil_model("clam_sb", 6, 2, k_sample=3)
    assert isinstance(model.inst_loss_fn, SmoothTop1SVM)
    X = torch.randn(1, 9, 6)
    model(X)  # materialise lazy layers
    with torch.no_grad():
        for clf in model.inst_classifiers:
            clf.module.weight.mul_(200.0)  # huge top-2 gaps: most rows take the hard branch
    _, losses = model.compute_loss(torch.tensor([1.0]), X)
    assert torch.isfinite(losses["InstLoss"])
    sum(losses.values()).backward()
    assert model.inst_classifiers[1].module.weight.grad.abs().sum() > 0
