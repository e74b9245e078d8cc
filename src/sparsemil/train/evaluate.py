"""Bag-level evaluation: metrics, repeated test passes, per-slide predictions.

Two kinds of variance are kept apart:

* **test-time variance** -- ``num_test`` passes over the same test bags with the same
  weights; they differ only through random sub-bag grouping (MMIL ``grouping="random"``)
  or DTFD-MIL's random chunks. Reported as mean +- std over passes.
* **training variance** -- over CV folds and training seeds (see :mod:`sparsemil.train.cv`).

Standard deviations are population std (``numpy.std``, ddof 0).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sparsemil.mil.factory import bag_loss, bag_probabilities
from sparsemil.mil.registry import model_inputs, registered_spec
from sparsemil.train.seeding import scoped_seed

METRICS = ("accuracy", "balanced_accuracy", "auc", "f1", "loss")


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, n_classes: int | None = None
) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC, F1 and log-loss of class probabilities.

    Args:
        labels: (B,) int labels.
        probs: (B, K) class probabilities.
        n_classes: K (default ``probs.shape[1]``).

    Returns:
        dict with ``accuracy``, ``balanced_accuracy``, ``auc`` (binary: ROC AUC of class 1;
        multiclass: one-vs-rest macro; NaN when the labels hold a single class), ``f1``
        (binary: of class 1; multiclass: macro) and ``loss`` (mean negative log-likelihood).
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = int(n_classes or probs.shape[1])
    pred = probs.argmax(1)
    out = {
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": float("nan"),
        "auc": float("nan"),
        "f1": float("nan"),
        "loss": float("nan"),
    }
    if len(labels) == 0:
        return out
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["balanced_accuracy"] = float(balanced_accuracy_score(labels, pred))
        if k == 2:
            out["f1"] = float(f1_score(labels, pred, pos_label=1, zero_division=0))
        else:
            out["f1"] = float(
                f1_score(labels, pred, average="macro", labels=list(range(k)), zero_division=0)
            )
    if len(np.unique(labels)) > 1:
        if k == 2:
            out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
        else:
            p = probs / probs.sum(1, keepdims=True)
            present = np.unique(labels)
            if len(present) == k:
                out["auc"] = float(roc_auc_score(labels, p, multi_class="ovr", average="macro"))
            else:  # macro over the classes present (one-vs-rest)
                aucs = [roc_auc_score(labels == c, p[:, c]) for c in present]
                out["auc"] = float(np.mean(aucs))
    eps = 1e-12
    out["loss"] = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)).mean())
    return out


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of the finite values (NaN when there are none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


@torch.no_grad()
def predict_bags(
    model: torch.nn.Module,
    loader: Any,
    num_test: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Run ``num_test`` passes of ``model`` (eval mode) over ``loader``.

    Each pass ``t`` runs under its own seed ``seed * 1000 + t`` (torch, numpy and Python
    generators are saved and restored), so passes differ only through random grouping and
    the result is reproducible.

    Returns:
        ``{"probs": (T, B, K), "labels": (B,), "slide_ids": list[str], "loss": (T, B)}``;
        ``loss`` is the per-bag criterion loss (NaN for unlabelled bags, label -1).
    """
    was_training = model.training
    model.eval()
    model.to(device)
    all_probs, all_losses = [], []
    labels: list[int] = []
    slide_ids: list[str] = []
    for t in range(int(num_test)):
        probs_t, loss_t = [], []
        with scoped_seed(seed * 1000 + t):
            if registered_spec(model).seeded:  # MMIL: its own generator drives grouping
                model.reseed(seed * 1000 + t)
            for batch in loader:
                x = batch["X"].to(device)
                kwargs = {k: v.to(device) for k, v in model_inputs(model, batch).items()}
                out = model.predict(x, return_inst_pred=False, **kwargs)
                if isinstance(out, tuple | list):
                    out = out[0]
                probs_t.append(bag_probabilities(out).float().cpu())
                y = batch["Y"]
                lab = y.clone()
                lab[lab < 0] = 0
                loss = bag_loss(out.cpu(), lab).float()
                loss[y < 0] = float("nan")
                loss_t.append(loss)
                if t == 0:
                    labels.extend(int(v) for v in y)
                    slide_ids.extend(batch["slide_id"])
        all_probs.append(torch.cat(probs_t))
        all_losses.append(torch.cat(loss_t))
    model.train(was_training)
    return {
        "probs": torch.stack(all_probs).numpy(),
        "labels": np.asarray(labels, dtype=np.int64),
        "slide_ids": slide_ids,
        "loss": torch.stack(all_losses).numpy(),
    }


def evaluate_predictions(pred: dict[str, Any], n_classes: int) -> dict[str, Any]:
    """Metrics of each pass, their mean +- std over passes, and the metrics of the mean
    probabilities (the ensemble over passes).

    Returns:
        ``{"metrics": {m: mean over passes}, "test_time": {m: {mean, std, n}},
        "ensemble": {m: value}, "passes": [{m: value}, ...]}``.
    """
    labels = pred["labels"]
    passes = [classification_metrics(labels, p, n_classes) for p in pred["probs"]]
    test_time = {m: mean_std([p[m] for p in passes]) for m in METRICS}
    ensemble = classification_metrics(labels, pred["probs"].mean(0), n_classes)
    return {
        "metrics": {m: test_time[m]["mean"] for m in METRICS},
        "test_time": test_time,
        "ensemble": ensemble,
        "passes": passes,
    }


def prediction_rows(
    pred: dict[str, Any], class_names: Sequence[str] | None = None, **extra: Any
) -> list[dict[str, Any]]:
    """One row per bag: slide_id, label (class index), mean probability per class over
    passes as ``prob_<class name>`` (``prob_0``, ``prob_1``, ... without names), the predicted
    class index, its std over passes, plus ``extra`` columns (e.g. fold)."""
    probs = pred["probs"]  # (T, B, K)
    mean = probs.mean(0)
    std = probs.std(0)
    names = prob_columns(class_names, mean.shape[1])
    rows = []
    for i, sid in enumerate(pred["slide_ids"]):
        row: dict[str, Any] = dict(extra)
        row["slide_id"] = sid
        row["label"] = int(pred["labels"][i])
        row["pred"] = int(mean[i].argmax())
        for c, col in enumerate(names):
            row[col] = float(mean[i, c])
        row["prob_std"] = float(std[i].max())
        rows.append(row)
    return rows


def prob_columns(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    """The probability column names ``prob_<class name>`` in class-index order."""
    if class_names is None or len(class_names) != n_classes:
        class_names = [str(c) for c in range(n_classes)]
    return [f"prob_{name}" for name in class_names]


def write_predictions_csv(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Write prediction rows as CSV atomically."""
    from sparsemil.io import atomic_write_text

    buf = io.StringIO()
    if rows:
        fields = list(rows[0].keys())
        for r in rows[1:]:
            for k in r:
                if k not in fields:
                    fields.append(k)
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
