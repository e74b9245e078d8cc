"""HessianOperator against exact Hessians (torch.autograd.functional.hessian) on tiny nets."""

from __future__ import annotations

import copy

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
    if method == "auto":  # every backend agrees on this MLP; the choice is by timing
        choice = op.backend_choice
        assert choice["chosen"] == op.backend and choice["autograd_s_per_vector"] > 0


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


@pytest.mark.parametrize("method", ["auto", "autograd", "linearize"])
def test_eval_mode_batchnorm_excluded_and_mode_restored(digits, method):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 10)
    )
    model.train()
    model(x)  # populate running stats
    names = [n for n, _ in hessian_parameters(model)]
    assert names == ["0.weight", "0.bias", "4.weight", "4.bias"]
    op = HessianOperator(model, ce, [(x, y)], method=method)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # dropout would make repeated products differ; eval mode makes them equal
    assert torch.equal(op.matvec(v), op.matvec(v))
    assert model.training
    # the eval-mode network's Hessian, computed independently
    model.eval()
    md = copy.deepcopy(model).double()  # a copy: .double() on shared modules would convert model
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


# ----------------------------------------------------------------- issue 14, P1 and P5


def _bn_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, 10),
    )


@pytest.mark.parametrize("method", ["linearize", "func", "autograd", "auto"])
def test_products_are_detached_and_batchnorm_uses_running_stats(digits, method):
    """BatchNorm parameters still require gradients while outside the Hessian: the products
    come back as plain detached tensors, BatchNorm runs on its running statistics (eval) and
    no product changes them, and SLQ runs (issue 14: it died at its first step)."""
    from sparsemil.curvature.slq import slq

    x, y = digits
    x = x[:64].reshape(-1, 1, 8, 8)
    model = _bn_convnet()
    model.train()
    model(x)  # populate the running statistics
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    op = HessianOperator(model, ce, [(x, y[:64])], method=method)
    assert op.determinism["passed"]
    assert "1.weight" not in op.names and op.dim == 3 * 9 + 3 + 192 * 10 + 10
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    hv = op @ v
    assert not hv.requires_grad and hv.grad_fn is None
    assert torch.equal(hv, op @ v)  # eval mode: the same product twice
    spec = slq(op, num_runs=1, num_steps=4, seed=0)
    assert np.all(np.isfinite(spec.ritz_values))
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2] and model.training  # mode restored
    # the product is the Hessian of the eval-mode loss (BatchNorm on running statistics)
    model.eval()
    ref = HessianOperator(model, ce, [(x, y[:64])], method="autograd", check=False) @ v
    model.train()
    torch.testing.assert_close(hv, ref, rtol=1e-4, atol=1e-6)
    # any params= subset: the other parameters still require grad, the product does not
    sub = HessianOperator(model, ce, [(x, y[:64])], params=[model[0].weight], method=method)
    out = sub @ torch.ones(sub.dim)
    assert sub.dim == 27 and not out.requires_grad and out.grad_fn is None


class _DropoutInEval(nn.Module):
    """Dropout left on in eval mode: a different loss at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(F.dropout(torch.tanh(self.fc1(x)), 0.5, training=True))


class _NoisyInEval(_DropoutInEval):
    """Another random forward: input noise drawn at every call."""

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x + 0.1 * torch.randn_like(x))))


class _WrongBackward(torch.autograd.Function):
    """``w1 * w2`` whose backward doubles the gradient of ``w1``: a gradient field that is not
    a gradient, so its Jacobian ("Hessian") is not symmetric."""

    @staticmethod
    def forward(ctx, w1, w2):
        ctx.save_for_backward(w1, w2)
        return w1 * w2

    @staticmethod
    def backward(ctx, g):
        w1, w2 = ctx.saved_tensors
        return 2.0 * g * w2, g * w1


class _Asymmetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.linspace(0.5, 1.5, 10))
        self.w2 = nn.Parameter(torch.linspace(-1.0, 1.0, 10))

    def forward(self, x):
        return x[:, :10] * _WrongBackward.apply(self.w1, self.w2)


@pytest.mark.parametrize("model_cls", [_DropoutInEval, _NoisyInEval])
@pytest.mark.parametrize("method", ["auto", "autograd", "func", "linearize"])
def test_random_forward_in_eval_is_refused(digits, model_cls, method):
    x, y = digits
    torch.manual_seed(0)
    model = model_cls()
    with pytest.raises(SparsemilError, match=r"random under model.eval\(\).*dropout"):
        HessianOperator(model, ce, [(x, y)], method=method)
    op = HessianOperator(model, ce, [(x, y)], method=method, check=False)  # opt out
    assert op.determinism is None


def test_asymmetric_products_are_refused(digits):
    x, y = digits
    with pytest.raises(SparsemilError, match="not symmetric"):
        HessianOperator(_Asymmetric(), ce, [(x, y)], method="autograd")


class _Unused(nn.Module):
    """``unused`` never reaches the loss; ``shift`` reaches it linearly only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)
        self.unused = nn.Linear(64, 10)
        self.shift = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.fc(x) + self.shift


@pytest.mark.parametrize("method", ["linearize", "func", "autograd", "auto"])
def test_unused_parameter_has_zero_curvature_in_every_backend(digits, method):
    x, y = digits
    model = _Unused()
    op = HessianOperator(model, ce, [(x[:100], y[:100]), (x[100:], y[100:])], method=method)
    H = op.dense()
    start = 0
    for name, n in zip(op.names, op.numels, strict=True):
        block = H[start : start + n]
        if name.startswith("unused."):
            assert torch.equal(block, torch.zeros_like(block)), name
        else:
            assert float(block.abs().sum()) > 0, name
        start += n
    ref = HessianOperator(model, ce, [(x[:100], y[:100]), (x[100:], y[100:])], method="func")
    torch.testing.assert_close(H, ref.dense(), rtol=1e-4, atol=1e-7)
    # a loss no parameter reaches: zero curvature, no crash
    const = HessianOperator(model, lambda m, b: b[0].sum() * 0 + 1.0, [(x, y)], method=method)
    assert float(const.dense().abs().max()) == 0.0


def test_params_argument_is_validated(digits):
    x, y = digits
    model = _net()
    batches = [(x, y)]
    for bad, kind in ((model, "Sequential"), (model[0].weight, "Parameter"), ("0.weight", "str")):
        with pytest.raises(SparsemilError, match=f"expected a list of parameters.*got {kind}"):
            HessianOperator(model, ce, batches, params=bad)
    with pytest.raises(SparsemilError, match=r"params\[1\]: expected a parameter.*got int"):
        HessianOperator(model, ce, batches, params=[model[0].weight, 3])
    with pytest.raises(SparsemilError, match=r"params\[0\]: not a parameter of the model"):
        HessianOperator(model, ce, batches, params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(SparsemilError, match="empty"):
        HessianOperator(model, ce, batches, params=[])
    # accepted forms: parameters, named pairs, (module, name) pairs; duplicates count once
    w = model[0].weight
    for params in (
        [w, w],
        [("0.weight", w)],
        [(model[0], "weight")],
        (p for n, p in model.named_parameters() if n == "0.weight"),
    ):
        assert HessianOperator(model, ce, batches, params=params).dim == w.numel()
    w.requires_grad_(False)
    with pytest.raises(SparsemilError, match=r"'0.weight' is frozen"):
        HessianOperator(model, ce, batches, params=[w])
    assert HessianOperator(model, ce, batches).names == ["0.bias", "2.weight", "2.bias"]


def test_batch_size_needs_a_batch_dimension_or_weights(digits):
    from sparsemil.curvature.hvp import batch_size_of

    x, y = digits
    model = _net()
    assert batch_size_of((x, y)) == 400
    assert batch_size_of({"X": x[None], "Y": y[:1]}) == 1  # one MIL bag
    assert batch_size_of([torch.tensor(2.0), (x, y)]) == 400  # 0-dim tensors do not count

    def loss(m, b):
        return ce(m, (b["x"], b["y"]))

    for batch, msg in (
        ({"x": x, "y": y, "note": "plain"}, None),
        ({"x": x, "y": y[:10]}, r"different leading dimensions \[10, 400\]"),
        (torch.tensor(3.0), "no tensor with a batch dimension"),
        ({"x": 1.0}, "no tensor with a batch dimension"),
    ):
        if msg is None:
            assert HessianOperator(model, loss, [batch]).weights == [1.0]
            continue
        with pytest.raises(SparsemilError, match=msg + ".*pass weights="):
            batch_size_of(batch)
    odd = [{"x": x[:100], "y": y[:100], "k": torch.arange(10)}, {"x": x[100:], "y": y[100:]}]
    with pytest.raises(SparsemilError, match="different leading dimensions"):
        HessianOperator(model, loss, odd)
    op = HessianOperator(model, loss, odd, weights=[100, 300])
    assert op.weights == [0.25, 0.75]
    for bad in ([float("nan"), 1.0], ["a", "b"]):
        with pytest.raises(SparsemilError, match="weights"):
            HessianOperator(model, loss, odd, weights=bad)


def test_peak_memory_sees_a_transient_allocation():
    from sparsemil.curvature.hvp import _PeakMemory

    with _PeakMemory(torch.device("cpu")) as mem:
        big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB of float32, touched
        del big
    assert mem.peak > 200 * 2**20  # freed before the block ends, still counted


def test_auto_does_not_try_a_trace_that_would_not_fit(digits, monkeypatch):
    """An out-of-memory kill cannot be fallen back from, so a traced trial whose estimated
    peak (TRACE_PEAK_FACTOR x the autograd product's) exceeds half of the free memory is
    never started; the product is the autograd one."""
    import sparsemil.curvature.hvp as hvp

    class _OneGiB(hvp._PeakMemory):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            self.peak = 2**30

    monkeypatch.setattr(hvp, "_PeakMemory", _OneGiB)
    monkeypatch.setattr(hvp, "_memory_available", lambda device: 4 * 2**30)
    traced = []
    for name in ("_hvp_linearize", "_hvp_func"):
        orig = getattr(HessianOperator, name)
        monkeypatch.setattr(
            HessianOperator,
            name,
            lambda self, *a, _o=orig, _n=name: traced.append(_n) or _o(self, *a),
        )
    x, y = digits
    op = HessianOperator(_net(), ce, [(x[:200], y[:200]), (x[200:], y[200:])], method="auto")
    v = torch.randn(op.dim, 2)
    hv = op @ v
    ref = HessianOperator(_net(), ce, [(x[:200], y[:200]), (x[200:], y[200:])], method="autograd")
    assert op.backend == "autograd" and traced == []
    assert op.backend_choice["linearize"].startswith("not tried: its trial would need ~6.0 GiB")
    assert op.backend_choice["func"].startswith("not tried: its trial would need ~3.0 GiB")
    torch.testing.assert_close(hv, ref @ v, rtol=1e-5, atol=1e-7)


def test_finite_check_survives_an_overflowing_sum():
    from sparsemil.curvature.hvp import _all_finite

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum is inf
    assert _all_finite(big)
    assert not _all_finite(torch.tensor([1.0, float("nan"), -1.0]))
    assert not _all_finite(torch.tensor([float("inf"), float("-inf")]))
