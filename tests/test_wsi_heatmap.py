"""Attention heatmaps over the real CMU slide, with torchmil ABMIL and sparsemil MMIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemil.cli.main import main
from sparsemil.errors import SparsemilError
from sparsemil.wsi.heatmap import (
    attention_heatmap,
    instance_scores,
    normalize_scores,
    thumbnail_size,
)

C = 16  # feature dimension of the synthetic bag


@pytest.fixture(scope="module")
def cmu(shared_dir) -> Path:
    return shared_dir / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _bag(n_x: int = 4, n_y: int = 5, seed: int = 0):
    """A grid of 256-px patches on CMU with random features."""
    rng = np.random.default_rng(seed)
    coords = np.array([[768 + 256 * i, 1024 + 256 * j] for j in range(n_y) for i in range(n_x)])
    feats = rng.normal(size=(coords.shape[0], C)).astype(np.float32)
    return feats, coords.astype(np.int64)


def _abmil():
    from torchmil.models import ABMIL

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ABMIL(in_shape=(C,))
    return model.eval()


def test_normalize_scores():
    s = np.array([3.0, -1.0, 10.0, 0.5])
    assert normalize_scores(s, "rank").tolist() == [2 / 3, 0.0, 1.0, 1 / 3]
    assert normalize_scores(s, "minmax") == pytest.approx((s + 1) / 11)
    assert normalize_scores(np.ones(3)).tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(SparsemilError, match="norm 'zscore': choose rank or minmax"):
        normalize_scores(s, "zscore")


def test_abmil_heatmap_size_scores_and_placement(cmu, tmp_path):
    feats, coords = _bag()
    model = _abmil()
    out = tmp_path / "hm.png"
    res = attention_heatmap(cmu, feats, coords, model, out, patch_size=256, thumb_size=512)
    # the PNG is exactly the thumbnail: longest side 512, aspect kept (2220 x 2967)
    assert thumbnail_size((2220, 2967), 512) == (383, 512)
    assert Image.open(out).size == (383, 512) == res.size
    # scores are ABMIL's own attention on the bag
    with torch.inference_mode():
        _, att = model(torch.from_numpy(feats)[None], return_att=True)
    np.testing.assert_allclose(res.scores, att[0].double().numpy(), rtol=1e-6)
    assert res.probabilities.shape == (2,) and res.probabilities.sum() == pytest.approx(1.0)
    # the top-scoring patch is drawn in the colour map's top colour, blended 50/50
    from matplotlib import colormaps

    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    plain = attention_heatmap(cmu, feats, coords, model, tmp_path / "a0.png", 256, 512, alpha=0.0)
    base = np.asarray(Image.open(plain.png).convert("RGB")).astype(float)
    top = int(np.argmax(res.scores))
    sx = 2220 / 383
    cx, cy = ((coords[top] + 128) / sx).round().astype(int)
    want = 0.5 * base[cy, cx] + 0.5 * 255 * np.array(colormaps["jet"](1.0)[:3])
    assert np.abs(img[cy, cx] - want).max() <= 3
    # outside every patch (top-left corner) the thumbnail is untouched
    assert np.abs(img[5, 5] - base[5, 5]).max() <= 1


def test_mmil_model_gets_coords(cmu, tmp_path):
    from sparsemil.mil import MMILTransformer

    feats, coords = _bag(seed=1)
    model = MMILTransformer(
        in_dim=C, n_classes=3, embed_dim=32, num_subbags=4, grouping="sequential", seed=0
    )
    scores, logits = instance_scores(model, feats, coords)
    assert scores.shape == (feats.shape[0],) and logits.shape == (1, 3)
    assert np.isfinite(scores).all() and scores.std() > 0
    res = attention_heatmap(cmu, feats, coords, model, tmp_path / "m.png", 256, thumb_size=300)
    assert Image.open(tmp_path / "m.png").size == thumbnail_size((2220, 2967), 300) == (224, 300)
    assert res.probabilities.shape == (3,)


def test_heatmap_cli_with_checkpoint(cmu, tmp_path, capsys):
    from sparsemil.data.h5 import write_h5_file
    from sparsemil.mil.checkpoint import save_mil_checkpoint
    from sparsemil.mil.factory import build_mil_model

    feats, coords = _bag(seed=2)
    h5 = tmp_path / "cmu.h5"
    geometry = {"patch_size": 256, "patch_level": 0}
    write_h5_file(h5, feats, coords, coords_attrs=geometry)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_mil_model("abmil", C)
        model(torch.zeros(1, 2, C))  # materialise lazy layers
    ckpt = save_mil_checkpoint(tmp_path / "abmil.safetensors", model, "abmil", {}, in_dim=C)
    out = tmp_path / "cli.png"
    args = ["wsi", "heatmap", "--slide", str(cmu), "--h5", str(h5), "--checkpoint", str(ckpt)]
    rc = main([*args, "--out", str(out), "--thumb-size", "400"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert Image.open(out).size == thumbnail_size((2220, 2967), 400) == (299, 400)
    assert "20 patches" in stdout and "Traceback" not in err
    # wrong feature dimension: a clear one-line error
    write_h5_file(h5, np.zeros((coords.shape[0], C + 1), np.float32), coords, coords_attrs=geometry)
    rc = main([*args, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "17-d" in err and "16-d" in err and "Traceback" not in err


def test_heatmap_applies_the_checkpoint_standardiser(cmu, tmp_path):
    """Issue example (K1): a model trained with standardisation on features far from zero
    (raw encoder scale, +50). The heatmap's slide probabilities equal ``mil predict``'s to
    1e-6, and differ from the unstandardised forward pass the heatmap used to run."""
    from sparsemil.data.h5 import write_h5_file
    from sparsemil.mil.checkpoint import save_mil_checkpoint
    from sparsemil.mil.factory import bag_probabilities, build_mil_model
    from sparsemil.train.inference import load_predictor, predict_checkpoint
    from sparsemil.wsi.heatmap import heatmap_from_checkpoint

    feats, coords = _bag(seed=3)
    feats = feats + 50.0
    h5 = tmp_path / "slide.h5"
    write_h5_file(h5, feats, coords, coords_attrs={"patch_size": 256, "patch_level": 0})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_mil_model("abmil", C)
        model(torch.zeros(1, 2, C))
    std = {"mean": feats.mean(0).tolist(), "std": (feats.std(0) + 1e-3).tolist()}
    ckpt = save_mil_checkpoint(
        tmp_path / "m.safetensors", model, "abmil", {}, {"standardize": std}, in_dim=C
    )
    res, _ = heatmap_from_checkpoint(cmu, h5, ckpt, tmp_path / "hm.png", thumb_size=200)
    rows = predict_checkpoint(load_predictor(ckpt), h5, tmp_path / "p.csv")
    assert res.probabilities[1] == pytest.approx(rows[0]["prob_1"], abs=1e-6)
    with torch.inference_mode():
        raw = bag_probabilities(model(torch.from_numpy(feats)[None]))[0, 1].item()
    assert abs(raw - res.probabilities[1]) > 1e-3  # the raw forward is a different number


def test_instance_scores_takes_dsmil_instance_scores():
    """DSMIL returns (1, N, 1) instance scores; ``instance_scores`` drops the trailing axis
    as ``Predictor`` does."""
    from sparsemil.mil.factory import build_mil_model

    feats, coords = _bag(seed=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_mil_model("dsmil", C).eval()
    with torch.inference_mode():
        _, att = model(torch.from_numpy(feats)[None], return_att=True)
    assert tuple(att.shape) == (1, 20, 1)
    scores, logits = instance_scores(model, feats, coords)
    assert scores.shape == (20,) and logits.shape == (1,)
    np.testing.assert_allclose(scores, att[0, :, 0].double().numpy(), rtol=1e-6)


def test_dtfdmil_has_no_attention_one_line_error(cmu, tmp_path, capsys):
    """DTFD-MIL's forward takes no ``return_att``: every attention consumer says so in one
    line (no TypeError); plain prediction still works."""
    from sparsemil.data.h5 import write_h5_file
    from sparsemil.mil.checkpoint import save_mil_checkpoint
    from sparsemil.mil.factory import build_mil_model
    from sparsemil.train.inference import attention_auc, load_predictor

    feats, coords = _bag(seed=5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_mil_model("dtfdmil", C)
        model(torch.zeros(1, 2, C), mask=torch.ones(1, 2, dtype=torch.bool))  # lazy layers
    msg = r"model dtfdmil \(DTFD-MIL\) has no attention: .*use a model with attention \(mmil, "
    with pytest.raises(SparsemilError, match=msg):
        instance_scores(model.eval(), feats, coords)
    ckpt = save_mil_checkpoint(tmp_path / "d.safetensors", model, "dtfdmil", {}, in_dim=C)
    predictor = load_predictor(ckpt)
    probs, att = predictor(feats, coords)
    assert att is None and probs.shape == (2,)
    with pytest.raises(SparsemilError, match=msg):
        predictor(feats, coords, return_att=True)
    with pytest.raises(SparsemilError, match=msg):
        attention_auc(predictor, [], [])
    h5 = tmp_path / "cmu.h5"
    write_h5_file(h5, feats, coords, coords_attrs={"patch_size": 256, "patch_level": 0})
    out = tmp_path / "hm.png"
    rc = main(["wsi", "heatmap", "--slide", str(cmu), "--h5", str(h5), "--checkpoint",
               str(ckpt), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "dtfdmil (DTFD-MIL) has no attention" in err and not out.exists()
