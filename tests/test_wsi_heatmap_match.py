"""``wsi heatmap`` checks that the h5 belongs to the slide, and places patches without
patch-size attributes (issue K4, heatmaps).

Issue example: the h5 of the TCGA slide drawn over CMU-1-Small-Region wrote a PNG with 28
of 48 patches off the slide, exit 0. Right: refused (exit 2, nothing written), or drawn
with warnings under ``--allow-mismatch``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemil.cli.main import main
from sparsemil.data.h5 import write_h5_file
from sparsemil.errors import SparsemilError
from sparsemil.wsi.heatmap import footprint_problems

C = 64  # the tiny backbone's feature dimension
CMU_SIZE = (2220, 2967)
TCGA_SIZE = (4443, 3567)


@pytest.fixture(scope="module")
def wsi_dir(shared_dir) -> Path:
    return shared_dir / "data" / "wsi"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from sparsemil.mil.checkpoint import save_mil_checkpoint
    from sparsemil.mil.factory import build_mil_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_mil_model("abmil", C)
        model(torch.zeros(1, 2, C))
    d = tmp_path_factory.mktemp("ckpt")
    return save_mil_checkpoint(d / "abmil.safetensors", model, "abmil", {}, in_dim=C)


@pytest.fixture(scope="module")
def tcga_h5(tmp_path_factory, wsi_dir) -> Path:
    """The TCGA slide's own h5 from ``wsi extract`` (40x via --mpp 0.25, every patch with
    any tissue)."""
    out = tmp_path_factory.mktemp("tcga")
    rc = main(
        ["wsi", "extract", "--slide", str(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs"), "--out"]
        + [str(out), "--backbone", "tiny", "--workers", "0", "--no-progress", "--mpp", "0.25"]
        + ["--min-tissue", "0"]
    )
    assert rc == 0
    return out / "TCGA-CR-7395-01A-01-TS1.h5"


def _heatmap(capsys, slide: Path, h5: Path, ckpt: Path, out: Path, *args: str):
    rc = main(
        ["wsi", "heatmap", "--slide", str(slide), "--h5", str(h5), "--checkpoint", str(ckpt)]
        + ["--out", str(out), "--thumb-size", "256", *args]
    )
    stdout, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, stdout, err


def _grid(size: tuple[int, int], step: int) -> np.ndarray:
    w, h = size
    return np.array(
        [[x, y] for y in range(0, h - step + 1, step) for x in range(0, w - step + 1, step)],
        dtype=np.int64,
    )


def _features(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, C)).astype(np.float32)


def test_tcga_h5_over_cmu_is_refused(wsi_dir, tcga_h5, ckpt, tmp_path: Path, capsys):
    cmu = wsi_dir / "CMU-1-Small-Region.svs"
    png = tmp_path / "wrong.png"
    rc, _, err = _heatmap(capsys, cmu, tcga_h5, ckpt, png)
    assert rc == 2 and not png.exists()
    assert "records slide 'TCGA-CR-7395-01A-01-TS1' (coords attribute 'name'), not " in err
    assert "CMU-1-Small-Region.svs" in err
    assert "records patches at level 1 of a 2221x1783 level, but CMU-1-Small-Region.svs " in err
    assert "25 of 40 patch footprints are not wholly on the slide (17 lie off it)" in err
    assert "the slide is 2220x2967" in err and "(flag: --h5, --allow-mismatch)" in err
    # with the explicit flag: drawn, and every problem is a warning
    rc, stdout, err = _heatmap(capsys, cmu, tcga_h5, ckpt, png, "--allow-mismatch")
    assert rc == 0 and png.exists() and "40 patches" in stdout
    warnings = [ln for ln in err.splitlines() if ln.startswith("sparsemil: warning:")]
    assert len(warnings) == 3 and "25 of 40 patch footprints" in warnings[2]
    # on its own slide: no complaint
    rc, _, err = _heatmap(capsys, wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs", tcga_h5, ckpt, png)
    assert rc == 0 and "warning" not in err


def test_the_issue_grid_of_48_patches(wsi_dir, ckpt, tmp_path: Path, capsys):
    """All 8 x 6 cells of TCGA's 512-px grid (a CLAM feature h5: no names, no level size)
    over CMU: 28 of the 48 footprints are not wholly on CMU, 18 lie off it."""
    coords = _grid(TCGA_SIZE, 512)
    assert coords.shape == (48, 2)
    h5 = tmp_path / "tcga_grid.h5"
    write_h5_file(h5, _features(48), coords, coords_attrs={"patch_size": 512, "patch_level": 0})
    png = tmp_path / "x.png"
    rc, _, err = _heatmap(capsys, wsi_dir / "CMU-1-Small-Region.svs", h5, ckpt, png)
    assert rc == 2 and not png.exists()
    assert "28 of 48 patch footprints are not wholly on the slide (18 lie off it)" in err
    assert "the patches reach 4096x3072 level-0 pixels but the slide is 2220x2967" in err


def test_padded_clam_edge_patches_are_accepted(wsi_dir, ckpt, tmp_path: Path, capsys):
    """CLAM pads edge patches (use_padding): footprints may overhang the slide while a
    point a quarter side inside lies on it."""
    coords = _grid((2304, 3072), 256)  # one column and row beyond CMU's 2220 x 2967
    assert footprint_problems(coords, 256, CMU_SIZE, "x") == ""
    h5 = tmp_path / "padded.h5"
    write_h5_file(h5, _features(len(coords)), coords, coords_attrs={"patch_size": 256})
    rc, _, err = _heatmap(capsys, wsi_dir / "CMU-1-Small-Region.svs", h5, ckpt, tmp_path / "p.png")
    assert rc == 0 and "warning" not in err
    # one more column is off the slide
    more = _grid((2560, 3072), 256)
    msg = footprint_problems(more, 256, CMU_SIZE, "h5 X")
    assert msg.startswith("h5 X: 32 of 120 patch footprints are not wholly on the slide (12 lie")


def test_recorded_slide_name_must_match(wsi_dir, ckpt, tmp_path: Path, capsys):
    coords = _grid((1024, 1024), 256) + 512
    h5 = tmp_path / "CMU-1-Small-Region.h5"
    attrs = {"patch_size": 256, "patch_level": 0, "name": "CMU-1-Small-Region"}
    write_h5_file(h5, _features(16), coords, coords_attrs=attrs)
    other = tmp_path / "other.svs"
    shutil.copy(wsi_dir / "CMU-1-Small-Region.svs", other)
    rc, _, err = _heatmap(capsys, other, h5, ckpt, tmp_path / "o.png")
    assert rc == 2 and "records slide 'CMU-1-Small-Region' (coords attribute 'name'), not " in err
    assert "other.svs" in err
    # TCGA names hold dots (barcode.uuid): the name is the file name without its suffix
    dotted = tmp_path / "TCGA-AA-3495-01Z-00-DX1.1dbc7e3f.svs"
    shutil.copy(wsi_dir / "CMU-1-Small-Region.svs", dotted)
    for name in (dotted.stem, dotted.name, str(dotted)):
        write_h5_file(h5, _features(16), coords, coords_attrs={"patch_size": 256, "name": name})
        rc, _, err = _heatmap(capsys, dotted, h5, ckpt, tmp_path / "d.png")
        assert rc == 0 and "warning" not in err, name
    # the root attribute 'slide' (sparsemil's own h5) is checked too
    write_h5_file(
        h5, _features(16), coords, coords_attrs={"patch_size": 256}, attrs={"slide": "/x/B.svs"}
    )
    rc, _, err = _heatmap(capsys, dotted, h5, ckpt, tmp_path / "d.png")
    assert rc == 2 and "records slide '/x/B.svs' (root attribute 'slide')" in err


def test_recorded_level_size_must_match(wsi_dir, ckpt, tmp_path: Path, capsys):
    coords = _grid((1024, 1024), 256)
    h5 = tmp_path / "a.h5"
    attrs = {"patch_size": 256, "patch_level": 0, "level_dim": np.array([2220, 2900])}
    write_h5_file(h5, _features(16), coords, coords_attrs=attrs)
    rc, _, err = _heatmap(capsys, wsi_dir / "CMU-1-Small-Region.svs", h5, ckpt, tmp_path / "a.png")
    assert rc == 2
    assert "records level 0 as 2220x2900 pixels (coords attribute 'level_dim'), but " in err
    assert "CMU-1-Small-Region.svs's is 2220x2967" in err


def test_clam_h5_without_patch_size_attributes(wsi_dir, ckpt, tmp_path: Path, capsys):
    """CLAM's extract_features_fp.py writes coords without attributes: the patch size is
    the grid's step (or --patch-size), and either way the note names the file."""
    from sparsemil.wsi.heatmap import heatmap_from_checkpoint

    cmu = wsi_dir / "CMU-1-Small-Region.svs"
    coords = _grid((1536, 2048), 256)
    coords = coords[np.random.default_rng(0).permutation(len(coords))[:30]]  # gaps, any order
    bare, full = tmp_path / "bare.h5", tmp_path / "full.h5"
    feats = _features(30)
    write_h5_file(bare, feats, coords)
    write_h5_file(full, feats, coords, coords_attrs={"patch_size": 256, "patch_level": 0})
    rc, _, err = _heatmap(capsys, cmu, bare, ckpt, tmp_path / "bare.png")
    assert rc == 0
    assert f"note: h5 {bare}: coords carry no patch-size attributes" in err
    assert "patch size 256 level-0 px inferred from the coordinate grid's step" in err
    rc, _, _ = _heatmap(capsys, cmu, full, ckpt, tmp_path / "full.png")
    a = np.asarray(Image.open(tmp_path / "bare.png"))
    assert rc == 0 and np.array_equal(a, np.asarray(Image.open(tmp_path / "full.png")))
    rc, _, err = _heatmap(capsys, cmu, bare, ckpt, tmp_path / "b2.png", "--patch-size", "256")
    assert rc == 0 and f"note: h5 {bare}: coords carry no patch-size attributes; patch size " in err
    assert "256 level-0 px from 'patch_size' (flag: --h5, --patch-size)" in err
    # a single patch has no grid: the error names the file and the field
    write_h5_file(bare, feats[:1], coords[:1])
    rc, _, err = _heatmap(capsys, cmu, bare, ckpt, tmp_path / "one.png")
    assert rc == 2 and f"h5 {bare}: coords carry no patch-size attributes" in err
    assert "set 'patch_size' to the patch side in level-0 pixels" in err and "--patch-size" in err
    with pytest.raises(SparsemilError, match=r"form no regular grid"):
        heatmap_from_checkpoint(cmu, bare, ckpt, tmp_path / "one.png", device="cpu")
