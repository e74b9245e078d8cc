"""MIL training config: YAML/JSON loading, unknown keys, overrides, validation."""

from __future__ import annotations

import json

import pytest

from sparsemil.errors import SparsemilError
from sparsemil.train.config import MILTrainConfig, load_config


def test_yaml_config_loads_and_flags_override(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(
        "data: musk1\nmodel: abmil\nlr: 0.001\nmodel_kwargs:\n  att_dim: 64\nmax_epochs: 7\n"
    )
    cfg = load_config(p)
    assert (cfg.data, cfg.model, cfg.lr, cfg.max_epochs) == ("musk1", "abmil", 1e-3, 7)
    assert cfg.model_kwargs == {"att_dim": 64}
    # defaults of the recipe the paper never published
    assert (cfg.weight_decay, cfg.patience, cfg.stop_start_epoch) == (1e-5, 20, 50)
    cfg2 = cfg.override(lr=None, max_epochs=3, seed=5)
    assert (cfg2.lr, cfg2.max_epochs, cfg2.seed) == (1e-3, 3, 5)


def test_json_config(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"data": "elephant", "folds": 5, "lmbda": 1e-4}))
    cfg = load_config(p)
    assert (cfg.folds, cfg.lmbda) == (5, 1e-4)


def test_unknown_key_suggests_nearest(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("data: musk1\nlearning_rate: 0.1\nmax_epoch: 3\n")
    with pytest.raises(SparsemilError, match="unknown key 'learning_rate'"):
        load_config(p)
    p.write_text("max_epoch: 3\n")
    with pytest.raises(SparsemilError, match="did you mean 'max_epochs'"):
        load_config(p)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": -1.0}, "'lr' must be >"),
        ({"max_epochs": 0}, "'max_epochs' must be >= 1"),
        ({"model": "abmill"}, "did you mean 'abmil'"),
        ({"format": "milcsv"}, "did you mean 'mil-csv'"),
        ({"model": "abmil", "n_classes": 3}, "binary torchmil baseline"),
        ({"fold": 3, "folds": 3}, "'fold' must be < folds"),
        ({"batch_size": "8"}, "must be an integer"),
    ],
)
def test_invalid_values(kw, match):
    with pytest.raises(SparsemilError, match=match):
        MILTrainConfig(**kw).validate()


def test_bad_yaml_is_one_line_error(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(SparsemilError, match=r"cfg.yaml: invalid YAML/JSON .*fix the syntax") as err:
        load_config(p)
    assert "\n" not in str(err.value)


def test_l1_strength_is_lmbda_everywhere(tmp_path):
    """One meaning of a key across configs: 'lmbda' is the L1 strength (MIL and vision);
    'l1' is the official on/off switch of the vision config, and a MIL config that still says
    'l1' is told the new name."""
    from sparsemil.experiments.vision.config import config_from_dict

    cfg = config_from_dict({"l1": True, "lmbda": 5e-5, "mil": {"data": "musk1", "lmbda": 1e-4}})
    assert cfg.l1 is True and cfg.lmbda == 5e-5 and cfg.mil.lmbda == 1e-4
    with pytest.raises(SparsemilError, match="key 'l1' is now 'lmbda'"):
        config_from_dict({"mil": {"data": "musk1", "l1": 1e-4}})
    with pytest.raises(SparsemilError, match="key 'l1' is now 'lmbda'"):
        MILTrainConfig.from_dict({"l1": 1e-4})
