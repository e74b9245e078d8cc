"""``sparsemil wsi extract`` end to end on the real slides (tiny backbone: fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sparsemil.cli.main import main
from test_wsi_tiff import write_tiled_tiff

# Patches of 256 px at 20x with >= 25 % tissue on CMU-1-Small-Region.svs (2220 x 2967,
# 8 x 11 = 88 grid cells) for the default tissue parameters; see docs/wsi.md.
CMU_PATCHES = 38
TCGA_PATCHES = 37  # with --mpp 0.25 (40x): 512-px level-0 patches, 8 x 6 = 48 cells


@pytest.fixture(scope="module")
def wsi_dir(shared_dir) -> Path:
    return shared_dir / "data" / "wsi"


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["wsi", "extract", "--backbone", "tiny", "--no-progress", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


@pytest.fixture(scope="module")
def cmu_h5(tmp_path_factory, wsi_dir) -> Path:
    out = tmp_path_factory.mktemp("cmu")
    rc = main(
        [
            "wsi", "extract", "--slide", str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--out", str(out), "--backbone", "tiny", "--workers", "0", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    return out / "CMU-1-Small-Region.h5"


def test_cmu_h5_layout_is_clam_compatible(cmu_h5, wsi_dir):
    with h5py.File(cmu_h5, "r") as f:
        assert set(f.keys()) == {"features", "coords"}
        feats, coords = f["features"], f["coords"]
        assert feats.dtype == np.float32 and feats.shape == (CMU_PATCHES, 64)
        assert coords.dtype == np.int64 and coords.shape == (CMU_PATCHES, 2)
        a = dict(coords.attrs)
        assert int(a["patch_size"]) == 256 and int(a["patch_level"]) == 0
        assert list(a["downsample"]) == [1.0, 1.0]
        assert list(a["level_dim"]) == [2220, 2967] == list(a["downsampled_level_dim"])
        assert a["name"] == "CMU-1-Small-Region"
        assert int(a["patch_size_level0"]) == 256 and float(a["target_magnification"]) == 20.0
        assert float(a["level0_magnification"]) == 20.0
        c = coords[()]
        fa = dict(feats.attrs)
        assert bool(fa["pretrained"]) is False
        assert "pipeline checks only" in fa["warning"] and fa["backbone"] == "tiny"
        assert f.attrs["resolution_source"] == "openslide.mpp-x"
        assert int(f.attrs["n_patches_tissue"]) == CMU_PATCHES
        X = feats[()]
    # level-0 grid, inside the slide, no duplicates
    assert (c % 256 == 0).all() and (c[:, 0] + 256 <= 2220).all() and (c[:, 1] + 256 <= 2967).all()
    assert len({tuple(r) for r in c}) == CMU_PATCHES
    # CLAM semantics: read_region(coord, patch_level, (patch_size,)*2) is the encoded patch
    import openslide

    from sparsemil.wsi.backbones import build_backbone
    from sparsemil.wsi.slide import to_rgb

    s = openslide.OpenSlide(str(wsi_dir / "CMU-1-Small-Region.svs"))
    enc = build_backbone("tiny", warn=False).encoder
    for i in (0, CMU_PATCHES // 2, CMU_PATCHES - 1):
        rgb = to_rgb(s.read_region(tuple(int(v) for v in c[i]), 0, (256, 256)))
        with torch.inference_mode():
            want = enc(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])[0].numpy()
        np.testing.assert_allclose(X[i], want, rtol=1e-5, atol=1e-6)
        # patches are tissue: saturated on average
        assert (rgb.max(2).astype(int) - rgb.min(2)).mean() > 20
    s.close()
    png = cmu_h5.with_name("CMU-1-Small-Region_tissue.png")
    from PIL import Image

    assert Image.open(png).size == (278, 371)  # the 4 um/px tissue mask


def test_cmu_is_deterministic_and_workers_agree(cmu_h5, wsi_dir, tmp_path, capsys):
    rc, out, err = _run(
        capsys, "--slide", str(wsi_dir / "CMU-1-Small-Region.svs"), "--out", str(tmp_path),
        "--workers", "2", "--batch-size", "7",
    )  # fmt: skip
    assert rc == 0 and f"{CMU_PATCHES} patches" in out
    with h5py.File(cmu_h5) as a, h5py.File(tmp_path / "CMU-1-Small-Region.h5") as b:
        assert np.array_equal(a["coords"][()], b["coords"][()])
        np.testing.assert_allclose(a["features"][()], b["features"][()], rtol=1e-5, atol=1e-6)


def test_tcga_needs_mpp_then_works(wsi_dir, tmp_path, capsys):
    slide = str(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs")
    rc, out, err = _run(capsys, "--slide", slide, "--out", str(tmp_path), "--workers", "0")
    assert rc == 1
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "set 'mpp'" in lines[0] and "TCGA-CR-7395" in lines[0]
    assert lines[0].endswith("(flag: --mpp)")  # the CLI names the flag of the field
    assert not (tmp_path / "TCGA-CR-7395-01A-01-TS1.h5").exists()
    rc, out, err = _run(
        capsys, "--slide", slide, "--out", str(tmp_path), "--workers", "0", "--mpp", "0.25"
    )
    assert rc == 0
    with h5py.File(tmp_path / "TCGA-CR-7395-01A-01-TS1.h5") as f:
        a = f["coords"].attrs
        assert (int(a["patch_level"]), int(a["patch_size"]), int(a["patch_size_level0"])) == (
            1,
            256,
            512,
        )
        assert float(a["level0_magnification"]) == 40.0 and f.attrs["resolution_source"] == "mpp"
        assert np.isnan(f.attrs["mpp_file"]) and f.attrs["resolution_note"] == ""
        assert f.attrs["tissue_mode"] == "otsu" and f.attrs["tissue_note"] == ""
        assert f["features"].shape == (TCGA_PATCHES, 64)
        assert (f["coords"][()] % 512 == 0).all()


def test_batch_resume_bad_files_and_shards(wsi_dir, tmp_path, capsys):
    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy(wsi_dir / "CMU-1-Small-Region.svs", src / "a_cmu.svs")
    data = (wsi_dir / "CMU-1-Small-Region.svs").read_bytes()
    (src / "b_truncated.svs").write_bytes(data[: len(data) // 2])
    (src / "c_notes.tiff").write_text("not a slide at all\n")
    bad = bytearray(data)
    bad[300_000:400_000] = b"\x5a" * 100_000  # tiles no longer decode
    (src / "d_damaged.svs").write_bytes(bytes(bad))
    out = tmp_path / "out"
    args = ["--slide", str(src), "--out", str(out), "--workers", "0", "--max-patches", "5"]
    rc, stdout, err = _run(capsys, *args)
    assert rc == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("sparsemil: error:")]
    assert len(errors) == 3
    assert "b_truncated.svs: corrupt or truncated slide file" in errors[0]
    assert "c_notes.tiff: not a slide file" in errors[1]
    assert "d_damaged.svs: corrupt slide file: cannot decode" in errors[2]
    assert "3 slide(s) failed" in err
    assert "4 slide(s): 1 extracted, 0 skipped (h5 exists), 0 without tissue, 3 failed" in stdout
    assert sorted(p.name for p in out.glob("*.h5")) == ["a_cmu.h5"]
    assert not list(out.glob(".*"))  # no temporary files left behind
    with h5py.File(out / "a_cmu.h5") as f:
        assert f["features"].shape == (5, 64) and int(f.attrs["n_patches_tissue"]) == CMU_PATCHES
    mtime = (out / "a_cmu.h5").stat().st_mtime_ns

    # resume: the finished slide is skipped, not rewritten; the bad ones fail again
    rc, stdout, err = _run(capsys, *args)
    assert rc == 1 and "skip a_cmu.svs" in stdout and "1 skipped" in stdout
    assert (out / "a_cmu.h5").stat().st_mtime_ns == mtime
    # nothing left to do: no backbone is built, so no random-init warning
    rc, stdout, err = _run(capsys, "--slide", str(src / "a_cmu.svs"), "--out", str(out))
    assert rc == 0 and "WARNING" not in err

    # shards 1/4 .. 3/4 hold only the bad files (a_cmu is slide 0)
    rc, stdout, err = _run(capsys, *args, "--shard", "2/4")
    assert rc == 1 and "c_notes.tiff" in err and "1 slide(s)" in stdout
    rc, stdout, err = _run(capsys, *args, "--shard", "4/4")
    assert rc == 2 and "--shard" in err


def test_blank_slide_warns_and_writes_no_h5(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(240, 3, size=(768, 1024, 3)), 0, 255).astype(np.uint8)
    slide = write_tiled_tiff(tmp_path / "blank.tif", img, mpp=0.5)
    rc, stdout, err = _run(capsys, "--slide", str(slide), "--out", str(tmp_path / "o"))
    assert rc == 0
    assert "warning:" in err and "no tissue found; no h5 written" in err
    assert not (tmp_path / "o" / "blank.h5").exists()
    assert (tmp_path / "o" / "blank_tissue.png").exists()


def test_bad_options_are_one_line_errors(wsi_dir, tmp_path, capsys):
    slide = str(wsi_dir / "CMU-1-Small-Region.svs")
    for extra, pat in [
        (["--batch-size", "0"], "--batch-size"),
        (["--mag", "40"], "cannot extract at 40x"),
        (["--backbone", "vgg"], "--backbone"),
        (["--weights", str(tmp_path / "nope.pt")], "--weights"),
    ]:
        rc, _, err = _run(capsys, "--slide", slide, "--out", str(tmp_path), *extra)
        assert rc in (1, 2) and pat in err, (extra, err)
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(capsys, "--slide", str(empty), "--out", str(tmp_path))
    assert rc == 2 and "no slide files in this folder" in err


def test_readers_of_the_data_package_read_our_h5(cmu_h5):
    from sparsemil.data.readers import read_bag

    bag = read_bag(cmu_h5, label=1)
    with h5py.File(cmu_h5) as f:
        np.testing.assert_array_equal(bag.features, f["features"][()])
        np.testing.assert_array_equal(bag.coords, f["coords"][()])


def test_one_bad_slide_file_is_refused_before_anything_is_written(tmp_path):
    """`wsi extract --slide notes.svs` (a text file): one-line refusal (the CLI's exit 2), no
    empty output folders -- not a failed batch of one."""
    from sparsemil.errors import SparsemilError
    from sparsemil.wsi.extract import ExtractConfig, run_extract

    fake = tmp_path / "notes.svs"
    fake.write_text("not a slide\n")
    out = tmp_path / "feats_out"
    with pytest.raises(
        SparsemilError, match=r"notes\.svs: not a slide file: it is a text file .*; fix: "
    ):
        run_extract(
            fake, out, ExtractConfig(), encoder="resnet50_trunc", weights=None, log=lambda *a: None
        )
    assert not out.exists()
