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
    slide: Path | None = typer.Option(
        None,
        "--slide",
        help="Slide whose tissue mask and patch grid are drawn (default: "
        "CMU-1-Small-Region.svs from ../shared/data/wsi; skipped when not found).",
    ),
    threads: int = typer.Option(
        1,
        "--threads",
        min=1,
        help="Torch intra-op threads. The demo's models and bags are small: more threads "
        "mostly add synchronisation, and on a busy machine slow it down many times.",
    ),
) -> None:
    """Offline demo on real data: MMIL vs torchmil baselines on Musk1 (k-fold CV), the
    pruning limit of the trained MMIL (theory vs measurement), the vision pruning-limit
    experiment on digits, a real slide's tissue mask and patch grid, MMIL vs ABMIL on a
    slide-scale synthetic cohort (bag AUC, attention localisation, heatmaps), and a
    self-contained report.html."""
    import torch

    from sparsemil.experiments.demo import run_demo

    torch.set_num_threads(int(threads))  # process-wide: set here, at the entry point
    run_demo(out, preset=preset, progress=progress, log=typer.echo, slide=slide)
