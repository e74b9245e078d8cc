"""``sparsemil prune mil``: the pruning limit of a trained MIL checkpoint (the bridge).

Accepts a checkpoint written by ``sparsemil mil train`` / ``mil cv`` (MMIL-Transformer or a
torchmil baseline). Reads the bags of its own training run (or ``--data``), sweeps global
magnitude pruning of the Linear weights on the evaluation bags, estimates the Hessian
spectrum over the training bags and writes ``limit.json``, ``sweep.csv`` and the plots.
"""

from __future__ import annotations

from pathlib import Path

import typer


def mil(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="MIL model.safetensors."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    data: str | None = typer.Option(
        None, "--data", help="Bags (default: the data recorded in the checkpoint)."
    ),
    data_dir: str | None = typer.Option(
        None, "--data-dir", help="Folder of per-slide feature files (overrides the checkpoint's)."
    ),
    format: str | None = typer.Option(None, "--format", help="Data format (as for mil train)."),
    labels: str | None = typer.Option(None, "--labels", help="Label CSV (slide_id,label)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, auto: model, sweep and HVPs."),
    eval_split: str = typer.Option("test", "--eval-split", help="test or val bags for the sweep."),
    n_ratios: int = typer.Option(200, "--n-ratios", help="Evenly spaced ratios i/n."),
    lanczos_iter: int = typer.Option(64, "--lanczos-iter", help="Lanczos steps per run."),
    lanczos_num: int = typer.Option(
        4, "--lanczos-num", help="SLQ probes (runs); >= 2 to measure the spread."
    ),
    negative: str = typer.Option("abs", "--negative", help="abs (official) or flat."),
    seed: int = typer.Option(0, "--seed", help="Seed of the SLQ probes."),
    finish: str = typer.Option(
        "none",
        "--finish",
        help="none, or proximal: first move w* to a stationary point of CE + lmbda ||w||_1 "
        "(full-batch proximal gradient; the finished weights go to OUT/finished.safetensors).",
    ),
    finish_tol: float = typer.Option(
        0.1, "--finish-tol", help="Finish until the KKT residual is <= this x lmbda sqrt(D)."
    ),
    finish_max_iter: int = typer.Option(
        200, "--finish-max-iter", help="Most proximal-gradient steps of the finish."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Predicted (Gaussian width) against measured pruning limit of a MIL checkpoint."""
    from sparsemil.cli.prune_run import echo_limit
    from sparsemil.errors import SparsemilError
    from sparsemil.experiments.mil_bridge import load_bridge_bags, mil_limit
    from sparsemil.limit.predict import LimitOptions
    from sparsemil.train.inference import load_predictor

    options = LimitOptions(
        negative=negative, finish=finish, finish_tol=finish_tol, finish_max_iter=finish_max_iter
    )
    options.validate("options")
    for flag, value, low in (("--n-ratios", n_ratios, 2), ("--lanczos-iter", lanczos_iter, 2),
                             ("--lanczos-num", lanczos_num, 1)):  # fmt: skip
        if value < low:  # checked before any bag is read or file written
            raise SparsemilError(f"{flag} {value}: must be >= {low}")
    if out.exists() and not out.is_dir():
        raise SparsemilError(f"--out {out}: is a file, not a folder; pass a folder path")
    if not checkpoint.is_file():
        raise SparsemilError(f"checkpoint {checkpoint}: no such file; pass a model.safetensors")
    predictor = load_predictor(checkpoint, device)  # the one checkpoint loader
    model, meta = predictor.model, predictor.meta
    if finish == "proximal" and not _trained_lmbda(meta) > 0:
        raise SparsemilError(
            f"checkpoint {checkpoint}: trained without L1 (train_config.lmbda is 0), so "
            "--finish proximal has no CE + lmbda ||w||_1 to finish; use --finish none"
        )
    bags = load_bridge_bags(
        meta, data=data, eval_split=eval_split, base=checkpoint.resolve().parent,
        data_dir=data_dir, format=format, labels=labels,
    )  # fmt: skip
    doc = mil_limit(
        model, bags, out, options=options, n_ratios=n_ratios, lanczos_iter=lanczos_iter,
        lanczos_num=lanczos_num, seed=seed, device=predictor.device, progress=progress,
        title=f"{meta['model']} ({checkpoint.name})",
        extra={"model": meta["model"], "checkpoint": str(checkpoint)},
        lmbda=_trained_lmbda(meta), epsilon_batch_size=_training_batch(meta),
        checkpoint_meta=meta,
    )  # fmt: skip
    echo_limit(doc, out)


def _training_batch(meta: dict) -> int:
    """Bags per optimiser step in training (``batch_size`` x ``accumulate_grad_batches``):
    the mini-batch of epsilon."""
    cfg = meta.get("train_config") or {}
    return int(cfg.get("batch_size") or 1) * max(int(cfg.get("accumulate_grad_batches") or 1), 1)


def _trained_lmbda(meta: dict) -> float:
    """The L1 strength the checkpoint was trained with (``train_config.lmbda``; older
    checkpoints say ``l1``); 0 when unrecorded (the premise checks then warn)."""
    cfg = meta.get("train_config") or {}
    value = cfg.get("lmbda", cfg.get("l1", 0.0))
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
