"""benchmarks/paper_tasks.py: every row's config is a valid PruneConfig, the official values
are kept where no reduction is stated, and the markdown lists what each row reduced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsemil.experiments.vision.config import config_from_dict
from torch_helpers import benchmark_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    return benchmark_module("paper_tasks")


@pytest.mark.parametrize("budget", ["cpu", "full"])
def test_every_row_is_a_valid_config(paper, budget):
    for row in paper.OFFICIAL:
        cfg = config_from_dict(paper.row_config(row, budget, "cpu"), where=row)
        assert cfg.dataset == "fashion-mnist" and cfg.lanczos_num == 4
        if row in paper.CNNS:
            assert (cfg.image_size, cfg.channels, cfg.augment) == (32, 3, "official")
            assert cfg.limit.important and cfg.scheduler_step == "iteration"
        if budget == "full":  # the official values, untouched
            assert cfg.epoch == 200 and cfg.sparse_epoch == 1000
            assert cfg.limit.hessian_samples is None and cfg.subset is None


def test_official_values_of_the_configs(paper):
    # QiaozheZhang/Global-One-shot-Pruning configs/*_l1.yml
    expect = {"fc5": (0.01, 5e-5), "fc12": (0.01, 5e-5), "alexnet": (0.01, 3e-5),
              "vgg16": (0.01, 1e-4), "resnet18": (0.1, 5e-5), "resnet50": (0.1, 2e-5)}  # fmt: skip
    for row, (lr, lmbda) in expect.items():
        cfg = paper.row_config(row, "full", "cpu")
        assert (cfg["lr"], cfg["lmbda"]) == (lr, lmbda)
    assert paper.row_config("alexnet", "full", "cpu")["lanczos_iter"] == 96


def test_markdown_states_reductions_and_missing_rows(paper, tmp_path):
    doc = {"actual_ratio": {"official": 0.9, "drop_1pt": 0.92}, "predicted_ratio": 0.88,
           "D": 1000, "epoch": 200, "dense": {"test_acc": 0.9},
           "uncertainty": {"interval_90": [0.86, 0.9]},
           "bounds": {"lower": 0.5, "upper": 0.95},
           "abs_error_by_criterion": {"official": 0.02, "drop_1pt": 0.04},
           "kept_fraction_rel_error": {"official": 0.2, "drop_1pt": 0.5},
           "premises": {"kkt": {"residual": 0.1, "bound": 0.2},
                        "order": {"first_order_share": 0.1}, "anisotropy": {"ratio": 1.2}}}  # fmt: skip
    (tmp_path / "fc5").mkdir()
    (tmp_path / "fc5" / "limit.json").write_text(json.dumps(doc))
    (tmp_path / "fc5" / "config.json").write_text(json.dumps(paper.row_config("fc5", "cpu", "cpu")))
    out = tmp_path / "paper.md"
    paper.write_markdown(tmp_path, paper.collect(tmp_path, ["fc5", "vgg16"], "cpu"), "cpu", out)
    text = out.read_text()
    assert "| fc5 | Fashion-MNIST (CIFAR-10 in the paper) | 1,000 | 200 | 0.900 " in text
    assert "0.880 [0.860, 0.900]" in text and "0.020 / 0.040" in text
    assert "hessian_samples=5000" in text  # the CPU reduction is stated
    assert "| vgg16 | (not run yet) |" in text
    # hand-written analysis below the marker is kept when the table is regenerated
    out.write_text(text + paper.FINDINGS + "\nFC5 is the row to read.\n")
    paper.write_markdown(tmp_path, paper.collect(tmp_path, ["fc5", "vgg16"], "cpu"), "cpu", out)
    again = out.read_text()
    assert again.count(paper.FINDINGS) == 1 and "FC5 is the row to read." in again


def test_reductions_come_from_the_config_a_row_ran_with(paper, tmp_path):
    ran = paper.row_config("fc12", "cpu", "cpu")
    assert "epoch 200->20" in paper.reductions("fc12", ran)
    assert paper.reductions("fc12", paper.row_config("fc12", "full", "cuda")) == (
        "none (official settings)"
    )
    # a finished row of another config is not silently reused
    row = tmp_path / "fc12"
    row.mkdir()
    (row / "limit.json").write_text("{}")
    (row / "config.json").write_text(json.dumps({**ran, "epoch": 7}))
    with pytest.raises(SystemExit, match="another config"):
        paper.run_row("fc12", "cpu", "cpu", tmp_path)


def test_report_only_without_results_leaves_the_doc(paper, tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("kept")
    for argv, msg in (
        (["--report-only", "--out", str(tmp_path / "none")], "holds no finished rows"),
        (["--rows", "bogus"], "unknown rows ['bogus']"),
    ):
        monkeypatch.setattr("sys.argv", ["paper_tasks.py", *argv, "--doc", str(doc)])
        with pytest.raises(SystemExit, match="^2$"):  # exit status 2
            paper.main()
        assert msg in capsys.readouterr().err
    assert doc.read_text() == "kept"


def test_a_limit_at_the_top_of_the_sweep_is_censored_not_scored(paper, tmp_path):
    """AlexNet's CPU row: 10 ratios (0.0 ... 0.9) and the accuracy never fell, so its limit is
    only known to be >= 0.9; an error of 0.413 against it would be a made-up number."""
    doc = {"actual_ratio": {"official": 0.9, "drop_1pt": 0.9}, "predicted_ratio": 0.487,
           "D": 46787978, "epoch": 1, "dense": {"test_acc": 0.09},
           "abs_error_by_criterion": {"official": 0.413, "drop_1pt": 0.413},
           "kept_fraction_rel_error": {"official": 4.13, "drop_1pt": 4.13}}  # fmt: skip
    ran = paper.row_config("alexnet", "cpu", "cpu")
    assert ran["sparse_epoch"] == 10
    line = paper.row_line("alexnet", doc, ran, None)
    assert "| >= 0.900 (censored) | >= 0.900 (censored) | censored / censored " in line
    assert "0.413" not in line and "4.13" not in line
    assert "| 1 | 0.090 |" in line  # no warning recorded: no verdict invented
    doc["warnings"] = ["chance-level accuracy: the dense model's test accuracy 0.0900 ..."]
    assert "| 1 | 0.090 (chance: not meaningful) |" in paper.row_line("alexnet", doc, ran, None)
    # one ratio below the top is a measured limit and is scored
    doc["actual_ratio"] = {"official": 0.8, "drop_1pt": 0.8}
    line = paper.row_line("alexnet", doc, ran, None)
    assert "| 0.800 | 0.800 | 0.413 / 0.413 | 4.13 / 4.13 " in line
    # a prediction at the top of the sweep (or beyond it: None) is not scored either
    for pred in (0.9, None):
        doc["predicted_ratio"] = pred
        assert "| 0.800 | 0.800 | censored / censored " in paper.row_line("alexnet", doc, ran, None)
