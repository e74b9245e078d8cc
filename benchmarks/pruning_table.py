"""Reproduction table: predicted vs actual pruning ratio; regenerates docs/results/pruning_limit.md.

    python benchmarks/pruning_table.py                    # full protocol (36 rows)
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
L1_STRENGTHS = (1e-4, 5e-4, 2e-3)
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

- **Weak L1 (1e-4).** The training loss at w* is close to zero, so epsilon (the std of the
  per-batch losses) is tiny (~1e-3). gw(R) = sum_k tau_k 2 eps / (2 eps + R^2 |theta_k|) is
  then decided by the eigenvalues within ~2 eps / R^2 of zero. A 128-step SLQ run places
  Ritz nodes about lambda_max / 128 apart, so the large cluster of near-zero eigenvalues
  (both signs) is represented by one or two nodes whose exact position -- and whether a
  slightly negative node counts as curved (`abs`) or flat (`flat`) -- moves the prediction
  by tens of points (compare the `predicted` and `pred (flat)` columns). A plausible
  further cause, not measured here: without sparsity pressure the quadratic model of the
  loss around w* may fail well before the predicted R.
- **Moderate and strong L1 (5e-4, 2e-3).** epsilon is larger, the relevant curvature scale
  2 eps / R^2 is far above SLQ's resolution, and predictions land within a few points of
  the `drop_1pt` ratio.
- **Criterion choice.** `drop_1pt` (the default) is what the error columns use; the
  `official` criterion (largest ratio with accuracy strictly above dense) is undefined in
  some rows and noisy on small test sets (digits: 360 test images, one image = 0.28
  points), and `train_loss_eps` is systematically lower. Nothing is tuned per row: the
  same epsilon rule, SLQ settings and solver are used throughout.
"""


def _rows(profile: dict, seeds, strengths) -> list[tuple[str, str, float, int]]:
    # seed-major order: a partial table already covers every configuration
    return [
        (f"{name}-l1{lmbda:g}-s{seed}", name, lmbda, seed)
        for seed in seeds
        for name in profile
        for lmbda in strengths
    ]


def _run_row(row_dir: str, cfg_dict: dict) -> str:
    import torch

    from sparsemil.prune.config import config_from_dict
    from sparsemil.prune.limit import run_limit

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict, where=row_dir)
    cfg.validate()
    run_limit(cfg, row_dir, progress=False)
    return row_dir


def _flat_prediction(row_dir: Path, doc: dict) -> float | None:
    """The prediction with non-positive eigenvalues treated as flat (same spectrum)."""
    from sparsemil.prune.sweep import SweepResult
    from sparsemil.prune.width import gaussian_width, predicted_ratio

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


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def write_markdown(path: Path, out: Path, profile: dict, rows: list, protocol: str) -> dict:
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
    summary = {
        "rows_done": done,
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
        f"(max {_fmt(summary['max_abs_error'], 4)}); goal <= 0.03",
        f"- same spectra, non-positive eigenvalues treated as flat: mean abs error "
        f"{_fmt(summary['mean_abs_error_flat'], 4)}",
        f"- official grid density (100,000 bins) and integer R: mean abs error "
        f"{_fmt(summary['mean_abs_error_official'], 4)}",
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
    from sparsemil.utils.io import atomic_write_json, atomic_write_text

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "pruning_table")
    ap.add_argument("--doc", type=Path, default=None, help="markdown output")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="CI-sized run (2 rows)")
    args = ap.parse_args(argv)
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
    t0 = time.perf_counter()
    if todo and args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futs = [pool.submit(_run_row, d, c) for d, c in todo]
            for fut in as_completed(futs):
                print(f"done {fut.result()} ({time.perf_counter() - t0:.0f}s)", flush=True)
                write_markdown(doc, args.out, profile, rows, protocol)
    else:
        for d, c in todo:
            _run_row(d, c)
            print(f"done {d} ({time.perf_counter() - t0:.0f}s)", flush=True)
            write_markdown(doc, args.out, profile, rows, protocol)
    summary = write_markdown(doc, args.out, profile, rows, protocol)
    print(json.dumps(summary, indent=1))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
