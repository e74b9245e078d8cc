"""Model factory (MMIL + torchmil baselines), probabilities and safetensors checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsemil.errors import SparsemilError
from sparsemil.mil.checkpoint import (
    load_mil_checkpoint,
    read_mil_checkpoint_meta,
    save_mil_checkpoint,
)
from sparsemil.mil.factory import MODEL_NAMES, bag_probabilities, build_mil_model
from sparsemil.mil.registry import model_inputs

SMALL = {
    "mmil": {"embed_dim": 32, "num_subbags": 2, "grouping": "sequential"},
    "transmil": {"att_dim": 32},
    "clam_sb": {"feat_ext_dim": 8, "feat_ext_dropout": 0.25},  # with a CLAM-style encoder
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_through_compute_loss(name):
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_mil_model(name, 12, 2, **SMALL.get(name, {}))
    x = torch.randn(1, 7, 12)
    batch = {"X": x, "Y": torch.tensor([1]), "mask": torch.ones(1, 7, dtype=torch.bool)}
    out, losses = model.compute_loss(batch["Y"], batch["X"], **model_inputs(model, batch))
    probs = bag_probabilities(out)
    assert probs.shape == (1, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))
    loss = sum(losses.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_bag_probabilities_binary_and_multiclass():
    p = bag_probabilities(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(p[:, 1], torch.sigmoid(torch.tensor([0.0, 2.0])))
    torch.testing.assert_close(p[:, 0], 1 - p[:, 1])
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    e = torch.exp(logits)
    torch.testing.assert_close(bag_probabilities(logits), e / e.sum())


def test_factory_rejects_bad_names_and_options():
    with pytest.raises(SparsemilError, match="did you mean 'dsmil'"):
        build_mil_model("dsmill", 8)
    with pytest.raises(SparsemilError, match="binary only"):
        build_mil_model("abmil", 8, n_classes=3)
    with pytest.raises(SparsemilError, match="did you mean 'att_dim'"):
        build_mil_model("abmil", 8, att_dimm=3)


@pytest.mark.parametrize("name", ["abmil", "mmil", "clam_sb"])
def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(1)
    kw = SMALL.get(name, {})
    model = build_mil_model(name, 10, 2, **kw).eval()
    path = save_mil_checkpoint(
        tmp_path / "m.safetensors", model, name, kw, {"in_dim": 10, "note": "x"}
    )
    loaded, meta = load_mil_checkpoint(path)
    assert meta["model"] == name and meta["note"] == "x" and meta["in_dim"] == 10
    x = torch.randn(2, 9, 10)
    mask = torch.ones(2, 9, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.predict(x, mask=mask, return_inst_pred=False),
            model.predict(x, mask=mask, return_inst_pred=False),
        )
    # the file is plain safetensors: tensors + JSON metadata, nothing pickled
    assert json.loads(json.dumps(read_mil_checkpoint_meta(path)))["model_kwargs"] == kw


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(SparsemilError, match="nope.safetensors: file not found"):
        load_mil_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SparsemilError, match="not a readable safetensors"):
        load_mil_checkpoint(junk)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(SparsemilError, match="no 'sparsemil' metadata"):
        load_mil_checkpoint(bare)


@pytest.mark.parametrize("name", ["abmil", "dsmil", "dtfdmil", "transmil"])
def test_baselines_take_a_clam_style_instance_encoder(name):
    torch.manual_seed(0)
    model = build_mil_model(name, 12, 2, feat_ext_dim=6, **SMALL.get(name, {}))
    enc = model.feat_ext
    assert isinstance(enc, torch.nn.Sequential) and enc[0].weight.shape == (6, 12)
    batch = {
        "X": torch.randn(1, 5, 12),
        "Y": torch.tensor([1]),
        "mask": torch.ones(1, 5, dtype=torch.bool),
    }
    _, losses = model.compute_loss(batch["Y"], batch["X"], **model_inputs(model, batch))
    sum(losses.values()).backward()
    assert enc[0].weight.grad is not None and enc[0].weight.grad.abs().sum() > 0


def test_encoder_options_are_validated():
    with pytest.raises(SparsemilError, match="feat_ext_dim must be an integer"):
        build_mil_model("abmil", 12, 2, feat_ext_dim=0)
    with pytest.raises(SparsemilError, match="feat_ext_dropout must be"):
        build_mil_model("abmil", 12, 2, feat_ext_dim=4, feat_ext_dropout=1.5)
    with pytest.raises(SparsemilError, match="needs feat_ext_dim"):
        build_mil_model("abmil", 12, 2, feat_ext_dropout=0.1)
    with pytest.raises(SparsemilError, match="not an option of model 'mmil'"):
        build_mil_model("mmil", 12, 2, feat_ext_dim=4)
