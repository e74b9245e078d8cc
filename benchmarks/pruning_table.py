"""Reproduction table: predicted vs actual pruning ratio; regenerates docs/results/pruning_limit.md.

    python benchmarks/pruning_table.py --workers 1 --out DIR   # full protocol (48 rows)
    python benchmarks/pruning_table.py --out DIR --markdown-only  # rescore the finished rows
    python benchmarks/pruning_table.py --longer           # + every row with 3x epochs
    python benchmarks/pruning_table.py --tiny --out DIR   # CI-sized (2 rows)

Every row is one ``run_limit`` (train with L1 -> sweep -> SLQ -> prediction) with a fixed
protocol: nothing (epsilon included) is tuned per row or to the measured result. Rows run in
``--workers`` processes with one torch thread each; a row whose ``limit.json`` exists is
reused, so an interrupted run resumes. The markdown is rewritten after every finished row.

Scoring (:func:`score`): theory against two baselines -- lambda-only (leave-one-out mean of
the actual limits of the other seeds with the same configuration and L1 strength) and
trace-only (``bounds.trace_only``) -- per criterion, on the same uncensored rows, with 95%
Student-t intervals; censored rows (:func:`censor_reasons`) are counted, never scored.
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
            limit=dict(),
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
            limit=dict(),
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
            limit=dict(),
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
            limit=dict(),
        ),
        "MLP 64-32-10 (D = 2,410), 5 epochs",
    ),
}


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
    """Markdown comparing the standard rows with their longer-trained twins (``--longer``),
    theory's abs error on ``drop_1pt`` over the pairs where neither row is censored (the same
    censoring rule as the summary, baselines aside); empty when no longer row exists."""
    lines, by_l1, pairs, n_censored = [], {}, [], 0
    for row_long, name, lm, seed in _longer_rows(profile, seeds, strengths):
        f_long = out_long / row_long / "limit.json"
        f_std = out / f"{name}-l1{lm:g}-s{seed}" / "limit.json"
        if not (f_long.exists() and f_std.exists()):
            continue
        a, b = json.loads(f_std.read_text()), json.loads(f_long.read_text())
        n = int(profile[name][0]["sparse_epoch"])
        top = (n - 1) / n - _AT_END_TOL
        act = [d["actual_ratio"].get("drop_1pt") for d in (a, b)]
        prd = [d["predicted_ratio"] for d in (a, b)]
        if any(v is None or v >= top for v in act + prd):
            n_censored += 1
            continue
        errs = (abs_error(prd[0], act[0]), abs_error(prd[1], act[1]))
        pairs.append(errs)
        by_l1.setdefault(lm, []).append(errs)
        lines.append(
            f"| {name} | {lm:g} | {seed} | {a['epoch']} -> {b['epoch']} "
            f"| {_pred_text(a)} -> {_pred_text(b)} "
            f"| {_fmt(act[0])} -> {_fmt(act[1])} "
            f"| {errs[0]:.3f} -> **{errs[1]:.3f}** "
            f"| {a['dense']['train_loss']:.4f} -> {b['dense']['train_loss']:.4f} |"
        )
    if not lines and not n_censored:
        return []
    n_total = len(_longer_rows(profile, seeds, strengths))
    per_l1 = [
        f"| {lm:g} | {len(v)} | {_ci_text(mean_ci([x for x, _ in v], nonnegative=True))} "
        f"| {_ci_text(mean_ci([y for _, y in v], nonnegative=True))} |"
        for lm, v in sorted(by_l1.items())
    ]
    return [
        f"## Training-length check ({LONGER_FACTOR}x epochs; not part of the summary)",
        "",
        f"Rows retrained with {LONGER_FACTOR}x the epochs, everything else unchanged "
        f"(`--longer`): {len(pairs)} scored pairs, {n_censored} censored pairs, of {n_total}. "
        "Theory's abs error against `drop_1pt`, standard -> longer.",
        "",
        f"- mean abs error, standard {_ci_text(mean_ci([x for x, _ in pairs], nonnegative=True))}"
        f", {LONGER_FACTOR}x epochs {_ci_text(mean_ci([y for _, y in pairs], nonnegative=True))}",
        "",
        "| L1 strength | pairs | standard [95% CI] | longer [95% CI] |",
        "| --- | --- | --- | --- |",
        *per_l1,
        "",
        "| config | L1 | seed | epochs | predicted | actual (drop_1pt) | abs err | train loss at w* |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
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


# ----------------------------------------------------------------------------- scoring
#: Criteria scored in the summary (the first is the default of ``run_limit``).
SCORED_CRITERIA = ("drop_1pt", "official", "train_loss_eps")
#: The theory and the two baselines it must beat.
PREDICTORS = ("theory", "lambda_only", "trace_only")
PREDICTOR_NAMES = {"theory": "theory", "lambda_only": "λ-only", "trace_only": "trace-only"}
#: A value this close to the largest swept ratio counts as "at the end of the sweep".
_AT_END_TOL = 1e-9


def row_record(config: str, lmbda: float, seed: int, doc: dict, rho_max: float) -> dict:
    """The numbers of one finished row (its ``limit.json`` ``doc``) the scoring needs.

    ``theory`` is ``predicted_ratio`` (None when the root lies outside the sweep, then
    ``theory_bound`` is ``predicted_bound``); ``trace_only`` is ``bounds.trace_only``;
    ``actual`` maps each criterion to the measured ratio (None: undefined); ``rho_max`` is the
    largest swept ratio.
    """
    return {
        "config": config,
        "lmbda": float(lmbda),
        "seed": int(seed),
        "theory": doc.get("predicted_ratio"),
        "theory_bound": doc.get("predicted_bound"),
        "trace_only": (doc.get("bounds") or {}).get("trace_only"),
        "actual": {c: (doc.get("actual_ratio") or {}).get(c) for c in SCORED_CRITERIA},
        "rho_max": float(rho_max),
    }


def attach_lambda_only(records: list[dict], criteria=SCORED_CRITERIA) -> list[dict]:
    """Set ``rec["lambda_only"][criterion]``: the leave-one-out mean of the actual ratios
    (same criterion) of the *other* records with the same ``config`` and ``lmbda``; None when
    no other such record has a defined actual ratio. Returns ``records`` (changed in place)."""
    for i, rec in enumerate(records):
        rec["lambda_only"] = {}
        for c in criteria:
            others = [
                r["actual"][c]
                for j, r in enumerate(records)
                if j != i
                and r["config"] == rec["config"]
                and r["lmbda"] == rec["lmbda"]
                and r["actual"].get(c) is not None
            ]
            rec["lambda_only"][c] = float(np.mean(others)) if others else None
    return records


def predictions(rec: dict, criterion: str) -> dict[str, float | None]:
    """``{predictor: value}`` of one record for ``criterion`` (only λ-only depends on it)."""
    return {
        "theory": rec["theory"],
        "lambda_only": rec["lambda_only"][criterion],
        "trace_only": rec["trace_only"],
    }


def censor_reasons(rec: dict, criterion: str) -> list[str]:
    """Why ``rec`` cannot be scored on ``criterion`` (empty: it is scored).

    Censored: the actual ratio undefined or at the largest swept ratio (accuracy or loss never
    crossed the threshold: the limit is only known to be >= rho_max); a prediction undefined,
    beyond the sweep (``predicted_bound``) or at the largest swept ratio.
    """
    from sparsemil.limit.predict import actual_censoring

    top = rec["rho_max"] - _AT_END_TOL
    why = actual_censoring(rec["actual"].get(criterion), rec["rho_max"], _AT_END_TOL)
    out = [why] if why else []
    for name, v in predictions(rec, criterion).items():
        label = PREDICTOR_NAMES[name]
        if v is None:
            beyond = name == "theory" and rec.get("theory_bound")
            out.append(f"{label} beyond the sweep" if beyond else f"{label} undefined")
        elif v >= top:
            out.append(f"{label} at rho_max")
    return out


def abs_error(pred: float, actual: float) -> float:
    """|pred - actual|."""
    return abs(float(pred) - float(actual))


def kept_fraction_error(pred: float, actual: float) -> float:
    """|(1 - pred) - (1 - actual)| / (1 - actual): the error relative to the kept fraction."""
    return abs(float(pred) - float(actual)) / (1.0 - float(actual))


def mean_ci(
    values, level: float = 0.95, nonnegative: bool = False
) -> dict[str, float | int | None]:
    """Mean with a Student-t ``level`` interval: ``{"n", "mean", "lo", "hi"}``
    (``mean`` None without values; ``lo``/``hi`` None with fewer than two). With
    ``nonnegative`` (errors) the lower end is clipped at 0."""
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    m = float(x.mean())
    if n < 2:
        return {"n": n, "mean": m, "lo": None, "hi": None}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / np.sqrt(n))
    lo = max(0.0, m - half) if nonnegative else m - half
    return {"n": n, "mean": m, "lo": lo, "hi": m + half}


def verdict(diff: dict) -> str:
    """``beats`` / ``loses`` / ``not separated`` from the CI of theory - baseline."""
    if diff["lo"] is None:
        return "not separated"
    if diff["hi"] < 0:
        return "beats"
    if diff["lo"] > 0:
        return "loses"
    return "not separated"


def score(records: list[dict], criterion: str) -> dict:
    """Scores of the three predictors on ``criterion`` over the uncensored ``records``
    (``attach_lambda_only`` already applied), all on the same rows.

    Returns ``{"criterion", "n_rows", "n_scored", "n_censored", "reasons": {reason: rows},
    "abs": {predictor: mean_ci}, "kept": {...}, "diff_abs": {baseline: mean_ci of
    theory - baseline abs error}, "diff_kept": {...}, "verdict_abs": {baseline: str},
    "verdict_kept": {...}}``.
    """
    reasons: dict[str, int] = {}
    errs = {p: [] for p in PREDICTORS}
    kept = {p: [] for p in PREDICTORS}
    n_cens = 0
    for rec in records:
        why = censor_reasons(rec, criterion)
        if why:
            n_cens += 1
            for r in why:
                reasons[r] = reasons.get(r, 0) + 1
            continue
        a = rec["actual"][criterion]
        for p, v in predictions(rec, criterion).items():
            errs[p].append(abs_error(v, a))
            kept[p].append(kept_fraction_error(v, a))
    out: dict = {
        "criterion": criterion,
        "n_rows": len(records),
        "n_scored": len(errs["theory"]),
        "n_censored": n_cens,
        "reasons": dict(sorted(reasons.items())),
        "abs": {p: mean_ci(errs[p], nonnegative=True) for p in PREDICTORS},
        "kept": {p: mean_ci(kept[p], nonnegative=True) for p in PREDICTORS},
    }
    for key, e in (("abs", errs), ("kept", kept)):
        diffs = {b: mean_ci(np.subtract(e["theory"], e[b])) for b in PREDICTORS if b != "theory"}
        out[f"diff_{key}"] = diffs
        out[f"verdict_{key}"] = {b: verdict(d) for b, d in diffs.items()}
    return out


# ----------------------------------------------------------------------------- markdown
def _ci_text(m: dict, nd: int = 3, signed: bool = False) -> str:
    """``mean [lo, hi]`` (``+``-signed for differences), ``n/a`` without a mean."""
    if m["mean"] is None:
        return "n/a"
    f = f"{'+' if signed else ''}.{nd}f"
    if m["lo"] is None:
        return format(m["mean"], f)
    return f"{format(m['mean'], f)} [{format(m['lo'], f)}, {format(m['hi'], f)}]"


def _row_seconds(doc: dict) -> float:
    return float(sum(v for v in (doc.get("timings") or {}).values() if v is not None))


def _pred_text(doc: dict) -> str:
    """Predicted ratio, or the one-sided bound when the root lies outside the swept range."""
    if doc["predicted_ratio"] is not None or not doc.get("predicted_bound"):
        return _fmt(doc["predicted_ratio"])
    b = doc["predicted_bound"]
    return f"{'≥' if b['side'] == '>=' else '≤'} {b['ratio']:.3f}"


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def premise_verdict(doc: dict) -> dict | None:
    """The premise checks of a row, re-judged from its stored numbers with the current
    thresholds of :mod:`sparsemil.limit.premises` (so rows computed before a threshold
    changed are judged like new ones): ``{"kkt_ratio", "first_order_share", "anisotropy",
    "failed": [check names], "passed"}``; None when the row has no premise checks."""
    from sparsemil.limit import premises as P

    pr = doc.get("premises")
    if not pr:
        return None
    kkt, order, ani = pr.get("kkt") or {}, pr.get("order") or {}, pr.get("anisotropy") or {}
    kkt_ratio = (
        kkt["residual"] / kkt["bound"]
        if kkt.get("bound") and kkt.get("residual") is not None
        else None
    )
    share, q = order.get("first_order_share"), ani.get("ratio")
    failed = []
    if kkt_ratio is None or kkt_ratio > P.KKT_MAX_SHARE:
        failed.append("kkt")
    if share is not None and share > P.FIRST_ORDER_MAX_SHARE:
        failed.append("order")
    if q is not None and not (1.0 / P.ANISOTROPY_MAX <= q <= P.ANISOTROPY_MAX):
        failed.append("anisotropy")
    det = pr.get("determinism")
    if isinstance(det, dict) and det.get("passed") is False:
        failed.append("determinism")
    return {
        "kkt_ratio": kkt_ratio,
        "first_order_share": share,
        "anisotropy": q,
        "failed": failed,
        "passed": not failed,
    }


def _kkt_share() -> float:
    from sparsemil.limit.premises import KKT_MAX_SHARE

    return float(KKT_MAX_SHARE)


def _premise_cells(doc: dict) -> list[str]:
    """KKT residual / (lambda sqrt D), first-order share, anisotropy, verdict."""
    v = premise_verdict(doc)
    if v is None:
        return ["n/a"] * 4
    return [
        _fmt(v["kkt_ratio"], 2),
        _fmt(v["first_order_share"], 2),
        _fmt(v["anisotropy"], 2),
        "pass" if v["passed"] else "fail: " + ", ".join(v["failed"]),
    ]


def _err_cells(rec: dict, criterion: str) -> str:
    """``theory / λ-only / trace-only`` abs errors, or ``cens.`` with the reason."""
    why = censor_reasons(rec, criterion)
    if why:
        return "cens. (" + "; ".join(why) + ")"
    a = rec["actual"][criterion]
    e = [abs_error(v, a) for v in predictions(rec, criterion).values()]
    return f"**{e[0]:.3f}** / {e[1]:.3f} / {e[2]:.3f}"


def _summary_lines(scores: dict[str, dict]) -> list[str]:
    """Plain sentences: where the theory beats the baselines and where it does not."""
    out = []
    for c, sc in scores.items():
        if sc["n_scored"] == 0:
            out.append(f"- `{c}`: no uncensored row ({sc['n_censored']} censored).")
            continue
        parts = []
        for b in ("lambda_only", "trace_only"):
            v, d = sc["verdict_abs"][b], sc["diff_abs"][b]
            word = {
                "beats": "**beats**",
                "loses": "**loses to**",
                "not separated": "is **not separated** from",
            }[v]
            parts.append(
                f"{word} the {PREDICTOR_NAMES[b]} baseline (theory - baseline {_ci_text(d, signed=True)})"
            )
        out.append(
            f"- `{c}` ({sc['n_scored']} scored rows, {sc['n_censored']} censored): mean abs "
            f"error theory {_ci_text(sc['abs']['theory'])}, λ-only "
            f"{_ci_text(sc['abs']['lambda_only'])}, trace-only "
            f"{_ci_text(sc['abs']['trace_only'])}; the theory " + "; it ".join(parts) + "."
        )
    return out


def _breakdown(
    records: list[dict], key: str, values, criteria, theory_best: list[str] | None = None
) -> list[str]:
    """Mean abs error per ``key`` value and criterion; appends ``"value (criterion)"`` to
    ``theory_best`` where the theory has the lowest mean of the three predictors."""
    head = "configuration" if key == "config" else "L1 strength"
    lines = [
        f"| {head} | criterion | scored / censored | theory | λ-only | trace-only | lowest mean |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in values:
        sub = [r for r in records if r[key] == v]
        if not sub:
            continue
        for c in criteria:
            sc = score(sub, c)
            means = {p: sc["abs"][p]["mean"] for p in PREDICTORS}
            best = min(PREDICTORS, key=lambda p: means[p]) if sc["n_scored"] else None
            label = v if key == "config" else f"L1 {v:g}"
            if best == "theory" and theory_best is not None:
                theory_best.append(f"{label} ({c})")
            lines.append(
                f"| {label} | {c} | {sc['n_scored']} / {sc['n_censored']} "
                f"| {_fmt(means['theory'])} | {_fmt(means['lambda_only'])} "
                f"| {_fmt(means['trace_only'])} | {PREDICTOR_NAMES.get(best, 'n/a')} |"
            )
    return lines


def write_markdown(
    path: Path,
    out: Path,
    profile: dict,
    rows: list,
    protocol: str,
    extra: list[str] | None = None,
) -> dict:
    """Score the finished rows under ``out`` and write the markdown ``path`` and
    ``out/summary.json``; returns the summary."""
    docs, records = [], []
    for row_name, name, lmbda, seed in rows:
        f = out / row_name / "limit.json"
        if not f.exists():
            continue
        doc = json.loads(f.read_text())
        n = int(profile[name][0]["sparse_epoch"])
        docs.append(doc)
        records.append(row_record(name, lmbda, seed, doc, rho_max=(n - 1) / n))
    attach_lambda_only(records)
    scores = {c: score(records, c) for c in SCORED_CRITERIA}
    done = len(records)

    # protocol placeholders: rows done and seconds per row per configuration
    for name in profile:
        secs = [_row_seconds(d) for d, r in zip(docs, records, strict=True) if r["config"] == name]
        n_rows = sum(1 for r in rows if r[1] == name)
        protocol = protocol.replace(f"{{rows:{name}}}", f"{len(secs)} / {n_rows}")
        protocol = protocol.replace(
            f"{{secs:{name}}}",
            f"{np.median(secs):.0f}, {np.max(secs):.0f}" if secs else "n/a",
        )

    table = [
        "| criterion | predictor | scored rows | mean abs error [95% CI] "
        "| mean kept-fraction error [95% CI] | theory - predictor, abs error [95% CI] "
        "| theory vs predictor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c, sc in scores.items():
        for p in PREDICTORS:
            diff = "" if p == "theory" else _ci_text(sc["diff_abs"][p], signed=True)
            ver = "" if p == "theory" else sc["verdict_abs"][p]
            table.append(
                f"| {c} | {PREDICTOR_NAMES[p]} | {sc['n_scored']} | {_ci_text(sc['abs'][p])} "
                f"| {_ci_text(sc['kept'][p])} | {diff} | {ver} |"
            )
    cens = [
        "| criterion | censored rows | reasons (rows; a row may have several) |",
        "| --- | --- | --- |",
    ]
    for c, sc in scores.items():
        why = ", ".join(f"{k}: {v}" for k, v in sc["reasons"].items()) or "none"
        cens.append(f"| {c} | {sc['n_censored']} / {sc['n_rows']} | {why} |")

    # premises and probe spread over all finished rows
    prem = [premise_verdict(d) or {"passed": False, "failed": ["not checked"]} for d in docs]
    n_pass = sum(1 for p in prem if p["passed"])
    n_kkt = sum(1 for p in prem if "kkt" in p["failed"])
    n_failed = {
        k: sum(1 for p in prem if k in p["failed"])
        for k in ("kkt", "order", "anisotropy", "determinism", "not checked")
        if any(k in p["failed"] for p in prem)
    } or {"none": 0}
    widths = [
        d["uncertainty"]["interval_90"][1] - d["uncertainty"]["interval_90"][0]
        for d in docs
        if (d.get("uncertainty") or {}).get("interval_90")
        and None not in d["uncertainty"]["interval_90"]
    ]
    by_premise = []
    for label, want in (("premises pass", True), ("premises fail", False)):
        sub = [r for r, p in zip(records, prem, strict=True) if p["passed"] == want]
        sc = score(sub, "drop_1pt")
        by_premise.append(
            f"{label}: {sc['n_scored']} scored rows, theory {_fmt(sc['abs']['theory']['mean'])}"
            f" / λ-only {_fmt(sc['abs']['lambda_only']['mean'])}"
            f" / trace-only {_fmt(sc['abs']['trace_only']['mean'])}"
        )

    lines = []
    for d, rec in zip(docs, records, strict=True):
        u = d.get("uncertainty") or {}
        iv = u.get("interval_90")
        iv_text = f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv and None not in iv else ""
        b = d.get("bounds") or {}
        act = d["actual_ratio"]
        lines.append(
            f"| {rec['config']} | {rec['lmbda']:g} | {rec['seed']} "
            f"| {d['dense']['test_acc']:.3f} | {d['epsilon']:.4f} "
            f"| {_pred_text(d)}{iv_text} | [{_fmt(b.get('lower'))}, {_fmt(b.get('upper'))}] "
            f"| {_fmt(rec['lambda_only']['drop_1pt'])} / {_fmt(rec['lambda_only']['official'])} "
            f"| {_fmt(act.get('drop_1pt'))} | {_fmt(act.get('official'))} "
            f"| {_err_cells(rec, 'drop_1pt')} | {_err_cells(rec, 'official')} "
            f"| {' | '.join(_premise_cells(d))} | {_row_seconds(d):.0f} |"
        )

    # where the theory has the lowest mean error; the trace bracket's use
    theory_best: list[str] = []
    by_cfg = _breakdown(records, "config", list(profile), ("drop_1pt", "official"), theory_best)
    strengths = sorted({r[2] for r in rows})
    by_l1 = _breakdown(records, "lmbda", strengths, ("drop_1pt", "official"), theory_best)
    n_cells = sum(1 for ln in by_cfg[2:] + by_l1[2:] if not ln.endswith("| n/a |"))
    upper_at_end = sum(
        1
        for d, r in zip(docs, records, strict=True)
        if (d.get("bounds") or {}).get("upper") is not None
        and d["bounds"]["upper"] >= r["rho_max"] - _AT_END_TOL
    )
    inside = sum(
        1
        for d in docs
        if None not in ((d.get("bounds") or {}).get("lower"), (d.get("bounds") or {}).get("upper"))
        and d["actual_ratio"].get("drop_1pt") is not None
        and d["bounds"]["lower"] <= d["actual_ratio"]["drop_1pt"] <= d["bounds"]["upper"]
    )

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
        *_summary_lines(scores),
        f"- premises: {n_pass} of {done} rows pass all premise checks; failing: "
        + ", ".join(f"{k} in {v}" for k, v in n_failed.items())
        + f" (KKT: residual of CE + lambda ||w||_1 above {_kkt_share():g} x lambda sqrt(D), "
        "w* not a stationary point; the thresholds of `sparsemil.limit.premises` applied to "
        "the stored numbers). "
        + (
            "`drop_1pt` mean abs errors (theory / λ-only / trace-only) by verdict: "
            + "; ".join(by_premise)
            + "."
            if 0 < n_pass < done
            else "So no subset of rows inside the premises can be scored apart."
            if n_pass == 0
            else ""
        ),
        f"- spread over SLQ probes: median width of the 90% interval "
        f"{_fmt(float(np.median(widths)) if widths else None)} (max "
        f"{_fmt(float(np.max(widths)) if widths else None)}) over {len(widths)} rows.",
        f"- the theory has the lowest mean abs error of the three predictors in "
        f"{len(theory_best)} of the {n_cells} configuration / L1-strength cells below"
        + (": " + ", ".join(theory_best) if theory_best else "")
        + ".",
        f"- trace bracket: the actual `drop_1pt` ratio lies inside [lower, upper] in {inside} "
        f"of {done} rows; its upper end (chord bound) is at the largest swept ratio in "
        f"{upper_at_end} of {done} rows, where the bracket says no more than its lower end.",
        "",
        "Means over the scored (uncensored) rows; all three predictors on the same rows; "
        '95% Student-t intervals. "beats"/"loses": the interval of theory - baseline '
        "lies below/above 0. The λ-only baseline's error is the seed-to-seed spread of the "
        "measured limit at a fixed configuration and L1 strength: a predictor that does not "
        "beat it predicts a row's limit less well than the limits measured on the other "
        "seeds do.",
        "",
        *table,
        "",
        "### Censored rows (not scored)",
        "",
        *cens,
        "",
        "### By configuration (mean abs error over the scored rows)",
        "",
        *by_cfg,
        "",
        "### By L1 strength (mean abs error over the scored rows)",
        "",
        *by_l1,
        "",
        *(extra or []),
        "## Rows",
        "",
        "Columns: dense test accuracy; epsilon; theory's predicted ratio with the 90% "
        "interval over the 4 SLQ probes (`≥ r`: the root lies beyond the sweep); the trace "
        "bracket [lower, upper] on the prediction (lower = the trace-only baseline); the "
        "λ-only baseline for `drop_1pt` / `official`; the actual ratio by `drop_1pt` and by "
        "`official`; abs errors theory / λ-only / trace-only per criterion (`cens.`: not "
        "scored, with the reason); premises: KKT residual / (lambda sqrt D) (passes at "
        f"<= {_kkt_share():g}), "
        "first-order share of the loss change at the prediction, anisotropy (Rayleigh "
        "quotient of the pruning direction / mean eigenvalue), verdict; seconds per row.",
        "",
        "| config | L1 | seed | dense acc | eps | theory [90% probes] | trace bracket "
        "| λ-only (d1 / off) | actual drop_1pt | actual official | abs err drop_1pt "
        "(theory / λ / trace) | abs err official (theory / λ / trace) | KKT / λ√D "
        "| 1st-order share | anisotropy | premises | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- | --- |",
        *lines,
        "",
    ]
    summary = {
        "rows_done": done,
        "rows_total": len(rows),
        "scores": scores,
        "premises_passed": n_pass,
        "kkt_failed": n_kkt,
        "premise_failures": n_failed,
        "probe_interval_width_median": float(np.median(widths)) if widths else None,
    }
    from sparsemil.io import atomic_write_json, atomic_write_text

    atomic_write_text(path, "\n".join(head))
    atomic_write_json(out / "summary.json", summary)
    return summary


#: The commit whose table used the previous protocol (kept for comparison in git history).
PREVIOUS_PROTOCOL_COMMIT = "a9e889f"


def protocol_text(profile: dict, seeds, strengths, workers: int) -> str:
    """The protocol section; it was written (and the scoring fixed) before the rerun."""
    lines = [
        "## Protocol",
        "",
        "Fixed before the rerun and applied to every row; nothing is chosen per row or tuned "
        "to the table.",
        "",
        f"- L1 strengths {', '.join(f'{s:g}' for s in strengths)} x seeds "
        f"{', '.join(map(str, seeds))} per configuration (chosen in advance, unchanged from the "
        "previous protocol); SGD, momentum 0.9, constant learning rate, L1 on every weight and "
        "bias (official default), kaiming-normal init; epochs as in the settings below.",
        "- epsilon = std (ddof 0) of the mean training cross-entropy of the mini-batches of 128 "
        "(`limit.epsilon_batch_size`, official) over one seeded shuffle of the training set at "
        "w* -- the official rule, never tuned.",
        "- Hessian: mean training cross-entropy at w* over the **full training set** "
        "(`limit.hessian_samples` null) in every configuration; SLQ with **4 Rademacher "
        "probes** x `lanczos_iter` steps (`lanczos_num` default 4), probes seeded by the row "
        "seed; prediction rho = gw(R(rho)) by bisection on the interpolated R(rho) "
        "(non-positive Ritz values `abs`, the default). The 90% interval over probes is the "
        "bootstrap (percentile) interval of the prediction over the 4 probes.",
        "- actual ratio, two criteria on the grid i / sparse_epoch: `drop_1pt` (largest ratio "
        "before test accuracy first falls more than 1 point below dense) and `official` "
        "(largest ratio whose test accuracy is strictly above dense; undefined when none is).",
        "- premises (in every row's `limit.json`): KKT residual of CE + lambda ||w||_1 against "
        "lambda sqrt(D), first-order share of the loss change at the predicted ratio, "
        "anisotropy (Rayleigh quotient of the pruning direction over the mean eigenvalue).",
        f"- rows run in {workers} worker process(es), one torch thread each, on a shared "
        "2-core CPU machine; a row's seconds are train + epsilon + sweep + Hessian + spectrum "
        "+ premise checks.",
        "",
        f"Changes from the previous protocol (the table at commit `{PREVIOUS_PROTOCOL_COMMIT}`, "
        "kept in git history): the Hessian subsets (`hessian_samples` 2000 for fmnist-mlp, 500 "
        "for digits-fc5 and fmnist-fc5q) and `lanczos_num: 1` are removed, so the official "
        "defaults (full-data Hessian, epsilon at batch 128, 4 probes) apply to all rows; the "
        "3x-epochs training-length check is not part of this rerun, and no number from the "
        "previous protocol enters the summary below.",
        "",
        "### Scoring (fixed before the rerun)",
        "",
        "- Predictors: **theory** (`predicted_ratio`); **lambda-only** baseline: the mean of "
        "the actual limits (same criterion) of the *other* rows with the same configuration "
        "and L1 strength (leave-one-out over seeds); **trace-only** baseline "
        "(`bounds.trace_only`): the prediction from the Gaussian width of an isotropic "
        "spectrum with the same trace Tr|H| (the Jensen lower end of the trace bracket).",
        "- Errors per criterion: abs error |pred - actual| and kept-fraction error "
        "|(1 - pred) - (1 - actual)| / (1 - actual).",
        "- Censored rows are counted and reported separately, never scored (in particular "
        "never as error 0): a row is censored for a criterion when the actual ratio is "
        "undefined or at the largest swept ratio (accuracy never fell), or when any of the "
        "three predictions is undefined or at the largest swept ratio (`predicted_bound` set: "
        "the root of rho = gw(R(rho)) lies beyond the sweep). All three predictors are scored "
        "on the same (uncensored) rows.",
        "- 95% confidence intervals: Student-t over the scored rows for each mean error, and "
        "for the paired difference theory - baseline. The theory *beats* a baseline on a "
        "criterion when the whole interval of that difference is below 0, *loses* when it is "
        "above 0; otherwise the data do not separate them.",
        "",
        "| configuration | description | settings | rows | seconds per row (median, max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (cfg, desc) in profile.items():
        keys = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("model", "limit"))
        limit = cfg.get("limit") or {}
        keys += ", limit: " + (", ".join(f"{k}={v}" for k, v in limit.items()) or "defaults")
        lines.append(f"| {name} | {desc} | {keys} | {{rows:{name}}} | {{secs:{name}}} |")
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
    ap.add_argument(
        "--tiny", action="store_true", help="CI-sized run (2 rows: 2 seeds, one L1 strength)"
    )
    ap.add_argument(
        "--markdown-only",
        action="store_true",
        help="run no row: rewrite the markdown from the rows already in --out",
    )
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
        profile, seeds, strengths = TINY, (0, 1), (2e-3,)
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
    if args.markdown_only:
        todo = []
    if args.longer and not args.markdown_only:
        for row_name, name, lmbda, seed in _longer_rows(profile, seeds, strengths):
            if (args.out_long / row_name / "limit.json").exists():
                continue
            cfg = json.loads(json.dumps(profile[name][0]))
            cfg.update(lmbda=float(lmbda), seed=int(seed), epoch=LONGER_FACTOR * cfg["epoch"])
            todo.append((str(args.out_long / row_name), cfg))

    def write() -> dict:
        extra = longer_section(args.out, args.out_long, profile, seeds, strengths)
        return write_markdown(doc, args.out, profile, rows, protocol, extra)

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
