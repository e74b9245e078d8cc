"""``sparsemil wsi`` sub-commands: ``extract`` (slides -> feature h5) and ``heatmap``."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Whole-slide images: features for MIL, attention heatmaps.", no_args_is_help=True
)


@app.command("extract")
def extract(
    slide: Path = typer.Option(..., "--slide", help="A slide file or a folder of slides."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder for <stem>.h5 and <stem>_tissue.png."
    ),
    mag: float = typer.Option(20.0, "--mag", help="Target magnification."),
    patch_size: int = typer.Option(256, "--patch-size", help="Patch side in pixels at --mag."),
    backbone: str = typer.Option(
        "resnet50_trunc", "--backbone", help="resnet50_trunc (1024-d), tiny (64-d), torchscript."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="Backbone weights: .safetensors, torch state_dict or TorchScript."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Patches per backbone batch."),
    workers: int | None = typer.Option(
        None, "--workers", help="Patch-reading worker processes (default min(4, CPUs); 0 = none)."
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="K/N: process every N-th slide starting at K (0-based)."
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Micrometres per level-0 pixel (needed when the slide has none)."
    ),
    max_patches: int | None = typer.Option(
        None, "--max-patches", help="At most this many patches per slide (evenly spaced)."
    ),
    min_tissue: float = typer.Option(
        0.25, "--min-tissue", help="Keep patches with at least this tissue fraction."
    ),
    input_size: int | None = typer.Option(
        None, "--input-size", help="Resize patches to this side before the backbone (e.g. 224)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars (default: when on a terminal)."
    ),
) -> None:
    """Detect tissue, patch and encode slides into CLAM/Trident-style feature h5 files.

    Exit status 1 when any slide failed (each failure is one line on stderr, listed again at
    the end); slides whose h5 exists are skipped, so rerunning resumes a killed batch.
    """
    from sparsemil.wsi.extract import ExtractConfig, run_extract
    from sparsemil.wsi.slide import parse_shard

    cfg = ExtractConfig(
        mag=mag,
        patch_size=patch_size,
        batch_size=batch_size,
        workers=workers,
        mpp=mpp,
        max_patches=max_patches,
        min_tissue=min_tissue,
        input_size=input_size,
        device=device,
        progress=progress,
    )
    results = run_extract(
        slide, out, cfg, backbone_name=backbone, weights=weights, shard=parse_shard(shard)
    )
    if any(r.status == "failed" for r in results):
        # SystemExit (not typer.Exit) so the status survives standalone_mode=False in main()
        raise SystemExit(1)


@app.command("heatmap")
def heatmap(
    slide: Path = typer.Option(..., "--slide", help="The slide the h5 was extracted from."),
    h5: Path = typer.Option(..., "--h5", help="Feature h5 (features + coords) of that slide."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="MIL checkpoint (.safetensors from sparsemil mil train)."
    ),
    out: Path = typer.Option(..., "--out", help="Output PNG."),
    thumb_size: int = typer.Option(
        1024, "--thumb-size", help="Longest side of the thumbnail = of the PNG, in pixels."
    ),
    norm: str = typer.Option("rank", "--norm", help="Score normalisation: rank or minmax."),
    alpha: float = typer.Option(0.5, "--alpha", help="Opacity of the heatmap colours."),
    cmap: str = typer.Option("jet", "--cmap", help="Matplotlib colour map."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
) -> None:
    """Draw the MIL model's per-patch attention over a slide thumbnail, with a colour bar."""
    from sparsemil.wsi.heatmap import heatmap_from_checkpoint

    res, predictor = heatmap_from_checkpoint(
        slide, h5, checkpoint, out, thumb_size=thumb_size, normalize=norm, alpha=alpha,
        cmap=cmap, device=device,
    )  # fmt: skip
    probs = ", ".join(
        f"{name} {p:.3f}" for name, p in zip(predictor.class_names, res.probabilities, strict=True)
    )
    typer.echo(
        f"sparsemil: {Path(slide).name}: {res.scores.shape[0]} patches, model "
        f"{predictor.model_name}, class probabilities [{probs}] -> {res.png} "
        f"({res.size[0]}x{res.size[1]})"
    )
