"""Opening slides, resolution, magnification -> level/read size, sharding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsemil.errors import SparsemilError
from sparsemil.wsi.slide import (
    list_slides,
    magnification_from_mpp,
    open_slide,
    parse_shard,
    patch_geometry,
    read_thumbnail,
    resolve_resolution,
    shard_slides,
)
from test_wsi_tiff import write_tiled_tiff


@pytest.fixture(scope="module")
def cmu(shared_dir) -> Path:
    return shared_dir / "data" / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def tcga(shared_dir) -> Path:
    return shared_dir / "data" / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"


def test_cmu_resolution_and_geometry(cmu):
    s = open_slide(cmu)
    res = resolve_resolution(s, cmu)
    assert res.source == "openslide.mpp-x" and res.mpp0 == pytest.approx(0.499)
    assert res.mag0 == 20.0  # 10 / 0.499 = 20.04 snapped
    g = patch_geometry(s, res, 20, 256, cmu)
    assert (g.level, g.read_size, g.patch_size_level0, g.downsample) == (0, 256, 256, 1.0)
    g10 = patch_geometry(s, res, 10, 256, cmu)  # one-level slide: read 512 at level 0
    assert (g10.level, g10.read_size, g10.patch_size_level0) == (0, 512, 512)
    with pytest.raises(SparsemilError, match="cannot extract at 40x"):
        patch_geometry(s, res, 40, 256, cmu)
    # the user's mpp always overrides the file, and says so
    over = resolve_resolution(s, cmu, mpp=0.25)
    assert (over.source, over.mag0, over.file_mpp) == ("mpp", 40.0, pytest.approx(0.499))
    assert over.note == "mpp 0.25 overrides the file's openslide.mpp-x 0.499 um/px"
    s.close()


def test_tcga_without_mpp_needs_user_mpp(tcga):
    s = open_slide(tcga)
    assert s.level_count == 2
    with pytest.raises(SparsemilError, match="set 'mpp' to the micrometres") as ei:
        resolve_resolution(s, tcga)
    assert "\n" not in str(ei.value)
    res = resolve_resolution(s, tcga, mpp=0.25)
    assert (res.mag0, res.source) == (40.0, "mpp")
    g = patch_geometry(s, res, 20, 256, tcga)
    # level 1 has downsample 2.0005: within 1 % of the wanted 2, read 256 px there
    assert (g.level, g.read_size, g.patch_size_level0) == (1, 256, 512)
    g5 = patch_geometry(s, res, 5, 256, tcga)
    assert (g5.level, g5.read_size, g5.patch_size_level0) == (1, 1024, 2048)
    s.close()


def test_magnification_snapping():
    assert magnification_from_mpp(0.2527) == 40.0
    assert magnification_from_mpp(0.499) == 20.0
    assert magnification_from_mpp(1.0) == 10.0
    assert magnification_from_mpp(0.33) == pytest.approx(10 / 0.33)  # 30x: no standard near


def test_read_thumbnail_matches_full_read(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(600, 900, 3), dtype=np.uint8)
    p = write_tiled_tiff(tmp_path / "r.tif", img, tile=128, mpp=0.5)
    s = open_slide(p)
    thumb, scale = read_thumbnail(s, 1.0, chunk=256)  # chunked read, no resizing
    assert (thumb == img).all() and scale == (1.0, 1.0)
    thumb, scale = read_thumbnail(s, 3.0, chunk=256)
    assert thumb.shape == (200, 300, 3) and scale == (3.0, 3.0)
    # each thumbnail pixel is close to the mean of its 3x3 block (bilinear reduce)
    ref = img.reshape(200, 3, 300, 3, 3).mean(axis=(1, 3))
    assert np.abs(thumb.astype(float) - ref).mean() < 20
    s.close()


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"hello, not a slide\n", "not a slide file"),
        (b"", "empty file"),
    ],
)
def test_non_slide_files_get_one_line_errors(tmp_path, content, pattern):
    p = tmp_path / "x.svs"
    p.write_bytes(content)
    with pytest.raises(SparsemilError, match=pattern) as ei:
        open_slide(p)
    assert "\n" not in str(ei.value) and str(p) in str(ei.value)


def test_truncated_and_missing(tmp_path, cmu):
    t = tmp_path / "trunc.svs"
    t.write_bytes(cmu.read_bytes()[:1_000_000])
    with pytest.raises(SparsemilError, match="corrupt or truncated"):
        open_slide(t)
    with pytest.raises(SparsemilError, match="no such slide"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SparsemilError, match="is a folder"):
        open_slide(tmp_path)


def test_list_and_shard(tmp_path):
    for name in ["b.svs", "a.tif", "c.ndpi", "notes.txt", ".hidden.svs", "d.SVS"]:
        (tmp_path / name).write_bytes(b"x")
    names = [p.name for p in list_slides(tmp_path)]
    assert names == ["a.tif", "b.svs", "c.ndpi", "d.SVS"]
    slides = list_slides(tmp_path)
    assert [p.name for p in shard_slides(slides, parse_shard("1/3"))] == ["b.svs"]
    assert [p.name for p in shard_slides(slides, parse_shard("0/3"))] == ["a.tif", "d.SVS"]
    union = sorted(p.name for k in range(3) for p in shard_slides(slides, (k, 3)))
    assert union == sorted(names)
    assert parse_shard(None) is None
    for bad in ["3/3", "1", "a/b", "-1/2", "0/0"]:
        with pytest.raises(SparsemilError, match="shard"):
            parse_shard(bad)
