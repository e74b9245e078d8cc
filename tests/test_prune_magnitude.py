"""Global magnitude pruning: exact counts (incl. ties), untouched biases/BN, torch prune round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparsemil.errors import SparsemilError
from sparsemil.prune.magnitude import (
    apply_masks,
    global_magnitude_masks,
    num_to_prune,
    prunable_parameters,
    prune_model,
    remove_masks,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and robust on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _two_layer(values: np.ndarray) -> nn.Sequential:
    """Linear(10, 10) -> Linear(10, 10) whose 200 weights are ``values`` (in order)."""
    net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    with torch.no_grad():
        flat = torch.as_tensor(values, dtype=torch.float32)
        net[0].weight.copy_(flat[:100].view(10, 10))
        net[2].weight.copy_(flat[100:].view(10, 10))
    return net


def _pruned_flat(masks) -> np.ndarray:
    return np.concatenate([(~m).reshape(-1).numpy() for m in masks.values()])


@pytest.mark.parametrize(
    ("ratio", "k"),
    [
        (0.0, 1),
        (0.001, 1),
        (0.005, 1),
        (0.3, 60),
        (0.301, 61),
        (0.5, 100),
        (0.999, 200),
        (1.0, 200),
    ],
)
def test_mask_count_exact_distinct(ratio: float, k: int) -> None:
    rng = np.random.default_rng(0)
    values = rng.permutation(np.arange(1, 201)) * rng.choice([-1.0, 1.0], 200) / 100.0
    net = _two_layer(values)
    masks = global_magnitude_masks(prunable_parameters(net), ratio)
    pruned = _pruned_flat(masks)
    assert pruned.sum() == k
    # the pruned weights are exactly the k smallest magnitudes
    smallest = np.argsort(np.abs(values), kind="stable")[:k]
    assert set(np.nonzero(pruned)[0]) == set(smallest)


def test_ties_at_threshold_are_pruned_hand_case() -> None:
    net = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.1, 0.2, -0.2, 0.2, 0.5, -0.5, 0.9, 1.0]]))
    # N=8, rho=0.25 -> k=2 -> threshold = 2nd smallest |w| = 0.2 -> all three 0.2 ties pruned
    masks = global_magnitude_masks(prunable_parameters(net), 0.25)
    assert masks[(net, "weight")].tolist() == [[False, False, False, False, True, True, True, True]]
    # rho = 0.125 -> k = 1 -> only 0.1
    masks = global_magnitude_masks(prunable_parameters(net), 0.125)
    assert int((~masks[(net, "weight")]).sum()) == 1


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 0.73, 0.95])
def test_mask_count_with_many_ties(ratio: float) -> None:
    rng = np.random.default_rng(1)
    values = rng.integers(0, 12, 200) / 4.0 * rng.choice([-1.0, 1.0], 200)  # heavy ties, zeros
    net = _two_layer(values)
    pruned = _pruned_flat(global_magnitude_masks(prunable_parameters(net), ratio))
    mags = np.sort(np.abs(values))
    k = max(1, math.ceil(ratio * 200 - 1e-9))
    t = mags[k - 1]
    assert pruned.sum() == int((np.abs(values) <= t).sum())
    assert pruned.sum() >= k
    assert np.all(np.abs(values)[~pruned] > t)


def test_num_to_prune_validation() -> None:
    assert num_to_prune(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in binary
    assert num_to_prune(0.1, 10) == 1
    with pytest.raises(SparsemilError, match=r"ratio: must be in \[0, 1\], got 1.5"):
        num_to_prune(1.5, 10)
    with pytest.raises(SparsemilError, match=r"ratio: must be in \[0, 1\], got -0.1"):
        num_to_prune(-0.1, 10)


def test_biases_and_batchnorm_untouched() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    with torch.no_grad():
        net[1].weight.uniform_(0.001, 0.002)  # tiny BN weights would be pruned if included
        net[1].bias.uniform_(0.001, 0.002)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    refs = prunable_parameters(net)
    assert [type(m) for m, _ in refs] == [nn.Conv2d, nn.Linear]
    prune_model(net, 0.9)
    after = net.state_dict()
    for key in before:
        if key in ("0.weight", "4.weight"):
            continue
        assert torch.equal(before[key], after[key]), key
    n_w = net[0].weight.numel() + net[4].weight.numel()
    n_zero = int((net[0].weight == 0).sum() + (net[4].weight == 0).sum())
    assert n_zero == math.ceil(0.9 * n_w)


def test_round_trip_through_torch_prune() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(7, 6)
    refs = prunable_parameters(net)
    n_w = sum(m.weight.numel() for m, _ in refs)
    ratio = 0.6
    masks = global_magnitude_masks(refs, ratio)

    # independent truth: torch's own global L1 pruning of the same number of weights
    ref_net = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3))
    ref_net.load_state_dict(net.state_dict())
    torch_prune.global_unstructured(
        [(ref_net[0], "weight"), (ref_net[2], "weight")],
        pruning_method=torch_prune.L1Unstructured,
        amount=math.ceil(ratio * n_w),
    )
    assert torch.equal(masks[(net[0], "weight")], ref_net[0].weight_mask.bool())
    assert torch.equal(masks[(net[2], "weight")], ref_net[2].weight_mask.bool())

    dense_w = net[0].weight.detach().clone()
    apply_masks(masks)
    assert hasattr(net[0], "weight_orig") and hasattr(net[0], "weight_mask")
    assert torch.equal(net[0].weight, dense_w * masks[(net[0], "weight")])
    with torch.no_grad():
        hooked = net(x)
        assert torch.equal(hooked, ref_net(x))
    remove_masks(masks)
    assert isinstance(net[0].weight, nn.Parameter) and not hasattr(net[0], "weight_mask")
    assert not torch_prune.is_pruned(net)
    for (m, _), mask in masks.items():
        assert torch.all(m.weight[~mask] == 0)
        assert torch.all(m.weight[mask] != 0)
    with torch.no_grad():
        assert torch.equal(net(x), hooked)
