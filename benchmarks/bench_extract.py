"""Patch extraction throughput: reading alone, backbone alone, and reading + backbone.

Usage::

    python benchmarks/bench_extract.py [--slide PATH] [--workers 0 2 4] [--batch-size 32]
        [--backbone resnet50_trunc] [--patch-size 256] [--n-read 512] [--n-model 64]
        [--device auto]

Patches are every whole 256-px grid cell of the slide at ``--mag`` (tissue or not, to
have more distinct positions); a pass over them uses fresh OpenSlide handles, so tiles
are decoded again (OpenSlide caches tiles per handle) and passes repeat until
``--n-read`` patches were read. ``reading`` = DataLoader over the coordinates, images
collated into uint8 batches; ``backbone`` = the encoder on random uint8 batches already
in memory; ``read+backbone`` = what ``sparsemil wsi extract`` does. The last line says
which of reading and backbone bounds the pipeline (patches/s ratio).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _coords(slide_path: Path, mag: float, patch_size: int, mpp: float | None):
    from sparsemil.wsi.patching import grid_coords
    from sparsemil.wsi.slide import open_slide, patch_geometry, resolve_resolution

    s = open_slide(slide_path)
    try:
        res = resolve_resolution(s, slide_path, mpp)
        geom = patch_geometry(s, res, mag, patch_size, slide_path)
        coords = grid_coords(s.dimensions, geom.patch_size_level0)
    finally:
        s.close()
    return geom, coords


def bench_read(slide, coords, geom, n, batch_size, workers, encoder=None, device=None) -> float:
    """Patches per second reading ``n`` patches (optionally encoding them)."""
    from sparsemil.wsi.extract import PatchDataset, make_loader

    done, t0 = 0, time.perf_counter()
    while done < n:
        ds = PatchDataset(slide, coords[: n - done], geom)  # fresh handles each pass
        loader = make_loader(
            ds, batch_size, workers, pin=device is not None and device.type == "cuda"
        )
        for imgs, _idx, errs in loader:
            assert not any(errs), errs
            if encoder is not None:
                with torch.inference_mode():
                    encoder(imgs.to(device, non_blocking=True)).cpu()
            done += imgs.shape[0]
        ds.close()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def bench_model(encoder, n, batch_size, patch_size, device) -> float:
    """Patches per second of the encoder alone on in-memory uint8 batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(
        0, 256, (batch_size, 3, patch_size, patch_size), dtype=torch.uint8, generator=g
    )
    x = x.to(device)
    with torch.inference_mode():
        encoder(x[:2])  # warm-up (kernel selection)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done, t0 = 0, time.perf_counter()
        while done < n:
            encoder(x)
            done += batch_size
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    p.add_argument("--mag", type=float, default=20.0)
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--backbone", default="resnet50_trunc")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--n-read", type=int, default=512)
    p.add_argument("--n-model", type=int, default=64)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    from sparsemil.errors import resolve_device
    from sparsemil.wsi.backbones import build_backbone

    device = torch.device(resolve_device(a.device))
    geom, coords = _coords(a.slide, a.mag, a.patch_size, a.mpp)
    print(
        f"slide {a.slide.name}: {coords.shape[0]} grid patches of {a.patch_size} px at "
        f"{a.mag:g}x (level {geom.level}, read {geom.read_size} px); device {device}; "
        f"torch threads {torch.get_num_threads()}"
    )
    enc = build_backbone(a.backbone, warn=False).encoder.to(device)
    model_ps = bench_model(enc, a.n_model, a.batch_size, a.patch_size, device)
    print(f"backbone {a.backbone:>15s}            : {model_ps:9.1f} patches/s")
    rows = []
    for w in a.workers:
        read_ps = bench_read(a.slide, coords, geom, a.n_read, a.batch_size, w)
        both_ps = bench_read(
            a.slide, coords, geom, min(a.n_read, a.n_model), a.batch_size, w, enc, device
        )
        rows.append((w, read_ps, both_ps))
        print(f"reading      workers={w:<2d}             : {read_ps:9.1f} patches/s")
        print(f"read+backbone workers={w:<2d}            : {both_ps:9.1f} patches/s")
    best_read = max(r[1] for r in rows)
    ratio = best_read / model_ps
    bound = "backbone" if ratio > 1 else "reading"
    print(
        f"reading / backbone throughput = {ratio:.2f} "
        f"(best reading {best_read:.1f} vs backbone {model_ps:.1f} patches/s): {bound}-bound"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
