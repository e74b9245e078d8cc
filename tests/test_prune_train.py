"""Model zoo shapes/initialisation, the L1 penalty, the LR schedule and deterministic training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsemil.data.vision import load_vision_dataset
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.experiments.vision.models import build_model
from sparsemil.experiments.vision.train import lr_at, train_l1
from sparsemil.prune.l1 import l1_params, l1_penalty


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and robust on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_fc_architectures_and_counts() -> None:
    fc5 = build_model("FC", (1, 28, 28), 10)
    widths = [784, 1000, 600, 300, 100, 10]
    assert _n_params(fc5) == sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
    fc12 = build_model("fc12", (64,), 10)
    lin = [m for m in fc12.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in lin] == [
        1000,
        900,
        800,
        750,
        700,
        650,
        600,
        500,
        400,
        200,
        100,
        10,
    ]
    assert [
        m.out_features for m in build_model("fc2", (64,), 10).modules() if isinstance(m, nn.Linear)
    ] == [100, 10]
    mlp = build_model("mlp", (1, 8, 8), 10, widths=[32, 16])
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(SparsemilError, match="widths"):
        build_model("mlp", (64,), 10)
    with pytest.raises(SparsemilError, match="too small"):
        build_model("lenet", (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("lenet", (1, 28, 28), 10),
        ("lenet", (3, 32, 32), 10),
        ("vgg16", (3, 32, 32), 10),
        ("resnet18", (3, 32, 32), 100),
        ("resnet50", (3, 32, 32), 100),
        ("alexnet", (3, 32, 32), 10),
    ],
)
def test_conv_models_forward(name: str, shape, classes: int) -> None:
    model = build_model(name, shape, classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, classes)


def test_official_alexnet_flatten_size() -> None:
    model = build_model("alexnet", (3, 32, 32), 10)
    assert model.linear[0].in_features == 256 * 5 * 5  # official: 32 x 7 = 224 input


def test_kaiming_normal_init_is_seeded() -> None:
    a = build_model("fc", (64,), 10, seed=0)
    b = build_model("fc", (64,), 10, seed=0)
    c = build_model("fc", (64,), 10, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.linear[2].weight, c.linear[2].weight)
    w = a.linear[2].weight.detach()  # 600 x 1000, fan_in 1000: std sqrt(2 / 1000)
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 1000), rel=0.02)
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-3)
    assert torch.count_nonzero(a.linear[2].bias) == 0
    bn = [
        m for m in build_model("vgg16", (3, 32, 32), 10).modules() if isinstance(m, nn.BatchNorm2d)
    ][0]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_l1_penalty_scopes() -> None:
    model = build_model("resnet18", (3, 8, 8), 10)
    names_all = {n for n, _ in l1_params(model, "all")}
    assert names_all == {n for n, _ in model.named_parameters()}  # weights, biases, BN affine
    names_w = {n for n, _ in l1_params(model, "weights")}
    assert "fc.bias" not in names_w and "conv1.1.weight" not in names_w  # BN weight excluded
    assert "fc.weight" in names_w and "conv1.0.weight" in names_w
    with torch.no_grad():
        manual = sum(p.abs().sum() for p in model.parameters())
        assert float(l1_penalty(model)) == pytest.approx(float(manual), rel=1e-6)
        manual2 = sum(p.pow(2).sum() for p in model.parameters())
        got2 = float(l1_penalty(model, regularizer="L2"))
        assert got2 == pytest.approx(float(manual2), rel=1e-6)


def test_lr_schedule_per_epoch_and_warmup() -> None:
    # scheduler_step: epoch (the official per-iteration default: test_prune_official_recipe.py)
    cfg = PruneConfig(lr=0.1, schedu=True, milestones=[2, 4], gamma=0.5, scheduler_step="epoch")
    assert [lr_at(cfg, e, 3, 10) for e in range(6)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    )
    cos = PruneConfig(lr=0.1, schedu=True, schedumode="cos", epoch=4, scheduler_step="epoch")
    assert lr_at(cos, 2, 0, 10) == pytest.approx(0.05)
    warm = PruneConfig(lr=0.1, warm=2)
    assert lr_at(warm, 0, 0, 10) == pytest.approx(0.0)
    assert lr_at(warm, 1, 0, 10) == pytest.approx(0.05, rel=1e-6)
    assert lr_at(warm, 2, 0, 10) == pytest.approx(0.1)


def test_training_is_deterministic_and_l1_shrinks_weights() -> None:
    data = load_vision_dataset("digits", subset=600, seed=0)
    runs = []
    for seed, lmbda in ((0, 1e-3), (0, 1e-3), (1, 1e-3), (0, 0.0)):
        cfg = PruneConfig(model="mlp", widths=[32], epoch=3, lr=0.05, lmbda=lmbda, seed=seed)
        model = build_model("mlp", data.in_shape, 10, widths=[32], seed=0)
        hist = train_l1(model, data, cfg, progress=False, device="cpu")
        runs.append((model, hist))
    (m0, h0), (m1, h1), (m2, _), (m3, h3) = runs
    assert all(torch.equal(p, q) for p, q in zip(m0.parameters(), m1.parameters(), strict=True))
    assert h0["train_loss"] == h1["train_loss"]
    assert not torch.equal(m0.linear[0].weight, m2.linear[0].weight)  # other shuffling
    assert h0["penalty"][-1] < h3["penalty"][-1]  # the penalty shrinks sum |theta|
    assert h0["train_loss"][-1] < h0["train_loss"][0]
    assert h0["test_acc"][-1] > 0.8
