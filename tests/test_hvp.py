"""HessianOperator against exact Hessians (torch.autograd.functional.hessian) on tiny nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sparsemil.curvature.hvp import HessianOperator, hessian_parameters
from sparsemil.errors import SparsemilError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data[:400] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:400])
    return x, y


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def exact_hessian(model: nn.Module, loss_of_params) -> torch.Tensor:
    """Float64 Hessian of ``loss_of_params(dict)`` over the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def f(th):
        parts = [c.reshape(s) for c, s in zip(torch.split(th, sizes), shapes, strict=True)]
        return loss_of_params(dict(zip(names, parts, strict=True)))

    return torch.autograd.functional.hessian(f, theta, vectorize=True)


@pytest.mark.parametrize("method", ["linearize", "func", "autograd", "auto"])
def test_matches_exact_hessian_with_ragged_batches(digits, method):
    x, y = digits
    model = _net()
    md = _net().double()
    md.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    # batches of unequal size: the operator must be the mean over *samples*
    cuts = [0, 50, 170, 400]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    op = HessianOperator(model, ce, batches, method=method, chunk_size=32)
    H = op.dense()
    He = exact_hessian(
        md, lambda ps: F.cross_entropy(torch.func.functional_call(md, ps, (x.double(),)), y)
    )
    assert op.dim == He.shape[0] == 64 * 6 + 6 + 6 * 10 + 10
    rel = (H - He).abs().max() / He.abs().max()
    assert rel < 1e-5
    if method == "auto":
        assert op.backend == "linearize"


def test_deterministic_and_matvec_equals_matmat(digits):
    x, y = digits
    model = _net(1)
    op = HessianOperator(model, ce, [(x[:200], y[:200]), (x[200:], y[200:])])
    gen = torch.Generator().manual_seed(3)
    V = torch.randn(op.dim, 5, generator=gen, dtype=torch.float64)
    a = op.matmat(V)
    b = op.matmat(V)
    assert torch.equal(a, b)
    col = op.matvec(V[:, 2])
    assert torch.allclose(col, a[:, 2], rtol=1e-5, atol=1e-9)
    assert op.num_products == 11


def test_eval_mode_batchnorm_excluded_and_mode_restored(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 10)
    )
    model.train()
    model(x)  # populate running stats
    names = [n for n, _ in hessian_parameters(model)]
    assert names == ["0.weight", "0.bias", "4.weight", "4.bias"]
    op = HessianOperator(model, ce, [(x, y)])
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # dropout would make repeated products differ; eval mode makes them equal
    assert torch.equal(op.matvec(v), op.matvec(v))
    assert model.training
    # the eval-mode network's Hessian, computed independently
    model.eval()
    md = nn.Sequential(*[m for m in model]).double()
    params = dict(hessian_parameters(md))
    fixed = {k: v for k, v in md.state_dict().items() if k not in params}

    def loss(ps):
        return F.cross_entropy(torch.func.functional_call(md, {**fixed, **ps}, (x.double(),)), y)

    sizes = [p.numel() for p in params.values()]
    shapes = [p.shape for p in params.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    He = torch.autograd.functional.hessian(
        lambda th: loss(
            dict(
                zip(
                    params,
                    [c.reshape(s) for c, s in zip(torch.split(th, sizes), shapes, strict=True)],
                    strict=True,
                )
            )
        ),
        theta,
        vectorize=True,
    )
    model.train()
    H = op.dense()
    assert (H - He).abs().max() / He.abs().max() < 1e-5


def test_bags_of_varying_size_with_weights():
    """MIL-style: one bag per batch, no padding; weights give each bag an equal share."""
    gen = torch.Generator().manual_seed(0)
    bags = [(torch.randn(n, 5, generator=gen), torch.tensor(n % 2)) for n in (3, 7, 12, 4)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))

    def bag_loss(m, bag):
        logits = m(bag[0]).mean(dim=0, keepdim=True)  # mean pooling over instances
        return F.cross_entropy(logits, bag[1].reshape(1))

    op = HessianOperator(model, bag_loss, bags, weights=[1.0] * len(bags))
    md = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    md.load_state_dict({k: v.double() for k, v in model.state_dict().items()})

    def loss(ps):
        total = 0.0
        for X, Y in bags:
            logits = torch.func.functional_call(md, ps, (X.double(),)).mean(0, keepdim=True)
            total = total + F.cross_entropy(logits, Y.reshape(1))
        return total / len(bags)

    He = exact_hessian(md, loss)
    assert (op.dense() - He).abs().max() / He.abs().max() < 1e-5


def test_validation_errors(digits):
    x, y = digits
    model = _net()
    with pytest.raises(SparsemilError, match="at least one batch"):
        HessianOperator(model, ce, [])
    with pytest.raises(SparsemilError, match="method='nope'"):
        HessianOperator(model, ce, [(x, y)], method="nope")
    with pytest.raises(SparsemilError, match="weights: 2 values for 1 batches"):
        HessianOperator(model, ce, [(x, y)], weights=[1.0, 2.0])
    op = HessianOperator(model, ce, [(x, y)])
    with pytest.raises(SparsemilError, match=r"matvec expects shape"):
        op.matvec(torch.zeros(3))
    assert np.isclose(sum(op.weights), 1.0)


def test_linear_operator_interface_against_scipy_and_exact_hessian(digits):
    """``shape``/``dtype``/``@``/``to_scipy()``: the top eigenvalues by our Lanczos and by
    ``scipy.sparse.linalg.eigsh(op.to_scipy())`` equal the exact dense Hessian's."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    from sparsemil.curvature.operator import (
        CurvatureOperator,
        DenseOperator,
        PerBatchCurvatureOperator,
    )
    from sparsemil.curvature.slq import top_eigenvalues

    x, y = digits
    x = x.double()
    model = _net(2).double()
    op = HessianOperator(model, ce, [(x[:150], y[:150]), (x[150:], y[150:])])
    D = op.dim
    assert op.shape == (D, D) and op.dtype == torch.float64
    assert isinstance(op, CurvatureOperator) and isinstance(op, PerBatchCurvatureOperator)
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(D, dtype=torch.float64, generator=gen).requires_grad_()
    hv = op @ v
    assert hv.shape == (D,) and hv.dtype == v.dtype and not hv.requires_grad
    assert torch.equal(hv, (op @ v[:, None]).squeeze(1))
    V = torch.randn(D, 3, dtype=torch.float64, generator=gen)
    HV = op @ V
    assert HV.shape == (D, 3)
    torch.testing.assert_close(HV[:, 1], op @ V[:, 1], rtol=1e-10, atol=1e-12)
    with pytest.raises(SparsemilError, match=r"operator @ x: x must have shape"):
        op @ V[None]

    He = exact_hessian(
        model, lambda ps: F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)
    )
    exact = torch.linalg.eigvalsh(He).numpy()[::-1]
    k = 4
    sp = op.to_scipy()
    assert isinstance(sp, LinearOperator) and sp.shape == (D, D) and sp.dtype == np.float64
    np.testing.assert_allclose(sp @ V.numpy(), HV.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sp.matvec(v.detach().numpy()), hv.numpy(), rtol=1e-12, atol=1e-14)
    by_scipy = np.sort(eigsh(sp, k=k, which="LA", return_eigenvectors=False))[::-1]
    ours = top_eigenvalues(op, k=k, num_steps=96)
    scale = exact[0]
    np.testing.assert_allclose(by_scipy, exact[:k], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(ours, exact[:k], rtol=0, atol=1e-8 * scale)
    # the dense test helper implements the same protocol
    dense = DenseOperator(He)
    assert isinstance(dense, CurvatureOperator) and dense.shape == (D, D)
    assert torch.equal(dense @ v.detach(), (dense @ v.detach()[:, None]).squeeze(1))
    by_dense = np.sort(eigsh(dense.to_scipy(), k=k, which="LA", return_eigenvectors=False))
    np.testing.assert_allclose(by_dense[::-1], exact[:k], rtol=0, atol=1e-10 * scale)
