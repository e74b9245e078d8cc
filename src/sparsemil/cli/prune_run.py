"""``sparsemil prune run --config cfg.yaml --out DIR``: the predicted pruning limit end to end.

Train with L1 -> pruning sweep -> Hessian spectrum (SLQ) -> predicted ratio. Writes
``DIR/limit.json`` (predicted_ratio, actual_ratio per criterion, default_criterion, epsilon,
D, spectrum summary, timings), ``DIR/predict.png`` (theory gw(R) against the actual
(R(rho), rho) curve), ``DIR/acc_loss.png`` (accuracy/loss against ratio, predicted ratio
marked), ``DIR/esd.png`` (the eigenvalue density), plus ``spectrum.json``, ``sweep.csv``,
``history.json`` and ``model.safetensors``. Every file is written atomically.

The config takes the official keys (``lanczos_iter``, ``lanczos_num``, ...) and an optional
``limit:`` section (see :class:`sparsemil.prune.limit.LimitOptions`).
"""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    config: Path = typer.Option(..., "--config", help="YAML config (official keys)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    device: str | None = typer.Option(None, "--device", help="Override the config's device."),
    negative: str | None = typer.Option(
        None, "--negative", help="Non-positive eigenvalues: abs (official) or flat."
    ),
    hessian_samples: int | None = typer.Option(
        None, "--hessian-samples", help="Seeded training subset for the Hessian (default all)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train with L1, sweep, estimate the spectrum and predict the pruning limit."""
    from sparsemil.prune.config import load_prune_config
    from sparsemil.prune.limit import LimitOptions, run_limit  # registers the limit: section

    cfg = load_prune_config(config)
    if device:
        cfg.device = device
        cfg.validate()
    opts = cfg.sections.get("limit") or LimitOptions()
    if negative is not None:
        opts.negative = negative
    if hessian_samples is not None:
        opts.hessian_samples = hessian_samples
    if threads is not None:
        opts.threads = threads
    opts.validate()
    cfg.sections["limit"] = opts
    doc = run_limit(cfg, out, progress=not quiet, log=None if quiet else typer.echo)
    pred = doc["predicted_ratio"]
    act = doc["actual_ratio"].get(doc["default_criterion"])
    typer.echo(
        f"predicted ratio {'undefined' if pred is None else f'{pred:.4f}'}; actual "
        f"({doc['default_criterion']}) {'undefined' if act is None else f'{act:.4f}'}; "
        f"epsilon {doc['epsilon']:.4g}; D {doc['D']}; wrote {out / 'limit.json'}"
    )
