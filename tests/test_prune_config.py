"""Prune configs: official keys, nearest-key suggestions, registered sections."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sparsemil.errors import SparsemilError
from sparsemil.prune.config import (
    PruneConfig,
    config_from_dict,
    load_prune_config,
    register_config_section,
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
    with pytest.raises(SparsemilError) as err:
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


@dataclass
class _Section:
    depth: int = 2
    name: str = "x"


def test_registered_section() -> None:
    register_config_section("prune_test_section", _Section)
    register_config_section("prune_test_section", _Section)  # idempotent
    cfg = config_from_dict({"model": "fc", "prune_test_section": {"depth": 5}})
    assert cfg.sections["prune_test_section"] == _Section(depth=5)
    assert cfg.to_dict()["prune_test_section"] == {"depth": 5, "name": "x"}
    assert config_from_dict(cfg.to_dict()).sections == cfg.sections
    with pytest.raises(SparsemilError, match="'depth'"):
        config_from_dict({"prune_test_section": {"dpeth": 1}})
    with pytest.raises(ValueError):
        register_config_section("lr", _Section)
