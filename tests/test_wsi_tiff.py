"""A minimal tiled-TIFF writer for synthetic slides (OpenSlide's generic-tiff format).

Other ``test_wsi_*`` modules import :func:`write_tiled_tiff` from here; the tests below
check that OpenSlide reads such files back exactly.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_tiled_tiff(
    path: Path,
    rgb: np.ndarray,
    tile: int = 256,
    mpp: float | None = None,
    dpi: float | None = None,
) -> Path:
    """Write (H, W, 3) uint8 ``rgb`` as an uncompressed, tiled, little-endian TIFF.

    ``mpp`` (um/px) is stored as X/YResolution in pixels per centimetre, which OpenSlide
    reports as ``openslide.mpp-x``; ``dpi`` stores a resolution in pixels per inch instead
    (as image editors write a screen's 72 dpi); without either the slide has no resolution.
    """
    h, w, _ = rgb.shape
    nx, ny = -(-w // tile), -(-h // tile)
    tiles = []
    for j in range(ny):
        for i in range(nx):
            t = np.full((tile, tile, 3), 255, np.uint8)
            blk = rgb[j * tile : (j + 1) * tile, i * tile : (i + 1) * tile]
            t[: blk.shape[0], : blk.shape[1]] = blk
            tiles.append(t.tobytes())
    entries: list[tuple[int, int, int, bytes]] = []

    def short(tag: int, vals: list[int]) -> None:
        entries.append((tag, 3, len(vals), struct.pack(f"<{len(vals)}H", *vals)))

    def long_(tag: int, vals: list[int]) -> None:
        entries.append((tag, 4, len(vals), struct.pack(f"<{len(vals)}I", *vals)))

    offsets, pos = [], 8
    for t in tiles:
        offsets.append(pos)
        pos += len(t)
    long_(256, [w])
    long_(257, [h])
    short(258, [8, 8, 8])
    short(259, [1])  # no compression
    short(262, [2])  # RGB
    short(277, [3])
    short(284, [1])
    long_(322, [tile])
    long_(323, [tile])
    long_(324, offsets)
    long_(325, [len(tiles[0])] * len(tiles))
    if mpp is not None:
        px_per_cm = int(round(1e4 / mpp))
        for tag in (282, 283):
            entries.append((tag, 5, 1, struct.pack("<II", px_per_cm, 1)))
        short(296, [3])  # centimetre
    elif dpi is not None:
        for tag in (282, 283):
            entries.append((tag, 5, 1, struct.pack("<II", int(round(dpi * 1000)), 1000)))
        short(296, [2])  # inch
    entries.sort(key=lambda e: e[0])
    ifd_off = pos
    extra_off = ifd_off + 2 + 12 * len(entries) + 4
    ifd, extra = struct.pack("<H", len(entries)), b""
    for tag, typ, cnt, val in entries:
        if len(val) <= 4:
            ifd += struct.pack("<HHI", tag, typ, cnt) + val.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, cnt, extra_off + len(extra))
            extra += val + (b"\0" if len(val) % 2 else b"")
    ifd += struct.pack("<I", 0)
    with open(path, "wb") as f:
        f.write(b"II*\0" + struct.pack("<I", ifd_off))
        for t in tiles:
            f.write(t)
        f.write(ifd + extra)
    return Path(path)


def test_openslide_reads_synthetic_tiff_exactly(tmp_path):
    import openslide

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(300, 520, 3), dtype=np.uint8)
    p = write_tiled_tiff(tmp_path / "rand.tif", img, tile=128, mpp=0.5)
    s = openslide.OpenSlide(str(p))
    assert s.dimensions == (520, 300)
    assert float(s.properties["openslide.mpp-x"]) == 0.5
    back = np.asarray(s.read_region((0, 0), 0, (520, 300)))
    assert (back[..., :3] == img).all() and (back[..., 3] == 255).all()
    s.close()
    q = write_tiled_tiff(tmp_path / "nompp.tif", img, tile=128)
    s = openslide.OpenSlide(str(q))
    assert "openslide.mpp-x" not in s.properties
    assert "openslide.objective-power" not in s.properties
    s.close()
