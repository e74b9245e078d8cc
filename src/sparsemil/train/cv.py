"""k-fold cross-validation of a MIL model: mean +- std over folds, ``metrics.json``.

``run_cv`` validates every input first, then trains one model per fold
(:func:`sparsemil.train.trainer.fit_fold`) into ``out/fold_<i>/`` and finally writes, atomically
and only when every fold finished:

* ``out/metrics.json`` -- top level: one ``{mean, std, n}`` per metric (``accuracy``,
  ``balanced_accuracy``, ``auc``, ``f1``, ``loss``) over the folds' test parts (fold /
  training variance); ``test_time`` -- the within-fold std over ``num_test`` repeated passes
  (random grouping), averaged over folds; ``pooled`` -- the metrics of all folds'
  predictions pooled; ``folds`` -- per-fold results; ``predictions`` -- one row per bag;
* ``out/predictions.csv`` -- the same per-bag rows;
* ``out/folds.csv`` -- the split (slide_id, label, fold_i = train/val/test), to reproduce it
  (``cfg.folds_csv`` / ``--folds-csv`` replays such a file instead of drawing new folds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sparsemil.io import atomic_write_json
from sparsemil.train.config import MILTrainConfig
from sparsemil.train.evaluate import (
    METRICS,
    classification_metrics,
    mean_std,
    prob_columns,
    write_predictions_csv,
)


def summarize_folds(
    results: list[dict[str, Any]], n_classes: int, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Aggregate per-fold results (as returned by ``fit_fold``) into the metrics.json body."""
    out: dict[str, Any] = {}
    for m in METRICS:
        out[m] = mean_std([r["metrics"][m] for r in results])
    out["test_time"] = {
        m: {"std_mean_over_folds": mean_std([r["test_time"][m]["std"] for r in results])["mean"]}
        for m in METRICS
    }
    rows = [row for r in results for row in r.get("predictions", [])]
    if rows:
        labels = np.array([row["label"] for row in rows])
        cols = prob_columns(class_names, n_classes)
        probs = np.array([[row[c] for c in cols] for row in rows])
        out["pooled"] = classification_metrics(labels, probs, n_classes)
    out["folds"] = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
    out["predictions"] = rows
    return out


def run_cv(
    cfg: MILTrainConfig,
    out: str | os.PathLike[str],
    resume: bool = False,
) -> dict[str, Any] | None:
    """Cross-validate ``cfg`` with ``cfg.folds`` stratified folds (seed ``cfg.seed``), or with
    the folds of ``cfg.folds_csv`` when given.

    Returns the metrics dict written to ``out/metrics.json`` (``None`` on DDP ranks > 0).
    """
    from sparsemil.data.splits import case_groups, write_folds_csv
    from sparsemil.train.data import folds_for, load_mil_data
    from sparsemil.train.trainer import (
        class_names_of,
        fit_fold,
        is_launched_child,
        preflight,
        prepare_out_dir,
    )

    t0 = time.time()
    data = load_mil_data(cfg)  # validates every bag before anything is trained
    preflight(cfg, data)
    folds = folds_for(data, cfg)
    out = prepare_out_dir(out, resume, "metrics.json")
    rank0 = not is_launched_child()
    if rank0:
        cases = case_groups(data)
        write_folds_csv(out / "folds.csv", folds, data.slide_ids, data.labels,
                        None if cases is None else cases.tolist())  # fmt: skip
    results = []
    for fold in folds:
        r = fit_fold(cfg, data, fold, out / f"fold_{fold.index}", resume=resume)
        results.append(r)
    if not rank0:
        return None
    metrics: dict[str, Any] = {
        **summarize_folds(results, data.n_classes, class_names_of(data)),
        "class_names": class_names_of(data),
        "protocol": {
            "grouped_by": "case_id" if case_groups(data) is not None else "slide",
            "data": data.source,
            "n_bags": len(data.bags),
            "in_dim": data.dim,
            "n_classes": data.n_classes,
            "model": cfg.model,
            "model_kwargs": cfg.model_kwargs,
            "folds": len(folds),
            "folds_csv": cfg.folds_csv,
            "seed": cfg.seed,
            "num_test": cfg.num_test,
            "std": "population std (ddof=0) over folds",
            "config": cfg.to_dict(),
        },
        "seconds": time.time() - t0,
    }
    write_predictions_csv(out / "predictions.csv", metrics["predictions"])
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def cv_seeds(
    cfg: MILTrainConfig, seeds: list[int], out: str | os.PathLike[str], resume: bool = False
) -> dict[str, Any] | None:
    """``run_cv`` once per seed into ``out/seed_<s>``; summary over all (seed, fold) runs and
    over the per-seed CV means. Returns ``None`` on DDP ranks > 0."""
    import dataclasses

    out = Path(out)
    per_seed = []
    for s in seeds:
        m = run_cv(dataclasses.replace(cfg, seed=int(s)), out / f"seed_{s}", resume=resume)
        per_seed.append(m)
    if any(m is None for m in per_seed):
        return None
    return summarize_seeds(per_seed)


def summarize_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std over all (seed, fold) test parts, plus the std of the per-seed CV means."""
    summary: dict[str, Any] = {}
    for m in METRICS:
        runs = [f["metrics"][m] for s in per_seed for f in s["folds"]]
        summary[m] = mean_std(runs)
        summary[m]["std_over_seed_means"] = mean_std([s[m]["mean"] for s in per_seed])["std"]
        summary[m]["test_time_std"] = float(
            np.nanmean([s["test_time"][m]["std_mean_over_folds"] for s in per_seed])
        )
    summary["seeds"] = [s["protocol"]["seed"] for s in per_seed]
    summary["per_seed"] = [{m: s[m] for m in METRICS} for s in per_seed]
    return summary
