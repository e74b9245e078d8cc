"""Tissue detection: Otsu on the HSV saturation of a low-resolution image of the slide.

Steps (numpy + ``scipy.ndimage``), applied to an RGB image of the whole slide read at
``TissueParams.mask_mpp`` micrometres per pixel (the *mask resolution*):

1. saturation ``S = 255 * (max(R,G,B) - min(R,G,B)) / max(R,G,B)`` (OpenCV's HSV S;
   0 where the pixel is black). Transparent, unscanned areas were composited onto white
   and so have S = 0. Glass is grey/white (low S); H&E-stained tissue is pink/purple (high S).
2. median filter of side ``median_um`` (odd number of pixels) against speckle;
3. Otsu's threshold of the filtered S over the whole image (256-bin histogram, the
   threshold maximising the between-class variance), but never below
   ``min_saturation``: on a blank slide Otsu would otherwise split background noise;
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
    """

    mask_mpp: float = 4.0
    max_side: int = 4096
    median_um: float = 28.0
    min_saturation: int = 20
    closing_um: float = 8.0
    opening_um: float = 4.0
    max_hole_um2: float = 16384.0  # one 256-px patch at 20x (128 um square)
    min_object_um2: float = 16384.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TissueMask:
    """Result of :func:`detect_tissue`.

    Attributes:
        mask: (h, w) bool, True = tissue.
        image: (h, w, 3) uint8 RGB image the mask was computed on.
        scale: (sx, sy) level-0 pixels per mask pixel.
        threshold: saturation threshold used (0..255).
        otsu: Otsu's threshold before the ``min_saturation`` floor.
    """

    mask: np.ndarray
    image: np.ndarray
    scale: tuple[float, float]
    threshold: int
    otsu: int

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


def mask_from_rgb(
    rgb: np.ndarray, um_per_px: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, int, int]:
    """Tissue mask of an RGB image whose pixels are ``um_per_px`` micrometres wide.

    Returns ``(mask (h, w) bool, threshold, otsu)``.
    """
    s = saturation(rgb)
    k = _odd(params.median_um / um_per_px)
    if k > 1:
        s = ndi.median_filter(s, size=k, mode="nearest")
    otsu = otsu_threshold(s)
    thr = max(otsu, int(params.min_saturation))
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
    return mask, thr, otsu


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
    mask, thr, otsu = mask_from_rgb(image, um_per_px, params)
    return TissueMask(mask=mask, image=image, scale=scale, threshold=thr, otsu=otsu)


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
