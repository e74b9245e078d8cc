"""Lightning training loop: kill + resume, delayed early stopping, L1, padding + masks."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from miltrain_helpers import write_subset
from sparsemil.data.bags import collate_bags
from sparsemil.data.splits import stratified_kfold
from sparsemil.errors import SparsemilError
from sparsemil.mil.factory import build_mil_model
from sparsemil.mil.registry import model_inputs
from sparsemil.prune.l1 import l1_penalty
from sparsemil.train.config import MILTrainConfig
from sparsemil.train.data import MILDataset, Standardizer, load_mil_data
from sparsemil.train.module import MILModule
from sparsemil.train.trainer import DelayedEarlyStopping, check_batch_support, fit_fold


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def musk_subset(tmp_path_factory):
    return write_subset(tmp_path_factory.mktemp("musk") / "musk1_sub.csv", per_class=12)


class _Kill(L.Callback):
    """Raise at the start of epoch ``at`` -- a crash after ``at`` finished epochs."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            raise RuntimeError("killed")


@pytest.mark.parametrize("model", ["mmil", "dtfdmil"])
def test_resume_after_kill_loses_no_epoch_and_matches_uninterrupted(tmp_path, musk_subset, model):
    kw = {"embed_dim": 16, "num_subbags": 2, "grouping": "random"} if model == "mmil" else {}
    cfg = MILTrainConfig(
        data=str(musk_subset), model=model, model_kwargs=kw, max_epochs=4, folds=2, progress=False
    )
    data = load_mil_data(cfg)
    fold = stratified_kfold(data.labels, 2, 0, 0.1)[0]
    full = fit_fold(cfg, data, fold, tmp_path / "a")
    with pytest.raises(RuntimeError, match="killed"):
        fit_fold(cfg, data, fold, tmp_path / "b", extra_callbacks=[_Kill(2)])
    assert json.loads((tmp_path / "b" / "state.json").read_text())["epochs_done"] == 2
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = fit_fold(cfg, data, fold, tmp_path / "b", resume=True)
    assert resumed["epochs_done"] == full["epochs_done"] == 4
    wa = load_file(str(tmp_path / "a" / "last.safetensors"))
    wb = load_file(str(tmp_path / "b" / "last.safetensors"))
    for k in wa:  # same data order, schedule, optimizer moments and RNG streams
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert resumed["metrics"]["accuracy"] == pytest.approx(full["metrics"]["accuracy"])
    # the merged epoch log covers epochs 0..3 once each
    import csv

    with open(tmp_path / "b" / "metrics.csv") as fh:
        epochs = sorted({int(r["epoch"]) for r in csv.DictReader(fh) if r.get("val_loss")})
    assert epochs == [0, 1, 2, 3]
    # a finished run is not retrained
    again = fit_fold(cfg, data, fold, tmp_path / "b", resume=True)
    assert again["metrics"] == resumed["metrics"]


def test_delayed_early_stopping_counts_from_start_but_stops_only_after_start_epoch():
    cb = DelayedEarlyStopping(start_epoch=6, monitor="val_loss", mode="min", patience=2)
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0]
    stops = []
    for epoch, v in enumerate(losses):
        cb._epoch = epoch
        stop, _ = cb._evaluate_stopping_criteria(torch.tensor(v))
        stops.append(stop)
    # no improvement since epoch 1: patience 2 is exhausted at epoch 3, but the first
    # allowed stop is after the 6th epoch (index 5)
    assert stops == [False] * 5 + [True] * 3
    assert cb.wait_count >= 2
    cb2 = DelayedEarlyStopping(start_epoch=50, monitor="val_loss", mode="min", patience=2)
    cb2._epoch = 0
    assert cb2._evaluate_stopping_criteria(torch.tensor(float("nan")))[0]  # NaN stops at once


def test_early_stopping_in_a_real_fit(tmp_path, musk_subset):
    # lr so large that validation loss stops improving; stop allowed from epoch 3 on
    cfg = MILTrainConfig(
        data=str(musk_subset), model="abmil", max_epochs=30, patience=1, stop_start_epoch=3,
        lr=0.5, folds=2, progress=False,
    )  # fmt: skip
    data = load_mil_data(cfg)
    r = fit_fold(cfg, data, stratified_kfold(data.labels, 2, 0, 0.1)[0], tmp_path / "r")
    assert 3 <= r["epochs_done"] < 30 and r["stopped_early"]


def test_l1_norm_and_l1_training_shrinks_weights(tmp_path, musk_subset):
    model = build_mil_model("abmil", 5)
    manual = sum(
        p.abs().sum() for n, p in model.named_parameters() if n.endswith(("weight", "bias"))
    )
    torch.testing.assert_close(l1_penalty(model), manual)
    norms = {}
    for lam in (0.0, 1e-2):
        cfg = MILTrainConfig(
            data=str(musk_subset),
            model="abmil",
            max_epochs=3,
            lmbda=lam,
            lr=1e-3,
            folds=2,
            progress=False,
        )
        data = load_mil_data(cfg)
        r = fit_fold(cfg, data, stratified_kfold(data.labels, 2, 0, 0.1)[0], tmp_path / f"l1_{lam}")
        w = load_file(r["checkpoint"])
        norms[lam] = sum(
            float(t.abs().sum()) for k, t in w.items() if k.endswith(("weight", "bias"))
        )
    assert norms[1e-2] < 0.9 * norms[0.0]


def test_padded_batch_loss_equals_mean_of_single_bag_losses(musk_subset):
    cfg = MILTrainConfig(data=str(musk_subset))
    data = load_mil_data(cfg)
    std = Standardizer.fit(data.bags, range(len(data.bags)))
    ds = MILDataset(data.bags, [0, 1, 2, 13], std)
    torch.manual_seed(0)
    for name, kw in (
        ("abmil", {}),
        ("mmil", {"embed_dim": 16, "num_subbags": 2, "grouping": "sequential"}),
    ):
        module = MILModule(build_mil_model(name, data.dim, **kw))
        module.model.eval()
        batch = collate_bags([ds[i] for i in range(4)])
        assert (~batch["mask"]).any()  # bags of different sizes: real padding
        _, loss, _ = module._losses(batch)
        singles = [module._losses(collate_bags([ds[i]]))[1] for i in range(4)]
        torch.testing.assert_close(loss, torch.stack(singles).mean(), rtol=1e-5, atol=1e-6)


def test_models_without_mask_reject_padded_batches():
    model = build_mil_model("transmil", 8, att_dim=16)
    with pytest.raises(SparsemilError, match="transmil' has no padding mask, so batch_size must"):
        check_batch_support("transmil", 4)
    check_batch_support("transmil", 1)
    with pytest.raises(SparsemilError, match="dsmil' ignores the padding mask.*'accumulate_grad"):
        check_batch_support("dsmil", 2)
    check_batch_support("abmil", 8)
    check_batch_support("mmil", 8)
    assert "mask" not in model_inputs(model, {"mask": torch.ones(1, 2, dtype=torch.bool)})


def test_standardizer_uses_training_statistics_only(musk_subset):
    data = load_mil_data(MILTrainConfig(data=str(musk_subset)))
    train = [0, 1, 2, 3]
    std = Standardizer.fit(data.bags, train)
    x = np.concatenate([data.bags[i].features for i in train]).astype(np.float64)
    np.testing.assert_allclose(std.mean, x.mean(0), rtol=1e-5, atol=1e-5)
    sd = x.std(0)
    sd[sd < 1e-8] = 1.0
    np.testing.assert_allclose(std.std, sd, rtol=1e-4, atol=1e-5)
