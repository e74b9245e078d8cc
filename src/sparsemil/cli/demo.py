"""``sparsemil demo``: the offline main job (filled in by the bridge issue)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: a fresh one)."),
) -> None:
    """Run the offline demo on real data and write a report."""
    typer.echo("demo: not assembled yet")
