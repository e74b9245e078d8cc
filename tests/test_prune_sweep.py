"""The pruning sweep equals a naive loop; criteria on hand-made curves; CSV round trip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sparsemil.data.vision import load_vision_dataset
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.experiments.vision.models import build_model
from sparsemil.experiments.vision.train import train_l1
from sparsemil.prune.magnitude import prunable_parameters
from sparsemil.prune.sweep import (
    CRITERIA,
    SweepResult,
    actual_ratio,
    actual_ratios,
    pruned_counts_and_distances,
    pruning_sweep,
    vision_evaluator,
    vision_sweep,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and robust on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained():
    data = load_vision_dataset("digits", seed=0)
    cfg = PruneConfig(model="mlp", widths=[48, 24], epoch=4, lr=0.05, lmbda=1e-4, seed=0)
    model = build_model("mlp", data.in_shape, 10, widths=cfg.widths, seed=0)
    train_l1(model, data, cfg, progress=False)
    with torch.no_grad():  # create exact ties so the tie rule matters in the sweep too
        model.linear[0].weight[:3, :3] = 0.05
        model.linear[2].weight[:2, :2] = -0.05
    return model, data


def _naive(model, evaluate, ratios):
    """Official-style loop: deepcopy, full sort, threshold, mask per ratio."""
    rows = []
    for r in ratios:
        cp = copy.deepcopy(model)
        ws = [m.weight for m, _ in prunable_parameters(cp)]
        mags = np.sort(np.concatenate([w.detach().abs().numpy().ravel() for w in ws]))
        k = max(1, int(np.ceil(r * mags.size - 1e-9)))
        t = mags[k - 1]
        with torch.no_grad():
            for w in ws:
                w.mul_((w.abs() > float(t)).float())
        out = evaluate(cp)
        diff = [
            (a - b).detach().reshape(-1)
            for a, b in zip(model.parameters(), cp.parameters(), strict=True)
        ]
        out["distance"] = float(torch.cat(diff).double().norm())
        out["num_pruned"] = sum(int((w == 0).sum()) for w in ws)
        rows.append(out)
    return rows


def test_sweep_equals_naive_loop(trained) -> None:
    model, data = trained
    w_star = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate = vision_evaluator(data)
    ratios = np.concatenate([np.arange(0, 1, 0.05), [0.3, 0.1, 0.999]])  # also goes back down
    res = pruning_sweep(model, evaluate, ratios, progress=False)
    naive = _naive(model, evaluate, ratios)
    assert res.test_acc.tolist() == [r["test_acc"] for r in naive]
    assert res.test_loss.tolist() == [r["test_loss"] for r in naive]
    assert res.train_loss.tolist() == [r["train_loss"] for r in naive]
    assert res.extra["train_acc"].tolist() == [r["train_acc"] for r in naive]
    assert res.num_pruned.tolist() == [r["num_pruned"] for r in naive]
    np.testing.assert_allclose(res.distance, [r["distance"] for r in naive], rtol=1e-6)
    counts, dists = pruned_counts_and_distances(model, ratios)
    assert counts.tolist() == res.num_pruned.tolist() and dists.tolist() == res.distance.tolist()
    # the model is back at w* afterwards
    for k, v in model.state_dict().items():
        assert torch.equal(v, w_star[k]), k
    dense = evaluate(model)
    assert res.dense["test_acc"] == dense["test_acc"]
    assert res.test_acc[-1] < 0.5  # pruning 99.9% destroys the model: the sweep did prune


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_batched_sweep_equals_sequential(trained, chunk) -> None:
    """Many ratios per vmapped pass: same pruned sets, distances and accuracies as the
    in-place sweep; losses to float32 rounding; the model is left untouched."""
    from sparsemil.prune.batched_sweep import batched_pruning_sweep, vision_evaluator_many

    model, data = trained
    w_star = {k: v.clone() for k, v in model.state_dict().items()}
    ratios = np.concatenate([np.arange(0, 1, 0.05), [0.3, 0.1, 0.999]])
    seq = pruning_sweep(model, vision_evaluator(data), ratios, progress=False)
    bat = batched_pruning_sweep(
        model, vision_evaluator_many(data, batch_size=500), ratios, chunk=chunk, progress=False
    )
    assert bat.num_pruned.tolist() == seq.num_pruned.tolist()
    assert bat.distance.tolist() == seq.distance.tolist()
    assert bat.test_acc.tolist() == seq.test_acc.tolist()
    assert bat.extra["train_acc"].tolist() == seq.extra["train_acc"].tolist()
    np.testing.assert_allclose(bat.test_loss, seq.test_loss, rtol=1e-5)
    np.testing.assert_allclose(bat.train_loss, seq.train_loss, rtol=1e-5)
    assert bat.dense["test_acc"] == seq.dense["test_acc"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, w_star[k]), k


def test_batched_sweep_conv_net() -> None:
    """vmap over conv weights (LeNet, 28x28 inputs; only batched vs sequential is compared,
    so seeded random images suffice): same pruned sets and accuracies."""
    from types import SimpleNamespace

    from sparsemil.prune.batched_sweep import batched_pruning_sweep, vision_evaluator_many

    gen = torch.Generator().manual_seed(0)
    data = SimpleNamespace(
        x_train=torch.randn(96, 1, 28, 28, generator=gen),
        y_train=torch.randint(0, 10, (96,), generator=gen),
        x_test=torch.randn(40, 1, 28, 28, generator=gen),
        y_test=torch.randint(0, 10, (40,), generator=gen),
    )
    model = build_model("lenet", (1, 28, 28), 10, seed=0).eval()
    ratios = np.linspace(0, 0.95, 9)
    seq = pruning_sweep(model, vision_evaluator(data), ratios, progress=False)
    bat = batched_pruning_sweep(model, vision_evaluator_many(data), ratios, chunk=4, progress=False)
    assert bat.num_pruned.tolist() == seq.num_pruned.tolist()
    assert bat.test_acc.tolist() == seq.test_acc.tolist()
    np.testing.assert_allclose(bat.train_loss, seq.train_loss, rtol=1e-5)


def test_vision_sweep_grid_and_eps(trained) -> None:
    model, data = trained
    res = vision_sweep(model, data, n_ratios=10, loss_batch_size=128, progress=False)
    assert res.ratios.tolist() == [i / 10 for i in range(10)]
    assert res.n_weights == sum(m.weight.numel() for m, _ in prunable_parameters(model))
    # eps = std (ddof 0, as the official np.std) of per-mini-batch training losses at w*
    model.eval()
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(
                model(data.x_train[i : i + 128]), data.y_train[i : i + 128]
            ).item()
            for i in range(0, len(data.y_train), 128)
        ]
    assert res.dense["train_loss_std"] == pytest.approx(np.std(losses, ddof=0), rel=1e-5)
    assert set(actual_ratios(res)) == set(CRITERIA)


def _curve(acc, train_loss=None, dense_acc=0.90, dense_loss=0.1, std=None) -> SweepResult:
    n = len(acc)
    dense = {"test_acc": dense_acc, "train_loss": dense_loss}
    if std is not None:
        dense["train_loss_std"] = std
    tl = np.asarray(train_loss if train_loss is not None else [dense_loss] * n, dtype=float)
    return SweepResult(
        np.arange(n) / 10, np.asarray(acc, float), np.zeros(n), tl, np.zeros(n), dense=dense
    )


def test_criterion_drop_1pt_and_official() -> None:
    #      rho: 0.0   0.1    0.2    0.3   0.4    0.5   0.6   0.7   0.8   0.9
    acc = [0.90, 0.91, 0.905, 0.89, 0.889, 0.85, 0.70, 0.95, 0.20, 0.10]
    s = _curve(acc)
    # first acc more than 1pt below 0.90 is 0.889 at 0.4 (0.89 is exactly 1pt: not "more")
    assert actual_ratio(s) == pytest.approx(0.3)
    assert actual_ratio(s, "drop_1pt") == pytest.approx(0.3)
    # official scans from the top: 0.95 at 0.7 is the largest strictly above 0.90
    assert actual_ratio(s, "official") == pytest.approx(0.7)


def test_criteria_edge_cases() -> None:
    never_above = _curve([0.90, 0.90, 0.89, 0.5])
    assert actual_ratio(never_above, "official") is None  # undefined, reported as None
    assert actual_ratio(never_above, "drop_1pt") == pytest.approx(0.2)
    first_fails = _curve([0.80, 0.9, 0.95])
    assert actual_ratio(first_fails, "drop_1pt") is None
    never_fails = _curve([0.9, 0.9, 0.895])
    assert actual_ratio(never_fails, "drop_1pt") == pytest.approx(0.2)
    # ratios given out of order are sorted first
    s = _curve([0.9, 0.9, 0.5, 0.9])
    perm = np.array([3, 0, 2, 1])
    shuffled = SweepResult(
        s.ratios[perm], s.test_acc[perm], s.test_loss, s.train_loss[perm], s.distance, dense=s.dense
    )
    assert actual_ratio(shuffled, "drop_1pt") == pytest.approx(0.1)
    with pytest.raises(SparsemilError, match="criterion: unknown 'nope'"):
        actual_ratio(s, "nope")


def test_criterion_train_loss_eps() -> None:
    s = _curve([0.9] * 5, train_loss=[0.1, 0.12, 0.149, 0.151, 0.3], std=0.05)
    assert actual_ratio(s, "train_loss_eps") == pytest.approx(0.2)  # default eps = std
    assert actual_ratio(s, "train_loss_eps", eps=0.3) == pytest.approx(0.4)
    assert actual_ratio(s, "train_loss_eps", eps=0.01) == pytest.approx(0.0)
    s_low = _curve([0.9] * 3, train_loss=[0.5, 0.6, 0.7], std=0.05)
    assert actual_ratio(s_low, "train_loss_eps") is None
    no_std = _curve([0.9] * 3)
    with pytest.raises(SparsemilError, match="no train_loss_std known"):
        actual_ratio(no_std, "train_loss_eps")
    assert actual_ratios(no_std)["train_loss_eps"] is None


def test_csv_round_trip(tmp_path) -> None:
    s = _curve([0.9, 0.8, 0.1], train_loss=[0.1, 0.2, 0.3])
    s.num_pruned = np.array([1, 5, 9])
    s.extra["train_acc"] = np.array([0.99, 0.9, 0.2])
    path = s.to_csv(tmp_path / "sweep.csv")
    back = SweepResult.from_csv(path, dense=s.dense)
    for name, col in s.columns().items():
        np.testing.assert_array_equal(back.columns()[name], col)
    assert actual_ratio(back) == actual_ratio(s)
