"""``sparsemil demo``: the offline main job (see :mod:`sparsemil.demo`)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: a fresh sparsemil-demo-<time> folder)."
    ),
    preset: str = typer.Option(
        "full", "--preset", help="full (the main job, minutes) or tiny (CI-sized, seconds)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Offline demo on real data: MMIL vs torchmil baselines on Musk1 (k-fold CV), the
    pruning limit of the trained MMIL (theory vs measurement), the vision pruning-limit
    experiment on digits, and a self-contained report.html."""
    from sparsemil.demo import run_demo

    run_demo(out, preset=preset, progress=progress, log=typer.echo)
