"""``sparsemil mil synth``: a slide-scale MIL cohort from real images, end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sparsemil.cli.main import main
from sparsemil.data import load_bag_source, read_h5_file
from sparsemil.data.synth import SynthConfig, parse_rates, synth_cohort
from sparsemil.train.inference import attention_auc, load_predictor
from test_wsi_tiff import write_tiled_tiff

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Digits, small slides (median 300 instances); tumour = digit 0 among digits 1 and 2.
SMALL = ["--size", "small", "--images", "digits", "--n-train", "20", "--n-test", "6",
         "--positive-fraction", "0.5", "--tumour-class", "0", "--normal-classes", "1,2",
         "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "c"
    assert main(["mil", "synth", "--out", str(out), "--witness-rate", "5%", *SMALL]) == 0
    return out


def _slides(d: Path) -> dict[str, dict]:
    return {s["slide_id"]: s for s in json.loads((d / "cohort.json").read_text())["slides"]}


def test_files_layout_labels_and_manifest(cohort: Path):
    m = json.loads((cohort / "cohort.json").read_text())
    assert m["summary"]["n_bags"] == 26 and m["summary"]["n_positive"] == 13
    assert m["images"] == {"dataset": "digits", "tumour_class": "0",
                           "normal_classes": ["1", "2"], "train_pool": 1078, "test_pool": 360}  # fmt: skip
    assert m["encoder"]["kind"] == "pca-whiten" and m["encoder"]["dim"] == 32
    assert 0.95 < m["linear_probe"]["auc"] <= 1.0  # digit 0 among 1 and 2 is easy
    labels = {r["slide_id"]: int(r["label"]) for r in csv.DictReader(open(cohort / "labels.csv"))}
    assert len(labels) == 26 and sum(labels.values()) == 13
    for sid, s in _slides(cohort).items():
        bag = read_h5_file(cohort / "h5_files" / f"{sid}.h5", need_coords=True)
        assert bag.features.shape == (s["n_instances"], 32) and bag.features.dtype == np.float32
        assert bag.patch_size_level0() == 256 and bag.coords.dtype == np.int64
        assert (bag.coords % 256 == 0).all() and len(np.unique(bag.coords, axis=0)) == len(bag.coords)
        w, h = (int(v) for v in bag.coords_attrs["level_dim"])
        assert (bag.coords >= 256).all() and (bag.coords[:, 0] + 256 < w).all()  # 1-cell margin
        assert (bag.coords[:, 1] + 256 < h).all()
        order = np.lexsort((bag.coords[:, 0], bag.coords[:, 1]))  # raster order, as CLAM
        assert (order == np.arange(len(order))).all()
        assert labels[sid] == s["label"] == int(bag.labels.sum() > 0)
        assert 60 <= s["n_instances"] <= 1000  # the small preset's bounds
    split = (cohort / "split.csv").read_text().splitlines()
    assert split[0] == "train,train_label,test,test_label" and len(split) == 21


def test_witness_fraction_and_contiguous_regions(tmp_path: Path):
    out = tmp_path / "rates"
    assert main(["mil", "synth", "--out", str(out), "--witness-rate", "0.002,0.01,0.05",
                 "--max-regions", "3", *SMALL]) == 0  # fmt: skip
    dirs = {w: out / f"w{w}" for w in ("0.002", "0.01", "0.05")}
    assert json.loads((out / "cohorts.json").read_text())["cohorts"] == {
        w: d.name for w, d in dirs.items()
    }
    facts = {w: _slides(d) for w, d in dirs.items()}
    n_regions = []
    for sid, s in facts["0.05"].items():
        masks = {}
        for w, d in dirs.items():
            bag = read_h5_file(d / "h5_files" / f"{sid}.h5")
            k = int(bag.labels.sum())
            assert k == facts[w][sid]["n_witness"]
            if s["label"] == 0:
                assert k == 0
                continue
            n = s["n_instances"]
            assert k == max(1, round(float(w) * n)) and abs(k / n - float(w)) <= 1 / n
            cells = bag.coords[bag.labels == 1] // 256
            grid = np.zeros(cells.max(axis=0) + 2, bool)
            grid[cells[:, 0], cells[:, 1]] = True
            _, n_parts = ndimage.label(grid)  # 4-connected components
            assert 1 <= n_parts <= facts[w][sid]["n_regions"] <= 3
            masks[w] = bag.labels == 1
            if w == "0.05":
                n_regions.append(facts[w][sid]["n_regions"])
        if masks:  # the same slides at every rate; lower rates are inside the higher ones
            assert not (masks["0.002"] & ~masks["0.01"]).any()
            assert not (masks["0.01"] & ~masks["0.05"]).any()
    assert max(n_regions) > 1  # several regions happen


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path):
    def make(name: str, seed: int) -> dict[str, bytes]:
        cfg = SynthConfig(out=str(tmp_path / name), seed=seed, size="small", images="digits",
                          n_train=4, n_test=2, witness_rate=[0.05])  # fmt: skip
        synth_cohort(cfg)
        root = tmp_path / name
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}

    a, b, c = make("a", 3), make("b", 3), make("c", 4)
    assert len(a) == 6 + 5 and a == b  # 6 h5 files, 4 CSVs, cohort.json
    assert a["cohort.json"] != c["cohort.json"]
    assert a["h5_files/train_0000.h5"] != c["h5_files/train_0000.h5"]


def test_train_test_predict_heatmap_and_attention_localisation(cohort: Path, tmp_path: Path):
    """ABMIL trained on the cohort through the CLI; its attention finds the tumour."""
    run = tmp_path / "run"
    args = ["mil", "train", "--data", str(cohort / "split.csv"), "--model", "abmil",
            "--model-kwargs", '{"feat_ext_dim": 64}', "--max-epochs", "30", "--lr", "1e-3",
            "--no-early-stopping", "--threads", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    ckpt = run / "model.safetensors"
    predictor = load_predictor(ckpt)
    src = load_bag_source(cohort / "split.csv")
    test = src.splits[0].test.tolist()
    loc = attention_auc(predictor, src.bags, test)
    assert loc["n_bags"] == 3 and loc["mean"] > 0.8, loc
    assert main(["mil", "test", "--checkpoint", str(ckpt), "--data", str(cohort / "split.csv"),
                 "--out", str(tmp_path / "test")]) == 0  # fmt: skip
    m = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert m["n_bags"] == 6 and m["auc"]["mean"] > 0.8
    preds = tmp_path / "pred.csv"
    assert main(["mil", "predict", "--checkpoint", str(ckpt), "--data",
                 str(cohort / "h5_files"), "--out", str(preds)]) == 0  # fmt: skip
    assert len(preds.read_text().splitlines()) == 27
    # wsi heatmap over a stand-in slide of the recorded level-0 size (grey tissue cells)
    sid = next(sid for sid, s in _slides(cohort).items() if s["part"] == "test" and s["label"])
    h5 = cohort / "h5_files" / f"{sid}.h5"
    bag = read_h5_file(h5)
    w, h = (int(v) for v in bag.coords_attrs["level_dim"])
    slide = np.full((h // 16, w // 16, 3), 255, np.uint8)  # 16 px per patch, scaled below
    for x, y in bag.coords // 16:
        slide[y : y + 16, x : x + 16] = 180
    slide = np.kron(slide, np.ones((16, 16, 1), np.uint8))  # level 0: 256 px per patch
    tif = write_tiled_tiff(tmp_path / f"{sid}.tif", slide, mpp=0.5)
    png = tmp_path / "hm.png"
    assert main(["wsi", "heatmap", "--slide", str(tif), "--h5", str(h5), "--checkpoint",
                 str(ckpt), "--out", str(png), "--thumb-size", "256", "--device", "cpu"]) == 0  # fmt: skip
    assert max(Image.open(png).size) == 256


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--witness-rate", "0.7"], r"'witness_rate' 0\.7 must be in \(0, 0\.5\] \(flag: --witness-rate\)"),
        (["--witness-rate", "1x"], r"witness_rate '1x' is not a number.*\(flag: --witness-rate\)"),
        (["--size", "huge"], r"'size' 'huge' is not a preset; valid: cpu, large, medium, small \(flag: --size\)"),
        (["--images", "fashion"], r"'images' 'fashion' is not supported; did you mean 'fashion-mnist'\?"),
        (["--tumour-class", "coats"], r"'tumour_class' 'coats' is not a class; did you mean 'coat'\?"),
        (["--normal-classes", "coat,bag"], r"'normal_classes' includes the tumour class 'coat'"),
        (["--n-train", "1"], r"'n_train' must be >= 2 \(got 1\) \(flag: --n-train\)"),
        (["--dim", "900"], r"'dim' must be in 1\.\.784 for fashion-mnist \(got 900\)"),
    ],
)  # fmt: skip
def test_bad_option_is_one_line_naming_the_flag(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    assert main(["mil", "synth", "--out", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sparsemil: error: ")
    assert re.search(message, err), err
    assert not out.exists()  # checked before anything is read or written


def test_existing_cohort_is_refused_unless_overwrite(cohort: Path, capsys):
    assert main(["mil", "synth", "--out", str(cohort), *SMALL]) == 2
    assert "already holds a cohort" in capsys.readouterr().err


def test_parse_rates():
    assert parse_rates("0.2%, 1%,0.05") == pytest.approx([0.002, 0.01, 0.05])
