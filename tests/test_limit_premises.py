"""The premise checks of the pruning-limit theory, against hand and exact values.

- the KKT residual of hand-chosen vectors;
- a logistic regression trained to the exact L1 optimum by proximal gradient (ISTA) passes
  the stationarity check; the same model trained without L1 is refused a bare number;
- g.d, 1/2 d.Hd and the Rayleigh quotient against autograd's exact gradient and Hessian;
- the important-eigenvalue rows of a CNN against exact per-batch Hessians (official
  normalisation: summed over batches, divided by the number of samples);
- the whole pipeline on a network someone trained without L1 comes with the premise warning.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sparsemil.curvature.hvp import HessianOperator
from sparsemil.limit.predict import important_flat_fraction, threshold_indices
from sparsemil.limit.premises import kkt_residual, premise_checks, pruning_direction
from sparsemil.prune.magnitude import prunable_parameters
from torch_helpers import summed_hessian_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_kkt_residual_by_hand():
    theta = torch.tensor([1.0, -2.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    grad = torch.tensor([-0.1, 0.1, 0.05, 0.3, 0.2], dtype=torch.float64)
    penalised = torch.tensor([True, True, True, True, False])
    out = kkt_residual(theta, grad, 0.1, penalised)
    # per coordinate: 0, 0, max(0.05 - 0.1, 0) = 0, max(0.3 - 0.1, 0) = 0.2, 0.2 (unpenalised)
    assert out["residual"] == pytest.approx(math.sqrt(0.08))
    assert out["magnitude_residual"] == pytest.approx(0.0)
    assert out["wrong_sign_fraction"] == 0.0
    assert out["bound"] == pytest.approx(0.1 * 2.0)  # lmbda sqrt(4 penalised)
    assert out["passed"] is False
    flipped = kkt_residual(theta, -grad, 0.1, penalised)
    assert flipped["wrong_sign_fraction"] == 1.0  # the gradient pushes both weights outwards


def _binary_digits(n: int = 200):
    d = load_digits()
    keep = np.isin(d.target, (3, 8))
    x = torch.tensor(d.data[keep][:n, 3::8] / 16.0, dtype=torch.float32)  # column 3: 8 pixels
    y = torch.tensor((d.target[keep][:n] == 8).astype(np.int64))
    return x, y


def _ista(model: nn.Linear, x, y, lmbda: float, steps: int = 4000, lr: float = 0.5) -> None:
    """Proximal gradient on mean CE + lmbda ||W||_1 (bias unpenalised): converges to the
    exact minimiser of this convex problem."""
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model.bias -= lr * model.bias.grad
            w = model.weight - lr * model.weight.grad
            model.weight.copy_(torch.sign(w) * (w.abs() - lr * lmbda).clamp_min(0.0))


def test_l1_optimum_passes_and_plain_training_is_flagged():
    x, y = _binary_digits()
    torch.manual_seed(0)
    model = nn.Linear(8, 2).double()
    xd = x.double()
    _ista(model, xd, y, lmbda=0.01)
    op = HessianOperator(model, ce, [(xd, y)])
    out = premise_checks(
        op, [(model, "weight")], 0.3, 0.05, 0.01, penalised=[model.weight], trace_probes=30
    )
    assert out["kkt"]["residual"] < 1e-3 * out["kkt"]["bound"]
    assert out["kkt"]["passed"] is True
    assert not any("stationary" in w for w in out["warnings"])
    # the same network trained by plain gradient descent, without the penalty
    torch.manual_seed(0)
    plain = nn.Linear(8, 2).double()
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(plain(xd), y).backward()
        opt.step()
    op = HessianOperator(plain, ce, [(xd, y)])
    out = premise_checks(op, [(plain, "weight")], 0.3, 0.05, 0.0, trace_probes=30)
    assert out["passed"] is False
    assert any("without the L1 penalty" in w for w in out["warnings"])


def test_orders_and_anisotropy_against_exact_derivatives():
    x, y = _binary_digits(120)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    xd = x.double()
    batches = [(xd[:50], y[:50]), (xd[50:], y[50:])]
    op = HessianOperator(model, ce, batches)
    prunable = prunable_parameters(model)
    ratio, eps = 0.4, 0.02
    out = premise_checks(op, prunable, ratio, eps, 0.0, trace_probes=3 * op.shape[0])
    # exact: gradient and Hessian of the mean CE over all 120 samples
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(th):
        parts = [c.reshape(s) for c, s in zip(torch.split(th, sizes), shapes, strict=True)]
        logits = torch.func.functional_call(model, dict(zip(names, parts, strict=True)), (xd,))
        return F.cross_entropy(logits, y)

    g = torch.autograd.functional.jacobian(loss, theta)
    H = torch.autograd.functional.hessian(loss, theta)
    # d: the 40 % smallest-magnitude weights (the two weight matrices) set to zero
    offsets = np.cumsum([0, *sizes])
    w_idx = np.concatenate([np.arange(offsets[0], offsets[1]), np.arange(offsets[2], offsets[3])])
    k = math.ceil(ratio * w_idx.size)
    pruned = w_idx[np.argsort(theta[w_idx].abs().numpy(), kind="stable")[:k]]
    d = torch.zeros_like(theta)
    d[pruned] = -theta[pruned]
    assert torch.allclose(pruning_direction(op, prunable, ratio), d)
    assert out["order"]["first_order"] == pytest.approx(float(g @ d), rel=1e-6)
    assert out["order"]["second_order"] == pytest.approx(0.5 * float(d @ H @ d), rel=1e-6)
    # with 3 D Hutch++ probes the sketch spans the space: the trace is exact
    assert out["trace"]["value"] == pytest.approx(float(torch.trace(H)), rel=1e-6)
    rq = float(d @ H @ d) / float(d @ d)
    assert out["anisotropy"]["ratio"] == pytest.approx(
        rq / (float(torch.trace(H)) / theta.numel()), rel=1e-6
    )
    share = abs(float(g @ d)) / (abs(float(g @ d)) + abs(0.5 * float(d @ H @ d)))
    assert out["order"]["first_order_share"] == pytest.approx(share, rel=1e-6)
    assert out["order"]["passed"] is (share <= 0.5)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_important_rows_of_a_cnn_official_normalisation():
    d = load_digits()
    x = torch.tensor(d.data[:90] / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target[:90])
    torch.manual_seed(0)
    model = TinyCNN().double()
    with torch.no_grad():  # a dead channel: its small kernel weights have flat Hessian rows
        model.conv.weight[0].mul_(1e-3)
        model.conv.bias[0] = -100.0
    batches = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 90, 30)]
    op = HessianOperator(model, ce, batches)
    prunable = prunable_parameters(model)
    out = important_flat_fraction(op, prunable, num_ratios=25, tol=1e-7)
    _, idx = threshold_indices(op, prunable, 25)
    rows = summed_hessian_rows(model, batches, idx)
    rows /= 90  # official: summed over batches, divided by the number of samples
    np.testing.assert_allclose(out["row_l1_norms"], rows, rtol=1e-6, atol=1e-14)
    assert out["num_samples"] == 90
    assert out["fraction"] == pytest.approx(np.mean(rows < 1e-7))
    assert 0.0 < out["fraction"] < 1.0  # the dead channel's weights are flat, the rest not


def test_model_trained_elsewhere_without_l1_gets_the_premise_warning(tmp_path):
    """Someone else's MLP (plain torch, no L1) through the package's limit pipeline."""
    from sparsemil.data.vision import load_vision_dataset
    from sparsemil.experiments.vision.config import PruneConfig
    from sparsemil.experiments.vision.run import model_limit

    data = load_vision_dataset("digits", seed=0)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        perm = torch.randperm(len(data.y_train), generator=gen)
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[b]), data.y_train[b]).backward()
            opt.step()
    cfg = PruneConfig(sparse_epoch=60, lanczos_iter=24, lanczos_num=3, device="cpu")
    doc = model_limit(model, data, cfg, tmp_path, lmbda=0.0)
    assert doc["premises"]["passed"] is False
    assert any("without the L1 penalty" in w for w in doc["warnings"])
    assert doc["uncertainty"]["num_probes"] == 3
    assert (tmp_path / "limit.json").is_file()
