"""Open whole-slide images and work out magnification, read level and read size.

Everything here is OpenSlide-based (``openslide-python`` with the ``openslide-bin`` wheel).

Resolution of level 0
---------------------
The level-0 magnification ``mag0`` is taken, in this order, from

1. the user's ``mpp`` (micrometres per level-0 pixel), which always overrides the file;
2. the slide's ``openslide.mpp-x`` / ``openslide.mpp-y`` (their mean);
3. the slide's ``openslide.objective-power``.

Metadata outside the plausible microscope range :data:`MPP_RANGE` (0.05-20 um/px, i.e.
an objective power of 0.5-200x) counts as missing: a TIFF whose only resolution tag is a
screen's 72 dpi becomes 352.8 um/px in OpenSlide, which is no scan. A user ``mpp`` outside
the range is refused. A micrometre-per-pixel value is turned into a magnification with the
usual convention ``mag = 10 / mpp`` (0.25 um/px = 40x, 0.5 um/px = 20x), snapped to the
nearest standard objective (1.25, 2.5, 5, 10, 20, 40, 60, 80, 100x) when within 10 % of it,
so a scanner's 0.499 um/px counts as 20x and patches are exactly 256 px rather than 256.5.
With none of the three the slide is refused with a one-line message asking for ``mpp``
(naming any implausible value that was ignored).

Patch geometry
--------------
For a target magnification ``mag`` and an output patch of ``patch_size`` pixels,
``downsample = mag0 / mag`` (level-0 pixels per output pixel, never below 1: no upsampling)
and ``patch_size_level0 = round(patch_size * downsample)``. Patches are read at the
deepest pyramid level whose downsample does not exceed ``downsample`` by more than 1 %
(so an Aperio level at 2.0005 serves a 2x request), ``read_size =
round(patch_size_level0 / level_downsample)`` pixels at that level, and resized to
``patch_size`` when the two differ. One-level slides simply read at level 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sparsemil.errors import SparsemilError

#: File suffixes picked up when ``--slide`` is a folder (OpenSlide's vendor formats and
#: generic tiled TIFF). DICOM is left out on purpose: one DICOM slide is many ``.dcm``
#: files; pass one of them explicitly.
SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".czi",
)

#: Plausible micrometres per pixel of a microscope scan (outside: treated as missing).
MPP_RANGE: tuple[float, float] = (0.05, 20.0)
#: Plausible magnifications, ``10 / MPP_RANGE``.
MAG_RANGE: tuple[float, float] = (10.0 / MPP_RANGE[1], 10.0 / MPP_RANGE[0])

#: Standard objective magnifications that an MPP-derived magnification snaps to.
STANDARD_MAGNIFICATIONS: tuple[float, ...] = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)

_LEVEL_TOLERANCE = 1.01  # a level may exceed the wanted downsample by 1 %
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


_TIFF_TYPES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}
_COMPRESSIONS = {1: "none", 5: "LZW", 6: "old JPEG", 7: "JPEG", 8: "Deflate", 32773: "PackBits"}
_COMPRESSIONS.update({33003: "JPEG 2000", 33005: "JPEG 2000", 34712: "JPEG 2000", 50001: "WebP"})


def tiff_layout(path: str | os.PathLike[str]) -> dict | None:
    """The first image of a TIFF (classic or BigTIFF) from its header, or ``None`` when the
    header or first directory cannot be parsed or its pixel data lie beyond the end of the
    file (a truncated or damaged file).

    Returns ``{"width", "height", "tiled", "compression", "samples", "bits", "pages"}``.
    """
    import struct

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
            if head[:2] not in (b"II", b"MM"):
                return None
            e = "<" if head[:2] == b"II" else ">"
            version = struct.unpack(e + "H", head[2:4])[0]
            big = version == 43
            if version not in (42, 43):
                return None
            first = struct.unpack(e + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
            tags: dict[int, list[int]] = {}
            pages, offset = 0, first
            while offset and pages < 4096:
                if offset + (8 if big else 2) > size:
                    return None
                fh.seek(offset)
                count_fmt, entry_size = ("Q", 20) if big else ("H", 12)
                n = struct.unpack(e + count_fmt, fh.read(8 if big else 2))[0]
                raw = fh.read(n * entry_size + (8 if big else 4))
                if len(raw) < n * entry_size + (8 if big else 4):
                    return None
                if pages == 0:
                    for i in range(n):
                        ent = raw[i * entry_size : (i + 1) * entry_size]
                        tag, typ = struct.unpack(e + "HH", ent[:4])
                        cnt = struct.unpack(
                            e + ("Q" if big else "I"), ent[4:12] if big else ent[4:8]
                        )[0]
                        width = _TIFF_TYPES.get(typ)
                        if width is None or tag not in (
                            256,
                            257,
                            258,
                            259,
                            273,
                            277,
                            279,
                            322,
                            323,
                            324,
                            325,
                        ):
                            continue
                        inline = ent[12:20] if big else ent[8:12]
                        nbytes = width * cnt
                        if nbytes <= len(inline):
                            data = inline[:nbytes]
                        else:
                            ptr = struct.unpack(e + ("Q" if big else "I"), inline)[0]
                            if ptr + nbytes > size:
                                return None
                            here = fh.tell()
                            fh.seek(ptr)
                            data = fh.read(nbytes)
                            fh.seek(here)
                        code = {1: "B", 3: "H", 4: "I", 16: "Q"}.get(typ)
                        if code is None:
                            continue
                        tags[tag] = list(struct.unpack(e + code * cnt, data))
                pages += 1
                offset = struct.unpack(e + ("Q" if big else "I"), raw[-(8 if big else 4) :])[0]
    except (OSError, struct.error):
        return None
    if 256 not in tags or 257 not in tags:
        return None
    tiled = 324 in tags
    offs, counts = (tags.get(324), tags.get(325)) if tiled else (tags.get(273), tags.get(279))
    if not offs or not counts or len(offs) != len(counts):
        return None
    if max(o + c for o, c in zip(offs, counts, strict=True)) > size:
        return None  # pixel data cut off: truncated
    return {
        "width": tags[256][0],
        "height": tags[257][0],
        "tiled": tiled,
        "compression": tags.get(259, [1])[0],
        "samples": tags.get(277, [1])[0],
        "bits": tags.get(258, [1])[0],
        "pages": pages,
    }


_CONVERT_TIFF = (
    "convert it to a tiled pyramidal TIFF, e.g. with libvips: vips tiffsave IN OUT.tif "
    "--tile --pyramid --compression jpeg --Q 90 --tile-width 256 --tile-height 256 (add "
    "--xres/--yres in pixels per mm, or set 'mpp')"
)


def _describe_format_failure(path: Path) -> str:
    """Why OpenSlide refused ``path``: a readable file in a layout OpenSlide does not read
    (what it is and how to convert it), a damaged slide, or no slide at all (by content)."""
    from sparsemil.data.h5 import file_kind

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as err:  # pragma: no cover - permission races
        return f"{path}: cannot read the file ({err.strerror})"
    if not head:
        return f"{path}: empty file, not a slide"
    if head[:4] in _TIFF_MAGICS:
        info = tiff_layout(path)
        if info is not None:
            what = f"{info['width']}x{info['height']}"
            if not info["tiled"]:
                return (
                    f"{path}: a {what} TIFF image stored in strips (not tiled), a layout "
                    f"OpenSlide does not read as a slide; fix: {_CONVERT_TIFF}"
                )
            comp = _COMPRESSIONS.get(info["compression"], f"code {info['compression']}")
            return (
                f"{path}: a tiled {what} TIFF ({comp} compression, {info['samples']} samples "
                f"of {info['bits']} bits, {info['pages']} page(s)) that OpenSlide does not "
                f"read; fix: {_CONVERT_TIFF}"
            )
    slide_like = (
        head[:4] in _TIFF_MAGICS
        or head.startswith(b"SQLite format 3")  # Sakura .svslide
        or head.startswith(b"ZISRAWFILE")  # Zeiss .czi
        or head[128:132] == b"DICM"  # DICOM
    )
    if slide_like:
        return (
            f"{path}: corrupt or truncated slide file: OpenSlide cannot parse it "
            "(re-copy or re-download the file)"
        )
    if path.suffix.lower() in (".mrxs", ".vms", ".vmu"):
        return (
            f"{path}: OpenSlide cannot open this {path.suffix} slide: its companion files "
            "are missing or damaged (they must sit next to it, as the scanner wrote them)"
        )
    kind = file_kind(path)
    if kind in ("a PNG image", "a JPEG image", "a GIF image"):
        return (
            f"{path}: {kind}, not a whole-slide image (OpenSlide reads tiled pyramidal "
            f"formats); fix: {_CONVERT_TIFF}"
        )
    if kind:
        return (
            f"{path}: not a slide file: it is {kind} (OpenSlide reads "
            f"{', '.join(SLIDE_EXTENSIONS)}, DICOM); fix: pass the whole-slide image itself"
        )
    return (
        f"{path}: not a slide file: its content is no format OpenSlide reads "
        f"({', '.join(SLIDE_EXTENSIONS)}, DICOM); fix: pass a whole-slide image, or check "
        "that the file was copied completely"
    )


def open_slide(path: str | os.PathLike[str]):
    """Open ``path`` with OpenSlide and check it can be read.

    Returns an ``openslide.OpenSlide``. Raises :class:`SparsemilError` with a one-line
    message for a missing file, a folder, a non-slide file or a corrupt/truncated slide.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        raise SparsemilError(f"{path}: no such slide file")
    if path.is_dir():
        raise SparsemilError(f"{path}: is a folder, not a slide file")
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SparsemilError(_describe_format_failure(path)) from None
    except openslide.OpenSlideError as err:
        raise SparsemilError(f"{path}: corrupt slide file: {_one_line(err)}") from None
    except OSError as err:
        raise SparsemilError(f"{path}: cannot open the file ({err.strerror or err})") from None
    w, h = slide.dimensions
    if slide.level_count < 1 or w <= 0 or h <= 0:
        slide.close()
        raise SparsemilError(f"{path}: slide has no image data (level 0 is {w}x{h})")
    return slide


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_error(path: str | os.PathLike[str], err: BaseException) -> SparsemilError:
    """The one-line error for a slide whose pixel data fail to decode."""
    return SparsemilError(
        f"{path}: corrupt slide file: cannot decode its pixels ({_one_line(err)})"
    )


def share_mode(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the usual permissions (0666 & ~umask); temporary files start as 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def list_slides(source: str | os.PathLike[str]) -> list[Path]:
    """The slide files named by ``source``.

    A file is returned as is (whatever its suffix: it is checked when opened). A folder
    gives its regular, non-hidden files with a suffix in :data:`SLIDE_EXTENSIONS`,
    sorted by name (not recursive).
    """
    source = Path(source)
    if not source.exists():
        raise SparsemilError(f"{source}: no such slide file or folder ('slide')")
    if source.is_file():
        return [source]
    slides = [
        p
        for p in source.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_EXTENSIONS
    ]
    return sorted(slides, key=lambda p: p.name)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``--shard K/N`` (0 <= K < N). ``None`` means no sharding."""
    if text is None or text == "":
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise SparsemilError(f"shard {text!r}: expected K/N with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise SparsemilError(f"shard {text!r}: need N >= 1 and 0 <= K < N, e.g. 0/4 ... 3/4")
    return k, n


def shard_slides(slides: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    """Every N-th slide starting at K (``slides[K::N]``) of the sorted list."""
    if shard is None:
        return list(slides)
    k, n = shard
    return list(slides)[k::n]


@dataclass(frozen=True)
class Resolution:
    """Level-0 resolution of a slide.

    Attributes:
        mag0: level-0 magnification used for all geometry (snapped, see module doc).
        mpp0: micrometres per level-0 pixel as found (user, file, or ``10 / objective``).
        source: where it came from: ``"mpp"`` (the user's value), ``"openslide.mpp-x"`` or
            ``"openslide.objective-power"``.
        file_mpp: the file's own ``openslide.mpp-x`` (mean with ``mpp-y``), plausible or
            not, or ``None`` when it records none.
        note: what was overridden or ignored (e.g. an implausible 352.8 um/px), or "".
    """

    mag0: float
    mpp0: float
    source: str
    file_mpp: float | None = None
    note: str = ""


def magnification_from_mpp(mpp: float) -> float:
    """``10 / mpp`` snapped to a standard objective when within 10 %."""
    raw = 10.0 / mpp
    best = min(STANDARD_MAGNIFICATIONS, key=lambda m: abs(m - raw) / m)
    return best if abs(best - raw) / best <= 0.10 else raw


def _positive_float(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def plausible_mpp(mpp: float | None) -> bool:
    """Whether ``mpp`` micrometres per pixel lies in :data:`MPP_RANGE`."""
    return mpp is not None and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def check_mpp(mpp: object, field: str = "mpp") -> float:
    """A user's micrometres per pixel as a float in :data:`MPP_RANGE`, else a one-line error
    naming ``field``."""
    v = _positive_float(mpp)
    if v is None:
        raise SparsemilError(f"{field} {mpp!r}: must be a positive number of micrometres/pixel")
    if not plausible_mpp(v):
        raise SparsemilError(
            f"{field} {v:g}: outside the plausible range of a microscope scan "
            f"({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px); use the scan's micrometres per "
            f"level-0 pixel, e.g. 0.25 for a 40x scan, 0.5 for 20x"
        )
    return v


def check_mag(mag: object, field: str = "mag") -> float:
    """A target magnification as a float in :data:`MAG_RANGE`, else a one-line error."""
    v = _positive_float(mag)
    if v is None or not MAG_RANGE[0] <= v <= MAG_RANGE[1]:
        raise SparsemilError(
            f"{field} {mag!r}: must be a magnification within {MAG_RANGE[0]:g}-"
            f"{MAG_RANGE[1]:g}x, e.g. 20"
        )
    return v


def _file_mpp(props) -> float | None:
    mx = _positive_float(props.get("openslide.mpp-x"))
    my = _positive_float(props.get("openslide.mpp-y"))
    if mx is None:
        return my
    return (mx + my) / 2 if my is not None else mx


def resolve_resolution(slide, path: str | os.PathLike[str], mpp: float | None = None) -> Resolution:
    """Level-0 magnification from ``mpp``, ``openslide.mpp-x`` or the objective power.

    ``mpp`` (the user's micrometres per level-0 pixel) always overrides the file; file
    values outside :data:`MPP_RANGE` count as missing (see the module doc).
    """
    props = slide.properties
    file_mpp = _file_mpp(props)
    power = _positive_float(props.get("openslide.objective-power"))
    if mpp is not None:
        v = check_mpp(mpp)
        note = ""
        if file_mpp is not None and abs(file_mpp - v) > 0.1 * v:
            note = f"mpp {v:g} overrides the file's openslide.mpp-x {file_mpp:g} um/px"
        return Resolution(magnification_from_mpp(v), v, "mpp", file_mpp, note)
    ignored = []
    if plausible_mpp(file_mpp):
        assert file_mpp is not None
        return Resolution(magnification_from_mpp(file_mpp), file_mpp, "openslide.mpp-x", file_mpp)
    if file_mpp is not None:
        ignored.append(f"its pixel size {file_mpp:g} um/px (openslide.mpp-x)")
    if power is not None and plausible_mpp(10.0 / power):
        note = f"ignored {ignored[0]}: implausible" if ignored else ""
        return Resolution(power, 10.0 / power, "openslide.objective-power", file_mpp, note)
    if power is not None:
        ignored.append(f"its objective power {power:g}x (openslide.objective-power)")
    if ignored:
        raise SparsemilError(
            f"{path}: the slide records {' and '.join(ignored)}, outside the plausible range "
            f"of a microscope scan ({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px, "
            f"{MAG_RANGE[0]:g}-{MAG_RANGE[1]:g}x; e.g. a screen resolution of 72 dpi); set "
            f"'mpp' to the micrometres per level-0 pixel (e.g. 0.25 for a 40x scan, 0.5 for "
            f"20x)"
        )
    raise SparsemilError(
        f"{path}: the slide records neither its pixel size (openslide.mpp-x) nor its "
        "objective power (openslide.objective-power); set 'mpp' to the micrometres per "
        "level-0 pixel (e.g. 0.25 for a 40x scan, 0.5 for 20x)"
    )


@dataclass(frozen=True)
class PatchGeometry:
    """How one output patch maps onto the slide.

    Attributes:
        target_mag: magnification the features are extracted at.
        patch_size: output patch side in pixels (at ``target_mag``).
        downsample: level-0 pixels per output pixel (``mag0 / target_mag``).
        patch_size_level0: patch side in level-0 pixels (grid step as well).
        level: pyramid level the patches are read from.
        level_downsample: that level's downsample.
        read_size: patch side in pixels at ``level`` (resized to ``patch_size`` if different).
        mag0: level-0 magnification.
    """

    target_mag: float
    patch_size: int
    downsample: float
    patch_size_level0: int
    level: int
    level_downsample: float
    read_size: int
    mag0: float

    def as_dict(self) -> dict:
        return asdict(self)


def best_level(level_downsamples: Sequence[float], downsample: float) -> int:
    """Deepest level whose downsample is at most ``downsample`` (1 % tolerance)."""
    ok = [i for i, d in enumerate(level_downsamples) if d <= downsample * _LEVEL_TOLERANCE]
    return max(ok, key=lambda i: level_downsamples[i]) if ok else 0


def patch_geometry(
    slide, resolution: Resolution, target_mag: float, patch_size: int, path: str | os.PathLike[str]
) -> PatchGeometry:
    """Read level and read size for ``patch_size`` pixels at ``target_mag``."""
    target_mag = check_mag(target_mag)
    if int(patch_size) < 8:
        raise SparsemilError(f"patch_size {patch_size}: must be at least 8 pixels")
    ds = resolution.mag0 / float(target_mag)
    if ds < 1.0 - 1e-6:
        raise SparsemilError(
            f"{path}: cannot extract at {target_mag:g}x from a slide whose level 0 is "
            f"{resolution.mag0:g}x (from {resolution.source}); set 'mag' to {resolution.mag0:g} "
            "or lower"
        )
    ds = max(ds, 1.0)
    ps0 = int(round(patch_size * ds))
    downs = [float(d) for d in slide.level_downsamples]
    level = best_level(downs, ds)
    read_size = max(1, int(round(ps0 / downs[level])))
    return PatchGeometry(
        target_mag=float(target_mag),
        patch_size=int(patch_size),
        downsample=ds,
        patch_size_level0=ps0,
        level=level,
        level_downsample=downs[level],
        read_size=read_size,
        mag0=resolution.mag0,
    )


def to_rgb(region) -> np.ndarray:
    """RGBA PIL image from ``read_region`` -> (H, W, 3) uint8, transparent parts white."""
    a = np.asarray(region)
    if a.ndim == 3 and a.shape[2] == 4:
        if a[..., 3].min() == 255:  # fully scanned: no compositing needed (the usual case)
            return np.ascontiguousarray(a[..., :3])
        rgb = a[..., :3].astype(np.uint16)
        alpha = a[..., 3:4].astype(np.uint16)
        # OpenSlide returns un-premultiplied RGBA; transparent = outside the scanned area.
        out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def read_thumbnail(
    slide,
    downsample: float | None = None,
    path: str | os.PathLike[str] = "",
    chunk: int = 4096,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """An RGB image of the whole slide at roughly ``downsample`` level-0 pixels per pixel.

    Reads the deepest level not coarser than the downsample in chunks of ``chunk`` pixels
    (so a one-level slide of any size needs no full-resolution buffer) and resizes each
    chunk into place.

    Args:
        downsample: level-0 pixels per image pixel (at least 1).
        size: exact (w, h) of the image instead of ``downsample``.

    Returns:
        image: (h, w, 3) uint8, with ``w = max(1, round(W0 / downsample))`` and likewise h
            (or ``size``).
        scale: (sx, sy) level-0 pixels per image pixel along x and y (``W0 / w``, ``H0 / h``).
    """
    from PIL import Image

    w0, h0 = slide.dimensions
    if size is not None:
        tw, th = max(1, int(size[0])), max(1, int(size[1]))
        downsample = max(min(w0 / tw, h0 / th), 1.0)
    else:
        if downsample is None:
            raise ValueError("read_thumbnail needs downsample or size")
        downsample = max(float(downsample), 1.0)
        tw, th = max(1, int(round(w0 / downsample))), max(1, int(round(h0 / downsample)))
    downs = [float(d) for d in slide.level_downsamples]
    level = best_level(downs, downsample)
    lw, lh = slide.level_dimensions[level]
    ld = downs[level]
    out = np.empty((th, tw, 3), dtype=np.uint8)
    try:
        for ly in range(0, lh, chunk):
            for lx in range(0, lw, chunk):
                cw, ch = min(chunk, lw - lx), min(chunk, lh - ly)
                x0, x1 = (lx * tw) // lw, ((lx + cw) * tw) // lw
                y0, y1 = (ly * th) // lh, ((ly + ch) * th) // lh
                if x1 <= x0 or y1 <= y0:
                    continue
                region = slide.read_region((int(lx * ld), int(ly * ld)), level, (cw, ch))
                tile = Image.fromarray(to_rgb(region))
                if tile.size != (x1 - x0, y1 - y0):
                    tile = tile.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
                out[y0:y1, x0:x1] = np.asarray(tile)
    except Exception as err:
        import openslide

        if isinstance(err, openslide.OpenSlideError):
            raise read_error(path, err) from None
        raise
    return out, (w0 / tw, h0 / th)
