"""Prune configs: official keys, nearest-key suggestions, registered sections."""

from __future__ import annotations

import pytest

from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import (
    PruneConfig,
    config_from_dict,
    load_prune_config,
)

OFFICIAL_STYLE = """\
model: FC
init: kaiming_normal
data_path: "datasets/"
dataset: mnist
use_full_data: True
batch_size: 128
gpu: 1
criterion: cross_entropy
optim: sgd
lr: 0.01
momentum: 0.9
weight_decay: 0
gamma: 0.2
schedumode: multistep
warm: 0
schedu: False
milestones: [60, 120, 180]
epoch: 200
l1: True
lmbda: 5e-5
regularizer: L1
mode: train
sparse: True
sparse_epoch: 1000
file_path: ' '
save_model: True
lanczos_iter: 128
lanczos_num: 1
seed: 3
"""


def test_official_keys_load(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(OFFICIAL_STYLE)
    cfg = load_prune_config(path)
    assert isinstance(cfg, PruneConfig)
    assert cfg.model == "fc" and cfg.dataset == "mnist"
    assert cfg.lmbda == pytest.approx(5e-5)  # YAML 1.1 reads 5e-5 as a string
    assert cfg.milestones == [60, 120, 180] and cfg.schedu is False
    assert cfg.sparse_epoch == 1000 and cfg.lanczos_iter == 128 and cfg.seed == 3
    assert cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("lmbdaa", "lmbda"),
        ("sparse_epochs", "sparse_epoch"),
        ("milestone", "milestones"),
        ("lanczos_iters", "lanczos_iter"),
    ],
)
def test_unknown_key_suggests_nearest(tmp_path, key: str, suggestion: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: fc\n{key}: 1\n")
    with pytest.raises(SparsemilError, match=f"unknown key '{key}'") as err:
        load_prune_config(path)
    msg = str(err.value)
    assert repr(key) in msg and repr(suggestion) in msg and "\n" not in msg


def test_bad_values() -> None:
    with pytest.raises(SparsemilError, match="lr"):
        config_from_dict({"lr": -1})
    with pytest.raises(SparsemilError, match="batch_size"):
        config_from_dict({"batch_size": "big"})
    with pytest.raises(SparsemilError, match="model"):
        config_from_dict({"model": "resnet19"})
    with pytest.raises(SparsemilError, match="widths"):
        config_from_dict({"model": "mlp"})


def test_limit_and_mil_sections_are_fields() -> None:
    """Nested sections are typed fields: no import-time registry, round trip through a dict."""
    cfg = config_from_dict({"model": "fc", "limit": {"hessian_samples": 64, "negative": "flat"}})
    assert cfg.limit.hessian_samples == 64 and cfg.limit.negative == "flat"
    assert cfg.to_dict()["limit"]["hessian_samples"] == 64
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SparsemilError, match="did you mean 'hessian_samples'"):
        config_from_dict({"limit": {"hessian_sample": 1}})
    with pytest.raises(SparsemilError, match="limit.negative"):
        config_from_dict({"limit": {"negative": "clip"}})
    mil = config_from_dict({"mil": {"data": "musk1", "lmbda": 1e-4, "max_epochs": 2}})
    assert mil.mil is not None and mil.mil.lmbda == 1e-4 and mil.mil.max_epochs == 2
    with pytest.raises(SparsemilError, match="did you mean 'max_epochs'"):
        config_from_dict({"mil": {"max_epoch": 2}})
