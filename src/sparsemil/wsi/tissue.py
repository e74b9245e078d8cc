"""Tissue detection: Otsu on the HSV saturation of a low-resolution image of the slide.

Steps (numpy + ``scipy.ndimage``), applied to an RGB image of the whole slide read at
``TissueParams.mask_mpp`` micrometres per pixel (the *mask resolution*):

1. saturation ``S = 255 * (max(R,G,B) - min(R,G,B)) / max(R,G,B)`` (OpenCV's HSV S;
   0 where the pixel is black). Transparent, unscanned areas were composited onto white
   and so have S = 0. Glass is grey/white (low S); H&E-stained tissue is pink/purple (high S).
2. median filter of side ``median_um`` (odd number of pixels) against speckle;
3. the threshold (:func:`choose_threshold`): Otsu's threshold of the filtered S over the
   whole image (256-bin histogram, the threshold maximising the between-class variance),
   but never below ``min_saturation``, since on a blank slide Otsu would otherwise split
   background noise -- except in the two situations Otsu's glass-vs-tissue split does not
   fit, which are detected and handled:

   * **no glass background** (tissue edge to edge, e.g. a crop or a core): fewer than 1 %
     of the pixels are glass-like (S <= ``glass_saturation``) and the median S is above
     ``min_saturation``, or Otsu's lower class is itself stained (its mean S >
     ``min_saturation``: Otsu split the tissue in two). The threshold is then
     ``min_saturation``, so all stained tissue is kept (mode ``no_glass``). Without glass
     and with a median S between the two (uniformly faint: a pale stain edge to edge, or
     tinted glass -- saturation cannot tell them apart) the result gets a note;
   * **very pale stain**: Otsu's threshold is below ``min_saturation``, its lower class is
     glass (mean S <= ``glass_saturation``), its upper class is at least 6 saturation units
     above it, and the two are well separated (between-class variance >= 0.8 of the total)
     or the upper class is the larger one (pale tissue with little glass).
     Otsu's threshold is then used (mode ``pale``), where the floor would find no tissue.

   ``tissue_threshold`` fixes the threshold instead (mode ``fixed``). A result that still
   looks doubtful -- no tissue while part of the image is faintly stained, or a quarter of
   the image with a saturation between glass and the threshold -- carries a ``note``
   that ``wsi extract`` prints as a warning;
4. closing then opening with discs of radius ``closing_um`` / ``opening_um``
   (bridges small gaps, removes thin debris);
5. holes (background wholly enclosed by tissue) smaller than ``max_hole_um2`` are filled;
   larger ones (lumina, fat, tears) stay background so patches there are dropped;
6. connected tissue components (8-connectivity) smaller than ``min_object_um2`` are removed.

Physical sizes are converted to pixels with the mask's actual micrometres per pixel
(which is coarser than ``mask_mpp`` when the slide is so large that the mask would exceed
``max_side`` pixels on its longest side, or finer for slides that are smaller than that).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue` (defaults used by ``sparsemil wsi extract``).

    Attributes:
        mask_mpp: micrometres per pixel of the tissue mask (4 um/px = 2.5x).
        max_side: cap on the mask's longest side in pixels (memory/time bound).
        median_um: side of the median filter on the saturation channel (um).
        min_saturation: floor on the Otsu threshold, in 0..255 saturation units.
        closing_um: radius of the closing disc (um).
        opening_um: radius of the opening disc (um).
        max_hole_um2: holes in tissue smaller than this area are filled (um^2).
        min_object_um2: tissue pieces smaller than this area are removed (um^2).
        glass_saturation: saturation at or below which a pixel looks like glass (0..255);
            used to recognise images without glass and very pale stains.
        tissue_threshold: a fixed saturation threshold (pixels above it are tissue)
            instead of the automatic choice; None = automatic.
    """

    mask_mpp: float = 4.0
    max_side: int = 4096
    median_um: float = 28.0
    min_saturation: int = 20
    closing_um: float = 8.0
    opening_um: float = 4.0
    max_hole_um2: float = 16384.0  # one 256-px patch at 20x (128 um square)
    min_object_um2: float = 16384.0
    glass_saturation: int = 8
    tissue_threshold: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise :class:`~sparsemil.errors.SparsemilError` naming the first bad field."""
        from sparsemil.errors import SparsemilError

        def bad(name: str, why: str) -> SparsemilError:
            return SparsemilError(f"{name} {getattr(self, name)}: {why}")

        if not (math.isfinite(self.mask_mpp) and self.mask_mpp > 0):
            raise bad("mask_mpp", "must be a positive number of micrometres per pixel, e.g. 4")
        if self.max_side < 16:
            raise bad("max_side", "must be at least 16 pixels")
        for name in ("median_um", "closing_um", "opening_um", "max_hole_um2", "min_object_um2"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise bad(name, "must be 0 or more")
        for name in ("min_saturation", "glass_saturation"):
            if not 0 <= int(getattr(self, name)) <= 254:
                raise bad(name, "must be a saturation within 0..254")
        if self.tissue_threshold is not None and not 0 <= int(self.tissue_threshold) <= 254:
            raise bad("tissue_threshold", "must be a saturation within 0..254")


@dataclass
class TissueMask:
    """Result of :func:`detect_tissue`.

    Attributes:
        mask: (h, w) bool, True = tissue.
        image: (h, w, 3) uint8 RGB image the mask was computed on.
        scale: (sx, sy) level-0 pixels per mask pixel.
        threshold: saturation threshold used (0..255).
        otsu: Otsu's threshold before the ``min_saturation`` floor.
        mode: how the threshold was chosen: ``"otsu"`` (Otsu, floored at
            ``min_saturation``), ``"no_glass"``, ``"pale"`` or ``"fixed"`` (see the module doc).
        note: a doubt about the result worth a warning, or "".
    """

    mask: np.ndarray
    image: np.ndarray
    scale: tuple[float, float]
    threshold: int
    otsu: int
    mode: str = "otsu"
    note: str = ""

    @property
    def fraction(self) -> float:
        """Fraction of the mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of (h, w, 3) uint8 RGB as uint8 0..255 (0 for black pixels)."""
    rgb = np.asarray(rgb)
    mx = rgb.max(axis=2).astype(np.int32)
    mn = rgb.min(axis=2).astype(np.int32)
    s = np.zeros(mx.shape, dtype=np.int32)
    nz = mx > 0
    s[nz] = ((mx[nz] - mn[nz]) * 255 + mx[nz] // 2) // mx[nz]
    return s.astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values``: pixels ``> t`` form the upper class.

    Maximises the between-class variance ``(mu_T w(t) - mu(t))^2 / (w(t) (1 - w(t)))``
    over the 256-bin histogram. A constant image returns its value.
    """
    v = np.asarray(values, dtype=np.uint8).ravel()
    if v.size == 0:
        return 0
    hist = np.bincount(v, minlength=256).astype(np.float64)
    p = hist / hist.sum()
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    denom = w * (1.0 - w)
    between = np.zeros(256)
    ok = denom > 1e-12
    between[ok] = (mu_t * w[ok] - mu[ok]) ** 2 / denom[ok]
    if not ok.any():
        return int(v[0])
    return int(np.argmax(between))


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


MIN_GLASS_FRACTION = 0.01
"""Below this fraction of glass-like pixels an image has no glass background."""
PALE_MIN_CONTRAST = 6.0
"""A pale stain's Otsu classes differ by at least this much mean saturation."""
PALE_MIN_SEPARATION = 0.8
"""... and their between-class variance is at least this fraction of the total."""
DOUBTFUL_FRACTION = 0.25
"""A result is doubtful when this much of the image lies between glass and the threshold."""


@dataclass(frozen=True)
class Threshold:
    """What :func:`choose_threshold` decided (see the module doc)."""

    value: int
    otsu: int
    mode: str
    note: str = ""


def choose_threshold(s: np.ndarray, params: TissueParams = TissueParams()) -> Threshold:
    """The saturation threshold of the (median-filtered) saturation image ``s``: Otsu's
    floored at ``min_saturation``, or the handling of images without glass and of very pale
    stains (module doc, step 3)."""
    v = np.asarray(s, dtype=np.uint8).ravel()
    otsu = otsu_threshold(v)
    floor, glass_s = int(params.min_saturation), int(params.glass_saturation)
    if v.size == 0:
        return Threshold(floor, otsu, "otsu")
    if params.tissue_threshold is not None:
        return Threshold(int(params.tissue_threshold), otsu, "fixed")
    lo, hi = v[v <= otsu].astype(np.float64), v[v > otsu].astype(np.float64)
    lo_mean = float(lo.mean()) if lo.size else 0.0
    hi_mean = float(hi.mean()) if hi.size else lo_mean
    glass = float(np.mean(v <= glass_s))
    median = float(np.median(v))
    uniform_note = ""
    if glass < MIN_GLASS_FRACTION and median > glass_s:
        if median > floor:  # stained everywhere
            return Threshold(floor, otsu, "no_glass")
        uniform_note = (
            f"no glass-like area and a uniformly faint saturation (median {median:g}, "
            f"between glass {glass_s} and the threshold {max(otsu, floor)}): a very pale "
            f"stain edge to edge, or tinted glass without tissue; check the tissue PNG and, "
            f"if it is tissue, set 'tissue_threshold' below {median:g}"
        )
    if lo_mean > floor:
        return Threshold(floor, otsu, "no_glass")
    if otsu < floor and lo.size and hi.size:
        w0 = lo.size / v.size
        between = w0 * (1.0 - w0) * (hi_mean - lo_mean) ** 2
        separation = between / max(float(v.var()), 1e-12)
        if (
            lo_mean <= glass_s
            and hi_mean - lo_mean >= PALE_MIN_CONTRAST
            and (separation >= PALE_MIN_SEPARATION or hi.size >= lo.size)
        ):
            return Threshold(max(otsu, 1), otsu, "pale")
    thr = max(otsu, floor)
    between_fraction = float(np.mean((v > glass_s) & (v <= thr)))
    note = uniform_note
    if not note and between_fraction >= DOUBTFUL_FRACTION:
        note = (
            f"{100 * between_fraction:.0f}% of the image has a saturation between glass "
            f"({glass_s}) and the threshold ({thr}): a very pale stain? check the tissue "
            f"PNG and set 'tissue_threshold' or 'min_saturation' if tissue is missing"
        )
    elif not note and not np.any(v > thr) and np.percentile(v, 99) > glass_s:
        note = (
            f"no saturation above the threshold {thr}, but the most saturated 1% of the "
            f"image reaches {int(np.percentile(v, 99))}: a very pale stain? set "
            f"'tissue_threshold' or 'min_saturation' below it to keep it"
        )
    return Threshold(thr, otsu, "otsu", note)


def mask_from_rgb(
    rgb: np.ndarray, um_per_px: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, int, int]:
    """Tissue mask of an RGB image whose pixels are ``um_per_px`` micrometres wide.

    Returns ``(mask (h, w) bool, threshold, otsu)`` (:func:`tissue_mask_of_rgb` also says
    how the threshold was chosen).
    """
    mask, choice = tissue_mask_of_rgb(rgb, um_per_px, params)
    return mask, choice.value, choice.otsu


def tissue_mask_of_rgb(
    rgb: np.ndarray, um_per_px: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, Threshold]:
    """Tissue mask of an RGB image whose pixels are ``um_per_px`` micrometres wide, and the
    :class:`Threshold` it used."""
    s = saturation(rgb)
    k = _odd(params.median_um / um_per_px)
    if k > 1:
        s = ndi.median_filter(s, size=k, mode="nearest")
    choice = choose_threshold(s, params)
    thr = choice.value
    mask = s > thr
    r_close = int(round(params.closing_um / um_per_px))
    if r_close > 0 and mask.any():
        # pad so closing does not glue tissue to the image border
        pad = r_close + 1
        mask = ndi.binary_closing(np.pad(mask, pad), structure=_disk(r_close))[pad:-pad, pad:-pad]
    r_open = int(round(params.opening_um / um_per_px))
    if r_open > 0 and mask.any():
        mask = ndi.binary_opening(mask, structure=_disk(r_open))
    px_area = um_per_px * um_per_px
    if mask.any():
        holes = ndi.binary_fill_holes(mask) & ~mask
        if holes.any():
            lab, n = ndi.label(holes, structure=np.ones((3, 3), bool))
            sizes = np.bincount(lab.ravel(), minlength=n + 1)
            small = sizes * px_area < params.max_hole_um2
            small[0] = False
            mask = mask | small[lab]
        lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes * px_area >= params.min_object_um2
        keep[0] = False
        mask = keep[lab]
    return mask, choice


def mask_downsample(
    dimensions: tuple[int, int], mpp0: float, params: TissueParams = TissueParams()
) -> float:
    """Level-0 pixels per mask pixel: ``mask_mpp / mpp0``, coarser if the mask would exceed
    ``max_side`` pixels, and at least 1."""
    w0, h0 = dimensions
    ds = params.mask_mpp / mpp0
    ds = max(ds, max(w0, h0) / float(params.max_side), 1.0)
    return ds


def detect_tissue(slide, mpp0: float, params: TissueParams = TissueParams(), path="") -> TissueMask:
    """Tissue mask of an open OpenSlide ``slide`` whose level 0 has ``mpp0`` um/px.

    ``mpp0`` should be the nominal micrometres per level-0 pixel (``10 / mag0``).
    """
    from sparsemil.wsi.slide import read_thumbnail

    ds = mask_downsample(slide.dimensions, mpp0, params)
    image, scale = read_thumbnail(slide, ds, path=path)
    um_per_px = mpp0 * math.sqrt(scale[0] * scale[1])
    mask, choice = tissue_mask_of_rgb(image, um_per_px, params)
    return TissueMask(
        mask=mask,
        image=image,
        scale=scale,
        threshold=choice.value,
        otsu=choice.otsu,
        mode=choice.mode,
        note=choice.note,
    )


def overlay_png(tissue: TissueMask, out_png, coords=None, patch_size_level0: int | None = None):
    """Write the mask image with tissue tinted green, its outline, and kept patches (blue).

    The PNG has the mask's size (``tissue.image``); ``coords`` are level-0 (x, y).
    """
    from PIL import Image, ImageDraw

    from sparsemil.io import atomic_path
    from sparsemil.wsi.slide import share_mode

    img = tissue.image.astype(np.float32)
    m = tissue.mask
    tint = np.array([40, 200, 80], np.float32)
    img[m] = 0.75 * img[m] + 0.25 * tint
    edge = m & ~ndi.binary_erosion(m)
    img[edge] = (0, 140, 40)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    if coords is not None and patch_size_level0:
        draw = ImageDraw.Draw(pil)
        sx, sy = tissue.scale
        for x, y in np.asarray(coords):
            x0, y0 = x / sx, y / sy
            draw.rectangle(
                [x0, y0, x0 + patch_size_level0 / sx - 1, y0 + patch_size_level0 / sy - 1],
                outline=(30, 60, 220),
            )
    with atomic_path(out_png) as tmp:
        pil.save(tmp, format="PNG")
        share_mode(tmp)
    return out_png
