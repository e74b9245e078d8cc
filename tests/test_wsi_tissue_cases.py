"""Tissue detection on images Otsu's glass-vs-tissue split does not fit (issue K4, last
part): tissue edge to edge (no glass) and very pale stains are detected and handled, a
doubtful result is reported, and every parameter is an option of ``wsi extract``.

The images are cut from the real slides and written as tiled TIFFs at 0.5 um/px (20x).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from sparsemil.cli.main import main
from sparsemil.wsi.slide import open_slide, to_rgb
from sparsemil.wsi.tissue import TissueParams, detect_tissue, tissue_mask_of_rgb
from test_wsi_tiff import write_tiled_tiff

CMU_PATCHES = 38  # the original CMU-1-Small-Region with the defaults (test_wsi_extract)


@pytest.fixture(scope="module")
def wsi_dir(shared_dir) -> Path:
    return shared_dir / "data" / "wsi"


@pytest.fixture(scope="module")
def cmu_rgb(wsi_dir) -> np.ndarray:
    s = open_slide(wsi_dir / "CMU-1-Small-Region.svs")
    rgb = to_rgb(s.read_region((0, 0), 0, s.dimensions))
    s.close()
    return rgb


def _extract(capsys, slide: Path, out: Path, *args: str) -> tuple[int, str, str]:
    rc = main(
        ["wsi", "extract", "--slide", str(slide), "--out", str(out), "--backbone", "tiny"]
        + ["--no-progress", "--workers", "0", *args]
    )
    stdout, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, stdout, err


def _mask(path: Path, params: TissueParams = TissueParams()):
    s = open_slide(path)
    try:
        return detect_tissue(s, 0.5, params)
    finally:
        s.close()


def test_tissue_edge_to_edge_is_kept(wsi_dir, tmp_path: Path, capsys):
    """A 768 x 768 crop of the TCGA tumour (level 1, 0.5 um/px) without any glass. Otsu used
    to split the tissue itself in two: 44.5 % of the mask, 6 of the 9 patches. Right: the
    whole crop, all 9 patches, and a warning that says why."""
    s = open_slide(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs")
    crop = to_rgb(s.read_region((600, 1000), 1, (768, 768)))
    s.close()
    slide = write_tiled_tiff(tmp_path / "core.tif", crop, mpp=0.5)
    tissue = _mask(slide)
    assert tissue.mode == "no_glass" and tissue.otsu == 119 and tissue.threshold == 20
    assert tissue.fraction > 0.999
    old = _mask(slide, TissueParams(tissue_threshold=tissue.otsu))  # the former rule
    assert old.fraction == pytest.approx(0.445, abs=0.005)
    rc, stdout, err = _extract(capsys, slide, tmp_path / "out")
    assert rc == 0 and "core.tif: 9 patches" in stdout
    assert "tissue detection found no glass background; used saturation threshold 20" in err
    with h5py.File(tmp_path / "out" / "core.h5") as f:
        assert f.attrs["tissue_mode"] == "no_glass" and f["features"].shape[0] == 9


def test_very_pale_stain_is_found(cmu_rgb, tmp_path: Path, capsys):
    """CMU-1 at a fifth of its stain (blended 80 % towards white). It used to have 'no
    tissue' (saturation below the floor of 20). Right: the pale stain is detected and the
    mask is the original's (39 patches; 38 on the original)."""
    pale = (cmu_rgb.astype(np.float32) * 0.2 + 255 * 0.8).round().astype(np.uint8)
    slide = write_tiled_tiff(tmp_path / "pale.tif", pale, mpp=0.5)
    tissue = _mask(slide)
    assert tissue.mode == "pale" and tissue.threshold == 5 < TissueParams().min_saturation
    original = _mask(write_tiled_tiff(tmp_path / "cmu.tif", cmu_rgb, mpp=0.5))
    assert original.mode == "otsu" and original.threshold == 46
    iou = (tissue.mask & original.mask).sum() / (tissue.mask | original.mask).sum()
    assert iou > 0.85
    old = _mask(slide, TissueParams(tissue_threshold=20))  # the former rule: nothing
    assert not old.mask.any()
    rc, stdout, err = _extract(capsys, slide, tmp_path / "out")
    assert rc == 0 and "pale.tif: 39 patches" in stdout
    assert "tissue detection found a very pale stain; used saturation threshold 5" in err
    rc, stdout, err = _extract(capsys, tmp_path / "cmu.tif", tmp_path / "out")
    assert f"cmu.tif: {CMU_PATCHES} patches" in stdout and "warning" not in err


@pytest.mark.parametrize("stain", [0.15, 0.3, 0.5])
def test_other_pale_stains_keep_the_tissue(cmu_rgb, stain: float):
    small = cmu_rgb[::8, ::8]  # 4 um/px
    pale = (small.astype(np.float32) * stain + 255 * (1 - stain)).round().astype(np.uint8)
    mask, choice = tissue_mask_of_rgb(pale, 4.0)
    full, _ = tissue_mask_of_rgb(small, 4.0)
    assert choice.mode == "pale"
    assert (mask & full).sum() / (mask | full).sum() > 0.85


def test_tinted_glass_is_no_tissue_but_reported(tmp_path: Path, capsys):
    """Uniformly faint colour without glass: tinted glass or a pale stain edge to edge --
    saturation cannot tell, so nothing is extracted and the warning says what to set."""
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal((245, 240, 228), 2, size=(768, 768, 3)), 0, 255).astype(np.uint8)
    slide = write_tiled_tiff(tmp_path / "tinted.tif", img, mpp=0.5)
    rc, _, err = _extract(capsys, slide, tmp_path / "out")
    assert rc == 0 and "no tissue found; no h5 written" in err
    assert "no glass-like area and a uniformly faint saturation (median 18" in err
    assert "set 'tissue_threshold' below 18" in err and "(flag: --tissue-threshold)" in err
    rc, stdout, _ = _extract(capsys, slide, tmp_path / "out", "--tissue-threshold", "10")
    assert rc == 0 and "tinted.tif: 9 patches" in stdout  # the user's call


def test_blank_glass_stays_blank():
    rng = np.random.default_rng(5)
    for sd in (1.0, 3.0):
        img = np.clip(rng.normal(242, sd, size=(200, 200, 3)), 0, 255).astype(np.uint8)
        mask, choice = tissue_mask_of_rgb(img, 4.0)
        assert not mask.any() and choice.mode == "otsu" and choice.note == ""


def test_tissue_parameters_are_extract_options(cmu_rgb, tmp_path: Path, capsys):
    slide = write_tiled_tiff(tmp_path / "cmu.tif", cmu_rgb[:1024, :1024], mpp=0.5)
    args = ["--mask-mpp", "8", "--max-side", "2048", "--median-um", "40", "--min-saturation"]
    args += ["25", "--closing-um", "16", "--opening-um", "8", "--max-hole-um2", "1000"]
    args += ["--min-object-um2", "2000", "--glass-saturation", "6"]
    rc, _, err = _extract(capsys, slide, tmp_path / "out", *args)
    assert rc == 0, err
    with h5py.File(tmp_path / "out" / "cmu.h5") as f:
        params = json.loads(f.attrs["tissue_params"])
    assert params == {
        "mask_mpp": 8.0,
        "max_side": 2048,
        "median_um": 40.0,
        "min_saturation": 25,
        "closing_um": 16.0,
        "opening_um": 8.0,
        "max_hole_um2": 1000.0,
        "min_object_um2": 2000.0,
        "glass_saturation": 6,
        "tissue_threshold": None,
    }
    for flag, value, field in [
        ("--min-saturation", "300", "min_saturation 300: must be a saturation within 0..254"),
        ("--mask-mpp", "0", "mask_mpp 0.0: must be a positive number"),
        ("--tissue-threshold", "-1", "tissue_threshold -1: must be a saturation within"),
    ]:
        rc, _, err = _extract(capsys, slide, tmp_path / "bad", flag, value)
        assert rc == 2 and field in err and f"(flag: {flag})" in err
        assert not (tmp_path / "bad").exists()


def test_cli_defaults_are_the_library_defaults():
    """The tissue options default to TissueParams' values (each help text names it)."""
    import typer

    from sparsemil.cli.main import app

    cmd = typer.main.get_command(app).commands["wsi"].commands["extract"]
    helps = {p.name: p.help for p in cmd.params}
    defaults = TissueParams().as_dict()
    for name, value in defaults.items():
        assert name in helps, name
        if value is not None:
            assert f"(default {value:g})" in helps[name], (name, helps[name])
