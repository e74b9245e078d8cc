"""Sub-bag grouping strategies for MMIL-Transformer.

Every strategy is a small function that takes one bag and returns **group ids**: an
``int64`` numpy array of shape ``(N,)`` with values in ``0..G-1`` (consecutive, every
group non-empty) -- or ``-1`` for an instance that belongs to no sub-bag (only after
:func:`cap_group_sizes` or :func:`drop_groups`). Index lists are derived with
:func:`group_index_lists`.

Randomness always comes from an explicit ``numpy.random.Generator`` (or a
``random_state`` seed for k-means); no global RNG state is read or written.

Fewer instances than sub-bags (``N < num_groups``): every strategy uses
``min(N, num_groups)`` groups, so no sub-bag is ever empty (the official code builds
empty sub-bags that contain only message tokens in that case).
"""

from __future__ import annotations

import math

import numpy as np

from sparsemil.errors import SparsemilError

#: Strategy names accepted by MMILTransformer (``grouping=``).
STRATEGIES: tuple[str, ...] = (
    "random",
    "sequential",
    "kmeans_embed",
    "kmeans_coords",
    "precomputed",
)
#: The official ``--mode`` names and what they mean here.
OFFICIAL_MODES: dict[str, str] = {
    "random": "random",
    "seq": "sequential",
    "embed": "kmeans_embed",
    "coords": "kmeans_coords",
    "idx": "precomputed",
}


def check_strategy(name: str) -> str:
    """Return the canonical strategy name for ``name`` (official aliases accepted)."""
    key = str(name)
    if key in STRATEGIES:
        return key
    if key in OFFICIAL_MODES:
        return OFFICIAL_MODES[key]
    raise SparsemilError(
        f"grouping '{name}' is not known; choose one of {', '.join(STRATEGIES)} "
        f"(official aliases: {', '.join(OFFICIAL_MODES)})"
    )


def _num_groups(n: int, num_groups: int) -> int:
    if n < 1:
        raise SparsemilError("cannot group an empty bag (N = 0 instances)")
    if num_groups < 1:
        raise SparsemilError(f"num_subbags must be >= 1 (got {num_groups})")
    return min(int(n), int(num_groups))


def _ids_from_split(order: np.ndarray, g: int) -> np.ndarray:
    """Group ids of ``numpy.array_split(order, g)``: chunk i gets id i."""
    n = order.shape[0]
    sizes = np.full(g, n // g, dtype=np.int64)
    sizes[: n % g] += 1  # array_split puts the larger chunks first
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.repeat(np.arange(g, dtype=np.int64), sizes)
    return ids


def sequential_groups(n: int, num_groups: int) -> np.ndarray:
    """``numpy.array_split(range(n), G)`` as group ids, ``G = min(n, num_groups)``.

    Returns: ``(n,)`` int64, non-decreasing.
    """
    g = _num_groups(n, num_groups)
    return _ids_from_split(np.arange(n), g)


def random_groups(n: int, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation split into ``min(n, num_groups)`` balanced groups.

    Sizes differ by at most one (as ``numpy.array_split``).
    Returns: ``(n,)`` int64.
    """
    g = _num_groups(n, num_groups)
    return _ids_from_split(rng.permutation(n), g)


def kmeans_groups(points: np.ndarray, num_groups: int, seed: int = 0) -> np.ndarray:
    """k-means (scikit-learn, ``n_init="auto"``) cluster labels as group ids.

    Args:
        points: ``(n, d)`` float array (embeddings or coordinates).
        num_groups: wanted number of clusters; ``min(n, num_groups)`` are used.
        seed: ``random_state`` of ``KMeans``.

    Returns: ``(n,)`` int64, relabelled to consecutive ids. A cluster of one instance is
    a sub-bag of one instance; k-means can return fewer non-empty clusters than asked
    (duplicate points), and then there are fewer groups -- never an empty or a
    duplicated sub-bag.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2:
        raise SparsemilError(f"k-means grouping needs (N, d) points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise SparsemilError("k-means grouping: points contain NaN or Inf")
    g = _num_groups(pts.shape[0], num_groups)
    if g == 1:
        return np.zeros(pts.shape[0], dtype=np.int64)
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # duplicate points -> fewer distinct clusters than asked; handled by relabelling
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=g, random_state=int(seed), n_init="auto").fit(pts).labels_
    return relabel(labels)


def relabel(ids: np.ndarray) -> np.ndarray:
    """Map arbitrary integer labels to consecutive ids ``0..G-1`` (sorted label order).

    ``-1`` (no sub-bag) stays ``-1``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise SparsemilError(f"group ids must be 1-D per bag, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
            raise SparsemilError("group ids must be integers")
    ids = ids.astype(np.int64)
    out = np.full(ids.shape, -1, dtype=np.int64)
    keep = ids >= 0
    if keep.any():
        _, inv = np.unique(ids[keep], return_inverse=True)
        out[keep] = inv
    return out


def precomputed_groups(ids: np.ndarray) -> np.ndarray:
    """Validate user group ids ``(n,)`` (any integers >= 0) and relabel them."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise SparsemilError(f"group_ids must have shape (N,) per bag, got {ids.shape}")
    if ids.size == 0:
        raise SparsemilError("cannot group an empty bag (N = 0 instances)")
    if np.issubdtype(ids.dtype, np.integer) and (ids < 0).any():
        raise SparsemilError("group_ids must be >= 0 for every real instance")
    out = relabel(ids)
    if (out < 0).any():
        raise SparsemilError("group_ids must be >= 0 for every real instance")
    return out


def num_kept(num_groups: int, mask_ratio: float) -> int:
    """How many of ``num_groups`` sub-bags survive sub-bag masking: at least 1.

    ``floor(G * (1 - mask_ratio))`` like the official code, but never 0 (the official
    rounding can keep 0 sub-bags, e.g. G = 3, mask_ratio = 0.7).
    """
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise SparsemilError(f"mask_ratio must be in [0, 1) (got {mask_ratio})")
    return max(1, int(math.floor(num_groups * (1.0 - float(mask_ratio)) + 1e-9)))


def drop_groups(ids: np.ndarray, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Sub-bag masking: drop a random ``mask_ratio`` fraction of the groups.

    Instances of dropped groups get id ``-1``; kept groups are relabelled ``0..K-1``
    with ``K = num_kept(G, mask_ratio) >= 1``.
    """
    g = int(ids.max()) + 1 if (ids >= 0).any() else 0
    if g == 0 or mask_ratio <= 0:
        return ids
    k = num_kept(g, mask_ratio)
    if k >= g:
        return ids
    keep = np.zeros(g, dtype=bool)
    keep[rng.choice(g, size=k, replace=False)] = True
    out = np.where((ids >= 0) & keep[np.maximum(ids, 0)], ids, -1)
    return relabel(out)


def cap_group_sizes(ids: np.ndarray, max_size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Randomly keep at most ``max_size`` instances per group (others get ``-1``).

    ``max_size=None`` (default everywhere) keeps everything; the official code always
    caps at 4300.
    """
    if max_size is None:
        return ids
    if int(max_size) < 1:
        raise SparsemilError(f"max_subbag_size must be >= 1 or None (got {max_size})")
    sizes = np.bincount(ids[ids >= 0])
    if sizes.size == 0 or sizes.max() <= max_size:
        return ids
    # random rank of every instance inside its group: shuffle, then stable sort by group
    perm = rng.permutation(ids.shape[0])
    perm = perm[np.argsort(ids[perm], kind="stable")]
    sorted_ids = ids[perm]
    starts = np.searchsorted(sorted_ids, sorted_ids, side="left")
    rank = np.arange(ids.shape[0]) - starts
    out = ids.copy()
    drop = (sorted_ids >= 0) & (rank >= max_size)
    out[perm[drop]] = -1
    return out


def group_index_lists(ids: np.ndarray) -> list[np.ndarray]:
    """Instance indices of each group ``0..G-1`` (ascending within a group)."""
    ids = np.asarray(ids)
    g = int(ids.max()) + 1 if ids.size and (ids >= 0).any() else 0
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    bounds = np.searchsorted(sorted_ids, np.arange(g + 1), side="left")
    return [order[bounds[i] : bounds[i + 1]] for i in range(g)]
