"""``sparsemil demo``: the offline main job (see :mod:`sparsemil.experiments.demo`)."""

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
    import torch

    from sparsemil.experiments.demo import run_demo

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    run_demo(out, preset=preset, progress=progress, log=typer.echo)
