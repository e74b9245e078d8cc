"""Patch extraction throughput per encoder: reading, preprocessing and network, and the bottleneck.

Usage::

    python benchmarks/bench_extract.py [--slide PATH] [--encoders resnet50_trunc uni]
        [--device cpu cuda] [--precision auto] [--workers 0 2] [--batch-size 32]
        [--patch-size 256] [--n-read 512] [--n-model 64]

Encoders are the full-size architectures with random weights (the speed does not depend on
the weights). For each encoder and device (``cuda`` is skipped with a note when no GPU is
visible) the run measures, in patches/s:

- ``reading``: a DataLoader with ``--workers`` processes reading the slide's 256-px grid
  patches into uint8 batches (fresh OpenSlide handles each pass, so tiles are decoded again;
  passes repeat until ``--n-read`` patches were read). Measured once per worker count; the
  best count is used below;
- ``preprocess``: the encoder's published transform (resize, crop, mean/std) on uint8
  batches already on the device;
- ``network``: the network alone on the preprocessed batches (under autocast when the
  precision is fp16/bf16);
- ``encoder``: both, as ``sparsemil wsi extract`` calls them;
- ``read+encode``: what ``sparsemil wsi extract`` does (``--n-model`` patches).

Reading runs in worker processes alongside the encoder, so a pipeline runs at about the
rate of its slowest stage: the last column names it, and the ratios give each stage's time
per patch relative to the slowest.
"""

from __future__ import annotations

import argparse
import os
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_read(slide, coords, geom, n, batch_size, workers, encoder=None, device=None) -> float:
    """Patches per second reading ``n`` patches (and encoding them when ``encoder`` is given)."""
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
    if device is not None:
        _sync(device)
    return done / (time.perf_counter() - t0)


def _rate(fn, x: torch.Tensor, n: int, device: torch.device) -> float:
    """Patches per second of ``fn`` on batch ``x`` (after one warm-up call)."""
    with torch.inference_mode():
        fn(x)  # warm-up (kernel selection, oneDNN setup)
        _sync(device)
        done, t0 = 0, time.perf_counter()
        while done < n:
            fn(x)
            done += x.shape[0]
        _sync(device)
    return done / (time.perf_counter() - t0)


def bench_encoder(bb, n: int, batch_size: int, patch_size: int, device: torch.device):
    """(preprocess, network, encoder) patches/s on in-memory uint8 batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(
        0, 256, (batch_size, 3, patch_size, patch_size), dtype=torch.uint8, generator=g
    ).to(device)
    enc = bb.encoder
    with torch.inference_mode():
        y = enc.preprocess(x)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(bb.precision)

    def net(z):
        if dtype is None:
            return enc.net(z)
        with torch.autocast(device_type=device.type, dtype=dtype):
            return enc.net(z)

    pre = _rate(enc.preprocess, x, max(n, 4 * batch_size), device)
    network = _rate(net, y, n, device)
    both = _rate(enc, x, n, device)
    return pre, network, both


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    p.add_argument("--mag", type=float, default=20.0)
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--encoders", nargs="+", default=["resnet50_trunc", "uni"])
    p.add_argument("--device", nargs="+", default=["cpu", "cuda"])
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--n-read", type=int, default=512)
    p.add_argument("--n-model", type=int, default=64)
    a = p.parse_args(argv)

    from sparsemil.wsi.backbones import build_backbone

    devices = []
    for d in a.device:
        dev = torch.device(d)
        if dev.type == "cuda" and not torch.cuda.is_available():
            print(f"device {d}: no CUDA device visible, skipped")
            continue
        devices.append(dev)
    geom, coords = _coords(a.slide, a.mag, a.patch_size, a.mpp)
    print(
        f"slide {a.slide.name}: {coords.shape[0]} grid patches of {a.patch_size} px at "
        f"{a.mag:g}x (level {geom.level}, read {geom.read_size} px); batch {a.batch_size}; "
        f"torch threads {torch.get_num_threads()}; CPU cores {os.cpu_count()}"
    )
    reads = {w: bench_read(a.slide, coords, geom, a.n_read, a.batch_size, w) for w in a.workers}
    for w, r in reads.items():
        print(f"reading  workers={w:<2d}: {r:9.1f} patches/s")
    best_w = max(reads, key=reads.get)
    read_ps = reads[best_w]
    head = (
        f"{'encoder':<15s} {'device':<6s} {'prec':<5s} {'input':>5s} {'read':>8s} "
        f"{'preproc':>8s} {'network':>8s} {'encoder':>8s} {'read+enc':>8s}  bottleneck "
        "(time per patch relative to it: read / preprocess / network)"
    )
    print(f"patches/s (reading with workers={best_w}):")
    print(head)
    for dev in devices:
        for name in a.encoders:
            bb = build_backbone(name, warn=False).prepare(dev, a.precision)
            pre, net, both = bench_encoder(bb, a.n_model, a.batch_size, a.patch_size, dev)
            full = bench_read(
                a.slide, coords, geom, a.n_model, a.batch_size, best_w, bb.encoder, dev
            )
            stages = {"reading": read_ps, "preprocessing": pre, "network": net}
            slow = min(stages, key=stages.get)
            ratios = " / ".join(f"{stages[slow] / v:.3f}" for v in stages.values())
            side = bb.preprocess.output_side(a.patch_size)
            print(
                f"{name:<15s} {dev.type:<6s} {bb.precision:<5s} {side:>5d} {read_ps:8.1f} "
                f"{pre:8.1f} {net:8.2f} {both:8.2f} {full:8.2f}  {slow} ({ratios})"
            )
            del bb
    return 0


if __name__ == "__main__":
    sys.exit(main())
