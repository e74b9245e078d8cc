"""``sparsemil mil`` sub-commands: train, cv, test, predict, benchmark, synth.

Options given on the command line override the ``--config`` file; heavy imports (torch,
Lightning) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from sparsemil.errors import SparsemilError

app = typer.Typer(
    help="Multiple-instance learning: train, cross-validate, test and apply MIL models "
    "(MMIL-Transformer and the torchmil baselines abmil, transmil, dsmil, clam_sb, dtfdmil).",
    no_args_is_help=True,
)

MODELS_HELP = "mmil | abmil | transmil | dsmil | clam_sb | dtfdmil"

# Shared options (Typer OptionInfo objects may be reused as defaults).
O_CONFIG = typer.Option(None, "--config", "-c", help="YAML/JSON config (flags override it).")
O_DATA = typer.Option(
    None,
    "--data",
    help="Bags: classic-MIL CSV or benchmark name (musk1, musk2, elephant, ucsb_breast_cancer), CLAM dataset CSV, official split CSV, a folder of per-slide .h5/.pt/DSMIL .csv files (with --labels), or a DSMIL bag-list CSV.",
)
FORMAT_HELP = "auto | mil-csv | clam | split | folder | h5 | pt | dsmil-csv."
O_FORMAT = typer.Option(None, "--format", help=FORMAT_HELP)
O_LABELS = typer.Option(
    None,
    "--labels",
    help="Label CSV (slide_id,label; CLAM dataset CSV) for a folder of per-slide files.",
)
O_FOLDS_CSV = typer.Option(
    None,
    "--folds-csv",
    help="Replay the folds of an earlier run's OUT/folds.csv instead of drawing new ones.",
)
O_DATA_DIR = typer.Option(
    None, "--data-dir", help="Folder of per-slide .h5/.pt feature files (clam/split formats)."
)
O_NCLS = typer.Option(
    None,
    "--n-classes",
    help="Number of bag classes (default: from the labels -- max label + 1, at least 2, or the number of class names).",
)
O_MODEL = typer.Option(None, "--model", "-m", help=MODELS_HELP)
O_MKW = typer.Option(
    None, "--model-kwargs", help="Model options as JSON, e.g. '{\"embed_dim\": 128}'."
)
O_SEED = typer.Option(
    None, "--seed", help="Seed of splits, initialisation and training (default 0)."
)
O_FOLDS = typer.Option(None, "--folds", help="Number of CV folds (default 10).")
O_EPOCHS = typer.Option(None, "--max-epochs", help="Maximum epochs (default 100).")
O_LR = typer.Option(None, "--lr", help="AdamW learning rate (default 2e-4).")
O_WD = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 1e-5).")
O_BS = typer.Option(
    None, "--batch-size", help="Bags per step per process (default 1; >1 pads + masks)."
)
O_ACC = typer.Option(
    None, "--accumulate-grad-batches", help="Gradient accumulation steps (default 1)."
)
O_L1 = typer.Option(
    None,
    "--lmbda",
    "--l1",
    help="L1 strength: loss += lmbda * sum|theta| over all weights and biases (default 0).",
)
O_PAT = typer.Option(None, "--patience", help="Early-stopping patience in epochs (default 20).")
O_START = typer.Option(
    None, "--stop-start-epoch", help="No early stop before this epoch (default 50)."
)
O_ES = typer.Option(
    None,
    "--early-stopping/--no-early-stopping",
    help="Early stopping on validation loss (default on).",
)
O_VAL = typer.Option(
    None, "--val-fraction", help="Share of training bags held out for validation (default 0.1)."
)
O_STD = typer.Option(
    None,
    "--standardize/--no-standardize",
    help="z-score features with training statistics (default: on for mil-csv).",
)
O_NTEST = typer.Option(
    None,
    "--num-test",
    help="Repeated test passes (random grouping), reported as mean ± std (default 1).",
)
O_ACCEL = typer.Option(None, "--accelerator", help="cpu | gpu | auto (default cpu).")
O_DEV = typer.Option(
    None, "--devices", help="Processes/GPUs per machine; >1 runs DDP (gloo on CPU)."
)
O_NODES = typer.Option(
    None, "--num-nodes", help="Machines for DDP (launch with torchrun or SLURM)."
)
O_STRAT = typer.Option(
    None, "--strategy", help="Lightning strategy (default auto; ddp when devices > 1)."
)
O_THREADS = typer.Option(
    None,
    "--threads",
    help="torch threads per process (0 = default; 1 is fastest for small models).",
)
O_PROG = typer.Option(None, "--progress/--no-progress", help="Progress bars (default on).")
O_OUT = typer.Option(None, "--out", "-o", help="Output folder.")
O_RESUME = typer.Option(
    False, "--resume", help="Continue a killed run in --out from its last finished epoch."
)

#: The options of ``mil train`` and ``mil cv``, written once: (field, type, option). Each
#: name is a field of :class:`sparsemil.train.config.MILTrainConfig` (``threads`` sets
#: ``num_threads``); ``None`` means "keep the config file's value".
TRAINING_OPTIONS: list[tuple[str, Any, Any]] = [
    ("data", str | None, O_DATA), ("format", str | None, O_FORMAT),
    ("data_dir", str | None, O_DATA_DIR), ("labels", str | None, O_LABELS),
    ("n_classes", int | None, O_NCLS), ("model", str | None, O_MODEL),
    ("model_kwargs", str | None, O_MKW), ("seed", int | None, O_SEED),
    ("folds", int | None, O_FOLDS), ("folds_csv", str | None, O_FOLDS_CSV),
    ("max_epochs", int | None, O_EPOCHS), ("lr", float | None, O_LR),
    ("weight_decay", float | None, O_WD), ("batch_size", int | None, O_BS),
    ("accumulate_grad_batches", int | None, O_ACC), ("lmbda", float | None, O_L1),
    ("patience", int | None, O_PAT), ("stop_start_epoch", int | None, O_START),
    ("early_stopping", bool | None, O_ES), ("val_fraction", float | None, O_VAL),
    ("standardize", bool | None, O_STD), ("num_test", int | None, O_NTEST),
    ("accelerator", str | None, O_ACCEL), ("devices", int | None, O_DEV),
    ("num_nodes", int | None, O_NODES), ("strategy", str | None, O_STRAT),
    ("threads", int | None, O_THREADS), ("progress", bool | None, O_PROG),
    ("out", str | None, O_OUT),
]  # fmt: skip


def with_training_options(fn: Any) -> Any:
    """Give command ``fn(config, ..., **options)`` the :data:`TRAINING_OPTIONS` as keyword
    parameters (Typer reads ``__signature__``), so the option list exists once."""
    import inspect

    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=tp)
        for name, tp, opt in TRAINING_OPTIONS
    ]
    fn.__signature__ = sig.replace(parameters=[*own, *shared])
    return fn


def training_config(config: Path | None, options: dict[str, Any]) -> Any:
    """The :class:`MILTrainConfig` of a ``train``/``cv`` call: file, then flags."""
    flags = dict(options)
    flags["num_threads"] = flags.pop("threads", None)
    return _config(config, **flags)


def _config(config: Path | None, **flags: Any) -> Any:
    from sparsemil.train.config import MILTrainConfig, load_config

    cfg = load_config(config) if config is not None else MILTrainConfig()
    mkw = flags.pop("model_kwargs", None)
    if mkw is not None:
        try:
            parsed = json.loads(mkw)
        except json.JSONDecodeError as err:
            raise SparsemilError(
                f"--model-kwargs is not valid JSON ({err.msg}); e.g. '{{\"embed_dim\": 128}}'"
            ) from None
        if not isinstance(parsed, dict):
            raise SparsemilError(
                "--model-kwargs must be a JSON object, e.g. '{\"embed_dim\": 128}'"
            )
        flags["model_kwargs"] = (
            {**cfg.model_kwargs, **parsed} if flags.get("model") in (None, cfg.model) else parsed
        )
    if flags.get("model") not in (None, cfg.model) and "model_kwargs" not in flags:
        flags["model_kwargs"] = {}  # options of the config's model do not apply to another
    cfg = cfg.override(**flags)
    if cfg.num_threads > 0:  # process-wide: set here, at the entry point
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    return cfg


def _fmt(m: dict[str, Any]) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


@app.command("train")
@with_training_options
def train(
    config: Path | None = O_CONFIG,
    fold: int | None = typer.Option(
        None, "--fold",
        help="Without a split CSV: train on fold FOLD of --folds or --folds-csv (default 0).",
    ),
    resume: bool = O_RESUME,
    **options: Any,
) -> None:  # fmt: skip
    """Train one model (checkpoints, early stopping, CSV logs) and test it on the split's
    test part. Writes OUT/model.safetensors, OUT/metrics.json and OUT/predictions.csv."""
    cfg = training_config(config, {**options, "fold": fold})
    from sparsemil.io import atomic_write_json
    from sparsemil.train.data import holdout_for, load_mil_data
    from sparsemil.train.evaluate import write_predictions_csv
    from sparsemil.train.trainer import fit_fold, is_launched_child, preflight, prepare_out_dir

    data = load_mil_data(cfg)
    split = holdout_for(data, cfg)
    preflight(cfg, data)
    run_dir = prepare_out_dir(cfg.out or "runs/mil-train", resume, "metrics.json")
    result = fit_fold(cfg, data, split, run_dir, resume=resume)
    if is_launched_child() or result is None:
        return
    rows = result.pop("predictions", [])
    metrics = {
        **{m: v for m, v in (result.get("test_time") or {}).items()},
        **result,
        "predictions": rows,
    }
    write_predictions_csv(run_dir / "predictions.csv", rows)
    atomic_write_json(run_dir / "metrics.json", metrics)
    typer.echo(
        f"model: {run_dir / 'model.safetensors'} (best epoch {result['best_epoch']}, {result['epochs_done']} epochs)"
    )
    if "metrics" in result:
        tt = result["test_time"]
        typer.echo(
            f"test ({result['n_test']} bags, {cfg.num_test} pass(es)): accuracy {_fmt(tt['accuracy'])}, AUC {_fmt(tt['auc'])}"
        )
    typer.echo(f"metrics: {run_dir / 'metrics.json'}")


@app.command("cv")
@with_training_options
def cv(config: Path | None = O_CONFIG, resume: bool = O_RESUME, **options: Any) -> None:
    """Stratified k-fold cross-validation. Writes OUT/metrics.json (accuracy, auc, ... as
    {mean, std} over folds; per-fold results; predictions), OUT/predictions.csv, OUT/folds.csv."""
    cfg = training_config(config, options)
    from sparsemil.train.cv import run_cv

    out_dir = cfg.out or "runs/mil-cv"
    m = run_cv(cfg, out_dir, resume=resume)
    if m is None:
        return
    typer.echo(
        f"{cfg.model} on {Path(m['protocol']['data']).stem}, {m['protocol']['folds']}-fold CV (seed {cfg.seed}): "
        f"accuracy {_fmt(m['accuracy'])}, AUC {_fmt(m['auc'])}, balanced accuracy "
        f"{_fmt(m['balanced_accuracy'])}, F1 {_fmt(m['f1'])}"
    )
    typer.echo(f"metrics: {Path(out_dir) / 'metrics.json'}")


@app.command("test")
def test(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="model.safetensors written by `mil train`."
    ),
    data: str = typer.Option(
        ..., "--data", help="Labelled bags (same forms as `mil train --data`)."
    ),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    data_dir: str | None = O_DATA_DIR,
    labels: str | None = O_LABELS,
    part: str = typer.Option(
        "auto",
        "--part",
        help="auto (test part of a split CSV, else all bags) | all | train | val | test.",
    ),
    num_test: int = typer.Option(
        1, "--num-test", help="Repeated passes (random grouping): mean ± std."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the test passes."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder for metrics.json and predictions.csv."
    ),
    allow_seen: bool = typer.Option(
        False, "--allow-seen",
        help="Score bags the model was trained or selected on, flagged in every output.",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, auto, ..."),
) -> None:  # fmt: skip
    """Evaluate a trained checkpoint on labelled bags: accuracy, balanced accuracy, AUC, F1
    (mean ± std over --num-test passes) and per-slide predictions."""
    from sparsemil.train.inference import evaluate_checkpoint, load_predictor

    predictor = load_predictor(checkpoint, device)
    m = evaluate_checkpoint(
        predictor, data, out, format=format, data_dir=data_dir, labels=labels, part=part,
        num_test=num_test, seed=seed, allow_seen=allow_seen,
    )  # fmt: skip
    n_seen = m["seen_in_training"]["n_bags"]
    typer.echo(
        f"{m['n_bags']} bags, {num_test} pass(es): accuracy {_fmt(m['accuracy'])}, "
        f"AUC {_fmt(m['auc'])}" + (f"; WARNING {n_seen} bags seen in training" if n_seen else "")
    )
    typer.echo(f"metrics: {out / 'metrics.json'}")


@app.command("predict")
def predict(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="model.safetensors written by `mil train`."
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="A per-slide feature file (.h5/.pt/.csv), a folder of them, or a classic-MIL CSV with --format mil-csv.",
    ),
    format: str = typer.Option(
        "auto", "--format", help="auto (file or folder of per-slide files) | mil-csv."
    ),
    num_test: int = typer.Option(1, "--num-test", help="Passes to average (random grouping)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the passes."),
    out: Path = typer.Option(..., "--out", "-o", help="Predictions CSV to write."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, auto, ..."),
) -> None:
    """Predict bag probabilities for new slides (labels not needed); writes a CSV with one
    row per slide: slide_id, predicted class, probability per class."""
    from sparsemil.train.inference import load_predictor, predict_checkpoint

    predictor = load_predictor(checkpoint, device)
    rows = predict_checkpoint(predictor, data, out, format=format, num_test=num_test, seed=seed)
    typer.echo(f"{len(rows)} predictions: {out}")


@app.command("benchmark")
def benchmark(
    datasets: str = typer.Option(
        "musk1,musk2,elephant,ucsb_breast_cancer",
        "--datasets",
        help="Comma-separated benchmark names.",
    ),
    models: str = typer.Option(
        "mmil,abmil,transmil,dsmil,clam_sb,dtfdmil", "--models", help="Comma-separated models."
    ),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated training seeds."),
    folds: int = typer.Option(10, "--folds", help="CV folds."),
    max_epochs: int | None = typer.Option(
        None, "--max-epochs", help="Override the benchmark recipe's epochs."
    ),
    out: Path = typer.Option(
        Path("runs/mil-benchmark"), "--out", "-o", help="Run folder (resumable)."
    ),
    table: Path | None = typer.Option(
        None,
        "--table",
        help="Markdown table to (re)write (default OUT/mil_benchmarks.md; pass "
        "docs/results/mil_benchmarks.md to regenerate the shipped one).",
    ),
    progress: bool = typer.Option(
        False, "--progress/--no-progress", help="Per-epoch progress bars."
    ),
    table_only: bool = typer.Option(
        False, "--table-only", help="Only rewrite the table from the runs under --out."
    ),
) -> None:
    """Cross-validate every model on the classic MIL benchmarks and (re)write the Markdown
    table. Finished (dataset, model, seed) runs are reused, so an interrupted benchmark
    continues where it stopped; the table is rewritten after every finished run."""
    from sparsemil.experiments.mil_benchmark import run_benchmark

    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    try:
        seed_list = [int(s) for s in split(seeds)]
    except ValueError:
        raise SparsemilError(f"seeds must be comma-separated integers (got {seeds!r})") from None
    table = table if table is not None else out / "mil_benchmarks.md"
    if table_only:
        from sparsemil.experiments.mil_benchmark import rewrite_table

        rewrite_table(out, table, folds, seed_list)
        typer.echo(f"table: {table}")
        return
    import torch

    torch.set_num_threads(1)  # tiny models: threads only add contention
    run_benchmark(
        split(datasets),
        split(models),
        seed_list,
        folds,
        out,
        table,
        max_epochs=max_epochs,
        progress=progress,
    )
    typer.echo(f"table: {table}")


@app.command("synth")
def synth(
    out: Path = typer.Option(
        ..., "--out", "-o",
        help="Folder to write the cohort to (one sub-folder w<rate> per rate when several).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds pools, encoder, bag sizes, labels, slides."),
    size: str = typer.Option(
        "cpu", "--size",
        help="Bag sizes: small (median 300, max 1000) | medium (median 1.5k, tail to 15k) | "
        "cpu (median 5k, tail to 50k) | large (median 20k, tail to 150k).",
    ),
    witness_rate: str = typer.Option(
        "0.05", "--witness-rate",
        help="Witness fraction of a positive slide; a list (0.002,0.01,0.05 or 0.2%,1%,5%) "
        "writes one cohort per rate, on the same slides.",
    ),
    n_train: int = typer.Option(270, "--n-train", help="Training slides (CAMELYON16: 270)."),
    n_test: int = typer.Option(130, "--n-test", help="Test slides (CAMELYON16: 130)."),
    positive_fraction: float = typer.Option(
        0.4, "--positive-fraction", help="Share of positive slides in each part."
    ),
    images: str = typer.Option("fashion-mnist", "--images", help="fashion-mnist | digits."),
    images_path: Path | None = typer.Option(
        None, "--images-path",
        help="Folder of the Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist).",
    ),
    dim: int | None = typer.Option(
        None, "--dim", help="Feature dimension (default 64 for fashion-mnist, 32 for digits)."
    ),
    patch_size: int = typer.Option(
        256, "--patch-size", help="Patch side in level-0 pixels (step of the coordinate grid)."
    ),
    tumour_class: str | None = typer.Option(
        None, "--tumour-class", help="Witness class, name or index (default coat / 8)."
    ),
    normal_classes: str | None = typer.Option(
        None, "--normal-classes", help="Comma-separated normal classes (default: all others)."
    ),
    max_regions: int = typer.Option(
        3, "--max-regions", help="At most this many tumour regions per positive slide."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cohort in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:  # fmt: skip
    """Write a synthetic slide-scale MIL cohort from real images (Fashion-MNIST or digits):
    CLAM/Trident h5 files with instance labels, labels/train/test/split CSVs and cohort.json
    (with the instance-level linear-probe AUC), ready for mil cv/train/test/predict."""
    from sparsemil import config as config_system
    from sparsemil.data.synth import SynthConfig, parse_rates, synth_cohort

    values = {
        "out": str(out), "seed": seed, "size": size, "witness_rate": parse_rates(witness_rate),
        "n_train": n_train, "n_test": n_test, "positive_fraction": positive_fraction,
        "images": images, "images_path": None if images_path is None else str(images_path),
        "dim": dim, "patch_size": patch_size, "tumour_class": tumour_class,
        "normal_classes": None if normal_classes is None
        else [c.strip() for c in normal_classes.split(",") if c.strip()],
        "max_regions": max_regions, "overwrite": overwrite,
    }  # fmt: skip
    cfg = config_system.from_mapping(SynthConfig, values, "synth")
    res = synth_cohort(cfg, progress=progress)
    typer.echo(
        f"{res.n_bags} slides, {res.n_instances} instances (median {res.median_instances:.0f}, "
        f"max {res.max_instances}); linear-probe AUC of the tumour class {res.probe_auc:.3f}; "
        f"{res.seconds['total']:.1f} s"
    )
    for d in res.dirs:
        typer.echo(
            f"cohort: {d} (cohort.json, labels.csv, train.csv, test.csv, split.csv, h5_files/)"
        )
