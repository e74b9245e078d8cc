"""Patch grid at level 0, kept where the tissue mask covers enough of the patch.

The grid is non-overlapping, step = ``patch_size_level0``, anchored at (0, 0), and only
patches lying wholly inside level 0 are candidates (a slide's last partial row/column is
dropped, as with CLAM's ``use_padding=False``). Order is row-major: y, then x.

A patch's tissue fraction is the exact area-weighted mean of the (piecewise-constant)
mask over the patch's footprint in mask pixels: the integral of the mask over a box is
the bilinear interpolation of its summed-area table at the box corners.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def grid_coords(dimensions: tuple[int, int], patch_size_level0: int) -> np.ndarray:
    """Top-left corners (x, y) of all whole patches of a (W, H) level 0; (M, 2) int64."""
    w0, h0 = (int(d) for d in dimensions)
    p = int(patch_size_level0)
    xs = np.arange(0, w0 - p + 1, p, dtype=np.int64)
    ys = np.arange(0, h0 - p + 1, p, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fraction(
    mask: np.ndarray, scale: tuple[float, float], coords: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """Fraction (0..1) of each patch covered by ``mask``.

    Args:
        mask: (h, w) bool tissue mask.
        scale: (sx, sy) level-0 pixels per mask pixel.
        coords: (M, 2) level-0 top-left corners (x, y).
        patch_size_level0: patch side in level-0 pixels.

    Returns:
        (M,) float64.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if coords.shape[0] == 0:
        return np.zeros(0)
    m = np.asarray(mask, dtype=np.float64)
    h, w = m.shape
    sat = np.zeros((h + 1, w + 1))
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    sx, sy = scale
    x0 = np.clip(coords[:, 0] / sx, 0, w)
    x1 = np.clip((coords[:, 0] + patch_size_level0) / sx, 0, w)
    y0 = np.clip(coords[:, 1] / sy, 0, h)
    y1 = np.clip((coords[:, 1] + patch_size_level0) / sy, 0, h)

    def integral(yv: np.ndarray, xv: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(sat, [yv, xv], order=1, mode="nearest")

    total = integral(y1, x1) - integral(y0, x1) - integral(y1, x0) + integral(y0, x0)
    area = (x1 - x0) * (y1 - y0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, total / np.maximum(area, 1e-12), 0.0)
    return np.clip(frac, 0.0, 1.0)


def tissue_patches(
    mask: np.ndarray,
    scale: tuple[float, float],
    dimensions: tuple[int, int],
    patch_size_level0: int,
    min_tissue: float = 0.25,
) -> np.ndarray:
    """Grid patches whose tissue fraction is ``>= min_tissue``; (N, 2) int64 (x, y)."""
    grid = grid_coords(dimensions, patch_size_level0)
    if grid.shape[0] == 0:
        return grid
    frac = tissue_fraction(mask, scale, grid, patch_size_level0)
    # a small epsilon so 0.25 exactly covered passes despite float round-off
    keep = frac >= float(min_tissue) - 1e-9
    if min_tissue <= 0:
        keep = frac > 0
    return grid[keep]


def cap_patches(coords: np.ndarray, max_patches: int | None) -> np.ndarray:
    """At most ``max_patches`` patches, evenly spaced through the (row-major) list.

    Deterministic: indices ``floor(i * N / k)`` for ``i = 0..k-1``.
    """
    coords = np.asarray(coords)
    n = coords.shape[0]
    if max_patches is None or max_patches <= 0 or n <= max_patches:
        return coords
    idx = (np.arange(max_patches, dtype=np.int64) * n) // max_patches
    return coords[idx]
