"""Issue 14, P3 and P5: non-finite or useless training never passes silently, and arguments
are checked where they enter (``device``, config keys, one config for train and run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsemil.cli.main import main
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.models import build_model
from sparsemil.limit.predict import chance_warning, loss_epsilon
from sparsemil.prune.export import save_checkpoint
from sparsemil.prune.magnitude import prune_model
from sparsemil.prune.sweep import pruning_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = (
    "model: mlp\nwidths: [32]\ndataset: digits\nbatch_size: 64\nepoch: {epoch}\nlr: {lr}\n"
    "lmbda: 0.0005\nsparse_epoch: 20\nlanczos_iter: 8\nseed: 0\n"
)


def _cfg(tmp_path, lr: float = 0.05, epoch: int = 2, extra: str = "") -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE.format(lr=lr, epoch=epoch) + extra)
    return str(path)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsemil: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _nan_checkpoint(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, widths=[32])
    with torch.no_grad():
        model.linear[0].weight[0, :3] = float("nan")
    meta = {"model": "mlp", "in_shape": [1, 8, 8], "num_classes": 10, "widths": [32]}
    return save_checkpoint(tmp_path / "nan.safetensors", model, meta), model


def test_training_stops_at_the_first_non_finite_loss(tmp_path, capsys) -> None:
    """lr = 1000: before, `prune train` exited 0 with NaN weights and `prune run` blamed
    "all batch losses equal"; now both stop with one line and write no model."""
    cfg = _cfg(tmp_path, lr=1000.0)
    out = tmp_path / "t"
    assert main(["prune", "train", "--config", cfg, "--out", str(out), "--quiet"]) == 2
    _one_line_error(capsys, "training diverged", "lr 1000", "config key 'lr'")
    assert not (out / "model.safetensors").exists()
    assert main(["prune", "run", "--config", cfg, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = _one_line_error(capsys, "training diverged")
    assert "all equal" not in err
    assert not (tmp_path / "r" / "limit.json").exists()


def test_non_finite_checkpoint_is_refused_by_sweep_and_export(tmp_path, capsys) -> None:
    """Before: `prune sweep` reported a limit of 0.95 (NaN magnitudes sort last) and
    `prune export` wrote the file."""
    ckpt, model = _nan_checkpoint(tmp_path)
    cfg = _cfg(tmp_path)
    sweep = ["prune", "sweep", "--config", cfg, "--checkpoint", str(ckpt), "--quiet"]
    assert main([*sweep, "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "nan.safetensors", "'linear.0.weight' has NaN/Inf")
    assert not (tmp_path / "s" / "sweep.json").exists()
    out = tmp_path / "e.safetensors"
    export = ["prune", "export", "--checkpoint", str(ckpt), "--ratio", "0.5", "--out", str(out)]
    assert main(export) == 2
    _one_line_error(capsys, "NaN/Inf")
    assert not out.exists()
    # the Python API refuses as well: sweep, masks, epsilon
    with pytest.raises(SparsemilError, match="Linear.weight has 3 NaN/Inf entries"):
        pruning_sweep(model, lambda m: {"test_acc": 0.0}, [0.5], progress=False)
    with pytest.raises(SparsemilError, match="NaN/Inf entries"):
        prune_model(model, 0.5)
    with pytest.raises(SparsemilError, match="1 of 3 per-batch training losses are NaN/Inf"):
        loss_epsilon([0.1, float("nan"), 0.3])


def test_chance_level_accuracy_is_warned(tmp_path, capsys) -> None:
    """lr = 1e-7: the model stays at chance; the prediction comes with a warning in
    limit.json and on the console."""
    cfg = _cfg(tmp_path, lr=1e-7, extra="limit:\n  threads: 1\n")
    out = tmp_path / "r"
    assert main(["prune", "run", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "limit.json").read_text())
    assert doc["dense"]["test_acc"] < 0.15
    assert doc["warnings"][0].startswith("chance-level accuracy")
    assert all(w.startswith(("premise:", "uncertainty:")) for w in doc["warnings"][1:])
    assert "warning: chance-level accuracy" in capsys.readouterr().err


def test_chance_warning_rule() -> None:
    balanced = np.repeat(np.arange(10), 36)  # n = 360, chance 0.1, 3 sigma = 0.047
    assert chance_warning(0.12, balanced) is not None
    assert chance_warning(0.05, balanced) is not None
    assert chance_warning(0.2, balanced) is None
    skewed = np.array([0] * 900 + [1] * 100)  # always predicting class 0 scores 0.9
    assert "chance (0.9000, 2 classes, n=1000)" in chance_warning(0.92, skewed)
    assert chance_warning(0.95, skewed) is None
    assert chance_warning(float("nan"), balanced) is None


@pytest.mark.parametrize("command", ["train", "sweep", "run"])
def test_device_cuda_without_cuda_exits_2(tmp_path, capsys, monkeypatch, command) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg(tmp_path, extra="device: cuda\n")
    args = ["prune", command, "--config", cfg, "--out", str(tmp_path / "o"), "--quiet"]
    if command == "sweep":
        args += ["--checkpoint", str(tmp_path / "missing.safetensors")]
    assert main(args) == 2
    _one_line_error(capsys, "config key 'device' 'cuda': no CUDA device is visible")
    assert not (tmp_path / "o").exists()
    # --device overrides a file written for another machine
    if command == "train":
        assert main([*args, "--device", "cpu"]) == 0


def test_device_values_are_checked() -> None:
    from sparsemil.errors import resolve_device
    from sparsemil.experiments.vision.config import config_from_dict

    with pytest.raises(SparsemilError, match="key 'device': must be auto, cpu, cuda"):
        config_from_dict({"device": "cudaa"})
    with pytest.raises(SparsemilError, match="'tpu': not a torch device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SparsemilError, match="'cuda:3': no CUDA device is visible"):
            resolve_device("cuda:3")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(SparsemilError, match=f"only {n} CUDA device"):
            resolve_device(f"cuda:{n}")


def test_one_config_serves_train_and_run(tmp_path, capsys) -> None:
    """A config with a `limit:` section trains with `prune train` (the section is for
    `prune run`, which reads the same file)."""
    cfg = _cfg(tmp_path, epoch=1, extra="limit:\n  hessian_samples: 256\n  negative: flat\n")
    out = tmp_path / "t"
    assert main(["prune", "train", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["limit"]["hessian_samples"] == 256
    assert main(["prune", "run", "--config", cfg, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "r" / "limit.json").read_text())
    assert doc["options"]["negative"] == "flat" and doc["hessian"]["samples"] == 256
    capsys.readouterr()  # the run's own warnings (premises) are not under test here
    # unknown keys anywhere in the file: one line, exit 2, for both commands
    for extra, hint in (("lmbdaa: 1\n", "'lmbda'"), ("limit:\n  negativ: flat\n", "'negative'")):
        bad = _cfg(tmp_path, extra=extra)
        for command in ("train", "run"):
            assert main(["prune", command, "--config", bad, "--out", str(tmp_path / "x")]) == 2
            _one_line_error(capsys, "unknown key", f"did you mean {hint}")


def test_run_needs_two_mini_batches_before_training(tmp_path, capsys) -> None:
    """epsilon needs >= 2 mini-batches: said before training, naming the key."""
    cfg = _cfg(tmp_path, extra="subset: 64\n")  # epsilon batch 128 (official): one mini-batch
    assert main(["prune", "run", "--config", cfg, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    _one_line_error(
        capsys, "config key 'limit.epsilon_batch_size' 128", "1 mini-batch", "raise subset"
    )
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_sweep_and_run_share_one_epsilon_rule(tmp_path, capsys) -> None:
    """One config serves both commands: `prune sweep` uses the epsilon of `prune run`
    (limit.epsilon_batch_size over the seeded shuffle) and refuses the same bad value."""
    cfg = _cfg(tmp_path, extra="limit:\n  epsilon_batch_size: 200\n  threads: 1\n")
    run = tmp_path / "run"
    assert main(["prune", "run", "--config", cfg, "--out", str(run), "--quiet"]) == 0
    limit = json.loads((run / "limit.json").read_text())
    ckpt = str(run / "model.safetensors")
    assert main(["prune", "sweep", "--config", cfg, "--checkpoint", ckpt,
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0  # fmt: skip
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sweep["loss_eps"] == pytest.approx(limit["epsilon"], rel=1e-9)
    capsys.readouterr()
    bad = _cfg(tmp_path, extra="limit:\n  epsilon_batch_size: 5000\n")
    for argv in (["run"], ["sweep", "--checkpoint", ckpt]):
        out = tmp_path / f"bad-{argv[0]}"
        assert main(["prune", *argv, "--config", bad, "--out", str(out), "--quiet"]) == 2
        _one_line_error(capsys, "'limit.epsilon_batch_size' 5000", "1 mini-batch")
        assert not out.exists()  # refused before any folder or file


def test_refusals_leave_no_output(tmp_path, capsys) -> None:
    """A random forward (dropout on in eval) is refused before the sweep writes anything, and
    a config refused before training leaves no folder."""
    from sparsemil.data.vision import load_vision_dataset
    from sparsemil.experiments.vision.config import PruneConfig
    from sparsemil.experiments.vision.run import model_limit

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.b(F.dropout(torch.relu(self.a(x.flatten(1))), 0.5, training=True))

    data = load_vision_dataset("digits", seed=0)
    out = tmp_path / "noisy"
    with pytest.raises(SparsemilError, match="dropout"):
        model_limit(Noisy(), data, PruneConfig(sparse_epoch=10, lanczos_iter=8), out, lmbda=0.0)
    assert not out.exists()
    aug = _cfg(tmp_path, extra="augment: official\n")  # 8x8 digits: not 32x32
    assert main(["prune", "run", "--config", aug, "--out", str(tmp_path / "a"), "--quiet"]) == 2
    _one_line_error(capsys, "augment")
    assert not (tmp_path / "a").exists()


def test_too_few_lanczos_steps_are_said(tmp_path) -> None:
    cfg = _cfg(tmp_path, epoch=1, extra="lanczos_num: 2\n")  # BASE: lanczos_iter 8
    out = tmp_path / "r"
    assert main(["prune", "run", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "limit.json").read_text())
    assert doc["uncertainty"]["stable"] is None
    assert any("cannot be judged" in w for w in doc["warnings"])


def test_run_with_the_important_eigenvalue_correction(tmp_path) -> None:
    """`limit.important` through `prune run`: rows over the Hessian's samples, official
    normalisation (divided by the number of samples)."""
    extra = "limit:\n  important: true\n  important_ratios: 5\n  threads: 1\n"
    cfg = _cfg(tmp_path, epoch=1, extra=extra)
    out = tmp_path / "r"
    assert main(["prune", "run", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "limit.json").read_text())
    imp = doc["important"]
    assert imp["num_samples"] == doc["hessian"]["samples"] == doc["n_train"]
    assert len(imp["row_l1_norms"]) == 5 and doc["flat_fraction"] == imp["fraction"]


def test_resume_limit_reuses_the_trained_model(tmp_path):
    """A run whose limit step died (e.g. killed for memory) resumes from its saved model:
    the same prediction and measured limits as the uninterrupted run, no new training."""
    from sparsemil.experiments.vision.config import config_from_dict
    from sparsemil.experiments.vision.run import resume_limit, run_limit

    cfg = config_from_dict({"model": "mlp", "widths": [32], "dataset": "digits",
                            "batch_size": 64, "epoch": 2, "lr": 0.05, "lmbda": 5e-4,
                            "sparse_epoch": 20, "lanczos_iter": 8, "seed": 0})  # fmt: skip
    out = tmp_path / "run"
    first = run_limit(cfg, out, progress=False)
    (out / "limit.json").unlink()
    again = resume_limit(cfg, out, progress=False)
    assert again["resumed"] and json.loads((out / "limit.json").read_text())["resumed"]
    assert again["predicted_ratio"] == pytest.approx(first["predicted_ratio"], rel=1e-9)
    assert again["actual_ratio"] == first["actual_ratio"]
    with pytest.raises(SparsemilError, match="no model.safetensors"):
        resume_limit(cfg, tmp_path / "empty", progress=False)
