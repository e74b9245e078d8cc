"""The console tells the truth, briefly (issue K7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sparsemil.cli.main import main, resume_hint

REPO = Path(__file__).resolve().parents[1]


def test_training_prints_no_lightning_banners(tmp_path):
    """No 'GPU available' / 'TPU available' lines and no advertisement per fold."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    cmd = [sys.executable, "-m", "sparsemil.cli.main", "mil", "cv", "--data", "musk1",
           "--model", "abmil", "--folds", "2", "--max-epochs", "1", "--no-progress",
           "--threads", "1", "--out", str(tmp_path / "cv")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-2000:]
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec"):
        assert noise not in text, noise
    assert "accuracy" in run.stdout


def test_ctrl_c_says_how_to_resume():
    assert "--resume" in resume_hint(["mil", "cv", "--data", "x"])
    assert "--resume" in resume_hint(["mil", "train"])
    assert resume_hint(["prune", "run"]) == ""


def test_table_only_never_replaces_a_table_with_an_empty_one(tmp_path, capsys, monkeypatch):
    """`mil benchmark --table-only` writes under --out by default, and refuses to write a
    table from a folder that holds no runs (it used to blank docs/results/mil_benchmarks.md)."""
    monkeypatch.chdir(REPO)
    shipped = (REPO / "docs/results/mil_benchmarks.md").read_text()
    rc = main(["mil", "benchmark", "--table-only", "--out", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and "no benchmark runs to tabulate" in err
    assert (REPO / "docs/results/mil_benchmarks.md").read_text() == shipped
    assert not (tmp_path / "empty" / "mil_benchmarks.md").exists()
