"""``sparsemil prune train`` and ``sparsemil prune sweep`` end to end on digits (tiny MLP)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sparsemil.cli.main import main
from sparsemil.experiments.vision.models import load_checkpoint


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and robust on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_train_then_sweep(tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: mlp\nwidths: [64, 32]\ndataset: digits\nepoch: 4\nlr: 0.05\nlmbda: 1e-4\n"
        "batch_size: 64\nsparse_epoch: 40\nseed: 0\n"
    )
    out = tmp_path / "run"
    assert main(["prune", "train", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    ckpt = out / "model.safetensors"
    model, meta = load_checkpoint(ckpt)
    assert meta["model"] == "mlp" and meta["in_shape"] == [1, 8, 8]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["test_acc"]) == 4 and hist["test_acc"][-1] > 0.85

    assert (
        main(
            [
                "prune",
                "sweep",
                "--config",
                str(cfg),
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "bytes" in text and "drop_1pt" in text
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40 and float(rows[1]["ratio"]) == 0.025
    summary = json.loads((out / "sweep.json").read_text())
    assert set(summary["actual_ratio"]) == {"drop_1pt", "official", "train_loss_eps"}
    assert summary["default_criterion"] == "drop_1pt"
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ratio = summary["actual_ratio"]["drop_1pt"]
    assert ratio is not None and 0.0 < ratio < 1.0
    exp = summary["export"]
    assert exp["sparse_bytes"] < exp["dense_bytes"]
    pruned, _ = load_checkpoint(out / "pruned_sparse.safetensors")
    n_zero = sum(int((m.weight == 0).sum()) for m in pruned.linear if hasattr(m, "weight"))
    assert n_zero >= int(ratio * summary["n_weights"])
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_unknown_key_exits_2(tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: fc\nlmbdaa: 1\n")
    assert main(["prune", "train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lmbda'" in err and not (tmp_path / "o").exists()
