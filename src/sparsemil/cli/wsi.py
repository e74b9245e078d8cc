"""``sparsemil wsi`` sub-commands: ``extract`` (slides -> feature h5) and ``heatmap``."""

from __future__ import annotations

from pathlib import Path

import typer

from sparsemil.cli.flags import append_flags, flags_of

app = typer.Typer(
    help="Whole-slide images: features for MIL, attention heatmaps.", no_args_is_help=True
)


@app.command("extract")
def extract(
    ctx: typer.Context,
    slide: Path = typer.Option(..., "--slide", help="A slide file or a folder of slides."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder for <stem>.h5 and <stem>_tissue.png."
    ),
    mag: float = typer.Option(20.0, "--mag", help="Target magnification."),
    patch_size: int = typer.Option(256, "--patch-size", help="Patch side in pixels at --mag."),
    encoder: str = typer.Option(
        "resnet50_trunc",
        "--encoder",
        "--backbone",
        help="Patch encoder: resnet50_trunc (1024-d), uni (1024-d), uni2h (1536-d), gigapath "
        "(1536-d), virchow (2560-d), torchscript, tiny (64-d, tests). --backbone: old name.",
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="Encoder weights as published: .safetensors, torch state_dict (weights_only) or "
        "TorchScript.",
    ),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 (GPU) or bf16.",
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Patches per backbone batch."),
    workers: int | None = typer.Option(
        None, "--workers", help="Patch-reading worker processes (default min(4, CPUs); 0 = none)."
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="K/N: process every N-th slide starting at K (0-based)."
    ),
    mpp: float | None = typer.Option(
        None,
        "--mpp",
        help="Micrometres per level-0 pixel; overrides the slide's metadata (needed when it "
        "has none or an implausible one).",
    ),
    max_patches: int | None = typer.Option(
        None, "--max-patches", help="At most this many patches per slide (evenly spaced)."
    ),
    min_tissue: float = typer.Option(
        0.25, "--min-tissue", help="Keep patches with at least this tissue fraction."
    ),
    input_size: int | None = typer.Option(
        None,
        "--input-size",
        help="Resize patches to this side instead of the encoder's published resize and crop.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars (default: when on a terminal)."
    ),
    mask_mpp: float | None = typer.Option(
        None, "--mask-mpp", help="Tissue detection: um/px of the tissue mask (default 4)."
    ),
    max_side: int | None = typer.Option(
        None, "--max-side", help="Tissue detection: longest side of the mask, px (default 4096)."
    ),
    median_um: float | None = typer.Option(
        None, "--median-um", help="Tissue detection: median filter side, um (default 28)."
    ),
    min_saturation: int | None = typer.Option(
        None,
        "--min-saturation",
        help="Tissue detection: floor on Otsu's saturation threshold, 0..254 (default 20).",
    ),
    closing_um: float | None = typer.Option(
        None, "--closing-um", help="Tissue detection: closing radius, um (default 8)."
    ),
    opening_um: float | None = typer.Option(
        None, "--opening-um", help="Tissue detection: opening radius, um (default 4)."
    ),
    max_hole_um2: float | None = typer.Option(
        None,
        "--max-hole-um2",
        help="Tissue detection: fill holes smaller than this, um^2 (default 16384).",
    ),
    min_object_um2: float | None = typer.Option(
        None,
        "--min-object-um2",
        help="Tissue detection: drop tissue pieces smaller than this, um^2 (default 16384).",
    ),
    glass_saturation: int | None = typer.Option(
        None,
        "--glass-saturation",
        help="Tissue detection: saturation up to which a pixel looks like glass (default 8).",
    ),
    tissue_threshold: int | None = typer.Option(
        None,
        "--tissue-threshold",
        help="Tissue detection: fixed saturation threshold instead of the automatic one.",
    ),
) -> None:
    """Detect tissue, patch and encode slides into CLAM/Trident-style feature h5 files.

    Exit status 1 when any slide failed (each failure is one line on stderr, listed again at
    the end); slides whose h5 exists are skipped, so rerunning resumes a killed batch.
    """
    from sparsemil.errors import SparsemilError
    from sparsemil.wsi.backbones import encoder_spec
    from sparsemil.wsi.extract import ExtractConfig, run_extract
    from sparsemil.wsi.slide import parse_shard
    from sparsemil.wsi.tissue import TissueParams

    given = {
        "mask_mpp": mask_mpp,
        "max_side": max_side,
        "median_um": median_um,
        "min_saturation": min_saturation,
        "closing_um": closing_um,
        "opening_um": opening_um,
        "max_hole_um2": max_hole_um2,
        "min_object_um2": min_object_um2,
        "glass_saturation": glass_saturation,
        "tissue_threshold": tissue_threshold,
    }
    try:
        encoder_spec(encoder)
    except SparsemilError as err:  # name both spellings of the flag
        raise SparsemilError(f"{err} (flag: --encoder, formerly --backbone)") from None
    tissue = TissueParams(**{k: v for k, v in given.items() if v is not None})
    flags = flags_of(ctx.command)

    def log(message: str, err: bool = False) -> None:
        typer.echo(append_flags(message, flags) if err else message, err=err)

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
        precision=precision,
        progress=progress,
        tissue=tissue,
    )
    results = run_extract(
        slide, out, cfg, encoder=encoder, weights=weights, shard=parse_shard(shard),
        log=log,
    )  # fmt: skip
    if any(r.status == "failed" for r in results):
        # SystemExit (not typer.Exit) so the status survives standalone_mode=False in main()
        raise SystemExit(1)


@app.command("heatmap")
def heatmap(
    ctx: typer.Context,
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
    patch_size: int | None = typer.Option(
        None,
        "--patch-size",
        help="Patch side in level-0 pixels; overrides the h5 (default: its coords attributes, "
        "else the coordinate grid's step).",
    ),
    allow_mismatch: bool = typer.Option(
        False,
        "--allow-mismatch",
        help="Draw an h5 that does not match the slide (patches off it, another slide name) "
        "with a warning instead of refusing.",
    ),
) -> None:
    """Draw the MIL model's per-patch attention over a slide thumbnail, with a colour bar.

    Refuses an h5 whose patches lie off the slide or that records another slide, unless
    --allow-mismatch.
    """
    from sparsemil.wsi.heatmap import heatmap_from_checkpoint

    res, predictor = heatmap_from_checkpoint(
        slide, h5, checkpoint, out, thumb_size=thumb_size, normalize=norm, alpha=alpha,
        cmap=cmap, device=device, patch_size=patch_size, allow_mismatch=allow_mismatch,
    )  # fmt: skip
    flags = flags_of(ctx.command)
    for note in res.notes:
        typer.echo(f"sparsemil: note: {append_flags(note, flags)}", err=True)
    for warning in res.warnings:
        typer.echo(f"sparsemil: warning: {warning}", err=True)
    probs = ", ".join(
        f"{name} {p:.3f}" for name, p in zip(predictor.class_names, res.probabilities, strict=True)
    )
    typer.echo(
        f"sparsemil: {Path(slide).name}: {res.scores.shape[0]} patches, model "
        f"{predictor.model_name}, class probabilities [{probs}] -> {res.png} "
        f"({res.size[0]}x{res.size[1]})"
    )
