"""``sparsemil prune run --config cfg.yaml --out DIR``: the predicted pruning limit end to end.

Train with L1 -> pruning sweep -> Hessian spectrum (SLQ) -> predicted ratio. Writes
``DIR/limit.json`` (predicted_ratio, actual_ratio per criterion, default_criterion, epsilon,
D, spectrum summary, timings), ``DIR/predict.png``, ``DIR/acc_loss.png``, ``DIR/esd.png``,
``spectrum.json``, ``sweep.csv``, ``history.json`` and ``model.safetensors``, atomically.

The config (:class:`sparsemil.experiments.vision.config.PruneConfig`) takes the official keys,
an optional ``limit:`` section and an optional ``mil:`` section (a MIL model instead of a
vision one). Flags override keys; every key is honoured in both modes.
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
    import dataclasses

    import torch

    from sparsemil import config as config_system
    from sparsemil.experiments.vision.config import load_prune_config

    cfg = load_prune_config(config)
    cfg = config_system.override(cfg, device=device)
    limit = config_system.override(
        cfg.limit, negative=negative, hessian_samples=hessian_samples, threads=threads
    )
    cfg = dataclasses.replace(cfg, limit=limit)
    if cfg.limit.threads is not None:
        torch.set_num_threads(int(cfg.limit.threads))
    if cfg.mil is not None:
        from sparsemil.experiments.mil_bridge import run_mil_limit

        doc = run_mil_limit(cfg, out, progress=not quiet)
    else:
        from sparsemil.experiments.vision.run import run_limit

        doc = run_limit(cfg, out, progress=not quiet, log=None if quiet else typer.echo)
    echo_limit(doc, out)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def echo_limit(doc: dict, out: Path) -> None:
    """Print the one-line summary of a ``limit.json`` object, then each of its warnings
    (``warning: ...``, on stderr)."""
    pred = doc["predicted_ratio"]
    act = doc["actual_ratio"].get(doc["default_criterion"])
    official = doc["actual_ratio"].get("official")
    interval = (doc.get("uncertainty") or {}).get("interval_90")
    spread = (
        "" if not interval or None in interval else f" [90%: {interval[0]:.3f}-{interval[1]:.3f}]"
    )
    typer.echo(
        f"predicted ratio {_fmt(pred)}{spread}; actual "
        f"({doc['default_criterion']}) {_fmt(act)}, (official) {_fmt(official)}; "
        f"epsilon {doc['epsilon']:.4g}; D {doc['D']}; wrote {out / 'limit.json'}"
    )
    premises = doc.get("premises")
    if premises:
        typer.echo(f"premises: {premises['verdict']}")
    for warning in doc.get("warnings") or []:
        typer.echo(f"warning: {warning}", err=True)
