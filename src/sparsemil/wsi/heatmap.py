"""Attention heatmaps: per-instance MIL scores drawn over a slide thumbnail.

Scores
------
The model runs once on the whole bag ``X (1, N, C)``:

- models that take ``coords`` (``accepts_coords`` in :mod:`sparsemil.mil.registry`:
  sparsemil's ``MMILTransformer``) are called as
  ``model(X, coords=coords (1, N, 2), return_att=True)`` and return ``(logits, att (1, N))``;
  MMIL's ``att`` is the message-token -> instance attention of each sub-bag combined with
  the global token's attention over the message tokens (see ``sparsemil.mil.mmil``);
- other models (the torchmil baselines such as ABMIL) as ``model(X, return_att=True)``,
  returning ``(Y_pred, att (1, N))`` -- ABMIL's ``att`` are its attention logits before the
  softmax, a monotone transform of the attention weights.

Extra leading axes of ``att`` (e.g. heads) are averaged. The scores are then normalised
to [0, 1]: ``"rank"`` (default, as CLAM's heatmaps: percentile rank, robust to the very
skewed attention of MIL models; ties share their mean rank) or ``"minmax"``.

Picture
-------
The thumbnail's longest side is ``thumb_size`` pixels (default 1024; never more than the
level-0 size), the other side follows the aspect ratio (rounded). Each patch's footprint is
filled with its colour (``cmap``) blended at ``alpha`` over the thumbnail; areas without
patches show the plain thumbnail. A colour bar is drawn *inside* the picture at the right
edge, so **the PNG has exactly the thumbnail's size**. Rendering uses matplotlib's Agg
canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsemil.errors import SparsemilError
from sparsemil.mil.factory import bag_probabilities
from sparsemil.mil.registry import spec_of
from sparsemil.train.inference import Predictor


@dataclass
class HeatmapResult:
    """What :func:`attention_heatmap` computed.

    Attributes:
        png: the written PNG.
        size: (width, height) of the PNG = the thumbnail.
        scores: (N,) raw per-instance scores.
        normalized: (N,) scores mapped to [0, 1].
        logits: model output for the bag (first element of the model's output), as numpy
            (``None`` when drawn through a :class:`~sparsemil.train.inference.Predictor`).
        probabilities: (n_classes,) bag probabilities (sigmoid of a single logit, else softmax).
    """

    png: Path
    size: tuple[int, int]
    scores: np.ndarray
    normalized: np.ndarray
    logits: np.ndarray | None
    probabilities: np.ndarray


def _takes_coords(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes ``coords`` (read from the model registry; False for a model
    the registry does not know)."""
    spec = spec_of(model)
    return spec is not None and spec.accepts_coords


def instance_scores(
    model: torch.nn.Module,
    features: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, torch.Tensor]:
    """Per-instance attention of ``model`` on one bag.

    Args:
        model: a MIL model with ``forward(X, ..., return_att=True) -> (out, att)``.
        features: (N, C) instance features.
        coords: (N, 2) level-0 patch positions (passed to models that take ``coords``).

    Returns:
        ``(scores (N,) float64, output (1, ...) tensor on CPU)``.
    """
    X = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if X.dim() != 2 or X.shape[0] == 0:
        raise SparsemilError(f"features must be (N, C) with N >= 1, got {tuple(X.shape)}")
    n = X.shape[0]
    model = model.to(device).eval()
    X = X.unsqueeze(0).to(device)
    with torch.inference_mode():
        if _takes_coords(model) and coords is not None:
            C = torch.as_tensor(np.asarray(coords), dtype=torch.float32).unsqueeze(0).to(device)
            out = model(X, coords=C, return_att=True)
        else:
            out = model(X, return_att=True)
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise SparsemilError(
            f"{type(model).__name__}(X, return_att=True) did not return (output, attention)"
        )
    logits, att = out[0], out[1]
    att = torch.as_tensor(att).detach().float().cpu()
    if att.shape[-1] != n:
        raise SparsemilError(
            f"{type(model).__name__} attention has shape {tuple(att.shape)}; expected (1, {n})"
        )
    att = att.reshape(-1, n).mean(dim=0)
    return att.double().numpy(), torch.as_tensor(logits).detach().float().cpu()


def normalize_scores(scores: np.ndarray, method: str = "rank") -> np.ndarray:
    """Map scores to [0, 1] by percentile rank (``"rank"``) or min-max (``"minmax"``).

    A single instance or constant scores give 0.5 everywhere.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        return s
    if method == "rank":
        from scipy.stats import rankdata

        if s.size == 1 or np.ptp(s) == 0:
            return np.full_like(s, 0.5)
        return (rankdata(s, method="average") - 1.0) / (s.size - 1.0)
    if method == "minmax":
        span = np.ptp(s)
        if span == 0:
            return np.full_like(s, 0.5)
        return (s - s.min()) / span
    raise SparsemilError(f"norm {method!r}: choose rank or minmax")


def thumbnail_size(dimensions: tuple[int, int], thumb_size: int) -> tuple[int, int]:
    """(w, h) of the thumbnail: longest side ``min(thumb_size, longest level-0 side)``."""
    w0, h0 = dimensions
    ds = max(max(w0, h0) / float(thumb_size), 1.0)
    return max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))


def render_heatmap(
    thumb: np.ndarray,
    scale: tuple[float, float],
    coords: np.ndarray,
    values: np.ndarray,
    patch_size_level0: int,
    alpha: float = 0.5,
    cmap: str = "jet",
    label: str = "attention (percentile)",
    colorbar: bool = True,
) -> np.ndarray:
    """RGB picture (h, w, 3) uint8 of ``values`` in [0, 1] drawn over ``thumb``."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = thumb.shape[:2]
    cm = colormaps[cmap]
    colors = cm(np.clip(values, 0, 1))[:, :3]
    over = np.zeros((h, w, 3), np.float64)
    cover = np.zeros((h, w), bool)
    sx, sy = scale
    for (x, y), c in zip(np.asarray(coords, np.float64), colors, strict=True):
        x0, y0 = int(round(x / sx)), int(round(y / sy))
        x1 = max(x0 + 1, int(round((x + patch_size_level0) / sx)))
        y1 = max(y0 + 1, int(round((y + patch_size_level0) / sy)))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 > x0 and y1 > y0:
            over[y0:y1, x0:x1] = c
            cover[y0:y1, x0:x1] = True
    img = thumb.astype(np.float64) / 255.0
    a = alpha * cover[..., None]
    img = img * (1 - a) + over * a
    if not colorbar:
        return (img * 255).round().clip(0, 255).astype(np.uint8)
    dpi = 100
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    font = float(np.clip(min(w, h) / 45.0, 5, 12))
    bar_w = max(6.0, 0.025 * w) / w
    bar_h = 0.35
    left = 1 - bar_w - (4.2 * font + 6) / w
    bottom = 0.06
    cax = fig.add_axes((left, bottom, bar_w, bar_h))
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cm), cax=cax)
    cb.set_ticks([0, 0.5, 1])
    cb.ax.tick_params(labelsize=font, length=2, pad=1)
    cb.set_label(label, fontsize=font, labelpad=2)
    cb.ax.patch.set_alpha(1.0)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((h, w, 3), 255, np.uint8)
    hh, ww = min(h, rgba.shape[0]), min(w, rgba.shape[1])
    out[:hh, :ww] = rgba[:hh, :ww]
    return out


def bag_scores(
    model: torch.nn.Module | Predictor,
    features: np.ndarray,
    coords: np.ndarray,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(scores (N,), probabilities (K,), logits or None)`` of one bag.

    A :class:`~sparsemil.train.inference.Predictor` (a trained checkpoint) applies the
    checkpoint's feature standardiser first, exactly as ``mil predict`` does; a bare model
    sees the features as they are.
    """
    if isinstance(model, Predictor):
        probs, att = model(features, coords, return_att=True)
        assert att is not None
        return att, probs, None
    scores, logits = instance_scores(model, features, coords, device=device)
    flat = logits.reshape(1, -1) if logits.dim() > 1 else logits.reshape(1)
    return scores, bag_probabilities(flat)[0].numpy(), logits.numpy()


def attention_heatmap(
    slide_path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    model: torch.nn.Module | Predictor,
    out_png: str | os.PathLike[str],
    patch_size: int,
    thumb_size: int = 1024,
    normalize: str = "rank",
    alpha: float = 0.5,
    cmap: str = "jet",
    device: str | torch.device = "cpu",
) -> HeatmapResult:
    """Run ``model`` on the bag and draw its per-instance scores over the slide thumbnail.

    Args:
        slide_path: the slide the bag was extracted from.
        features: (N, C) instance features.
        coords: (N, 2) int level-0 top-left patch corners (x, y).
        model: a trained checkpoint's :class:`~sparsemil.train.inference.Predictor`
            (standardises like ``mil predict``), or a bare MIL model (see the module doc).
        out_png: output PNG path (written atomically).
        patch_size: patch side in **level-0** pixels (h5 ``coords.attrs["patch_size_level0"]``).
        thumb_size: longest side of the thumbnail / PNG in pixels.
        normalize: ``"rank"`` or ``"minmax"``.

    Returns:
        :class:`HeatmapResult`; the PNG is ``thumbnail_size(slide.dimensions, thumb_size)``.

    Raises:
        SparsemilError: mismatched coords, ``thumb_size`` < 16, ``alpha`` outside 0..1,
            a non-positive ``patch_size``, or an unreadable slide.
    """
    from PIL import Image

    from sparsemil.io import atomic_path
    from sparsemil.wsi.slide import open_slide, read_thumbnail, share_mode

    coords = np.asarray(coords)
    features = np.asarray(features)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
        raise SparsemilError(
            f"coords must be (N, 2) matching features (N={features.shape[0]}), got {coords.shape}"
        )
    if thumb_size < 16:
        raise SparsemilError(f"thumb_size {thumb_size}: must be at least 16 pixels")
    if not 0.0 <= alpha <= 1.0:
        raise SparsemilError(f"alpha {alpha}: must be within 0..1")
    if int(patch_size) < 1:
        raise SparsemilError(f"patch_size {patch_size}: must be a positive level-0 size")
    scores, probs, logits = bag_scores(model, features, coords, device=device)
    values = normalize_scores(scores, normalize)
    slide = open_slide(slide_path)
    try:
        w0, h0 = slide.dimensions
        tw, th = thumbnail_size((w0, h0), thumb_size)
        thumb, scale = read_thumbnail(slide, path=slide_path, size=(tw, th))
    finally:
        slide.close()
    label = "attention (percentile)" if normalize == "rank" else "attention (min-max)"
    picture = render_heatmap(thumb, scale, coords, values, int(patch_size), alpha, cmap, label)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
        share_mode(tmp)
    return HeatmapResult(
        png=out_png,
        size=(picture.shape[1], picture.shape[0]),
        scores=scores,
        normalized=values,
        logits=logits,
        probabilities=probs,
    )


def heatmap_from_checkpoint(
    slide: str | os.PathLike[str],
    h5: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    thumb_size: int = 1024,
    normalize: str = "rank",
    alpha: float = 0.5,
    cmap: str = "jet",
    device: str | None = "auto",
) -> tuple[HeatmapResult, Predictor]:
    """``wsi heatmap``: a trained checkpoint's attention on a slide's feature h5.

    The checkpoint is applied through :func:`sparsemil.train.inference.load_predictor`
    (standardiser, classes), so the slide probabilities equal ``mil predict``'s. Everything is
    checked (colour map, h5 layout, feature dimension, slide readable) before the model runs.

    Raises:
        SparsemilError: unknown ``cmap``, a missing/unreadable file, an h5 without coords or
            patch-size attributes, or features of another dimension than the checkpoint's.
    """
    from matplotlib import colormaps

    from sparsemil.data.h5 import read_h5_file
    from sparsemil.train.inference import load_predictor
    from sparsemil.wsi.slide import open_slide

    if cmap not in colormaps:
        raise SparsemilError(f"cmap {cmap!r}: not a matplotlib colour map (e.g. jet, viridis)")
    if not Path(h5).is_file():
        raise SparsemilError(f"h5 {h5}: no such file")
    predictor = load_predictor(checkpoint, device)
    bag = read_h5_file(h5, need_coords=True)
    predictor.check_features(bag.features.shape[1], f"h5 {h5}")
    s = open_slide(slide)
    try:
        downs = list(s.level_downsamples)
    finally:
        s.close()
    res = attention_heatmap(
        slide, bag.features, bag.coords.astype(np.int64), predictor, out_png,
        bag.patch_size_level0(downs), thumb_size=thumb_size, normalize=normalize, alpha=alpha,
        cmap=cmap,
    )  # fmt: skip
    return res, predictor
