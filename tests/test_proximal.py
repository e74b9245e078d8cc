"""The proximal finishing phase (a certified stationary point of CE + lmbda ||theta||_1) and the
per-layer anisotropy of the pruning direction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from sparsemil.curvature.hvp import HessianOperator
from sparsemil.errors import SparsemilError
from sparsemil.limit import premises
from sparsemil.prune.proximal import kkt_residual, proximal_finish, soft_threshold


def _logistic_data(n: int = 120, p: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    w_true = np.array([2.0, -1.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5])[:p]
    y = (X @ w_true + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
    return X, y


def _bce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), y)


def test_soft_threshold():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0])
    torch.testing.assert_close(soft_threshold(x, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))


def test_logistic_regression_reaches_the_l1_optimum():
    import sklearn
    from sklearn.linear_model import LogisticRegression

    X, y = _logistic_data()
    n = X.shape[0]
    lmbda = 0.03
    torch.manual_seed(0)
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    batch = (torch.from_numpy(X), torch.from_numpy(y))
    res = proximal_finish(model, _bce, [batch], lmbda, tol=1e-7, max_iter=5000)
    assert res.converged and res.stop_reason == "converged"
    assert res.kkt_after["residual"] <= 1e-7 * lmbda * np.sqrt(X.shape[1])
    assert res.kkt_before["residual"] > res.kkt_after["residual"]
    # sklearn: min ||w||_1 + C sum_i log-loss_i  <=>  mean log-loss + lmbda ||w||_1, C = 1/(n lmbda)
    new_api = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8)
    l1 = {"l1_ratio": 1.0} if new_api else {"penalty": "l1"}  # 'penalty' deprecated in 1.8
    ref = LogisticRegression(
        C=1.0 / (n * lmbda), solver="liblinear", fit_intercept=False, tol=1e-12,
        max_iter=100_000, **l1,
    ).fit(X, y)  # fmt: skip
    w = model.weight.detach().numpy().reshape(-1)
    np.testing.assert_allclose(w, ref.coef_.reshape(-1), atol=1e-5)
    assert set(np.flatnonzero(w == 0)) == set(np.flatnonzero(np.abs(ref.coef_.reshape(-1)) < 1e-8))
    assert res.zeros_after >= 1  # the L1 optimum is sparse and the prox step gives exact zeros
    # F is monotone non-increasing along the accepted steps
    trace = np.array(res.objective_trace)
    assert np.all(np.diff(trace) <= 0)
    assert res.objective_after <= res.objective_before


def test_unpenalised_parameters_take_plain_gradient_steps():
    X, y = _logistic_data(seed=1)
    lmbda = 0.05
    torch.manual_seed(1)
    model = nn.Linear(X.shape[1], 1).double()  # bias unpenalised
    batch = (torch.from_numpy(X), torch.from_numpy(y))
    res = proximal_finish(
        model, _bce, [batch], lmbda, penalised=[model.weight], tol=1e-6, max_iter=5000
    )
    assert res.converged
    # at the optimum the bias gradient vanishes (no subgradient term for it)
    model.zero_grad()
    _bce(model, batch).backward()
    assert abs(float(model.bias.grad)) < 1e-6 * lmbda * 3
    assert res.kkt_after["n_penalised"] == X.shape[1]


def test_refuses_without_l1():
    with pytest.raises(SparsemilError, match="lmbda"):
        proximal_finish(nn.Linear(2, 1), _bce, [(torch.zeros(3, 2), torch.zeros(3))], 0.0)


def test_small_mmil_reaches_the_tolerance_and_the_objective_never_rises():
    from sparsemil.experiments.mil_bridge import bag_loss_fn, deterministic_grouping
    from sparsemil.mil.mmil import MMILTransformer
    from sparsemil.prune.l1 import l1_params

    gen = torch.Generator().manual_seed(0)
    bags = []
    for i in range(10):
        n = 3 + i % 4
        y = i % 2
        x = torch.randn(1, n, 12, generator=gen) + (0.8 if y else -0.8)
        bags.append({"X": x, "Y": torch.tensor([y])})
    torch.manual_seed(0)
    model = MMILTransformer(
        12, n_classes=2, embed_dim=16, num_subbags=2, num_layers=1, grouping="random", seed=3
    )
    lmbda = 1e-3
    with deterministic_grouping(model):
        res = proximal_finish(
            model, bag_loss_fn, bags, lmbda, penalised=[p for _, p in l1_params(model)],
            tol=0.1, max_iter=400,
        )  # fmt: skip
    assert model.grouping == "random"
    assert res.converged, res.to_dict()
    assert res.kkt_after["residual"] <= 0.1 * res.kkt_after["bound"]
    assert res.kkt_after["passed"]
    assert np.all(np.diff(res.objective_trace) <= 0)
    assert model.training  # mode restored


def test_kkt_residual_is_shared_with_the_premise_checks():
    assert premises.kkt_residual is kkt_residual
    theta = torch.tensor([1.0, 0.0, -2.0, 0.5])
    grad = torch.tensor([-0.1, 0.05, 0.1, 0.3])
    pen = torch.tensor([True, True, True, False])
    r = kkt_residual(theta, grad, 0.1, pen)
    assert r["residual"] == pytest.approx(0.3)  # only the unpenalised gradient is left


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("layers.0.msg_attn.to_qkv.weight", "to_qkv"),
        ("layers.1.subbag_attn.to_out.weight", "to_out"),
        ("proj.weight", "proj"),
        ("classifier.module.weight", "classifier"),
        ("pool.fc1.module.weight", "pool.fc1"),
        ("pool.fc2.weight", "pool.fc2"),
    ],
)
def test_layer_group_names(name, group):
    assert premises.layer_group(name) == group


class _Quadratic(nn.Module):
    """Loss 1/2 sum_i h_i theta_i^2 over two layers: a diagonal Hessian known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[0.1, -2.0, 0.0], [1.5, -0.05, 4.0]]))
            self.b.weight.copy_(torch.tensor([[0.2, -0.01, 3.0, 0.15]]))
        self.h_a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        self.h_b = 7.0


def _quadratic_loss(model: _Quadratic, batch) -> torch.Tensor:
    quad_a = (model.h_a * model.a.weight**2).sum()
    return 0.5 * quad_a + 0.5 * model.h_b * (model.b.weight**2).sum()


def test_layer_anisotropy_equals_the_hand_computed_rayleigh_quotients():
    model = _Quadratic()
    op = HessianOperator(model, _quadratic_loss, [torch.zeros(1)], method="autograd")
    refs = [(model.a, "weight"), (model.b, "weight")]
    groups = premises.layer_groups(["a.weight", "b.weight"], refs)
    assert list(groups) == ["a", "b"]
    # ratio 5/10: the 5 smallest |w| are 0 (a), -0.01 (b), -0.05 (a), 0.1 (a), 0.15 (b): the
    # direction is non-zero on two weights of each layer
    mean_ev = (1 + 2 + 3 + 4 + 5 + 6 + 4 * 7.0) / 10
    out = premises.layer_anisotropy(op, refs, 0.5, groups, mean_ev, n_random=4, seed=1)
    ga, gb = out["groups"]["a"], out["groups"]["b"]
    assert (ga["n_pruned"], ga["n_weights"], gb["n_pruned"], gb["n_weights"]) == (2, 6, 2, 4)
    assert (ga["n_nonzero"], gb["n_nonzero"]) == (5, 4)
    rq_a = (5.0 * 0.05**2 + 1.0 * 0.1**2) / (0.05**2 + 0.1**2)
    assert ga["rayleigh_magnitude"] == pytest.approx(rq_a, rel=1e-6)
    assert gb["rayleigh_magnitude"] == pytest.approx(7.0, rel=1e-6)
    assert gb["rayleigh_random"] == pytest.approx([7.0] * 4, rel=1e-6)  # constant diagonal
    assert all(1.0 - 1e-9 <= q <= 6.0 + 1e-9 for q in ga["rayleigh_random"])
    assert all(1.0 - 1e-9 <= q <= 6.0 + 1e-9 for q in ga["rayleigh_random_nonzero"])
    assert ga["magnitude_over_mean"] == pytest.approx(rq_a / mean_ev, rel=1e-6)
    assert gb["magnitude_over_random"] == pytest.approx(1.0, rel=1e-6)
    assert gb["rayleigh_random_nonzero"] == pytest.approx([7.0] * 4, rel=1e-6)
    assert out["products"] == 2 * (1 + 2 * 4)
    # through premise_checks: the same numbers under "layers"
    doc = premises.premise_checks(op, refs, 0.5, 0.1, 0.01, groups=groups, trace_probes=3)
    assert doc["layers"]["groups"]["b"]["rayleigh_magnitude"] == pytest.approx(7.0, rel=1e-6)


def test_mil_limit_with_the_proximal_finish(tmp_path):
    import json

    from sparsemil.experiments.mil_bridge import MILBags, mil_limit
    from sparsemil.limit.predict import LimitOptions
    from sparsemil.mil.mmil import MMILTransformer

    gen = torch.Generator().manual_seed(2)
    bags = []
    for i in range(16):
        y = i % 2
        x = torch.randn(1, 3 + i % 3, 10, generator=gen) + (0.7 if y else -0.7)
        bags.append({"X": x, "Y": torch.tensor([y])})
    data = MILBags(train=bags[:12], eval=bags[12:], n_classes=2, source="toy", eval_split="test")
    torch.manual_seed(0)
    model = MMILTransformer(10, n_classes=2, embed_dim=16, num_subbags=2, num_layers=1)
    opts = LimitOptions(
        finish="proximal", finish_tol=1e-6, finish_max_iter=3, layer_random=2, hessian_samples=6
    )
    doc = mil_limit(
        model, data, tmp_path, options=opts, n_ratios=8, lanczos_iter=6, lanczos_num=2,
        progress=False, lmbda=1e-3, epsilon_batch_size=4,
    )  # fmt: skip
    fin = json.loads((tmp_path / "limit.json").read_text())["finish"]
    assert fin["iterations"] == 3 and not fin["converged"] and fin["stop_reason"] == "max_iter"
    assert fin["kkt_after"]["ratio"] < fin["kkt_before"]["ratio"]
    assert fin["objective_after"] <= fin["objective_before"]
    assert any(w.startswith("finish: the proximal phase stopped") for w in doc["warnings"])
    assert doc["epsilon_batch_size"] == 4
    # the premise checks see the finished weights and the gradient of all training bags (not
    # of the Hessian's subset of 6): the same KKT residual as the finish's
    assert doc["premises"]["kkt"]["residual"] == pytest.approx(fin["kkt_after"]["residual"])
    layers = doc["premises"]["layers"]
    assert layers is not None, doc["premises"]
    assert set(layers["groups"]) <= {"proj", "to_qkv", "to_out", "classifier"}
    with pytest.raises(SparsemilError, match="lmbda"):
        mil_limit(model, data, tmp_path / "b", options=opts, n_ratios=8, lanczos_iter=6,
                  progress=False)  # fmt: skip
    # a rerun without the finish into the same folder leaves no stale finished weights
    stale = tmp_path / "finished.safetensors"
    stale.write_bytes(b"earlier run")
    mil_limit(model, data, tmp_path, options=LimitOptions(hessian_samples=6, layer_random=0),
              n_ratios=8, lanczos_iter=6, lanczos_num=2, progress=False)  # fmt: skip
    assert not stale.exists()
    assert json.loads((tmp_path / "limit.json").read_text()).get("finish") is None


def test_finish_options_are_checked():
    from sparsemil.experiments.vision.config import PruneConfig
    from sparsemil.limit.predict import LimitOptions

    with pytest.raises(SparsemilError, match="limit.finish"):
        LimitOptions(finish="ista").validate()
    with pytest.raises(SparsemilError, match="finish_tol"):
        LimitOptions(finish="proximal", finish_tol=0.0).validate()
    with pytest.raises(SparsemilError, match="MIL bridge"):
        PruneConfig(limit=LimitOptions(finish="proximal")).validate()
    # a MIL config trained without L1 is refused before any training (nothing to finish)
    from sparsemil.train.config import MILTrainConfig

    mil = MILTrainConfig(data="x.csv", lmbda=0.0)
    with pytest.raises(SparsemilError, match="needs mil.lmbda > 0"):
        PruneConfig(mil=mil, limit=LimitOptions(finish="proximal")).validate()
    PruneConfig(mil=dataclasses.replace(mil, lmbda=1e-4),
                limit=LimitOptions(finish="proximal")).validate()  # fmt: skip


@pytest.mark.parametrize("q", [0.0, -2.0, float("nan")])
def test_anisotropy_extension_predicts_nothing_without_positive_curvature(q):
    from sparsemil.curvature.operator import DenseOperator
    from sparsemil.curvature.slq import slq
    from sparsemil.limit.predict import anisotropy_extension

    h = np.diag(np.linspace(0.1, 2.0, 20))
    spec = slq(DenseOperator(h), num_runs=2, num_steps=10, seed=0)
    ratios = np.linspace(0.05, 0.95, 19)
    ext = anisotropy_extension(spec, ratios, 0.1 * ratios, 0.01, q)
    assert ext["predicted_ratio"] is None and "q =" in ext["reason"]
    ok = anisotropy_extension(spec, ratios, 0.1 * ratios, 0.01, 1.0)
    assert "reason" not in ok and ok["label"].startswith("extension")
