"""Sub-bag grouping strategies: partition invariants, reproducibility, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemil.errors import SparsemilError
from sparsemil.mil import MMILTransformer
from sparsemil.mil import grouping as grp


def assert_partition(ids: np.ndarray, n: int, g: int) -> None:
    """Every instance in exactly one of g non-empty groups 0..g-1."""
    assert ids.shape == (n,) and ids.dtype == np.int64
    assert set(np.unique(ids).tolist()) == set(range(g))
    lists = grp.group_index_lists(ids)
    assert len(lists) == g and all(len(a) > 0 for a in lists)
    assert np.array_equal(np.sort(np.concatenate(lists)), np.arange(n))


@pytest.mark.parametrize(("n", "g"), [(10, 3), (1000, 10), (301, 3), (7, 7), (3, 10), (1, 4)])
def test_sequential_is_array_split(n, g):
    ids = grp.sequential_groups(n, g)
    k = min(n, g)
    assert_partition(ids, n, k)
    for i, chunk in enumerate(np.array_split(np.arange(n), k)):
        assert np.array_equal(np.flatnonzero(ids == i), chunk)


def test_random_partition_and_seeding():
    n, g = 103, 10
    a = grp.random_groups(n, g, np.random.default_rng(7))
    b = grp.random_groups(n, g, np.random.default_rng(7))
    c = grp.random_groups(n, g, np.random.default_rng(8))
    assert_partition(a, n, g)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(np.bincount(a).tolist()) == [10] * 7 + [11] * 3
    assert_partition(grp.random_groups(4, 10, np.random.default_rng(0)), 4, 4)


def test_kmeans_singleton_cluster_is_its_own_sub_bag():
    """The official code duplicates another sub-bag for a one-instance cluster."""
    rng = np.random.default_rng(0)
    pts = np.concatenate(
        [rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2)), [[100.0, 100.0]]]
    )
    ids = grp.kmeans_groups(pts, 3, seed=0)
    assert_partition(ids, 41, 3)
    sizes = sorted(np.bincount(ids).tolist())
    assert sizes == [1, 20, 20]
    assert ids[40] not in ids[:40]


def test_kmeans_with_fewer_distinct_points_than_groups():
    pts = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]]), 10, axis=0)
    ids = grp.kmeans_groups(pts, 5, seed=0)
    g = int(ids.max()) + 1
    assert_partition(ids, 20, g)
    assert g <= 5
    assert_partition(grp.kmeans_groups(pts[:3], 5), 3, int(grp.kmeans_groups(pts[:3], 5).max()) + 1)


def test_kmeans_is_reproducible_and_rejects_bad_points():
    pts = np.random.default_rng(1).normal(size=(60, 4))
    assert np.array_equal(grp.kmeans_groups(pts, 4, seed=3), grp.kmeans_groups(pts, 4, seed=3))
    assert_partition(grp.kmeans_groups(pts, 4), 60, 4)
    pts[3, 1] = np.nan
    with pytest.raises(SparsemilError, match="NaN"):
        grp.kmeans_groups(pts, 4)


def test_precomputed_relabel_and_errors():
    ids = grp.precomputed_groups(np.array([7, 7, 3, 42, 3]))
    assert np.array_equal(ids, [1, 1, 0, 2, 0])
    with pytest.raises(SparsemilError, match=">= 0"):
        grp.precomputed_groups(np.array([0, -2]))
    with pytest.raises(SparsemilError, match="integers"):
        grp.precomputed_groups(np.array([0.5, 1.0]))
    with pytest.raises(SparsemilError, match="empty bag"):
        grp.precomputed_groups(np.array([], dtype=np.int64))


def test_cap_group_sizes():
    ids = grp.sequential_groups(100, 3)  # sizes 34, 33, 33
    assert grp.cap_group_sizes(ids, None, np.random.default_rng(0)) is ids
    capped = grp.cap_group_sizes(ids, 10, np.random.default_rng(0))
    kept = capped >= 0
    assert np.array_equal(capped[kept], ids[kept])  # kept instances keep their group
    assert np.bincount(capped[kept]).tolist() == [10, 10, 10]
    again = grp.cap_group_sizes(ids, 10, np.random.default_rng(0))
    other = grp.cap_group_sizes(ids, 10, np.random.default_rng(1))
    assert np.array_equal(capped, again) and not np.array_equal(capped, other)
    assert np.array_equal(grp.cap_group_sizes(ids, 40, np.random.default_rng(0)), ids)


def test_drop_groups_keeps_at_least_one():
    ids = grp.sequential_groups(30, 3)
    for ratio, kept in [(0.0, 3), (0.34, 1), (0.5, 1), (0.7, 1), (0.99, 1), (0.2, 2)]:
        out = grp.drop_groups(ids, ratio, np.random.default_rng(0))
        g = int(out.max()) + 1
        assert g == kept == grp.num_kept(3, ratio)
        assert_partition(out[out >= 0], int((out >= 0).sum()), g)
    with pytest.raises(SparsemilError, match="mask_ratio"):
        grp.num_kept(3, 1.0)


def test_strategy_names():
    assert grp.check_strategy("seq") == "sequential"
    assert grp.check_strategy("embed") == "kmeans_embed"
    assert grp.check_strategy("coords") == "kmeans_coords"
    with pytest.raises(SparsemilError, match="choose one of"):
        grp.check_strategy("hilbert")


@pytest.mark.parametrize("strategy", ["kmeans_embed", "kmeans_coords", "random"])
def test_model_grouping_equals_precomputed_ids(strategy):
    """The model's own grouping gives the same logits as feeding those ids."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 45, 8, generator=gen)
    coords = torch.randint(0, 50, (1, 45, 2), generator=gen).float()
    coords[0, 44] = 1000.0  # an outlier tile: a singleton k-means cluster
    model = MMILTransformer(in_dim=8, embed_dim=16, num_subbags=4, grouping=strategy, seed=0).eval()
    with torch.no_grad():
        h = model.proj(x[0]) + model.absolute_pos_embed
    if strategy == "kmeans_embed":
        ids = grp.kmeans_groups(h.numpy(), 4, seed=0)
    elif strategy == "kmeans_coords":
        ids = grp.kmeans_groups(coords[0].numpy(), 4, seed=0)
        assert np.bincount(ids).min() == 1
    else:
        ids = grp.random_groups(45, 4, np.random.default_rng(11))
        model.reseed(11)
    a, att = model(x, coords=coords, return_att=True)
    assert (att > 0).all()  # every instance is in a sub-bag
    model.grouping = "precomputed"
    b = model(x, group_ids=torch.from_numpy(ids)[None])
    assert torch.allclose(a, b, atol=1e-6)


def test_model_random_grouping_is_seeded():
    x = torch.randn(1, 50, 8, generator=torch.Generator().manual_seed(0))
    m1 = MMILTransformer(in_dim=8, embed_dim=16, num_subbags=5, seed=3).eval()
    m2 = MMILTransformer(in_dim=8, embed_dim=16, num_subbags=5, seed=3).eval()
    outs1 = [m1(x) for _ in range(3)]
    outs2 = [m2(x) for _ in range(3)]
    for a, b in zip(outs1, outs2, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(outs1[0], outs1[1])  # a new random grouping per call
