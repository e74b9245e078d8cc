"""MMIL-Transformer vs the official implementation's outputs (../shared/reference/mmil_official)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from sparsemil.errors import SparsemilError
from sparsemil.mil import MMILTransformer, load_official_checkpoint
from sparsemil.mil.grouping import num_kept
from sparsemil.mil.official import official_config_to_kwargs, parse_bool

CASE_NAMES = [
    "c16_full_seq_sub10_msg1_L2_N600",
    "c16_d64_seq_sub4_msg1_L2_N1000",
    "c16_d64_seq_sub3_msg2_L1_N301",
    "tcga_d64_seq_sub4_msg1_L2_N777",
]


@pytest.fixture(scope="module")
def ref_dir(shared_dir):
    return shared_dir / "reference" / "mmil_official"


@pytest.fixture(scope="module")
def cases(ref_dir):
    return json.loads((ref_dir / "cases.json").read_text())


def _case(ref_dir, cases, name):
    data = load_file(str(ref_dir / f"{name}.safetensors"))
    state = {k[len("state.") :]: v for k, v in data.items() if k.startswith("state.")}
    return cases[name]["config"], state, data["input"], data["expected_logits"]


def test_all_cases_listed(cases):
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_official_logits(ref_dir, cases, name):
    config, state, x, expected = _case(ref_dir, cases, name)
    assert x.shape == (1, cases[name]["N"], config["in_chans"])
    assert torch.allclose(expected, torch.tensor(cases[name]["logits"]))
    model = MMILTransformer.from_official(state, config).eval()
    assert model.proj is not None if config["type"] == "camelyon16" else model.proj is None
    assert model.grouping == "sequential"
    # autograd path, inference (in place, chunked) path, and the full last layer
    out = model(x)
    assert out.shape == (1, config["n_classes"])
    assert (out - expected).abs().max().item() < 1e-5
    with torch.inference_mode():
        assert (model(x) - expected).abs().max().item() < 1e-5
        model.max_chunk_bytes = 1  # one head per attention call
        assert (model(x) - expected).abs().max().item() < 1e-5
    model._full_last_layer = True
    assert (model(x) - expected).abs().max().item() < 1e-5
    # the loader reads the reference file itself (``state.`` prefix stripped)
    loaded = load_official_checkpoint(ref_dir / f"{name}.safetensors")
    assert sorted(loaded) == sorted(state)


def test_output_ignores_sub_bag_order(ref_dir, cases):
    config, state, x, expected = _case(ref_dir, cases, "c16_d64_seq_sub4_msg1_L2_N1000")
    model = MMILTransformer.from_official(state, config).eval()
    seq_ids = torch.arange(1000) * 4 // 1000  # not array_split order, but 4 contiguous blocks
    sizes = torch.tensor([250, 250, 250, 250])
    assert torch.equal(torch.bincount(seq_ids), sizes)
    model.grouping = "precomputed"
    a = model(x, group_ids=seq_ids[None])
    b = model(x, group_ids=(3 - seq_ids)[None])  # same sub-bags, reversed order
    assert (a - expected).abs().max().item() < 1e-5
    assert (a - b).abs().max().item() < 1e-6


def test_pt_checkpoint_loader(tmp_path, ref_dir, cases):
    config, state, x, expected = _case(ref_dir, cases, "tcga_d64_seq_sub4_msg1_L2_N777")
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
    loaded = load_official_checkpoint(path)
    assert sorted(loaded) == sorted(state)
    model = MMILTransformer.from_official(loaded, config).eval()
    assert (model(x) - expected).abs().max().item() < 1e-5
    torch.save(state, tmp_path / "plain.pt")
    assert sorted(load_official_checkpoint(tmp_path / "plain.pt")) == sorted(state)


def test_loader_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"args": argparse.Namespace(a=1)}, path)
    with pytest.raises(SparsemilError, match="weights-only"):
        load_official_checkpoint(path)
    with pytest.raises(SparsemilError, match="not found"):
        load_official_checkpoint(tmp_path / "missing.pt")


def test_state_dict_problems_are_listed(ref_dir, cases):
    config, state, _, _ = _case(ref_dir, cases, "c16_d64_seq_sub4_msg1_L2_N1000")
    bad = dict(state)
    del bad["layers.1.GroupsMSGAttenLayer.AttenLayer.attn.to_out.0.bias"]
    bad["extra.weight"] = torch.zeros(3)
    bad["fc2.weight"] = torch.zeros(3, 64)
    with pytest.raises(SparsemilError, match="official state_dict does not match") as err:
        MMILTransformer.from_official(bad, config)
    msg = str(err.value)
    assert "missing keys: layers.1.GroupsMSGAttenLayer.AttenLayer.attn.to_out.0.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "fc2.weight (3, 64) != (2, 64)" in msg
    with pytest.raises(SparsemilError, match="num_layers"):
        MMILTransformer.from_official(state, {k: v for k, v in config.items() if k != "num_layers"})


def test_boolean_config_parsing(ref_dir, cases):
    """The official ``type=bool`` argparse reads "False" as True; we parse it correctly."""
    config, state, x, expected = _case(ref_dir, cases, "c16_d64_seq_sub4_msg1_L2_N1000")
    assert parse_bool("False", "ape") is False and parse_bool("true", "ape") is True
    with pytest.raises(SparsemilError, match="boolean"):
        parse_bool("maybe", "ape")
    model = MMILTransformer.from_official(state, {**config, "ape": "True"}).eval()
    assert (model(x) - expected).abs().max().item() < 1e-5
    with pytest.raises(SparsemilError, match="absolute_pos_embed"):
        MMILTransformer.from_official(state, {**config, "ape": "False"})
    no_ape = {k: v for k, v in state.items() if k != "absolute_pos_embed"}
    model = MMILTransformer.from_official(no_ape, {**config, "ape": "False"})
    assert model.absolute_pos_embed is None


def test_projection_follows_type_and_fc1_is_optional_without_it(ref_dir, cases):
    config, state, x, expected = _case(ref_dir, cases, "tcga_d64_seq_sub4_msg1_L2_N777")
    assert official_config_to_kwargs(config)["project"] is False
    assert official_config_to_kwargs({**config, "type": "camelyon16"})["project"] is True
    no_fc1 = {k: v for k, v in state.items() if not k.startswith("fc1.")}
    model = MMILTransformer.from_official(no_fc1, config).eval()
    assert (model(x) - expected).abs().max().item() < 1e-5
    with pytest.raises(SparsemilError, match="in_chans"):
        official_config_to_kwargs({**config, "in_chans": 32})
    with pytest.raises(SparsemilError, match="missing keys: fc1.weight, fc1.bias"):
        MMILTransformer.from_official(no_fc1, {**config, "type": "camelyon16"})


def test_mask_ratio_rounding_keeps_a_sub_bag():
    # official: int(3 * (1 - 0.7)) == 0 sub-bags kept
    assert int(3 * (1 - 0.7)) == 0
    assert num_kept(3, 0.7) == 1
    assert num_kept(10, 0.5) == 5 and num_kept(10, 0.0) == 10
