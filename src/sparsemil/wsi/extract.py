"""Slides -> tissue mask -> patch grid -> features, one CLAM/Trident-style h5 per slide.

Per slide ``<stem>`` (the file name without its last suffix) in ``out_dir``:

``<stem>.h5``
    ``features``: (N, C) float32; attributes ``encoder`` (and the same name as
    ``backbone``, its former name), ``pretrained``, ``weights``, ``weights_sha256``,
    ``warning`` (the random-init warning or ""), ``normalization``, ``preprocessing``
    (JSON: resize, interpolation, centre crop, mean, std), ``precision``, ``input_size``
    (side of the network input), ``name``, ``savetodir`` (Trident writes the last two).

    ``coords``: (N, 2) int64, top-left (x, y) of each patch in level-0 pixels; attributes
    as CLAM's ``create_patches_fp.py`` writes them -- ``patch_size`` (side in pixels *at
    ``patch_level``*, so ``read_region(coord, patch_level, (patch_size, patch_size))``
    reads exactly the patch), ``patch_level``, ``downsample`` (that level's (dx, dy)),
    ``downsampled_level_dim`` and ``level_dim`` (that level's (W, H)), ``name``,
    ``save_path`` -- plus Trident's ``patch_size_level0``, ``level0_magnification``,
    ``target_magnification``, ``overlap`` (0) and ``savetodir``, and ``target_patch_size``
    (pixels at ``--mag``, before the encoder's resize and crop). When the target magnification
    is a pyramid level (the usual case) ``patch_size == target_patch_size``.

    Root attributes: provenance (``sparsemil_version``, ``slide``, ``mpp0`` and
    ``resolution_source`` -- ``mpp`` for the user's value, else the slide property used --,
    ``mpp_file`` (the file's own ``openslide.mpp-x``, NaN when none) and ``resolution_note``
    (what was overridden or ignored), tissue-detection parameters, threshold, ``tissue_mode``
    and ``tissue_note``, ``min_tissue``, ``max_patches``, ``n_patches_tissue`` before the cap,
    and the encoder attributes).

``<stem>_tissue.png``
    The tissue-mask image (see :mod:`sparsemil.wsi.tissue`, default 4 um/px) with tissue
    tinted green and the kept patches outlined in blue.

The h5 (:func:`sparsemil.data.h5.write_h5_file`) is written to a hidden temporary name and
renamed when complete, so an existing
``<stem>.h5`` means the slide is done: a rerun skips it (resume). A slide without tissue
gets a warning and its PNG but no h5.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sparsemil.data.h5 import write_h5_file
from sparsemil.errors import SparsemilError, resolve_device
from sparsemil.wsi.backbones import PRECISIONS, Backbone
from sparsemil.wsi.slide import (
    SLIDE_EXTENSIONS,
    PatchGeometry,
    check_mag,
    check_mpp,
    list_slides,
    open_slide,
    patch_geometry,
    read_error,
    resolve_resolution,
    shard_slides,
    to_rgb,
)
from sparsemil.wsi.tissue import TissueParams, detect_tissue, overlay_png


@dataclass
class ExtractConfig:
    """Options of ``sparsemil wsi extract`` (defaults as CLAM/Trident: 20x, 256 px).

    Attributes:
        mag: target magnification.
        patch_size: output patch side in pixels at ``mag``.
        batch_size: patches per backbone batch.
        workers: DataLoader worker processes reading patches (0 = read in the main process;
            None = ``min(4, os.cpu_count())``).
        mpp: micrometres per level-0 pixel; always overrides the slide's metadata.
        max_patches: keep at most this many patches per slide (evenly spaced), None = all.
        min_tissue: keep patches whose tissue fraction is at least this.
        input_size: resize patches to this side before the encoder, instead of its
            published resize and crop (None = the published transform).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"auto"`` (fp16 autocast on CUDA, fp32 elsewhere), ``"fp32"``,
            ``"fp16"`` (GPU only) or ``"bf16"``; see
            :func:`sparsemil.wsi.backbones.resolve_precision`.
        progress: show progress bars; None = only when stderr is a terminal.
        tissue: tissue-detection parameters.
    """

    mag: float = 20.0
    patch_size: int = 256
    batch_size: int = 64
    workers: int | None = None
    mpp: float | None = None
    max_patches: int | None = None
    min_tissue: float = 0.25
    input_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    progress: bool | None = None
    tissue: TissueParams = field(default_factory=TissueParams)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise SparsemilError(f"batch_size {self.batch_size}: must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise SparsemilError(f"workers {self.workers}: must be 0 or more")
        if self.max_patches is not None and self.max_patches < 1:
            raise SparsemilError(f"max_patches {self.max_patches}: must be at least 1")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise SparsemilError(f"min_tissue {self.min_tissue}: must be within 0..1")
        check_mag(self.mag)
        if self.patch_size < 8:
            raise SparsemilError(f"patch_size {self.patch_size}: must be at least 8 pixels")
        if self.input_size is not None and self.input_size < 8:
            raise SparsemilError(f"input_size {self.input_size}: must be at least 8 pixels")
        if self.mpp is not None:
            check_mpp(self.mpp)
        if self.precision not in PRECISIONS:
            raise SparsemilError(
                f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        self.tissue.validate()

    def n_workers(self) -> int:
        if self.workers is not None:
            return int(self.workers)
        return min(4, os.cpu_count() or 1)


class PatchDataset(Dataset):
    """Patches of one slide, read on demand.

    Each process (the main one or a DataLoader worker) opens its own OpenSlide handle on
    first use. Item ``i`` is ``(image uint8 (3, P, P), i, error)`` where ``error`` is ""
    or the one-line reason the read failed (the image is then zeros); failures are
    reported by the consumer, so worker tracebacks never reach the user.
    """

    def __init__(self, path: str | os.PathLike[str], coords: np.ndarray, geometry: PatchGeometry):
        self.path = str(path)
        self.coords = np.asarray(coords, dtype=np.int64)
        self.level = int(geometry.level)
        self.read_size = int(geometry.read_size)
        self.patch_size = int(geometry.patch_size)
        self._slide = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def _handle(self):
        if self._slide is None or self._pid != os.getpid():
            import openslide

            self._slide = openslide.OpenSlide(self.path)
            self._pid = os.getpid()
        return self._slide

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` as (P, P, 3) uint8 RGB (transparent areas white)."""
        from PIL import Image

        x, y = (int(v) for v in self.coords[i])
        region = self._handle().read_region((x, y), self.level, (self.read_size,) * 2)
        rgb = to_rgb(region)
        if self.read_size != self.patch_size:
            rgb = np.asarray(
                Image.fromarray(rgb).resize((self.patch_size,) * 2, Image.Resampling.BILINEAR)
            )
        return rgb

    def __getitem__(self, i: int):
        try:
            rgb = self.read(i)
            err = ""
        except Exception as exc:  # reported one-line by the consumer
            rgb = np.zeros((self.patch_size, self.patch_size, 3), np.uint8)
            err = " ".join(str(exc).split()) or type(exc).__name__
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), i, err

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_slide"] = None
        state["_pid"] = None
        return state


def make_loader(ds: PatchDataset, batch_size: int, workers: int, pin: bool) -> DataLoader:
    """Ordered DataLoader over ``ds`` with ``workers`` reader processes."""
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 4, "persistent_workers": False}
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        drop_last=False,
        **kwargs,
    )


@dataclass
class SlideResult:
    """Outcome for one slide: ``status`` in {"done", "skipped", "no_tissue", "failed"};
    ``warnings``: doubts about a finished slide (overridden or ignored metadata, a doubtful
    tissue mask)."""

    slide: Path
    status: str
    h5: Path | None = None
    n_patches: int = 0
    message: str = ""
    warnings: list[str] = field(default_factory=list)


def output_paths(slide: Path, out_dir: Path) -> tuple[Path, Path]:
    """``(out_dir/<stem>.h5, out_dir/<stem>_tissue.png)``."""
    return out_dir / f"{slide.stem}.h5", out_dir / f"{slide.stem}_tissue.png"


def _progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def plan_patches(path: Path, cfg: ExtractConfig):
    """Open the slide, resolve its resolution, detect tissue and choose patches.

    Returns ``(resolution, geometry, tissue, coords_all, coords, level_dimensions,
    level_downsamples)`` where ``coords`` is ``coords_all`` capped at ``cfg.max_patches``.
    """
    from sparsemil.wsi.patching import cap_patches, tissue_patches

    slide = open_slide(path)
    try:
        res = resolve_resolution(slide, path, cfg.mpp)
        geom = patch_geometry(slide, res, cfg.mag, cfg.patch_size, path)
        tissue = detect_tissue(slide, 10.0 / res.mag0, cfg.tissue, path=path)
        coords_all = tissue_patches(
            tissue.mask, tissue.scale, slide.dimensions, geom.patch_size_level0, cfg.min_tissue
        )
        level_dims = slide.level_dimensions
        level_downs = slide.level_downsamples
    finally:
        slide.close()
    coords = cap_patches(coords_all, cfg.max_patches)
    return res, geom, tissue, coords_all, coords, level_dims, level_downs


def encode_patches(
    path: Path,
    coords: np.ndarray,
    geom: PatchGeometry,
    backbone: Backbone,
    cfg: ExtractConfig,
    device: torch.device,
    desc: str = "",
) -> np.ndarray:
    """Features (N, C) float32 of the patches at ``coords`` (order kept)."""
    from tqdm.auto import tqdm

    ds = PatchDataset(path, coords, geom)
    loader = make_loader(ds, cfg.batch_size, cfg.n_workers(), pin=device.type == "cuda")
    feats: np.ndarray | None = None
    enc = backbone.encoder
    bar = tqdm(
        total=len(ds),
        desc=desc,
        unit="patch",
        leave=False,
        disable=not _progress_enabled(cfg.progress),
    )
    try:
        for imgs, idx, errs in loader:
            bad = [(int(i), e) for i, e in zip(idx, errs, strict=True) if e]
            if bad:
                i, e = bad[0]
                x, y = (int(v) for v in coords[i])
                raise read_error(path, RuntimeError(f"patch at ({x}, {y}): {e}"))
            with torch.inference_mode():
                out = enc(imgs.to(device, non_blocking=True)).float().cpu().numpy()
            if not np.isfinite(out).all():
                hint = (
                    "; set 'precision' to bf16 or fp32"
                    if backbone.precision == "fp16"
                    else "; check the weights file"
                )
                raise SparsemilError(
                    f"{path}: encoder {backbone.name} gave non-finite features "
                    f"(precision {backbone.precision}){hint}"
                )
            if feats is None:
                feats = np.empty((len(ds), out.shape[1]), dtype=np.float32)
            feats[idx.numpy()] = out
            bar.update(len(idx))
    finally:
        bar.close()
        ds.close()
    assert feats is not None
    return feats


def _clean_stale_temps(out_dir: Path, stem: str) -> None:
    for p in out_dir.glob(f".{glob.escape(stem)}.*.tmp.h5"):
        try:
            p.unlink()
        except OSError:
            pass


def extract_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    backbone: Backbone,
    cfg: ExtractConfig,
    device: torch.device | None = None,
) -> SlideResult:
    """Extract one slide into ``out_dir`` (see the module doc). Skips a finished slide.

    Raises :class:`SparsemilError` (one line) for an unreadable slide.
    """
    import sparsemil

    path, out_dir = Path(path), Path(out_dir)
    h5_path, png_path = output_paths(path, out_dir)
    if h5_path.exists():
        return SlideResult(path, "skipped", h5_path, message=f"{h5_path.name} exists")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out_dir, path.stem)
    device = device or torch.device(resolve_device(cfg.device))
    res, geom, tissue, coords_all, coords, level_dims, level_downs = plan_patches(path, cfg)
    overlay_png(tissue, png_path, coords, geom.patch_size_level0)
    warnings = [w for w in (res.note, tissue.note) if w]
    if tissue.mode in ("no_glass", "pale"):
        what = "no glass background" if tissue.mode == "no_glass" else "a very pale stain"
        warnings.append(
            f"tissue detection found {what}; used saturation threshold {tissue.threshold} "
            f"(Otsu: {tissue.otsu}); check {png_path.name}"
        )
    if coords.shape[0] == 0:
        why = (
            "no tissue found"
            if not tissue.mask.any()
            else f"no patch has tissue fraction >= {cfg.min_tissue}"
        )
        extra = f" ({tissue.note})" if tissue.note else ""
        return SlideResult(path, "no_tissue", None, 0, f"{why}; no h5 written{extra}")
    feats = encode_patches(path, coords, geom, backbone, cfg, device, desc=path.name)
    lvl = geom.level
    ld = float(level_downs[lvl])
    coords_attrs = {
        # CLAM (create_patches_fp.py)
        "patch_size": int(geom.read_size),
        "patch_level": int(lvl),
        "downsample": np.array([ld, ld], dtype=np.float64),
        "downsampled_level_dim": np.array(level_dims[lvl], dtype=np.int64),
        "level_dim": np.array(level_dims[lvl], dtype=np.int64),
        "name": path.stem,
        "save_path": str(out_dir),
        # Trident
        "patch_size_level0": int(geom.patch_size_level0),
        "level0_magnification": float(geom.mag0),
        "target_magnification": float(geom.target_mag),
        "overlap": 0,
        "savetodir": str(out_dir),
        # sparsemil
        "target_patch_size": int(geom.patch_size),
    }
    feature_attrs = {"name": path.stem, "savetodir": str(out_dir), **backbone.attrs()}
    feature_attrs["input_size"] = backbone.preprocess.output_side(geom.patch_size)
    root_attrs = {
        "sparsemil_version": sparsemil.__version__,
        "slide": str(path),
        "mpp0": float(res.mpp0),
        "resolution_source": res.source,
        "mpp_file": float(res.file_mpp) if res.file_mpp is not None else float("nan"),
        "resolution_note": res.note,
        "tissue_params": json.dumps(cfg.tissue.as_dict()),
        "tissue_threshold": int(tissue.threshold),
        "tissue_otsu": int(tissue.otsu),
        "tissue_mode": tissue.mode,
        "tissue_note": tissue.note,
        "min_tissue": float(cfg.min_tissue),
        "max_patches": int(cfg.max_patches or 0),
        "n_patches_tissue": int(coords_all.shape[0]),
        **backbone.attrs(),
    }
    write_h5_file(
        h5_path,
        feats,
        coords,
        attrs=root_attrs,
        features_attrs=feature_attrs,
        coords_attrs=coords_attrs,
    )
    return SlideResult(path, "done", h5_path, int(coords.shape[0]), warnings=warnings)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def extract_batch(
    slides: Sequence[Path],
    out_dir: str | os.PathLike[str],
    backbone: Backbone | None,
    cfg: ExtractConfig,
    log=print,
) -> list[SlideResult]:
    """Extract every slide; a failing slide is logged in one line and the batch goes on.

    ``backbone`` may be None only when every slide's h5 already exists.

    ``log(message, err: bool)`` prints a line (``err`` = to stderr).
    """
    import openslide
    from tqdm.auto import tqdm

    cfg.validate()
    device = torch.device(resolve_device(cfg.device))
    if backbone is not None:
        backbone.prepare(device, cfg.precision)
    out_dir = Path(out_dir)
    results: list[SlideResult] = []
    seen: dict[str, Path] = {}
    bar = tqdm(slides, desc="slides", unit="slide", disable=not _progress_enabled(cfg.progress))
    for path in bar:
        path = Path(path)
        if path.stem in seen:
            msg = (
                f"{path}: same output name {path.stem}.h5 as {seen[path.stem]}; rename one of them"
            )
            results.append(SlideResult(path, "failed", message=msg))
            log(f"sparsemil: error: {msg}", True)
            continue
        seen[path.stem] = path
        try:
            r = extract_slide(path, out_dir, backbone, cfg, device)
        except SparsemilError as exc:
            r = SlideResult(path, "failed", message=_one_line(exc))
        except openslide.OpenSlideError as exc:
            r = SlideResult(path, "failed", message=_one_line(read_error(path, exc)))
        except (OSError, RuntimeError, ValueError, MemoryError) as exc:
            r = SlideResult(
                path, "failed", message=f"{path}: {type(exc).__name__}: {_one_line(exc)}"
            )
        results.append(r)
        if r.status == "failed":
            log(f"sparsemil: error: {r.message}", True)
        elif r.status == "skipped":
            log(f"sparsemil: skip {path.name}: {r.message}", False)
        elif r.status == "no_tissue":
            log(f"sparsemil: warning: {path}: {r.message}", True)
        else:
            log(f"sparsemil: {path.name}: {r.n_patches} patches -> {r.h5}", False)
            for w in r.warnings:
                log(f"sparsemil: warning: {path}: {w}", True)
    bar.close()
    return results


def summarize(results: Sequence[SlideResult]) -> str:
    """One line: counts per status."""
    counts = {
        s: sum(r.status == s for r in results) for s in ("done", "skipped", "no_tissue", "failed")
    }
    return (
        f"sparsemil: {len(results)} slide(s): {counts['done']} extracted, {counts['skipped']} "
        f"skipped (h5 exists), {counts['no_tissue']} without tissue, {counts['failed']} failed"
    )


def run_extract(
    slide: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: ExtractConfig,
    encoder: str = "resnet50_trunc",
    weights: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    log=None,
) -> list[SlideResult]:
    """List (and shard) the slides, build the encoder, extract, and log a summary."""
    from sparsemil.wsi.backbones import build_backbone

    if log is None:

        def log(msg: str, err: bool = False) -> None:
            print(msg, file=sys.stderr if err else sys.stdout, flush=True)

    cfg.validate()
    everything = list_slides(slide)
    if not everything:
        raise SparsemilError(
            f"slide {slide}: no slide files in this folder (looked for "
            f"{', '.join(SLIDE_EXTENSIONS)}); pass a slide file or a folder of slides"
        )
    slides = shard_slides(everything, shard)
    if not slides:
        assert shard is not None
        log(
            f"sparsemil: warning: shard {shard[0]}/{shard[1]} has no slides "
            f"({len(everything)} slide(s) under {slide})",
            True,
        )
        return []
    pending = [s for s in slides if not output_paths(s, Path(out_dir))[0].exists()]
    if pending and Path(slide).is_file():
        # one slide given: bad input is a one-line refusal (exit 2) before anything is
        # loaded or written, not a failed batch of one that leaves empty folders behind
        open_slide(pending[0]).close()
    backbone = build_backbone(encoder, weights, input_size=cfg.input_size) if pending else None
    results = extract_batch(slides, out_dir, backbone, cfg, log=log)
    log(summarize(results), False)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        log(f"sparsemil: {len(failed)} slide(s) failed:", True)
        for r in failed:
            log(f"  {r.slide}", True)
    return results
