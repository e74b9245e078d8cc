"""``sparsemil prune run`` -- placeholder; the pruning-limit issue replaces this module.

It must define ``run(...)``: :mod:`sparsemil.cli.prune` registers it with
``app.command("run")(prune_run.run)``.
"""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    config: Path = typer.Option(..., "--config", help="YAML config (official keys)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
) -> None:
    """Train with L1, sweep, estimate the spectrum and predict the pruning limit."""
    typer.echo(
        "sparsemil prune run: not available yet (the pruning-limit step is not built)", err=True
    )
    raise typer.Exit(code=1)
