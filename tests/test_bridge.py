"""The bridge (MIL pruning limit) and the offline demo, on real Musk1 bags."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sparsemil.cli.main import main
from sparsemil.curvature.hvp import HessianOperator
from sparsemil.data.mil_benchmarks import load_mil_benchmark
from sparsemil.errors import SparsemilError
from sparsemil.experiments.mil_bridge import (
    MILBags,
    bag_loss_fn,
    deterministic_grouping,
    make_evaluator,
    mil_limit,
)
from sparsemil.mil.mmil import MMILTransformer


def _musk_bags(n: int = 12) -> list[dict[str, torch.Tensor]]:
    bags = load_mil_benchmark("musk1")
    feats = np.concatenate([b.features for b in bags])
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    pick = [b for b in bags if b.features.shape[0] >= 4][:n]
    return [
        {
            "X": torch.from_numpy((b.features - mu) / sd).float().unsqueeze(0),
            "Y": torch.tensor([b.label]),
        }
        for b in pick
    ]


def _model() -> MMILTransformer:
    torch.manual_seed(0)
    return MMILTransformer(
        166, n_classes=2, embed_dim=32, num_subbags=2, num_layers=1, grouping="random", seed=3
    ).eval()


def test_hvp_over_bags_is_deterministic_with_sequential_grouping():
    bags = _musk_bags()
    assert len({b["X"].shape[1] for b in bags}) > 1  # bags of varying size, no padding
    model = _model()
    v = torch.randn(
        sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1)
    )
    with deterministic_grouping(model):
        op = HessianOperator(model, bag_loss_fn, bags, method="autograd")
        h1, h2 = op.matvec(v), op.matvec(v)
    assert model.grouping == "random"  # restored
    assert torch.equal(h1, h2)
    assert float(h1.norm()) > 0
    # The operator is the mean over bags of the per-bag Hessians.
    with deterministic_grouping(model):
        per_bag = [
            HessianOperator(model, bag_loss_fn, [b], method="autograd").matvec(v) for b in bags
        ]
    torch.testing.assert_close(h1, torch.stack(per_bag).mean(0), rtol=1e-4, atol=1e-6)
    # With random grouping the same products differ: determinism comes from the context,
    # and the operator's construction check refuses the random model (issue 14, P1).
    with pytest.raises(SparsemilError, match="two products of one vector differ"):
        HessianOperator(model, bag_loss_fn, bags, method="autograd")
    op_r = HessianOperator(model, bag_loss_fn, bags, method="autograd", check=False)
    assert not torch.equal(op_r.matvec(v), op_r.matvec(v))


def test_mil_limit_writes_limit_json(tmp_path):
    bags = _musk_bags(16)
    data = MILBags(train=bags[:10], eval=bags[10:], n_classes=2, source="musk1", eval_split="test")
    model = _model()
    ev = make_evaluator(data)(model)
    assert 0.0 <= ev["test_acc"] <= 1.0 and ev["train_loss"] > 0
    before = [p.detach().clone() for p in model.parameters()]
    doc = mil_limit(model, data, tmp_path, n_ratios=8, lanczos_iter=6, progress=False)
    for p, q in zip(before, model.parameters(), strict=True):  # w* restored after the sweep
        assert torch.equal(p, q)
    saved = json.loads((tmp_path / "limit.json").read_text())
    assert saved["default_criterion"] == "drop_1pt"
    assert set(saved["actual_ratio"]) == {"drop_1pt", "official", "train_loss_eps"}
    assert saved["D"] == sum(p.numel() for p in model.parameters())
    assert saved["epsilon"] == pytest.approx(doc["dense"]["train_loss_std"])
    for f in ("predict.png", "acc_loss.png", "esd.png", "sweep.csv"):
        assert (tmp_path / f).stat().st_size > 0


def test_prune_mil_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    rc = main(
        [
            "prune",
            "mil",
            "--checkpoint",
            str(tmp_path / "nope.safetensors"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "nope.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "limit.json").exists()


def test_demo_tiny_end_to_end(tmp_path, capsys, shared_dir):
    out = tmp_path / "demo"
    slide = shared_dir / "data" / "wsi" / "CMU-1-Small-Region.svs"
    rc = main(["demo", "--preset", "tiny", "--out", str(out), "--no-progress",
               "--slide", str(slide)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "MIL comparison" in text and "Pruning limit" in text and "Slide scale" in text
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/') == 8  # self-contained: every figure embedded
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in summary["mil_cv"]] == ["mmil", "abmil", "dsmil"]
    for key in ("mil_limit", "vision_limit"):
        assert set(summary[key]["actual_ratio"]) == {"drop_1pt", "official", "train_loss_eps"}
    # every figure is shown at its physical size (text at its point size), within the page
    widths = [int(w) for w in re.findall(r'<figure style="width:(\d+)px">', html)]
    assert len(widths) == 8 and all(300 <= w <= 1000 for w in widths), widths
    # the real slide: wsi extract's tissue mask and patch grid (38 of 88 patches of 256 px)
    real = summary["real_slide"]
    assert (real["dimensions"], real["n_grid"], real["n_patches"]) == ([2220, 2967], 88, 38)
    assert 0.2 < real["tissue_fraction"] < 0.5 and (out / "slide" / "tissue_patches.jpg").is_file()
    assert "<b>38 of 88</b>" in html
    # the slide-scale cohort: MMIL against ABMIL, bag AUC and attention localisation
    syn = summary["slide_scale"]
    assert syn["cohort"]["witness_rate"] == 0.05 and syn["recipe"]["batch_size"] == 1
    assert [m["model"] for m in syn["models"]] == ["mmil", "abmil"]
    for m in syn["models"]:
        assert m["loc_bags"] == 3 and m["loc_auc"] > 0.5, m
        assert (
            f"<td>{m['display_name']}</td><td>{m['accuracy']:.3f}</td><td>{m['auc']:.3f}</td>"
            in html
        )
        assert f"{m['loc_auc']:.3f} ± " in html and f"{m['loc_auc']:.3f}" in text
    assert (out / "synth" / "attention.png").is_file() and syn["heatmap_slide"] in html
    # A second run into the same (non-empty) folder is refused, not overwritten.
    assert main(["demo", "--preset", "tiny", "--out", str(out)]) == 2


def test_demo_missing_slide_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--preset", "tiny", "--out", str(out), "--slide", str(tmp_path / "x.svs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "x.svs: no such file" in err and err.count("\n") == 0
    assert not out.exists()


def test_prune_run_accepts_a_mil_config(tmp_path):
    cfg = tmp_path / "mil.yaml"
    cfg.write_text(
        "mil:\n  data: musk1\n  model: abmil\n  lmbda: 1.0e-4\n  max_epochs: 2\n  batch_size: 8\n"
        "  folds: 4\n  progress: false\nsparse_epoch: 10\nlanczos_iter: 8\nseed: 0\n"
    )
    assert (
        main(["prune", "run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    )
    doc = json.loads((tmp_path / "o" / "limit.json").read_text())
    assert doc["model"] == "abmil" and doc["lmbda"] == 1e-4
    assert doc["hessian"]["bags"] > 0 and doc["n_eval_bags"] > 0
    assert (tmp_path / "o" / "train" / "model.safetensors").is_file()


def test_prune_run_mil_config_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mil:\n  data: musk1\n  modle: abmil\n")
    rc = main(["prune", "run", "--config", str(cfg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "modle" in err and "model" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "limit.json").exists()
