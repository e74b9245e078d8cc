"""Tissue detection and patch selection against independent truths."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from sparsemil.wsi.patching import cap_patches, grid_coords, tissue_fraction, tissue_patches
from sparsemil.wsi.tissue import (
    TissueParams,
    detect_tissue,
    mask_from_rgb,
    otsu_threshold,
    saturation,
)
from test_wsi_tiff import write_tiled_tiff

PINK = (200, 90, 170)


def test_saturation_matches_colorsys():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(40, 3), dtype=np.uint8)
    rgb[0] = 0  # black
    ours = saturation(rgb.reshape(1, -1, 3))[0].astype(int)
    ref = [round(255 * colorsys.rgb_to_hsv(*(c / 255.0 for c in px))[1]) for px in rgb]
    assert np.abs(ours - np.array(ref)).max() <= 1


def test_otsu_maximises_between_class_variance_brute_force():
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.normal(30, 8, 3000), rng.normal(150, 20, 1000)])
    v = np.clip(v, 0, 255).astype(np.uint8)
    best, best_t = -1.0, None
    for t in range(255):  # direct definition on the raw values
        lo, hi = v[v <= t].astype(float), v[v > t].astype(float)
        if lo.size == 0 or hi.size == 0:
            continue
        w0, w1 = lo.size / v.size, hi.size / v.size
        between = w0 * w1 * (lo.mean() - hi.mean()) ** 2
        if between > best + 1e-9:
            best, best_t = between, t
    assert otsu_threshold(v) == best_t
    assert 40 < best_t < 130


def test_tissue_fraction_matches_supersampled_mask():
    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) < 0.4
    scale = (7.3, 6.1)  # level-0 px per mask px, non-integer
    coords = np.array([[0, 0], [13, 29], [100, 40], [250, 150], [330, 180]])  # inside the mask
    ps = 40
    got = tissue_fraction(mask, scale, coords, ps)
    # independent: average the mask at every level-0 pixel centre of each patch
    for (x, y), f in zip(coords, got, strict=True):
        xs = (np.arange(x, x + ps) + 0.5) / scale[0]
        ys = (np.arange(y, y + ps) + 0.5) / scale[1]
        xi = np.clip(xs.astype(int), 0, mask.shape[1] - 1)
        yi = np.clip(ys.astype(int), 0, mask.shape[0] - 1)
        ref = mask[np.ix_(yi, xi)].mean()
        assert f == pytest.approx(ref, abs=0.03)


def test_grid_and_cap():
    g = grid_coords((1000, 520), 256)
    assert g.tolist() == [[0, 0], [256, 0], [512, 0], [0, 256], [256, 256], [512, 256]]
    assert grid_coords((100, 100), 256).shape == (0, 2)
    c = cap_patches(np.arange(20).reshape(10, 2), 4)
    assert c[:, 0].tolist() == [0, 4, 10, 14]
    assert cap_patches(g, None) is g


def _synthetic(h=1536, w=2048):
    rng = np.random.default_rng(4)
    img = np.clip(rng.normal(242, 2, size=(h, w, 3)), 0, 255).astype(np.uint8)  # glass
    img[512:1024, 256:1280] = PINK  # tissue: exactly 4 x 2 patches of 256 px
    img[700:780, 600:680] = 243  # 40 um hole (0.0016 mm^2): filled
    img[100:110, 1800:1810] = PINK  # 5 um speck: removed
    return img


def test_synthetic_slide_mask_and_patches(tmp_path):
    import openslide

    path = write_tiled_tiff(tmp_path / "syn.tif", _synthetic(), mpp=0.5)
    s = openslide.OpenSlide(str(path))
    tissue = detect_tissue(s, 0.5, TissueParams())
    dims = s.dimensions
    s.close()
    assert tissue.mask.shape == (192, 256)  # 4 um/px
    truth = np.zeros((192, 256), bool)
    truth[64:128, 32:160] = True
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.97
    assert not tissue.mask[:20, 200:].any()  # speck gone
    assert tissue.mask[90:96, 76:84].all()  # small hole filled
    coords = tissue_patches(tissue.mask, tissue.scale, dims, 256, 0.25)
    expected = [[x, y] for y in (512, 768) for x in (256, 512, 768, 1024)]
    assert coords.tolist() == expected


def test_large_hole_is_kept_and_blank_slide_has_no_tissue():
    rng = np.random.default_rng(5)
    img = np.clip(rng.normal(242, 3, size=(200, 200, 3)), 0, 255).astype(np.uint8)
    mask, thr, otsu = mask_from_rgb(img, 4.0)
    assert not mask.any() and thr == TissueParams().min_saturation and otsu < thr
    img[40:160, 40:160] = PINK
    img[80:120, 80:120] = 242  # 160 um hole, 0.0256 mm^2 > max_hole_um2
    mask, _, _ = mask_from_rgb(img, 4.0)
    assert not mask[85:115, 85:115].any()
    assert mask[45:75, 45:155].all()
