"""SLQ, trace and extreme eigenvalues against the exact Hessian of a small net on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sparsemil.curvature.hvp import HessianOperator
from sparsemil.curvature.slq import (
    DenseOperator,
    hutchinson_trace,
    lanczos,
    rademacher,
    slq,
    spectral_density,
    top_eigenvalues,
)
from sparsemil.errors import SparsemilError
from sparsemil.limit.width import gaussian_width, predicted_ratio
from sparsemil.prune.sweep import pruned_counts_and_distances, sweep_ratios


@pytest.fixture(scope="module")
def trained():
    """A 64-16-10 MLP (1210 parameters) trained with L1 on 600 digits, its operator, the
    exact float64 Hessian eigenvalues (torch.autograd.functional.hessian) and epsilon."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    d = load_digits()
    x = torch.tensor(d.data[:600] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:600])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        perm = torch.randperm(600, generator=gen)
        for i in range(0, 600, 64):
            idx = perm[i : i + 64]
            pen = sum(p.abs().sum() for p in model.parameters())
            loss = F.cross_entropy(model(x[idx]), y[idx]) + 5e-4 * pen
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    md = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    md.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    theta = torch.cat([p.detach().reshape(-1) for p in md.parameters()])

    def full_loss(th):
        parts = [c.reshape(s) for c, s in zip(torch.split(th, sizes), shapes, strict=True)]
        ps = dict(zip(names, parts, strict=True))
        return F.cross_entropy(torch.func.functional_call(md, ps, (x.double(),)), y)

    H = torch.autograd.functional.hessian(full_loss, theta, vectorize=True)
    eig = np.linalg.eigvalsh(H.numpy())
    batches = [(x[i : i + 200], y[i : i + 200]) for i in range(0, 600, 200)]
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]) for i in range(0, 600, 64)]
    eps = float(np.std([float(v) for v in losses]))
    yield {"model": model, "op": op, "eig": eig, "eps": eps}
    torch.set_num_threads(old)


def test_extreme_eigenvalues_match_exact(trained):
    op, eig = trained["op"], trained["eig"]
    assert op.dim == 1210
    top = top_eigenvalues(op, k=2, which="largest")
    low = top_eigenvalues(op, k=1, which="smallest")
    np.testing.assert_allclose(top, eig[::-1][:2], rtol=1e-3)
    np.testing.assert_allclose(low, eig[:1], rtol=1e-3)
    assert eig[0] < 0  # a non-convex point: the smallest eigenvalue is negative
    res = slq(op, num_runs=2, num_steps=80, seed=0)
    assert res.lambda_max == pytest.approx(eig[-1], rel=1e-3)
    assert res.lambda_min == pytest.approx(eig[0], rel=1e-3)


def test_trace_within_5_percent(trained):
    op, eig = trained["op"], trained["eig"]
    est, err = hutchinson_trace(op, num_probes=60, seed=1)
    assert abs(est - eig.sum()) / abs(eig.sum()) < 0.05
    assert err >= 0


def test_gaussian_width_from_slq_matches_exact_spectrum(trained):
    op, eig, eps, model = trained["op"], trained["eig"], trained["eps"], trained["model"]
    res = slq(op, num_runs=4, num_steps=100, seed=0)
    nodes, weights = res.nodes_weights()
    assert np.isclose(weights.sum(), 1.0)
    ratios = sweep_ratios(500)
    _, dist = pruned_counts_and_distances(model, ratios)

    def exact(R):
        return gaussian_width(R, eig, None, eps)

    rho = predicted_ratio(ratios, dist, exact)
    assert rho is not None and 0.3 < rho < 0.999
    # relevant R: from 0 to twice the distance at the predicted ratio
    R = np.linspace(0.0, 2.0 * np.interp(rho, ratios, dist), 60)
    for negative in ("abs", "flat"):
        err = np.abs(
            gaussian_width(R, nodes, weights, eps, negative=negative)
            - gaussian_width(R, eig, None, eps, negative=negative)
        )
        print(f"gw max abs error ({negative}): {err.max():.4f}")
        assert err.max() < 0.01, (negative, err.max())
    rho_slq = predicted_ratio(ratios, dist, lambda r: gaussian_width(r, nodes, weights, eps))
    print(f"predicted ratio exact {rho:.4f} slq {rho_slq:.4f}")
    assert abs(rho_slq - rho) < 0.01


def test_lanczos_is_exact_on_a_known_spectrum():
    gen = torch.Generator().manual_seed(0)
    D = 60
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    lam = torch.linspace(-1.0, 5.0, D, dtype=torch.float64)
    op = DenseOperator((Q * lam) @ Q.T)
    res = slq(op, num_runs=3, num_steps=D, seed=0)  # D steps: the quadrature is exact
    for r in range(3):
        np.testing.assert_allclose(np.sort(res.ritz_values[r]), lam.numpy(), atol=1e-9)
        assert res.ritz_weights[r].sum() == pytest.approx(1.0)
    # the quadrature integrates polynomials of degree < 2m exactly: sum_k tau_k theta_k^2 is
    # q^T H^2 q for the normalised probe q
    q = rademacher(D, 3, 0)[:, 0]
    q = q / q.norm()
    H = op.matrix
    assert np.dot(res.ritz_weights[0], res.ritz_values[0] ** 2) == pytest.approx(
        float(q @ H @ H @ q), rel=1e-10
    )
    lz, basis = lanczos(op, rademacher(D, 2, 0), 20, return_basis=True)
    for r in range(2):
        B = basis[r, : int(lz.num_steps[r])]
        assert torch.allclose(B @ B.T, torch.eye(B.shape[0], dtype=B.dtype), atol=1e-12)
    grid, dens = spectral_density(res.ritz_values, res.ritz_weights, num_bins=4000)
    assert np.sum(dens) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=2e-3)


def test_breakdown_on_low_rank_operator():
    gen = torch.Generator().manual_seed(1)
    U = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    op = DenseOperator(U @ U.T)  # rank 3: Krylov space closes after <= 4 steps
    res = slq(op, num_runs=2, num_steps=20, seed=0)
    assert all(s <= 4 for s in res.num_steps)
    exact = np.linalg.eigvalsh((U @ U.T).numpy())
    assert res.lambda_max == pytest.approx(exact[-1], rel=1e-9)


def test_slq_validation():
    op = DenseOperator(np.eye(4))
    with pytest.raises(SparsemilError, match=r"num_runs \(lanczos_num\)"):
        slq(op, num_runs=0)
    with pytest.raises(SparsemilError, match="which='middle'"):
        top_eigenvalues(op, which="middle")
    with pytest.raises(SparsemilError, match="square matrix"):
        DenseOperator(np.ones((2, 3)))
