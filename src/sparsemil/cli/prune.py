"""``sparsemil prune`` sub-commands: ``train``, ``sweep``, ``export`` (and ``run``).

- ``sparsemil prune train --config cfg.yaml --out DIR`` -- L1-penalised training; writes
  ``DIR/model.safetensors`` (weights + JSON metadata), ``DIR/config.json``, ``DIR/history.json``.
- ``sparsemil prune sweep --config cfg.yaml --checkpoint CKPT --out DIR`` -- the pruning sweep
  over ``sparse_epoch`` ratios; writes ``DIR/sweep.csv``, ``DIR/sweep.json`` (dense metrics and
  the actual ratio of every criterion), ``DIR/sweep.png`` and ``DIR/pruned_sparse.safetensors``
  (the model pruned at the configured criterion's ratio, compressed), printing dense vs sparse
  bytes.
- ``sparsemil prune export --checkpoint CKPT --ratio R --out FILE`` -- prune and save compressed.

Every output is written atomically. ``run`` lives in :mod:`sparsemil.cli.prune_run`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from sparsemil.cli import prune_mil, prune_run

app = typer.Typer(help="prune commands.", no_args_is_help=True)


@app.command("train")
def train(
    config: Path = typer.Option(..., "--config", help="YAML config (official keys)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    device: str | None = typer.Option(None, "--device", help="Override the config's device."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a model of the zoo with the L1 penalty and save it as safetensors."""
    from sparsemil import config as config_system
    from sparsemil.experiments.vision.config import load_prune_config
    from sparsemil.experiments.vision.run import run_train

    cfg = config_system.override(load_prune_config(config), device=device)
    meta = run_train(cfg, out, progress=not quiet)
    acc = meta["final_test_acc"]
    typer.echo(
        f"trained {cfg.model} on {meta['dataset_name']} for {cfg.epoch} epochs in "
        f"{meta['seconds']:.1f}s; test acc {acc if acc is None else f'{acc:.4f}'}; "
        f"wrote {out / 'model.safetensors'}"
    )


@app.command("sweep")
def sweep(
    config: Path = typer.Option(..., "--config", help="YAML config (official keys)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="model.safetensors from train."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    device: str | None = typer.Option(None, "--device", help="Override the config's device."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Sweep `sparse_epoch` pruning ratios; write CSV, JSON, PNG and the sparse model."""
    from sparsemil import config as config_system
    from sparsemil.experiments.vision.config import load_prune_config
    from sparsemil.experiments.vision.run import run_sweep

    cfg = config_system.override(load_prune_config(config), device=device)
    summary = run_sweep(cfg, checkpoint, out, progress=not quiet)
    for line in summary["lines"]:
        typer.echo(line)
    if "export" in summary:
        ex = summary["export"]
        typer.echo(
            f"pruned at {ex['ratio']:.3f} ({cfg.actual_criterion}): {ex['n_pruned']} of "
            f"{ex['n_weights']} weights ({ex['pruned_fraction']:.2%}); dense "
            f"{ex['dense_bytes']} bytes -> sparse {ex['sparse_bytes']} bytes "
            f"({ex['sparse_bytes'] / ex['dense_bytes']:.2%})"
        )
    parts = ", ".join(
        f"{k}={'undefined' if v is None else f'{v:.3f}'}"
        for k, v in summary["actual_ratio"].items()
    )
    typer.echo(
        f"dense test acc {summary['dense']['test_acc']:.4f}; actual ratio: {parts}; "
        f"wrote {out / 'sweep.csv'}"
    )


@app.command("export")
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="model.safetensors from train."),
    ratio: float = typer.Option(..., "--ratio", help="Pruning ratio in [0, 1]."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
) -> None:
    """Prune a checkpoint globally by magnitude and save it in the compressed format."""
    from sparsemil.experiments.vision.run import run_export

    doc = run_export(checkpoint, ratio, out)
    for line in doc["lines"]:
        typer.echo(line)
    typer.echo(
        f"pruned {doc['n_pruned']} of {doc['n_weights']} weights ({doc['pruned_fraction']:.2%}); "
        f"dense {doc['dense_bytes']} bytes -> sparse {doc['sparse_bytes']} bytes "
        f"({doc['sparse_bytes'] / doc['dense_bytes']:.2%}); wrote {out}"
    )


app.command("run")(prune_run.run)
app.command("mil")(prune_mil.mil)
