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

Extra leading axes of ``att`` (e.g. heads) are averaged and a trailing axis of size 1
(DSMIL's ``(1, N, 1)`` instance scores) is dropped. DTFD-MIL returns no attention (its
``forward`` takes no ``return_att``) and is refused with a one-line error. The scores are then normalised
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

Slide and feature file must match
---------------------------------
Before the model runs, the bag is checked against the slide (:func:`footprint_problems`,
:func:`h5_slide_problems`): every patch footprint must lie on the slide -- one of the four
points at the footprint's centre +- a quarter side inside level 0, which every CLAM
(padded, ``four_pt``), Trident or sparsemil patch satisfies --, the h5's recorded slide
name (``coords``/``features`` attribute ``name``, root attribute ``slide``) must be the
slide's, and its recorded level size (``level_dim`` at ``patch_level``) the slide's. A
mismatch is refused, or with ``allow_mismatch`` drawn with a warning.

The patch side comes from the h5's ``coords`` attributes
(:func:`sparsemil.data.h5.patch_size_level0`), or from ``patch_size`` (level-0 pixels;
it overrides the attributes), or -- for coords without patch-size attributes, as CLAM's
``extract_features_fp.py`` writes them -- from the step of the coordinate grid
(:func:`sparsemil.data.h5.grid_step`); either way a note names the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparsemil.errors import SparsemilError
from sparsemil.mil.factory import bag_probabilities
from sparsemil.mil.registry import require_attention, spec_of
from sparsemil.train.inference import Predictor, instance_attention


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
        warnings: mismatches drawn anyway (``allow_mismatch``).
        notes: where the patch size came from when the h5 did not say it.
    """

    png: Path
    size: tuple[int, int]
    scores: np.ndarray
    normalized: np.ndarray
    logits: np.ndarray | None
    probabilities: np.ndarray
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
        ``(scores (N,) float64, output (1, ...) tensor on CPU)``; a trailing attention axis
        of size 1 (DSMIL's ``(1, N, 1)`` instance scores) is dropped, extra leading axes are
        averaged.

    Raises:
        SparsemilError: bad features, or a model without attention (DTFD-MIL).
    """
    X = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if X.dim() != 2 or X.shape[0] == 0:
        raise SparsemilError(f"features must be (N, C) with N >= 1, got {tuple(X.shape)}")
    n = X.shape[0]
    require_attention(model)
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
    scores = instance_attention(out[1], n, type(model).__name__)
    return scores, torch.as_tensor(out[0]).detach().float().cpu()


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


def footprint_problems(
    coords: np.ndarray, patch_size: int, dimensions: tuple[int, int], what: str
) -> str:
    """Why the patches at ``coords`` (level-0 top-left corners, side ``patch_size``) cannot
    come from a slide of level-0 size ``dimensions``, or "" when they can.

    A patch is off the slide when none of the four points at its centre +- a quarter side
    lies inside level 0 (CLAM keeps a padded edge patch only when one of them is in the
    tissue); the message also counts the footprints not wholly inside.
    """
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if c.shape[0] == 0:
        return ""
    w0, h0 = (float(d) for d in dimensions)
    ps = float(patch_size)
    q = ps / 4.0
    off = (
        (c[:, 0] + q >= w0) | (c[:, 1] + q >= h0) | (c[:, 0] + 3 * q <= 0) | (c[:, 1] + 3 * q <= 0)
    )
    if not off.any():
        return ""
    outside = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] + ps > w0) | (c[:, 1] + ps > h0)
    x1, y1 = int(np.ceil((c[:, 0] + ps).max())), int(np.ceil((c[:, 1] + ps).max()))
    return (
        f"{what}: {int(outside.sum())} of {c.shape[0]} patch footprints are not wholly on "
        f"the slide ({int(off.sum())} lie off it): the patches reach {x1}x{y1} level-0 "
        f"pixels but the slide is {int(w0)}x{int(h0)}; the features were extracted from "
        f"another slide (or at another resolution)"
    )


def _names_match(recorded: str, slide: Path) -> bool:
    r = str(recorded).strip()
    if not r:
        return True
    rp = Path(r.replace("\\", "/"))
    return bool({slide.name, slide.stem} & {r, rp.name, rp.stem})


def h5_slide_problems(bag, slide_path: Path, level_dimensions: list) -> list[str]:
    """What the h5 ``bag`` (:class:`~sparsemil.data.h5.H5Bag`) records that contradicts the
    slide: another slide name, or another size of its patch level."""
    out = []
    for where, attrs, key in (
        ("coords attribute 'name'", bag.coords_attrs, "name"),
        ("features attribute 'name'", bag.features_attrs, "name"),
        ("root attribute 'slide'", bag.attrs, "slide"),
    ):
        value = attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and not _names_match(value, slide_path):
            out.append(f"h5 {bag.path} records slide {value!r} ({where}), not {slide_path.name}")
            break
    a = bag.coords_attrs
    if "level_dim" in a:
        level = int(np.asarray(a.get("patch_level", 0)).ravel()[0])
        rec = tuple(int(v) for v in np.asarray(a["level_dim"]).ravel()[:2])
        if level >= len(level_dimensions):
            out.append(
                f"h5 {bag.path} records patches at level {level} of a {rec[0]}x{rec[1]} level, "
                f"but {slide_path.name} has {len(level_dimensions)} level(s)"
            )
        elif tuple(int(v) for v in level_dimensions[level]) != rec:
            have = tuple(int(v) for v in level_dimensions[level])
            out.append(
                f"h5 {bag.path} records level {level} as {rec[0]}x{rec[1]} pixels (coords "
                f"attribute 'level_dim'), but {slide_path.name}'s is {have[0]}x{have[1]}"
            )
    return out


def _mismatch(problems: list[str], allow: bool, warnings: list[str]) -> None:
    if not problems:
        return
    if not allow:
        raise SparsemilError(
            f"{'; '.join(problems)}; fix: pass the h5 extracted from this slide, or set "
            f"'allow_mismatch' to draw it anyway"
        )
    warnings.extend(problems)


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
    allow_mismatch: bool = False,
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
        allow_mismatch: draw patches that lie off the slide (with a warning in
            ``HeatmapResult.warnings``) instead of refusing.

    Returns:
        :class:`HeatmapResult`; the PNG is ``thumbnail_size(slide.dimensions, thumb_size)``.

    Raises:
        SparsemilError: mismatched coords, patches off the slide (:func:`footprint_problems`)
            unless ``allow_mismatch``, ``thumb_size`` < 16, ``alpha`` outside 0..1, a
            non-positive ``patch_size``, or an unreadable slide.
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
    warnings: list[str] = []
    slide = open_slide(slide_path)
    try:
        w0, h0 = slide.dimensions
        problem = footprint_problems(coords, int(patch_size), (w0, h0), f"slide {slide_path}")
        _mismatch([problem] if problem else [], allow_mismatch, warnings)
        tw, th = thumbnail_size((w0, h0), thumb_size)
        thumb, scale = read_thumbnail(slide, path=slide_path, size=(tw, th))
    finally:
        slide.close()
    scores, probs, logits = bag_scores(model, features, coords, device=device)
    values = normalize_scores(scores, normalize)
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
        warnings=warnings,
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
    patch_size: int | None = None,
    allow_mismatch: bool = False,
) -> tuple[HeatmapResult, Predictor]:
    """``wsi heatmap``: a trained checkpoint's attention on a slide's feature h5.

    The checkpoint is applied through :func:`sparsemil.train.inference.load_predictor`
    (standardiser, classes), so the slide probabilities equal ``mil predict``'s. Everything is
    checked (colour map, h5 layout, feature dimension, slide readable, h5 and slide match:
    see the module doc) before the model runs.

    Args:
        patch_size: patch side in level-0 pixels; overrides the h5's ``coords`` attributes
            (default: those, else the coordinate grid's step).
        allow_mismatch: warn (``HeatmapResult.warnings``) instead of refusing an h5 that
            does not match the slide.

    Raises:
        SparsemilError: unknown ``cmap``, a missing/unreadable file, a model without
            attention (DTFD-MIL), an h5 without coords,
            a patch size that is neither recorded, given nor inferable, features of another
            dimension than the checkpoint's, or an h5 that does not match the slide.
    """
    from matplotlib import colormaps

    from sparsemil.data.h5 import read_h5_file
    from sparsemil.train.inference import load_predictor
    from sparsemil.wsi.slide import open_slide

    if cmap not in colormaps:
        raise SparsemilError(f"cmap {cmap!r}: not a matplotlib colour map (e.g. jet, viridis)")
    if not Path(h5).is_file():
        raise SparsemilError(f"h5 {h5}: no such file")
    if patch_size is not None and int(patch_size) < 1:
        raise SparsemilError(f"patch_size {patch_size}: must be a positive level-0 size")
    predictor = load_predictor(checkpoint, device)
    require_attention(predictor.model)
    bag = read_h5_file(h5, need_coords=True)
    predictor.check_features(bag.features.shape[1], f"h5 {h5}")
    s = open_slide(slide)
    try:
        downs = list(s.level_downsamples)
        level_dims = list(s.level_dimensions)
    finally:
        s.close()
    size, notes = heatmap_patch_size(bag, downs, patch_size)
    problems = h5_slide_problems(bag, Path(slide), level_dims)
    off = footprint_problems(bag.coords, size, level_dims[0], f"h5 {h5} on slide {slide}")
    warnings: list[str] = []
    _mismatch(problems + ([off] if off else []), allow_mismatch, warnings)
    res = attention_heatmap(
        slide, bag.features, bag.coords.astype(np.int64), predictor, out_png, size,
        thumb_size=thumb_size, normalize=normalize, alpha=alpha, cmap=cmap,
        allow_mismatch=True,  # checked above
    )  # fmt: skip
    res.warnings = warnings
    res.notes.extend(notes)
    return res, predictor


def heatmap_patch_size(
    bag, level_downsamples: list[float], patch_size: int | None = None
) -> tuple[int, list[str]]:
    """The patch side in level-0 pixels for the h5 ``bag``, and notes on where it came from
    when the h5 does not record it (see the module doc)."""
    from sparsemil.data.h5 import grid_step

    try:
        recorded: int | None = bag.patch_size_level0(level_downsamples)
    except SparsemilError:
        recorded = None
    if patch_size is not None:
        size = int(patch_size)
        if recorded is None:
            return size, [
                f"h5 {bag.path}: coords carry no patch-size attributes; patch size {size} "
                f"level-0 px from 'patch_size'"
            ]
        if recorded != size:
            return size, [
                f"h5 {bag.path}: patch_size {size} overrides the {recorded} level-0 px its "
                f"coords attributes give"
            ]
        return size, []
    if recorded is not None:
        return recorded, []
    step = grid_step(bag.coords)
    if step is None:
        raise SparsemilError(
            f"h5 {bag.path}: coords carry no patch-size attributes (patch_size_level0 or "
            f"patch_size, as CLAM's extract_features_fp.py leaves them) and the "
            f"{bag.coords.shape[0]} coordinates form no regular grid to infer it from; fix: "
            f"set 'patch_size' to the patch side in level-0 pixels"
        )
    return step, [
        f"h5 {bag.path}: coords carry no patch-size attributes (as CLAM's "
        f"extract_features_fp.py leaves them); patch size {step} level-0 px inferred from "
        f"the coordinate grid's step; set 'patch_size' if the patches overlap"
    ]
