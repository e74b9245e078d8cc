"""Slide files OpenSlide cannot read: readable images in another layout say what they are
and how to convert them; only damaged files are called corrupt (issue K4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsemil.cli.main import main
from sparsemil.errors import SparsemilError
from sparsemil.wsi.slide import open_slide, tiff_layout
from test_wsi_tiff import write_tiled_tiff

RGB = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
CONVERT = "convert it to a tiled pyramidal TIFF, e.g. with libvips: vips tiffsave IN OUT.tif"


def _refused(path: Path) -> str:
    with pytest.raises(SparsemilError, match=str(path.name)) as e:
        open_slide(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_deflate"])
def test_strip_tiff_is_not_called_corrupt(tmp_path: Path, compression):
    """A TIFF as image editors and cameras write it (strips, no tiles): OpenSlide refuses
    it, and it used to be reported as "corrupt or truncated ... re-download"."""
    p = tmp_path / "snapshot.tif"
    Image.fromarray(RGB).save(p, compression=compression)
    assert tiff_layout(p) is not None and tiff_layout(p)["tiled"] is False
    msg = _refused(p)
    assert msg.startswith(f"{p}: a 400x300 TIFF image stored in strips (not tiled)")
    assert CONVERT in msg and "corrupt" not in msg and "re-download" not in msg


@pytest.mark.parametrize(("fmt", "kind"), [("PNG", "a PNG image"), ("JPEG", "a JPEG image")])
def test_plain_images(tmp_path: Path, fmt: str, kind: str):
    p = tmp_path / f"region.{fmt.lower()}"
    Image.fromarray(RGB).save(p, format=fmt)
    msg = _refused(p)
    assert msg.startswith(f"{p}: {kind}, not a whole-slide image") and CONVERT in msg


def test_truncated_tiled_tiff_is_corrupt(tmp_path: Path):
    good = write_tiled_tiff(tmp_path / "good.tif", RGB, mpp=0.5)
    assert tiff_layout(good) == {
        "width": 400,
        "height": 300,
        "tiled": True,
        "compression": 1,
        "samples": 3,
        "bits": 8,
        "pages": 1,
    }
    data = good.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:8] + bytes(len(data) // 2))  # the directory is gone
    assert tiff_layout(cut) is None
    assert "corrupt or truncated slide file" in _refused(cut)


def test_extract_reports_the_layout(tmp_path: Path, capsys):
    p = tmp_path / "snapshot.tif"
    Image.fromarray(RGB).save(p)
    rc = main(["wsi", "extract", "--slide", str(p), "--out", str(tmp_path / "o"), "--backbone"]
              + ["tiny", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    # one slide that OpenSlide cannot open is bad input: exit 2, one line, nothing written
    assert rc == 2 and "TIFF image stored in strips (not tiled)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
