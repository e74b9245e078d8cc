"""Reproduction table: predicted vs actual pruning ratio; regenerates docs/results/pruning_limit.md.

    python benchmarks/pruning_table.py                    # full protocol (48 rows)
    python benchmarks/pruning_table.py --longer           # + every row with 3x epochs
    python benchmarks/pruning_table.py --tiny --out DIR   # CI-sized (2 rows)

Every row is one ``run_limit`` (train with L1 -> sweep -> SLQ -> prediction) with a fixed
protocol: nothing (epsilon included) is tuned per row or to the measured result. Rows run in
``--workers`` processes with one torch thread each; a row whose ``limit.json`` exists is
reused, so an interrupted run resumes. The markdown is rewritten after every finished row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
L1_STRENGTHS = (1e-4, 5e-4, 1e-3, 2e-3)
SEEDS = (0, 1, 2)

# name -> (config without lmbda/seed, description)
FULL = {
    "digits-mlp": (
        dict(
            model="mlp",
            widths=[64, 32],
            dataset="digits",
            batch_size=64,
            lr=0.05,
            epoch=30,
            sparse_epoch=200,
            lanczos_iter=128,
            lanczos_num=1,
            limit=dict(),
        ),
        "MLP 64-64-32-10 (D = 6,570)",
    ),
    "fmnist-mlp": (
        dict(
            model="mlp",
            widths=[64, 32],
            dataset="fashion-mnist",
            subset=6000,
            batch_size=128,
            lr=0.05,
            epoch=10,
            sparse_epoch=100,
            lanczos_iter=128,
            lanczos_num=1,
            limit=dict(hessian_samples=2000),
        ),
        "MLP 784-64-32-10 (D = 52,650)",
    ),
    "digits-fc5": (
        dict(
            model="fc",
            dataset="digits",
            batch_size=64,
            lr=0.02,
            epoch=20,
            sparse_epoch=200,
            lanczos_iter=128,
            lanczos_num=1,
            limit=dict(hessian_samples=500),
        ),
        "FC5 64-1000-600-300-100-10 (D = 877,010)",
    ),
    "fmnist-fc5q": (
        dict(
            model="mlp",
            widths=[250, 150, 75, 25],
            dataset="fashion-mnist",
            subset=6000,
            batch_size=128,
            lr=0.02,
            epoch=10,
            sparse_epoch=100,
            lanczos_iter=128,
            lanczos_num=1,
            limit=dict(hessian_samples=500),
        ),
        "FC5-shaped at 1/4 width 784-250-150-75-25-10 (D = 247,385)",
    ),
}
TINY = {
    "digits-tiny": (
        dict(
            model="mlp",
            widths=[32],
            dataset="digits",
            batch_size=64,
            lr=0.05,
            epoch=5,
            sparse_epoch=50,
            lanczos_iter=24,
            lanczos_num=1,
            limit=dict(),
        ),
        "MLP 64-32-10 (D = 2,410), 5 epochs",
    ),
}


DISCUSSION = """## Where theory and measurement disagree, and why

- **Training length** (section "Training-length check" below): every row trained 3x as many
  epochs, nothing else changed, lowers the error at every L1 strength and brings the mean
  within the goal; the misses discussed next are those of the standard epoch budget.
- **The error falls with the L1 strength** (per-L1 table): 0.121 at 1e-4, 0.042 at 5e-4,
  0.012 at 1e-3, 0.006 at 2e-3. At 1e-3 and 2e-3 all 24 rows are within 0.038 of the
  measured `drop_1pt` ratio. Over the three strengths >= 5e-4 the mean error is within the
  goal (see the summary); over the whole protocol, with the 1e-4 rows, it is not.
- **Moderate L1 (5e-4)**: 8 of 12 rows within 0.05; the FC5-shaped net on Fashion-MNIST
  under-predicts by ~0.06 on all three seeds, and digits FC5 seed 1 by 0.14.
- **Weak L1 (1e-4)**: the errors are large and of a consistent sign per dataset:
  Fashion-MNIST is over-predicted in all 6 rows (by 0.03 to 0.21), digits FC5 is
  under-predicted by 0.16-0.24 in 2 of 3 rows. This is *not* a quadrature artefact: for the
  digits-mlp / 1e-4 / seed 0 row we also computed the exact Hessian (D = 6,570, dense,
  float64 eigendecomposition; `--exact-check runs/pruning_table/digits-mlp-l10.0001-s0`):
  the exact spectrum predicts 0.624 (`abs`) / 0.725 (`flat`) against SLQ's 0.614 / 0.712
  and a measured 0.545. Nor is it probe noise: re-running SLQ on the digits-fc5 / 1e-4 /
  seed 0 model with 6 different Rademacher probes gives predictions 0.52-0.59 (`abs`) and
  0.88-0.94 (`flat`), all far from the measured 0.79. The gap is between the theory (with
  the official epsilon rule) and the measurement. The theory takes w* to be the minimum
  of an L1-regularised loss, whose magnitude distribution the penalty has shaped; at 1e-4
  the penalty barely acts within the epoch budget. On digits the nets then memorise the
  training set (training loss at w* ~1e-3, so epsilon ~4e-4 to 9e-4), and a tolerance that
  tiny makes the prediction hinge on near-zero curvature, while test accuracy (what
  `drop_1pt` measures) survives far more pruning. On Fashion-MNIST the training loss stays
  high (~0.25) and the quadratic model evidently overstates how far the weights can move.
  The training-length check below tests the first part of this reading: the same rows
  trained 3x longer (nothing else changed).
- **Non-positive eigenvalues**: `flat` predicts higher ratios than `abs` (by construction:
  a flat direction contributes 1); its mean error is larger here. The choice is a modelling
  decision that moves weak-L1 predictions by up to ~0.36 (digits-fc5 / 1e-4 / seed 0).
  The SLQ mass on negative Ritz values ranges from ~0.02 to ~0.97 across comparable rows:
  one Ritz node stands for the huge cluster of near-zero eigenvalues, and whether it lands
  just below or just above zero decides that mass. For one model it is stable across
  probes (0.87-0.94 for the row above), so it reflects the model, not the probe.
- **Criterion choice**: the error columns use `drop_1pt` (the default). The `official`
  criterion (largest ratio with accuracy strictly above dense) is undefined in some rows
  and noisy on small test sets (digits: 360 test images, one image = 0.28 points);
  `train_loss_eps` is systematically lower. Nothing is tuned per row: the same epsilon
  rule, SLQ settings and solver are used throughout, and the L1 strengths are fixed
  in advance for every configuration.
"""


def _rows(profile: dict, seeds, strengths) -> list[tuple[str, str, float, int]]:
    # seed-major order: a partial table already covers every configuration
    return [
        (f"{name}-l1{lmbda:g}-s{seed}", name, lmbda, seed)
        for seed in seeds
        for name in profile
        for lmbda in strengths
    ]


#: Training-length check: the weakest-L1 rows once more with this many times the epochs.
LONGER_FACTOR = 3


def _longer_rows(profile: dict, seeds, strengths) -> list[tuple[str, str, float, int]]:
    # weakest L1 first: those rows motivated the check
    return [
        (
            f"{name}-l1{lmbda:g}-s{seed}-e{LONGER_FACTOR * profile[name][0]['epoch']}",
            name,
            lmbda,
            seed,
        )
        for lmbda in sorted(strengths)
        for seed in seeds
        for name in profile
    ]


def longer_section(out: Path, out_long: Path, profile: dict, seeds, strengths) -> list[str]:
    """Markdown comparing the standard rows with their longer-trained twins (every L1
    strength), with the mean abs error per strength and overall."""
    from sparsemil.limit.predict import censored_abs_error

    lines, by_l1, pairs, censored = [], {}, [], []
    for row_long, name, lm, seed in _longer_rows(profile, seeds, strengths):
        f_long = out_long / row_long / "limit.json"
        f_std = out / f"{name}-l1{lm:g}-s{seed}" / "limit.json"
        if not (f_long.exists() and f_std.exists()):
            continue
        a, b = json.loads(f_std.read_text()), json.loads(f_long.read_text())
        errs = [
            censored_abs_error(
                d["predicted_ratio"], d.get("predicted_bound"), d["actual_ratio"]["drop_1pt"]
            )
            for d in (a, b)
        ]
        if None in errs:
            continue
        censored.append(b["predicted_ratio"] is None)
        pairs.append(tuple(errs))
        by_l1.setdefault(lm, []).append(tuple(errs))
        lines.append(
            f"| {name} | {lm:g} | {seed} | {a['epoch']} -> {b['epoch']} "
            f"| {_pred_text(a)} -> {_pred_text(b)} "
            f"| {_fmt(a['actual_ratio']['drop_1pt'])} -> {_fmt(b['actual_ratio']['drop_1pt'])} "
            f"| {errs[0]:.3f} -> **{errs[1]:.3f}** "
            f"| {b['dense']['test_acc']:.3f} "
            f"| {a['dense']['train_loss']:.4f} -> {b['dense']['train_loss']:.4f} |"
        )
    if not lines:
        return []
    n_censored = sum(censored)
    uncensored = [y for (_, y), c in zip(pairs, censored, strict=True) if not c]
    n_total = len(_longer_rows(profile, seeds, strengths))
    done = "complete" if len(pairs) == n_total else f"{len(pairs)} of {n_total} rows so far"
    per_l1 = [
        f"| {lm:g} | {len(v)} | {np.mean([x for x, _ in v]):.3f} | **{np.mean([y for _, y in v]):.3f}** "
        f"| {max(y for _, y in v):.3f} |"
        for lm, v in sorted(by_l1.items())
    ]
    return [
        f"## Training-length check ({LONGER_FACTOR}x epochs, every row)",
        "",
        f"Every row once more, trained {LONGER_FACTOR}x as many epochs (the same factor for "
        "every row and configuration, everything else unchanged: same epsilon rule, SLQ, solver, "
        "criterion; `python benchmarks/pruning_table.py --longer`). The factor was chosen once, "
        "after the weakest-L1 rows above missed, and not adjusted afterwards. The hypothesis: the "
        "theory takes w* to be the minimiser of the L1-regularised loss; if the misses come from "
        "w* not yet being that minimiser, longer training should bring prediction and "
        f"measurement together. Status: {done}.",
        "",
        f"Censored rows ({n_censored}): where rho = gw(R(rho)) has no root below the largest "
        "swept ratio, the prediction is `>= rho_max`; its error counts as 0 when the measured "
        "ratio is rho_max too (test accuracy never fell), else as the distance to rho_max "
        "(`sparsemil.limit.predict.censored_abs_error`).",
        "",
        f"- **mean abs error, {LONGER_FACTOR}x epochs: {np.mean([y for _, y in pairs]):.4f}** "
        f"over {len(pairs)} rows (the same rows at the standard length: "
        f"{np.mean([x for x, _ in pairs]):.4f}); goal <= 0.03",
        f"- without the {n_censored} censored rows: {np.mean(uncensored):.4f} over "
        f"{len(uncensored)} rows"
        if uncensored
        else "- every row censored",
        "",
        "| L1 strength | rows | mean abs error (standard) | mean abs error (longer) | max abs error (longer) |",
        "| --- | --- | --- | --- | --- |",
        *per_l1,
        "",
        "| config | L1 | seed | epochs | predicted | actual (drop_1pt) | abs err | dense acc (longer) | train loss at w* |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *lines,
        "",
    ]


def _run_row(row_dir: str, cfg_dict: dict) -> str:
    import torch

    from sparsemil.experiments.vision.config import config_from_dict
    from sparsemil.experiments.vision.run import run_limit

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict, where=row_dir)
    cfg.validate()
    run_limit(cfg, row_dir, progress=False)
    return row_dir


def _flat_prediction(row_dir: Path, doc: dict) -> float | None:
    """The prediction with non-positive eigenvalues treated as flat (same spectrum)."""
    from sparsemil.limit.width import gaussian_width, predicted_ratio
    from sparsemil.prune.sweep import SweepResult

    spec = json.loads((row_dir / "spectrum.json").read_text())
    vals = np.array(spec["ritz_values"], dtype=float)
    wts = np.array(spec["ritz_weights"], dtype=float)
    sweep = SweepResult.from_csv(row_dir / "sweep.csv")
    eps = doc["epsilon"]
    return predicted_ratio(
        sweep.ratios,
        sweep.distance,
        lambda R: gaussian_width(R, vals, wts, eps, negative="flat"),
    )


def _pred_text(doc: dict) -> str:
    """Predicted ratio, or the one-sided bound when the root lies outside the swept range."""
    if doc["predicted_ratio"] is not None or not doc.get("predicted_bound"):
        return _fmt(doc["predicted_ratio"])
    b = doc["predicted_bound"]
    return f"{'≥' if b['side'] == '>=' else '≤'} {b['ratio']:.3f}"


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def write_markdown(
    path: Path,
    out: Path,
    profile: dict,
    rows: list,
    protocol: str,
    extra: list[str] | None = None,
    summary_extra: list[str] | None = None,
) -> dict:
    lines = []
    errs, errs_flat, errs_off = [], [], []
    done = 0
    for row_name, name, lmbda, seed in rows:
        f = out / row_name / "limit.json"
        if not f.exists():
            continue
        done += 1
        doc = json.loads(f.read_text())
        pred = doc["predicted_ratio"]
        act = doc["actual_ratio"]
        a = act.get("drop_1pt")
        flat = _flat_prediction(out / row_name, doc)
        off = doc.get("predicted_ratio_official")
        err = None if pred is None or a is None else abs(pred - a)
        if err is not None:
            errs.append(err)
        if flat is not None and a is not None:
            errs_flat.append(abs(flat - a))
        if off is not None and a is not None:
            errs_off.append(abs(off - a))
        dense = doc["dense"]
        t = doc["timings"]
        lines.append(
            f"| {name} | {lmbda:g} | {seed} | {dense['test_acc']:.3f} | {doc['epsilon']:.4f} "
            f"| {_fmt(pred)} | {_fmt(a)} | **{_fmt(err)}** | {_fmt(flat)} | {_fmt(off)} "
            f"| {_fmt(act.get('official'))} | {_fmt(act.get('train_loss_eps'))} "
            f"| {doc['spectrum']['lambda_max']:.3g} | {doc['spectrum']['negative_mass']:.3f} "
            f"| {t['train_s'] + t['sweep_s'] + t['spectrum_s']:.0f} |"
        )
    mean = float(np.mean(errs)) if errs else None
    vs_train = []
    for row_name, _, _, _ in rows:
        f = out / row_name / "limit.json"
        if f.exists():
            d = json.loads(f.read_text())
            t_eps = d["actual_ratio"].get("train_loss_eps")
            if d["predicted_ratio"] is not None and t_eps is not None:
                vs_train.append(abs(d["predicted_ratio"] - t_eps))
    summary = {
        "rows_done": done,
        "mean_abs_error_vs_train_loss_eps": float(np.mean(vs_train)) if vs_train else None,
        "rows_total": len(rows),
        "mean_abs_error": mean,
        "mean_abs_error_flat": float(np.mean(errs_flat)) if errs_flat else None,
        "mean_abs_error_official": float(np.mean(errs_off)) if errs_off else None,
        "max_abs_error": float(np.max(errs)) if errs else None,
    }
    per_cfg = []
    for name in profile:
        e = []
        for row_name, n, _, _ in rows:
            f = out / row_name / "limit.json"
            if n == name and f.exists():
                d = json.loads(f.read_text())
                if d["abs_error"] is not None:
                    e.append(d["abs_error"])
        if e:
            per_cfg.append(f"| {name} | {len(e)} | {np.mean(e):.3f} | {np.max(e):.3f} |")
    min_l1 = min(r[2] for r in rows)
    errs_strong = []
    for row_name, _, lm, _ in rows:
        f = out / row_name / "limit.json"
        if lm > min_l1 and f.exists():
            d = json.loads(f.read_text())
            if d["abs_error"] is not None:
                errs_strong.append(d["abs_error"])
    summary["mean_abs_error_without_weakest_l1"] = (
        float(np.mean(errs_strong)) if errs_strong else None
    )
    per_l1 = []
    for lmbda in sorted({r[2] for r in rows}):
        e = []
        for row_name, _, lm, _ in rows:
            f = out / row_name / "limit.json"
            if lm == lmbda and f.exists():
                d = json.loads(f.read_text())
                if d["abs_error"] is not None:
                    e.append(d["abs_error"])
        if e:
            per_l1.append(f"| {lmbda:g} | {len(e)} | {np.mean(e):.3f} | {np.max(e):.3f} |")
    status = "complete" if done == len(rows) else f"PARTIAL: {done} of {len(rows)} rows finished"
    head = [
        "# Predicted vs actual pruning ratio",
        "",
        f"Generated by `python benchmarks/pruning_table.py` ({status}).",
        "",
        protocol,
        "",
        "## Summary",
        "",
        f"- rows: {done} / {len(rows)}",
        f"- **mean |predicted - actual(drop_1pt)| = {_fmt(mean, 4)}** "
        f"(max {_fmt(summary['max_abs_error'], 4)}) at the configurations' epoch budget; "
        "goal <= 0.03",
        f"- without the weakest L1 strength ({min_l1:g}), {len(errs_strong)} rows: mean abs error "
        f"{_fmt(float(np.mean(errs_strong)) if errs_strong else None, 4)}",
        f"- same spectra, non-positive eigenvalues treated as flat: mean abs error "
        f"{_fmt(summary['mean_abs_error_flat'], 4)}",
        f"- official grid density (100,000 bins) and integer R: mean abs error "
        f"{_fmt(summary['mean_abs_error_official'], 4)}",
        f"- predicted vs the `train_loss_eps` criterion instead of `drop_1pt`: mean abs error "
        f"{_fmt(summary['mean_abs_error_vs_train_loss_eps'], 4)}",
        *(summary_extra or []),
        "",
        "| configuration | rows | mean abs error | max abs error |",
        "| --- | --- | --- | --- |",
        *per_cfg,
        "",
        "| L1 strength | rows | mean abs error | max abs error |",
        "| --- | --- | --- | --- |",
        *per_l1,
        "",
        DISCUSSION,
        "",
        *(extra or []),
        "## Rows",
        "",
        "Columns: dense test accuracy; epsilon; predicted ratio (Ritz-pair gw, `abs`); actual "
        "ratio by `drop_1pt` (the default); absolute error; predicted with `flat`; predicted "
        "by the official grid-density/integer-R rule; actual ratio by the `official` and "
        "`train_loss_eps` criteria; SLQ lambda_max; SLQ mass of negative Ritz values; "
        "seconds (train + sweep + spectrum, one thread on a shared 2-core machine).",
        "",
        "| config | L1 | seed | dense acc | eps | predicted | actual | abs err | pred (flat) "
        "| pred (official) | actual (official) | actual (train_loss_eps) | lambda_max "
        "| neg. mass | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
        *lines,
        "",
    ]
    from sparsemil.io import atomic_write_json, atomic_write_text

    atomic_write_text(path, "\n".join(head))
    atomic_write_json(out / "summary.json", summary)
    return summary


def protocol_text(profile: dict, seeds, strengths, workers: int) -> str:
    lines = [
        "## Protocol",
        "",
        f"- L1 strengths {', '.join(f'{s:g}' for s in strengths)} x seeds "
        f"{', '.join(map(str, seeds))} per configuration; SGD, momentum 0.9, constant "
        "learning rate, L1 on every weight and bias (official default), kaiming-normal init.",
        "- epsilon = std (ddof 0) of the per-mini-batch training cross-entropy at w* "
        "(mini-batches of `batch_size`, fixed order) -- the official rule, never tuned.",
        "- actual ratio: `drop_1pt` (largest ratio before test accuracy first falls more than "
        "1 point below dense) on the grid i / sparse_epoch.",
        "- Hessian: mean training cross-entropy at w*, seeded subset of `hessian_samples` "
        "training samples where given; SLQ `lanczos_num` x `lanczos_iter` (official 1 x 128), "
        "Rademacher probe seeded by the row seed; prediction by bisection on the "
        "interpolated R(rho).",
        f"- rows run in {workers} worker process(es), one torch thread each.",
        "",
        "| configuration | description | settings |",
        "| --- | --- | --- |",
    ]
    for name, (cfg, desc) in profile.items():
        keys = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("model",))
        lines.append(f"| {name} | {desc} | {keys} |")
    return "\n".join(lines)


def exact_check(row_dir: Path) -> dict:
    """Predictions of a finished row from the *exact* Hessian spectrum (dense, float64
    eigendecomposition; small nets only) next to the SLQ ones and the measured ratio."""
    import torch

    from sparsemil.curvature.hvp import HessianOperator, cross_entropy_loss, fixed_batches
    from sparsemil.data.vision import load_vision_dataset
    from sparsemil.experiments.vision.models import load_checkpoint
    from sparsemil.limit.width import gaussian_width, predicted_ratio
    from sparsemil.prune.sweep import SweepResult

    torch.set_num_threads(1)
    doc = json.loads((row_dir / "limit.json").read_text())
    spec = json.loads((row_dir / "spectrum.json").read_text())
    model, meta = load_checkpoint(row_dir / "model.safetensors")
    model.eval()
    opts = doc["options"]
    data = load_vision_dataset(
        meta["dataset"], subset=meta["config"].get("subset"), seed=doc["seed"]
    )
    batches = fixed_batches(
        data.x_train, data.y_train, opts["hessian_batch_size"], opts["hessian_samples"], doc["seed"]
    )
    op = HessianOperator(model, cross_entropy_loss, batches, chunk_size=64)
    eig = np.linalg.eigvalsh(op.dense().numpy())
    sweep = SweepResult.from_csv(row_dir / "sweep.csv")
    vals = np.array(spec["ritz_values"], dtype=float)
    wts = np.array(spec["ritz_weights"], dtype=float)
    eps = doc["epsilon"]
    out = {"actual": doc["actual_ratio"], "epsilon": eps}
    for neg in ("abs", "flat"):
        out[f"exact_{neg}"] = predicted_ratio(
            sweep.ratios,
            sweep.distance,
            lambda R, n=neg: gaussian_width(R, eig, None, eps, negative=n),
        )
        out[f"slq_{neg}"] = predicted_ratio(
            sweep.ratios,
            sweep.distance,
            lambda R, n=neg: gaussian_width(R, vals, wts, eps, negative=n),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "pruning_table")
    ap.add_argument("--doc", type=Path, default=None, help="markdown output")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="CI-sized run (2 rows)")
    ap.add_argument(
        "--longer",
        action="store_true",
        help=f"also run every row with {LONGER_FACTOR}x the epochs (training-length check)",
    )
    ap.add_argument("--out-long", type=Path, default=REPO / "runs" / "pruning_long")
    ap.add_argument(
        "--exact-check",
        type=Path,
        default=None,
        help="a finished row folder: compare its prediction with the exact spectrum",
    )
    args = ap.parse_args(argv)
    if args.exact_check is not None:
        print(json.dumps(exact_check(args.exact_check), indent=1))
        return 0
    if args.tiny:
        profile, seeds, strengths = TINY, (0,), (5e-4, 2e-3)
        doc = args.doc or args.out / "pruning_limit.md"
    else:
        profile, seeds, strengths = FULL, SEEDS, L1_STRENGTHS
        doc = args.doc or REPO / "docs" / "results" / "pruning_limit.md"
    rows = _rows(profile, seeds, strengths)
    protocol = protocol_text(profile, seeds, strengths, args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = []
    for row_name, name, lmbda, seed in rows:
        if (args.out / row_name / "limit.json").exists():
            continue
        cfg = json.loads(json.dumps(profile[name][0]))
        cfg.update(lmbda=float(lmbda), seed=int(seed))
        todo.append((str(args.out / row_name), cfg))
    if args.longer:
        for row_name, name, lmbda, seed in _longer_rows(profile, seeds, strengths):
            if (args.out_long / row_name / "limit.json").exists():
                continue
            cfg = json.loads(json.dumps(profile[name][0]))
            cfg.update(lmbda=float(lmbda), seed=int(seed), epoch=LONGER_FACTOR * cfg["epoch"])
            todo.append((str(args.out_long / row_name), cfg))

    def write() -> dict:
        extra = longer_section(args.out, args.out_long, profile, seeds, strengths)
        headline = [ln for ln in extra if ln.startswith("- **mean abs error, ")]
        summary_extra = (
            [
                f"- every row trained {LONGER_FACTOR}x as many epochs (training-length check below): "
                + headline[0][2:]
            ]
            if headline
            else []
        )
        return write_markdown(doc, args.out, profile, rows, protocol, extra, summary_extra)

    t0 = time.perf_counter()
    if todo and args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futs = [pool.submit(_run_row, d, c) for d, c in todo]
            for fut in as_completed(futs):
                print(f"done {fut.result()} ({time.perf_counter() - t0:.0f}s)", flush=True)
                write()
    else:
        for d, c in todo:
            _run_row(d, c)
            print(f"done {d} ({time.perf_counter() - t0:.0f}s)", flush=True)
            write()
    summary = write()
    print(json.dumps(summary, indent=1))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
