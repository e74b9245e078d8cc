"""Issue 14, P2: one set of parameters everywhere -- frozen weights, tied weights, and which
weight tensors are prunable (printed, never skipped silently)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsemil.curvature.hvp import HessianOperator, cross_entropy_loss
from sparsemil.errors import SparsemilError
from sparsemil.prune.export import load_sparse, save_checkpoint, save_sparse
from sparsemil.prune.l1 import l1_params, l1_penalty
from sparsemil.prune.magnitude import (
    global_magnitude_masks,
    prunable_parameters,
    prunable_set,
    prune_model,
    resolve_params,
)
from sparsemil.prune.sweep import pruned_counts_and_distances, pruning_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digits(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (
        torch.tensor(d.data[:n] / 16.0, dtype=torch.float32),
        torch.tensor(d.target[:n], dtype=torch.int64),
    )


def _frozen_first_layer() -> nn.Sequential:
    """The issue's example: digits MLP 64 -> 32 -> 10 whose first layer is frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model[0].requires_grad_(False)
    return model


def _evaluate(x, y):
    def evaluate(model):
        with torch.no_grad():
            logits = model(x)
        return {
            "test_acc": float((logits.argmax(1) == y).float().mean()),
            "test_loss": float(F.cross_entropy(logits, y)),
            "train_loss": float(F.cross_entropy(logits, y)),
        }

    return evaluate


def test_frozen_weights_are_outside_every_set() -> None:
    """Before: the Hessian covered the 330 trainable parameters while the sweep pruned 2,368
    weights, 2,048 of them frozen. Now every step uses the 320 trainable weights."""
    x, y = _digits()
    model = _frozen_first_layer()
    pset = prunable_set(model)
    assert pset.n_weights == 320 and pset.names == ["2.weight"]
    assert pset.left_out == {"0.weight": "frozen (requires_grad=False)"}
    assert any("frozen" in line and "0.weight" in line for line in pset.describe())
    # the L1 penalty and the Hessian leave the frozen layer out as well
    assert [n for n, _ in l1_params(model)] == ["2.weight", "2.bias"]
    assert [n for n, _ in l1_params(model, "weights")] == ["2.weight"]
    op = HessianOperator(model, cross_entropy_loss, [(x, y)])
    assert op.dim == 330 and op.names == ["2.weight", "2.bias"]
    # the sweep and R(rho): over the 320 trainable weights only
    ratios = np.array([0.0, 0.25, 0.5, 0.75])
    frozen_before = model[0].weight.detach().clone()
    sweep = pruning_sweep(model, _evaluate(x, y), ratios, progress=False)
    assert sweep.n_weights == 320
    mags = np.sort(model[2].weight.detach().abs().double().numpy().reshape(-1))
    k = [max(1, math.ceil(r * 320)) for r in ratios]
    assert sweep.num_pruned.tolist() == k
    np.testing.assert_allclose(sweep.distance, [math.sqrt((mags[:n] ** 2).sum()) for n in k])
    n_pruned, dist = pruned_counts_and_distances(model, ratios)
    assert n_pruned.tolist() == k and np.allclose(dist, sweep.distance)
    # pruning never touches the frozen layer, and the requested ratio is the pruned ratio
    masks = prune_model(model, 0.5)
    assert list(masks) == [(model[2], "weight")]
    assert torch.equal(model[0].weight, frozen_before)
    assert int((model[2].weight == 0).sum()) == 160
    # asking for the frozen weight explicitly is refused, naming it
    with pytest.raises(SparsemilError, match=r"params\[0\]: Linear.weight is frozen"):
        pruning_sweep(model, _evaluate(x, y), ratios, params=[(model[0], "weight")])


def test_frozen_first_layer_prediction_uses_the_trainable_set() -> None:
    """The prediction from the Python API equals the one over the stated (trainable) set."""
    from sparsemil.limit.predict import predict_limit

    x, y = _digits()
    model = _frozen_first_layer()
    ratios = np.linspace(0.0, 0.95, 20)
    default = pruning_sweep(model, _evaluate(x, y), ratios, progress=False)
    explicit = pruning_sweep(
        model, _evaluate(x, y), ratios, params=[(model[2], "weight")], progress=False
    )
    assert np.array_equal(default.distance, explicit.distance)
    op = HessianOperator(model, cross_entropy_loss, [(x, y)])
    a = predict_limit(op, default.ratios, default.distance, 0.05, num_steps=20)
    b = predict_limit(op, explicit.ratios, explicit.distance, 0.05, num_steps=20)
    assert a.predicted_ratio == b.predicted_ratio


class _Tied(nn.Module):
    """64 -> 16 -> 16 -> 16 -> 10 whose two 16x16 layers share one weight: 1,440 unique
    weights (1,696 when the shared one is counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(64, 16)
        self.h1 = nn.Linear(16, 16)
        self.h2 = nn.Linear(16, 16)
        self.h2.weight = self.h1.weight
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        return self.out(torch.tanh(self.h2(torch.tanh(self.h1(torch.tanh(self.inp(x)))))))


def test_tied_weights_are_counted_once() -> None:
    x, y = _digits()
    model = _Tied()
    pset = prunable_set(model)
    assert pset.n_weights == 1440 and len(pset.refs) == 3
    assert pset.aliases == {"h2.weight": "h1.weight"}
    assert any("tied: h2.weight is h1.weight" in line for line in pset.describe())
    # rho = 0.5 prunes 50 % of the unique weights (it pruned 54.3 % when counted twice)
    prune_model(model, 0.5)
    unique = [model.inp.weight, model.h1.weight, model.out.weight]
    zeros = sum(int((w == 0).sum()) for w in unique)
    assert zeros == 720 and zeros / 1440 == 0.5
    assert model.h2.weight is model.h1.weight  # still tied
    # sweep, R(rho), the penalty and the Hessian count the shared tensor once
    model = _Tied()
    unique = [model.inp.weight, model.h1.weight, model.out.weight]
    sweep = pruning_sweep(model, _evaluate(x, y), [0.0, 0.5, 0.9], progress=False)
    assert sweep.n_weights == 1440 and sweep.num_pruned.tolist() == [1, 720, 1296]
    mags = np.sort(torch.cat([w.detach().abs().reshape(-1) for w in unique]).double().numpy())
    assert sweep.distance[1] == pytest.approx(math.sqrt((mags[:720] ** 2).sum()), rel=1e-12)
    with torch.no_grad():
        manual = sum(p.abs().sum() for p in model.parameters())  # parameters() is unique
        assert float(l1_penalty(model)) == pytest.approx(float(manual), rel=1e-6)
    assert len(l1_params(model, "weights")) == 3
    op = HessianOperator(model, cross_entropy_loss, [(x, y)])
    assert op.dim == 1440 + 16 + 16 + 16 + 10
    # explicit refs naming the shared tensor twice count it once
    refs = [(model.h1, "weight"), (model.h2, "weight"), (model.out, "weight")]
    assert len(global_magnitude_masks(refs, 0.5)) == 2
    with pytest.raises(SparsemilError, match="tied weights cannot carry"):
        prune_model(model, 0.5, permanent=False)
    # the batched (GPU) sweep prunes the same set, with the same results
    from sparsemil.prune.batched_sweep import batched_pruning_sweep

    def evaluate_many(model, stacked):
        logits = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(stacked)
        losses = np.array([float(F.cross_entropy(out, y)) for out in logits])
        acc = (logits.argmax(-1) == y).float().mean(1).numpy()
        return {"test_acc": acc, "test_loss": losses, "train_loss": losses}

    batched = batched_pruning_sweep(model, evaluate_many, [0.0, 0.5, 0.9], chunk=2, progress=False)
    assert batched.n_weights == 1440 and batched.num_pruned.tolist() == [1, 720, 1296]
    np.testing.assert_allclose(batched.test_loss, sweep.test_loss, rtol=1e-5)


@pytest.mark.parametrize("writer", ["checkpoint", "sparse"])
def test_tied_weights_save_and_load(tmp_path, writer: str) -> None:
    """Both writers save a tied model (no raw safetensors error); loading restores the
    outputs and the tie. The sparse export stores the shared tensor once."""
    from safetensors.torch import load_file

    model = _Tied()
    prune_model(model, 0.9)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / f"{writer}.safetensors"
    fresh = _Tied()
    if writer == "checkpoint":
        save_checkpoint(path, model, {"model": "tied"})
        fresh.load_state_dict(load_file(str(path)))
    else:
        save_sparse(path, model)
        stored = load_file(str(path))
        assert not any(k.startswith("h2.weight") for k in stored)  # the alias is not stored
        load_sparse(path, fresh)
    assert fresh.h2.weight is fresh.h1.weight
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


class _Zoo(nn.Module):
    """One of every layer kind the prunable rule decides about."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.conv1d = nn.Conv1d(8, 8, 3)
        self.conv3d = nn.Conv3d(1, 2, 2)
        self.convt = nn.ConvTranspose2d(2, 2, 2)
        self.bn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.att = nn.MultiheadAttention(8, 2)
        self.att_kv = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
        self.rnn = nn.GRU(8, 8)
        self.bil = nn.Bilinear(3, 3, 2)
        self.token = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 2)
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)


def test_which_tensors_are_prunable_is_stated() -> None:
    model = _Zoo()
    pset = prunable_set(model)
    assert pset.names == [
        "conv1d.weight",
        "conv3d.weight",
        "convt.weight",
        "att.in_proj_weight",
        "att.out_proj.weight",
        "att_kv.q_proj_weight",
        "att_kv.k_proj_weight",
        "att_kv.v_proj_weight",
        "att_kv.out_proj.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "bil.weight",
        "head.weight",
    ]
    assert pset.left_out == {
        "frozen.weight": "frozen (requires_grad=False)",
        "emb.weight": "embedding table (not a prunable layer type)",
        "bn.weight": "normalisation scale of BatchNorm1d",
        "ln.weight": "normalisation scale of LayerNorm",
        "token": "parameter of _Zoo (not a prunable layer type)",
    }
    lines = "\n".join(pset.describe())
    for name in pset.left_out:
        assert name in lines  # every left-out weight tensor is printed
    # the requested ratio is the ratio pruned over the stated set (distinct magnitudes)
    prune_model(model, 0.3)
    zeros = sum(int((getattr(m, a) == 0).sum()) for m, a in pset.refs)
    assert zeros == math.ceil(0.3 * pset.n_weights)
    assert int((model.emb.weight == 0).sum()) == 0 and int((model.bn.weight == 0).sum()) == 0
    # the penalty's "weights" scope is exactly the set; "all" contains it
    assert [n for n, _ in l1_params(model, "weights")] == pset.names
    assert set(pset.names) <= {n for n, _ in l1_params(model, "all")}
    # restricting the layer types lists the others as left out
    only_linear = prunable_set(model, include=(nn.Linear,))
    assert only_linear.left_out["conv1d.weight"] == "Conv1d is not in include"


def test_params_to_prune_are_validated() -> None:
    x, y = _digits()
    model = _Tied()
    evaluate = _evaluate(x, y)
    for bad, kind in ((model, "_Tied"), (model.h1.weight, "Parameter"), ({"a": 1}, "dict")):
        with pytest.raises(SparsemilError, match=f"params: expected a list.*got {kind}"):
            pruning_sweep(model, evaluate, [0.5], params=bad)
    with pytest.raises(SparsemilError, match=r"params\[1\]: expected a \(module, name\) pair"):
        pruning_sweep(model, evaluate, [0.5], params=[(model.h1, "weight"), 3.0])
    with pytest.raises(SparsemilError, match=r"params\[0\]: the model has no parameter 'nope'"):
        pruning_sweep(model, evaluate, [0.5], params=["nope"])
    with pytest.raises(SparsemilError, match=r"params\[0\]: Linear has no tensor 'wieght'"):
        pruning_sweep(model, evaluate, [0.5], params=[(model.h1, "wieght")])
    with pytest.raises(SparsemilError, match=r"params\[0\]: the tensor is not a parameter"):
        pruning_sweep(model, evaluate, [0.5], params=[nn.Parameter(torch.ones(2))])
    # names, parameters and named pairs are all accepted, each tensor once
    forms = (
        ["h1.weight", "h2.weight"],
        [model.h1.weight],
        [("h1.weight", model.h1.weight)],
        prunable_parameters(model)[1:2],
    )
    for params in forms:
        assert resolve_params(model, params) == [(model.h1, "weight")]
    with pytest.raises(SparsemilError, match="pruning: params must be a list of"):
        global_magnitude_masks(model.h1.weight, 0.5)
    with pytest.raises(SparsemilError, match=r"pruning: params\[0\] must be a \(module, name\)"):
        global_magnitude_masks([model.h1.weight], 0.5)
