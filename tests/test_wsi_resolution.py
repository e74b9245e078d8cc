"""Resolution metadata is checked, never trusted when absurd (issue K4, first part).

OpenSlide turns a TIFF whose only resolution tag is a screen's 72 dpi into
``openslide.mpp-x = 352.8`` um/px. That used to become a level-0 magnification of 0.028x,
the advice "set mag to 0.028 or lower", and, following it, 9 meaningless patches with exit
status 0. Pixel sizes outside 0.05-20 um/px now count as missing, ``mpp`` always overrides
the file and the h5 records where the pixel size came from.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from sparsemil.cli.main import main
from sparsemil.errors import SparsemilError
from sparsemil.wsi.slide import (
    MAG_RANGE,
    MPP_RANGE,
    check_mag,
    open_slide,
    patch_geometry,
    resolve_resolution,
)
from test_wsi_tiff import write_tiled_tiff

PINK = (200, 90, 170)


def _slide(tmp_path: Path, **resolution) -> Path:
    """768 x 1024 glass with a 512 x 512 pink square at (256, 256): 2 x 2 patches of 256 px."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(242, 2, size=(768, 1024, 3)), 0, 255).astype(np.uint8)
    img[256:768, 256:768] = PINK
    return write_tiled_tiff(tmp_path / "screen.tif", img, **resolution)


def _extract(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["wsi", "extract", "--backbone", "tiny", "--no-progress", "--workers", "0", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


class _Props:
    """A stand-in for an OpenSlide handle: only ``properties``."""

    def __init__(self, **props: str) -> None:
        self.properties = {f"openslide.{k.replace('_', '-')}": v for k, v in props.items()}


def test_screen_dpi_is_no_pixel_size(tmp_path: Path, capsys):
    """Issue example: the 72 dpi TIFF. Right: refused with a request for mpp (no absurd
    magnification advised), the advised --mag 0.028 refused, and --mpp extracts the 4
    tissue patches with the h5 recording the source."""
    slide = _slide(tmp_path, dpi=72)
    s = open_slide(slide)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(352.78, abs=0.01)
    with pytest.raises(
        SparsemilError,
        match=r"records its pixel size 352\.778 um/px \(openslide\.mpp-x\), outside the "
        r"plausible range of a microscope scan \(0\.05-20 um/px, 0\.5-200x; e\.g\. a screen "
        r"resolution of 72 dpi\); set 'mpp' to",
    ):
        resolve_resolution(s, slide)
    s.close()

    out = tmp_path / "out"
    rc, _, err = _extract(capsys, "--slide", str(slide), "--out", str(out))
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 1 and len(errors) == 1
    assert "352.778 um/px" in errors[0] and errors[0].endswith("(flag: --mpp)")
    assert "'mag'" not in errors[0] and "0.028" not in errors[0]
    assert not list(out.glob("*.h5"))

    rc, _, err = _extract(capsys, "--slide", str(slide), "--out", str(out), "--mag", "0.028")
    assert rc == 2 and "mag 0.028: must be a magnification within 0.5-200x" in err
    assert "(flag: --mag)" in err and not list(out.glob("*.h5"))

    rc, stdout, err = _extract(capsys, "--slide", str(slide), "--out", str(out), "--mpp", "0.5")
    assert rc == 0 and "screen.tif: 4 patches" in stdout
    assert "warning:" in err and "mpp 0.5 overrides the file's openslide.mpp-x 352.778" in err
    with h5py.File(out / "screen.h5") as f:
        assert f.attrs["resolution_source"] == "mpp" and f.attrs["mpp0"] == 0.5
        assert f.attrs["mpp_file"] == pytest.approx(352.78, abs=0.01)
        assert "overrides" in f.attrs["resolution_note"]
        assert f["coords"][()].tolist() == [[256, 256], [512, 256], [256, 512], [512, 512]]
        assert float(f["coords"].attrs["level0_magnification"]) == 20.0


def test_user_mpp_always_overrides_and_is_checked(tmp_path: Path, capsys):
    slide = _slide(tmp_path, mpp=0.25)  # the file says 40x
    out = tmp_path / "out"
    rc, _, err = _extract(capsys, "--slide", str(slide), "--out", str(out), "--mpp", "0.5")
    assert rc == 0 and "overrides the file's openslide.mpp-x 0.25" in err
    with h5py.File(out / "screen.h5") as f:
        assert f.attrs["resolution_source"] == "mpp" and f.attrs["mpp_file"] == 0.25
        assert f["features"].shape[0] == 4  # 256-px patches: the user's 20x, not the file's 40x
    for bad in ("352.8", "0.001"):
        rc, _, err = _extract(capsys, "--slide", str(slide), "--out", str(out), "--mpp", bad)
        assert rc == 2 and f"mpp {float(bad):g}: outside the plausible range" in err
        assert "(flag: --mpp)" in err


@pytest.mark.parametrize(
    ("props", "mpp", "want"),
    [
        ({"mpp_x": "0.2495", "mpp_y": "0.2505"}, None, ("openslide.mpp-x", 40.0, "")),
        ({"mpp_x": "20"}, None, ("openslide.mpp-x", 0.5, "")),  # the range is inclusive
        ({"mpp_x": "0.05"}, None, ("openslide.mpp-x", 200.0, "")),
        (
            {"mpp_x": "352.8", "objective_power": "20"},
            None,
            (
                "openslide.objective-power",
                20.0,
                "ignored its pixel size 352.8 um/px (openslide.mpp-x): implausible",
            ),
        ),
        ({"mpp_x": "0.25"}, 0.25, ("mpp", 40.0, "")),  # agreeing: no note
        ({}, 0.5, ("mpp", 20.0, "")),
    ],
)
def test_resolution_sources(props, mpp, want):
    res = resolve_resolution(_Props(**props), "s.tif", mpp=mpp)
    assert (res.source, res.mag0, res.note) == want


@pytest.mark.parametrize(
    ("props", "pattern"),
    [
        ({"mpp_x": "0.001"}, r"pixel size 0\.001 um/px \(openslide\.mpp-x\), outside"),
        ({"mpp_x": "100"}, r"pixel size 100 um/px"),  # 100 px/cm
        ({"objective_power": "1000"}, r"objective power 1000x \(openslide\.objective-power\)"),
        ({"objective_power": "0.01"}, r"objective power 0\.01x"),
        ({}, r"records neither its pixel size .* nor its objective power"),
    ],
)
def test_implausible_or_missing_metadata_asks_for_mpp(props, pattern):
    with pytest.raises(SparsemilError, match=pattern) as e:
        resolve_resolution(_Props(**props), "s.tif")
    assert "set 'mpp' to the micrometres per level-0 pixel" in str(e.value)


def test_no_absurd_magnification_is_accepted_or_advised():
    assert MPP_RANGE == (0.05, 20.0) and MAG_RANGE == (0.5, 200.0)
    for bad in (0.028, 0.0, -1.0, 1000.0):
        with pytest.raises(SparsemilError, match="must be a magnification within 0.5-200x"):
            check_mag(bad)
    # the lowest plausible scan (20 um/px = 0.5x) advises at most its own 0.5x
    res = resolve_resolution(_Props(mpp_x="20"), "s.tif")

    class _Slide:
        level_downsamples = (1.0,)

    with pytest.raises(SparsemilError, match=r"set 'mag' to 0\.5 or lower"):
        patch_geometry(_Slide(), res, 20, 256, "s.tif")
