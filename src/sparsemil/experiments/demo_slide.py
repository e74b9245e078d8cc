"""The demo's slide-scale steps (steps 4 and 5 of ``sparsemil demo``).

4. **A real slide.** ``CMU-1-Small-Region.svs`` (an Aperio SVS of the OpenSlide test data,
   CC0; found in ``../shared/data/wsi`` or given with ``--slide``): its tissue mask and patch
   grid exactly as ``sparsemil wsi extract`` computes them
   (:func:`sparsemil.wsi.extract.plan_patches` with the extract defaults: 256-pixel patches
   at 20x, kept where tissue covers at least a quarter), drawn over the slide's thumbnail
   (``slide/tissue_patches.jpg``).
5. **A slide-scale cohort.** A small cohort from :func:`sparsemil.data.synth.synth_cohort`
   (``sparsemil mil synth``): scikit-learn digits through the cohort's fixed PCA encoder,
   slides of log-normal size (the ``small`` preset, median 300 patches), digit ``0`` as the
   tumour class among the other nine, one witness rate. MMIL-Transformer (k-means grouping
   on the patch coordinates) and ABMIL are trained through the package's trainer
   (:func:`sparsemil.train.trainer.fit_fold`) with one recipe (:data:`RECIPE`: AdamW, cosine
   schedule, bag batch 1, every training slide used, the last epoch kept) and scored on the
   test slides: bag accuracy and AUC, and the attention localisation AUC
   (:func:`sparsemil.train.inference.attention_auc`: per positive test slide, ROC AUC of
   the per-instance attention against the instance labels). Both models' attention on the
   largest positive test slide is drawn on its patch grid with the tumour outlined
   (``synth/attention.png``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sparsemil.errors import SparsemilError
from sparsemil.io import shared_roots

SLIDE_NAME = "CMU-1-Small-Region.svs"

#: The training recipe of both models on the cohort (``MILTrainConfig`` fields).
RECIPE: dict[str, Any] = {
    "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 1, "accumulate_grad_batches": 1,
    "val_fraction": 0.0, "early_stopping": False, "num_test": 1, "seed": 0,
}  # fmt: skip
WIDTH = 64  # MMIL embed_dim = ABMIL's instance-encoder width
#: The two models: registry name -> (name for people, ``model_kwargs``).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mmil": ("MMIL-Transformer", {"embed_dim": WIDTH, "num_subbags": 10, "num_msg": 1,
                                  "num_layers": 2, "grouping": "kmeans_coords"}),
    "abmil": ("ABMIL", {"feat_ext_dim": WIDTH}),
}  # fmt: skip
#: The cohort (``SynthConfig`` fields besides ``n_train``, ``n_test``, ``witness_rate``).
COHORT: dict[str, Any] = {
    "seed": 0, "size": "small", "images": "digits", "tumour_class": "0",
    "positive_fraction": 0.5,
}  # fmt: skip


# --------------------------------------------------------------------------- the real slide
def find_demo_slide() -> Path | None:
    """``CMU-1-Small-Region.svs`` in ``$SPARSEMIL_SHARED/data/wsi``, else in
    ``../shared/data/wsi`` next to the working folder or next to this source checkout;
    ``None`` when none exists."""
    for root in shared_roots():
        path = root / "data" / "wsi" / SLIDE_NAME
        if path.is_file():
            return path
    return None


def run_real_slide(slide: Path, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Step 4: tissue mask and patch grid of ``slide`` (``wsi extract``'s defaults) over
    its thumbnail; writes ``out/tissue_patches.jpg`` and returns the facts."""
    from sparsemil.wsi.extract import ExtractConfig, plan_patches
    from sparsemil.wsi.heatmap import thumbnail_size
    from sparsemil.wsi.patching import grid_coords
    from sparsemil.wsi.slide import open_slide, read_thumbnail

    t0 = time.time()
    cfg = ExtractConfig()
    res, geom, tissue, coords_all, _, level_dims, _ = plan_patches(Path(slide), cfg)
    s = open_slide(slide)
    try:
        thumb, _ = read_thumbnail(s, path=slide, size=thumbnail_size(s.dimensions, 900))
    finally:
        s.close()
    dims = (int(level_dims[0][0]), int(level_dims[0][1]))
    grid = grid_coords(dims, geom.patch_size_level0)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "slide": str(slide),
        "name": Path(slide).name,
        "dimensions": list(dims),
        "mpp": res.mpp0,
        "magnification": res.mag0,
        "resolution_from": res.source,
        "patch_size": geom.patch_size,
        "patch_size_level0": geom.patch_size_level0,
        "target_mag": geom.target_mag,
        "min_tissue": cfg.min_tissue,
        "tissue_fraction": tissue.fraction,
        "threshold": tissue.threshold,
        "threshold_mode": tissue.mode,
        "mask_shape": list(tissue.mask.shape),
        "n_grid": int(grid.shape[0]),
        "n_patches": int(coords_all.shape[0]),
        "figure": "slide/tissue_patches.jpg",
    }
    plot_real_slide(out / "tissue_patches.jpg", thumb, tissue, grid, coords_all, doc)
    doc["seconds"] = time.time() - t0
    log(
        f"      {doc['name']}: {dims[0]}x{dims[1]} px at {res.mpp0:g} um/px, tissue "
        f"{100 * tissue.fraction:.0f} %, {doc['n_patches']} of {doc['n_grid']} patches kept "
        f"({time.time() - t0:.0f}s)"
    )
    return doc


def plot_real_slide(path: Path, thumb, tissue, grid, kept, doc: dict[str, Any]) -> None:
    """Two panels: the thumbnail, and the same with the tissue mask (tint and outline), the
    whole patch grid (thin grey) and the kept patches (blue)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    from sparsemil.io import atomic_path
    from sparsemil.limit.plots import DPI, plot_style

    w0, h0 = doc["dimensions"]
    ps = doc["patch_size_level0"]
    extent = (0, w0, h0, 0)
    mask = tissue.mask
    sx, sy = tissue.scale
    with plot_style():
        fig = Figure(figsize=(7.6, 5.4), dpi=DPI)
        axes = fig.subplots(1, 2)
        for ax in axes:
            ax.imshow(thumb, extent=extent, interpolation="lanczos")
            ax.set_xlim(0, w0)
            ax.set_ylim(h0, 0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0].set_title(f"{doc['name']}\n{w0}x{h0} px, {doc['mpp']:g} µm/px")
        ax = axes[1]
        tint = np.zeros((*mask.shape, 4))
        tint[mask] = (0.1, 0.75, 0.3, 0.35)
        ax.imshow(tint, extent=extent, interpolation="nearest")
        xs = (np.arange(mask.shape[1]) + 0.5) * sx
        ys = (np.arange(mask.shape[0]) + 0.5) * sy
        ax.contour(xs, ys, mask.astype(float), levels=[0.5], colors=["#0b6e2e"], linewidths=1.2)
        boxes = [Rectangle((x, y), ps, ps) for x, y in grid]
        ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="0.55",
                                          linewidths=0.5, linestyle=":"))  # fmt: skip
        boxes = [Rectangle((x, y), ps, ps) for x, y in kept]
        ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#1f3fd6",
                                          linewidths=1.1))  # fmt: skip
        ax.set_title(
            f"tissue {100 * doc['tissue_fraction']:.0f} % (saturation > {doc['threshold']})\n"
            f"{doc['n_patches']} patches of {doc['patch_size']} px at {doc['target_mag']:g}x"
        )
        handles = [
            Patch(facecolor=(0.1, 0.75, 0.3, 0.35), edgecolor="#0b6e2e", label="tissue mask"),
            Line2D([], [], color="#1f3fd6", lw=1.1, label="patch kept (tissue >= 25 %)"),
            Line2D([], [], color="0.55", lw=0.8, ls=":", label="grid patch not kept"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False,
                   bbox_to_anchor=(0.5, -0.01))  # fmt: skip
        fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.08, wspace=0.04)
        with atomic_path(path) as tmp:  # a photograph: JPEG is a tenth of the PNG
            fig.savefig(tmp, format="jpeg", bbox_inches="tight", pil_kwargs={"quality": 88})


# --------------------------------------------------------------------------- the cohort
def run_synth(settings: dict[str, Any], out: Path, progress: bool,
              log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Step 5: write the cohort, train and score both models, draw their attention on one
    positive test slide; returns the facts and numbers (see the module doc)."""
    from sparsemil.data.synth import SynthConfig, synth_cohort

    t0 = time.time()
    rate = float(settings["witness_rate"])
    cohort_dir = out / "cohort"
    syn = synth_cohort(SynthConfig(
        out=str(cohort_dir), witness_rate=[rate], n_train=int(settings["n_train"]),
        n_test=int(settings["n_test"]), **COHORT,
    ))  # fmt: skip
    log(
        f"      cohort: {syn.n_bags} slides ({settings['n_train']} train, {settings['n_test']} "
        f"test), median {syn.median_instances:.0f} patches, witness rate {100 * rate:g} %, "
        f"instance probe AUC {syn.probe_auc:.3f} ({time.time() - t0:.0f}s)"
    )
    rows = [_train_one(name, settings, cohort_dir, out / name, progress, log) for name in MODELS]
    shown = _heatmap_slide(cohort_dir)
    plot_attention(out / "attention.png", cohort_dir, shown, rows)
    return {
        "cohort": {
            "folder": "synth/cohort", **COHORT, "witness_rate": rate,
            "n_train": int(settings["n_train"]), "n_test": int(settings["n_test"]),
            "n_instances": syn.n_instances, "median_instances": syn.median_instances,
            "max_instances": syn.max_instances, "probe_auc": syn.probe_auc,
        },
        "recipe": {**RECIPE, "max_epochs": int(settings["max_epochs"])},
        "models": [{k: v for k, v in r.items() if k != "predictor"} for r in rows],
        "heatmap_slide": shown,
        "figure": "synth/attention.png",
        "seconds": time.time() - t0,
    }  # fmt: skip


def _train_one(name: str, settings: dict[str, Any], cohort_dir: Path, run_dir: Path,
               progress: bool, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    from sparsemil.train.config import MILTrainConfig
    from sparsemil.train.data import holdout_for, load_mil_data
    from sparsemil.train.inference import attention_auc, load_predictor
    from sparsemil.train.trainer import fit_fold

    display, kwargs = MODELS[name]
    cfg = MILTrainConfig.from_dict({
        **RECIPE, "data": str(cohort_dir / "split.csv"), "format": "split", "model": name,
        "model_kwargs": kwargs, "max_epochs": int(settings["max_epochs"]),
        "progress": progress, "out": str(run_dir),
    }, "demo slide-scale config")  # fmt: skip
    cfg.validate("demo slide-scale config")
    t0 = time.time()
    data = load_mil_data(cfg)
    split = holdout_for(data, cfg)
    result = fit_fold(cfg, data, split, run_dir)
    assert result is not None
    seconds = time.time() - t0
    predictor = load_predictor(run_dir / "model.safetensors")
    loc = attention_auc(predictor, data.bags, split.test.tolist())
    m = result["metrics"]
    row = {
        "model": name, "display_name": display, "model_kwargs": kwargs,
        "accuracy": m["accuracy"], "auc": m["auc"], "loc_auc": loc["mean"],
        "loc_auc_std": loc["std"], "loc_bags": loc["n_bags"], "loc_per_bag": loc["per_bag"],
        "n_train": len(split.train), "n_test": len(split.test),
        "epochs": int(settings["max_epochs"]), "train_seconds": seconds,
        "checkpoint": f"synth/{name}/model.safetensors", "predictor": predictor,
    }  # fmt: skip
    log(
        f"      {display}: bag accuracy {_f(row['accuracy'])}, AUC {_f(row['auc'])}, "
        f"attention localisation AUC {_f(row['loc_auc'])} over {row['loc_bags']} positive "
        f"test slides ({seconds:.0f}s)"
    )
    return row


def _f(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def _heatmap_slide(cohort_dir: Path) -> str:
    """The largest positive test slide (the first in id order among equals)."""
    import json

    slides = json.loads((cohort_dir / "cohort.json").read_text())["slides"]
    pos = [s for s in slides if s["part"] == "test" and s["label"] == 1]
    if not pos:
        raise SparsemilError(f"{cohort_dir}: the cohort has no positive test slide")
    return min(pos, key=lambda s: (-s["n_instances"], s["slide_id"]))["slide_id"]


def _cells(coords: np.ndarray, values: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` on the patch grid ((H, W) float, NaN off tissue) and the (N, 2) cells."""
    cell = (np.asarray(coords) // step).astype(np.int64)  # (col, row)
    grid = np.full((int(cell[:, 1].max()) + 2, int(cell[:, 0].max()) + 2), np.nan)
    grid[cell[:, 1], cell[:, 0]] = values
    return grid, cell


def _outline(cell: np.ndarray, positive: np.ndarray) -> list[list[tuple[float, float]]]:
    """Segments (in cell units, pixel-edge coordinates) between tumour cells and the rest."""
    tumour = {(int(c), int(r)) for (c, r), p in zip(cell, positive, strict=True) if p}
    segs = []
    for c, r in tumour:
        x0, y0, x1, y1 = c - 0.5, r - 0.5, c + 0.5, r + 0.5
        if (c, r - 1) not in tumour:
            segs.append([(x0, y0), (x1, y0)])
        if (c, r + 1) not in tumour:
            segs.append([(x0, y1), (x1, y1)])
        if (c - 1, r) not in tumour:
            segs.append([(x0, y0), (x0, y1)])
        if (c + 1, r) not in tumour:
            segs.append([(x1, y0), (x1, y1)])
    return segs


def plot_attention(path: Path, cohort_dir: Path, slide_id: str, rows: list[dict]) -> None:
    """Ground truth and each model's attention (percentile rank within the slide, as
    ``wsi heatmap`` draws it) on the patch grid of ``slide_id``, tumour outlined."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from sparsemil.data.h5 import read_h5_file
    from sparsemil.io import atomic_path
    from sparsemil.limit.plots import DPI, plot_style
    from sparsemil.wsi.heatmap import normalize_scores

    bag = read_h5_file(cohort_dir / "h5_files" / f"{slide_id}.h5", need_coords=True)
    step = bag.patch_size_level0()
    assert bag.labels is not None
    positive = np.asarray(bag.labels) > 0
    truth, cell = _cells(bag.coords, positive.astype(float), step)
    panels = [("ground truth", truth, ListedColormap(["#d9d9d9", "#d62728"]))]
    for r in rows:
        _, att = r["predictor"](bag.features, bag.coords, return_att=True)
        grid, _ = _cells(bag.coords, normalize_scores(att, "rank"), step)
        auc = r["loc_per_bag"].get(slide_id)
        title = f"{r['display_name']}\nlocalisation AUC {_f(auc)}"
        panels.append((title, grid, colormaps["viridis"]))
    segs = _outline(cell, positive)
    h, w = truth.shape
    with plot_style():
        fig = Figure(figsize=(9.6, 2.9 * max(0.6, min(1.6, h / w)) + 0.7), dpi=DPI)
        axes = fig.subplots(1, len(panels))
        im = None
        for ax, (title, grid, cmap) in zip(axes, panels, strict=True):
            cmap = cmap.with_extremes(bad="white")
            shown = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1,
                              interpolation="nearest")  # fmt: skip
            if title != "ground truth":
                im = shown
            ax.add_collection(LineCollection(segs, colors="#ff2d2d" if im is not None
                                             else "black", linewidths=1.4))  # fmt: skip
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        n, k = bag.features.shape[0], int(positive.sum())
        axes[0].set_title(f"{slide_id}: {n} patches\n{k} tumour (outlined)")
        if im is not None:
            cb = fig.colorbar(im, ax=list(axes[1:]), fraction=0.04, pad=0.02, shrink=0.9)
            cb.set_label("attention (percentile in slide)")
            cb.set_ticks([0, 0.5, 1])
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
