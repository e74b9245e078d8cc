"""Sparse export and checkpoints: real byte savings and exact round trips (safetensors only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.models import build_model, load_checkpoint
from sparsemil.prune.export import (
    load_sparse,
    save_checkpoint,
    save_sparse,
    serialized_bytes,
)
from sparsemil.prune.magnitude import apply_masks, prune_model


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and robust on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_sparse_export_round_trip(tmp_path) -> None:
    model = build_model("mlp", (64,), 10, widths=[128, 64], seed=3)
    prune_model(model, 0.9)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    sizes = save_sparse(tmp_path / "m.safetensors", model)
    assert sizes["dense_bytes"] == serialized_bytes(model)
    assert sizes["sparse_bytes"] == (tmp_path / "m.safetensors").stat().st_size
    # 10% float32 values + a 1-bit mask: well under a quarter of the dense bytes
    assert sizes["sparse_bytes"] < 0.25 * sizes["dense_bytes"]
    fresh = build_model("mlp", (64,), 10, widths=[128, 64], seed=99)
    load_sparse(tmp_path / "m.safetensors", fresh)
    for key, val in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], val), key
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_sparse_export_with_batchnorm_and_dense_fallback(tmp_path) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )
    model.train()
    model(torch.randn(4, 1, 8, 8))  # non-trivial running stats, num_batches_tracked = 1
    model.eval()
    prune_model(model, 0.5)  # 50%: cheaper stored dense -> dense fallback for weights
    sizes = save_sparse(tmp_path / "bn.safetensors", model)
    assert sizes["sparse_bytes"] > 0
    fresh = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )
    load_sparse(tmp_path / "bn.safetensors", fresh)
    for key, val in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], val), key
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_checkpoint_round_trip(tmp_path) -> None:
    model = build_model("lenet", (1, 28, 28), 10, seed=1)
    meta = {
        "model": "lenet",
        "in_shape": [1, 28, 28],
        "num_classes": 10,
        "widths": None,
        "init": "kaiming_normal",
        "config": {"lmbda": 1e-4},
    }
    path = save_checkpoint(tmp_path / "ck.safetensors", model, meta)
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\n"  # not a pickle
    back, meta_back = load_checkpoint(path)
    assert meta_back == meta
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    # a sparse export that carries the metadata loads through load_checkpoint too
    prune_model(model, 0.95)
    save_sparse(tmp_path / "sp.safetensors", model, meta)
    back2, _ = load_checkpoint(tmp_path / "sp.safetensors")
    with torch.no_grad():
        assert torch.equal(back2(x), model(x))


def test_not_a_checkpoint(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(SparsemilError, match="bad.safetensors: not a readable safetensors"):
        load_checkpoint(bad)
    with pytest.raises(SparsemilError, match="missing.safetensors: file not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def _plain_conv() -> nn.Module:
    return build_model("lenet", (1, 28, 28), 10, seed=5)


@pytest.mark.parametrize("how", ["apply_masks", "torch_prune_twice", "global_unstructured"])
def test_export_folds_torch_prune_hooks(tmp_path, how: str) -> None:
    """A model still carrying torch.nn.utils.prune hooks (weight_orig / weight_mask) exports
    the folded weights: smaller than the dense model, loadable into the plain architecture
    (and through load_checkpoint), with the same outputs. Before: a larger file that failed
    to load."""
    from torch.nn.utils import prune as torch_prune

    meta = {"model": "lenet", "in_shape": [1, 28, 28], "num_classes": 10, "widths": None}
    model = _plain_conv().eval()
    dense_bytes = serialized_bytes(_plain_conv())
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if how == "apply_masks":
        apply_masks(prune_model(model, 0.9, permanent=False))
    elif how == "torch_prune_twice":  # a PruningContainer: two masks combined
        for m in layers:
            torch_prune.l1_unstructured(m, "weight", amount=0.6)
            torch_prune.l1_unstructured(m, "weight", amount=0.75)
    else:
        torch_prune.global_unstructured(
            [(m, "weight") for m in layers], torch_prune.L1Unstructured, amount=0.9
        )
    assert torch_prune.is_pruned(model)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    sizes = save_sparse(tmp_path / "sp.safetensors", model, meta)
    assert sizes["sparse_bytes"] < 0.3 * dense_bytes
    assert sizes["dense_bytes"] < 1.01 * dense_bytes  # no *_orig / *_mask entries
    fresh = _plain_conv()
    load_sparse(tmp_path / "sp.safetensors", fresh)
    back, _ = load_checkpoint(tmp_path / "sp.safetensors")
    save_checkpoint(tmp_path / "ck.safetensors", model, meta)
    back2, _ = load_checkpoint(tmp_path / "ck.safetensors")
    with torch.no_grad():
        for m in (fresh.eval(), back, back2):
            assert torch.equal(m(x), expected)
    assert torch_prune.is_pruned(model)  # the exported model itself is left as it was
