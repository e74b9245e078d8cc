"""The CLAM / Trident ``.h5`` feature-file layout: its one reader and its one writer.

One slide per file:

``features``
    (N, C) float features, one row per patch (readers also accept a leading batch axis,
    (1, N, C), and any real dtype). Attributes: backbone provenance.
``coords``
    (N, 2) top-left (x, y) of each patch in level-0 pixels (int64). Attributes as CLAM's
    ``create_patches_fp.py`` writes them -- ``patch_size`` (side in pixels *at*
    ``patch_level``), ``patch_level``, ``downsample``, ... -- and/or Trident's
    ``patch_size_level0`` (see :func:`patch_size_level0`).
``labels`` (optional)
    (N,) instance labels.
root attributes
    provenance (free form).

:func:`read_h5_file` checks the layout (every problem a one-line
:class:`~sparsemil.errors.SparsemilError` naming the file), :func:`h5_info` probes the
shapes without reading arrays, :func:`write_h5_file` writes the layout atomically
(:func:`sparsemil.io.atomic_path`: a crash never leaves a half-written ``.h5``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsemil.data.bags import bag_arrays
from sparsemil.errors import SparsemilError
from sparsemil.io import atomic_path

H5_SUFFIXES = (".h5", ".hdf5")
"""File suffixes of the layout."""

PathLike = str | os.PathLike[str]


@dataclass
class H5Bag:
    """The contents of one CLAM/Trident feature file.

    Attributes:
        path: the file.
        features: float32 (N, C).
        coords: (N, 2) as stored (int64 for CLAM/Trident), or ``None``.
        labels: (N,) instance labels, or ``None``.
        attrs: root attributes.
        features_attrs: attributes of ``features``.
        coords_attrs: attributes of ``coords`` (patch geometry).
    """

    path: Path
    features: np.ndarray
    coords: np.ndarray | None = None
    labels: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    features_attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)

    def patch_size_level0(self, level_downsamples: Sequence[float] | None = None) -> int:
        """Patch side in level-0 pixels (see :func:`patch_size_level0`)."""
        return patch_size_level0(self.coords_attrs, level_downsamples, where=str(self.path))


# --------------------------------------------------------------------------- reading
def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive (the format torch.save writes)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"MATLAB 5.0 MAT-file", "a MATLAB v5 .mat file"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"II+\x00", "a BigTIFF image"),
    (b"MM\x00+", "a BigTIFF image"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"SQLite format 3\x00", "an SQLite database"),
)


def file_kind(path: PathLike) -> str:
    """What the content of ``path`` is, by its first bytes: ``"an HDF5 file"``, ``"a zip
    archive (...)"``, ``"a PNG image"``, ``"a text (CSV) file"``, ... or "" when unknown
    (also for an unreadable or empty file)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
            hdf5 = head.startswith(_HDF5_SIGNATURE)
            for off in (512, 1024, 2048, 4096, 8192):  # after a user block (MATLAB 7.3)
                if hdf5:
                    break
                fh.seek(off)
                hdf5 = fh.read(8) == _HDF5_SIGNATURE
    except OSError:
        return ""
    if hdf5:
        return "an HDF5 file"
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (what older torch.save and pickle.dump write)"
    if head and b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return ""
        return "a text (CSV) file" if "," in text else "a text file"
    return ""


_CONVERT = {
    "a zip archive": "it is a .pt bag saved with torch.save: name it <slide>.pt (format "
    "'pt' reads it), or write the CLAM layout with sparsemil.data.h5.write_h5_file",
    "a Python pickle": "if it is a .pt bag saved with torch.save, name it <slide>.pt "
    "(format 'pt' reads it), or write the CLAM layout with sparsemil.data.h5.write_h5_file",
    "a NumPy .npy": "load it with numpy.load and write the CLAM layout with "
    "sparsemil.data.h5.write_h5_file(path, features, coords)",
    "a MATLAB v5": "read it with scipy.io.loadmat and write the CLAM layout with "
    "sparsemil.data.h5.write_h5_file(path, features, coords)",
    "a text (CSV)": "if it is a DSMIL per-slide CSV, name it <slide>.csv (format "
    "'dsmil-csv' reads it)",
}


def not_hdf5_message(path: Path, kind: str) -> str:
    """The message for a readable file of another kind where an HDF5 feature file was
    expected: what it is and how to convert it (never "corrupt")."""
    fix = next((v for k, v in _CONVERT.items() if kind.startswith(k)), None)
    if fix is None and ("image" in kind or "TIFF" in kind):
        fix = "it is an image, not features: extract features from the slide first (wsi extract)"
    if fix is None:
        fix = "point at a CLAM/Trident .h5 feature file (datasets 'features', 'coords')"
    return f"{path}: {kind}, not an HDF5 feature file; fix: {fix}"


def _corrupt(path: Path, exc: BaseException) -> SparsemilError:
    return SparsemilError(
        f"{path}: corrupt or unreadable HDF5 file ({_first_line(exc)}); fix: re-copy the "
        f"file or re-run feature extraction for this slide (truncated copies and "
        f"interrupted extractions leave such files)"
    )


def require_file(path: Path, kinds: str = ".h5") -> None:
    """Raise :class:`SparsemilError` unless ``path`` is an existing file (one message for
    every per-slide reader; ``kinds`` names the expected file types)."""
    if not path.exists():
        raise SparsemilError(
            f"data file {path} does not exist; fix: check the path (and the data folder / "
            f"slide_id in your dataset or split CSV)"
        )
    if not path.is_file():
        raise SparsemilError(f"{path} is not a file; fix: point at a per-slide {kinds} file")


def _open(path: Path):
    import h5py

    require_file(path)
    try:
        return h5py.File(path, "r")
    except Exception as exc:  # h5py raises OSError for bad signatures and truncated files
        if path.stat().st_size == 0:
            raise SparsemilError(
                f"{path}: empty file; fix: re-copy the file or re-run feature extraction for "
                f"this slide (interrupted copies and extractions leave such files)"
            ) from None
        kind = file_kind(path)
        if kind and kind != "an HDF5 file":  # readable, of another kind: never "corrupt"
            raise SparsemilError(not_hdf5_message(path, kind)) from None
        raise _corrupt(path, exc) from None


_MISSING_FIX = {
    "features": "point at CLAM/Trident feature files (datasets 'features' (N, C) and 'coords' "
    "(N, 2)), not patch coordinate files, or re-run feature extraction",
    "coords": "use feature files with patch coordinates (CLAM/Trident layout), or re-run "
    "feature extraction",
}


def _layout_of(f) -> tuple[str, str] | None:
    """``(what the file is, how to convert it)`` for HDF5 layouts other than CLAM/Trident
    that are recognisable, else ``None``."""
    import h5py

    keys = set(f.keys())
    userblock = int(getattr(f, "userblock_size", 0) or 0)
    if userblock:
        with open(f.filename, "rb") as fh:
            if fh.read(19) == b"MATLAB 7.3 MAT-file":
                return (
                    "a MATLAB v7.3 .mat file",
                    "read it (h5py or the mat73 package) and write the CLAM layout with "
                    "sparsemil.data.h5.write_h5_file(path, features, coords)",
                )
    if "model_weights" in keys or "model_config" in f.attrs or "keras_version" in f.attrs:
        return ("a Keras model file, not features", "point at the slide's feature file")
    if {"X", "obs", "var"} <= keys:
        return (
            "an AnnData (.h5ad) file",
            "write its X matrix as features with sparsemil.data.h5.write_h5_file",
        )
    if isinstance(f.get("features"), h5py.Group):
        inner = ", ".join(sorted(f["features"].keys())) or "nothing"
        return (
            f"an HDF5 file whose 'features' is a group (holding {inner}), not an (N, C) dataset",
            "store one (N, C) dataset 'features' per slide (sparsemil.data.h5.write_h5_file)",
        )
    matrices = [
        k
        for k in sorted(keys)
        if k not in ("coords", "features")
        and isinstance(f[k], h5py.Dataset)
        and len(f[k].shape) in (2, 3)
        and f[k].shape[-1] > 2
        and f[k].dtype.kind in "fiu"
    ]
    if matrices:
        k = matrices[0]
        return (
            f"an HDF5 file holding {k!r} {tuple(f[k].shape)} but no 'features' (another "
            f"pipeline's layout)",
            f"rename the dataset: h5py.File(path, 'r+').move({k!r}, 'features')",
        )
    return None


def _dataset(f, path: Path, key: str):
    import h5py

    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        layout = _layout_of(f) if key == "features" else None
        if layout is not None:
            raise SparsemilError(f"{path}: {layout[0]}; fix: {layout[1]}")
        have = ", ".join(sorted(f.keys())) or "nothing"
        raise SparsemilError(
            f"{path}: no '{key}' dataset (the file has: {have}); fix: {_MISSING_FIX[key]}"
        )
    return obj


def h5_info(path: PathLike) -> tuple[int, int, bool]:
    """``(N, C, has_coords)`` of a feature file from dataset shapes only (no array read)."""
    path = Path(path)
    with _open(path) as f:
        try:
            shape = tuple(_dataset(f, path, "features").shape)
            has_coords = "coords" in f
        except SparsemilError:
            raise
        except Exception as exc:
            raise _corrupt(path, exc) from None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise SparsemilError(
            f"{path}: features has shape {shape}, expected (N, C) or (1, N, C); "
            f"fix: store one (instances x features) matrix per slide"
        )
    return int(shape[0]), int(shape[1]), has_coords


def read_h5_file(path: PathLike, *, need_coords: bool = False) -> H5Bag:
    """Read and check one feature file (``coords`` must be present when ``need_coords``)."""
    path = Path(path)
    with _open(path) as f:
        try:
            fset = _dataset(f, path, "features")
            cset = _dataset(f, path, "coords") if need_coords or "coords" in f else None
            features = np.asarray(fset[()])
            coords = np.asarray(cset[()]) if cset is not None else None
            labels = np.asarray(f["labels"][()]) if "labels" in f else None
            attrs = dict(f.attrs)
            features_attrs = dict(fset.attrs)
            coords_attrs = dict(cset.attrs) if cset is not None else {}
        except SparsemilError:
            raise
        except Exception as exc:
            raise _corrupt(path, exc) from None
    features, coords = bag_arrays(path, features, coords)
    if labels is not None:
        labels = labels.reshape(-1) if labels.ndim == 2 and 1 in labels.shape else labels
        if labels.shape != (features.shape[0],):
            raise SparsemilError(
                f"{path}: labels has shape {tuple(labels.shape)} but features has "
                f"{features.shape[0]} instances; fix: store one instance label per row"
            )
    return H5Bag(path, features, coords, labels, attrs, features_attrs, coords_attrs)


def patch_size_level0(
    attrs: Mapping[str, Any],
    level_downsamples: Sequence[float] | None = None,
    where: str = "h5 coords",
) -> int:
    """Patch side in level-0 pixels from ``coords`` attributes (ours, CLAM's or Trident's).

    Trident's ``patch_size_level0`` when present; else CLAM's ``patch_size`` times the
    ``downsample`` attribute, or times ``level_downsamples[patch_level]`` (the slide's
    pyramid), or times 1.
    """
    if "patch_size_level0" in attrs:
        return int(np.asarray(attrs["patch_size_level0"]).ravel()[0])
    if "patch_size" in attrs:
        ps = float(np.asarray(attrs["patch_size"]).ravel()[0])
        if "downsample" in attrs:
            ds = float(np.asarray(attrs["downsample"]).ravel()[0])
        elif "patch_level" in attrs and level_downsamples is not None:
            ds = float(level_downsamples[int(np.asarray(attrs["patch_level"]).ravel()[0])])
        else:
            ds = 1.0
        return int(round(ps * ds))
    raise SparsemilError(
        f"{where}: coords have neither patch_size_level0 nor patch_size attributes; cannot "
        f"place patches; fix: re-extract with sparsemil, CLAM or Trident"
    )


def grid_step(coords: np.ndarray) -> int | None:
    """The step of the patch grid that ``coords`` (N, 2) lie on, in coords units, or
    ``None`` when there is no clear grid.

    The most common positive difference between neighbouring patches of a row (equal y)
    or of a column (equal x), provided it accounts for at least half of those differences
    (CLAM's grids restart at each tissue piece, and tissue gaps skip cells). For the
    non-overlapping grids of CLAM, Trident and sparsemil the step is the patch side.
    """
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] < 2:
        return None
    c = np.rint(c.astype(np.float64)).astype(np.int64)
    parts = []
    for a, b in ((0, 1), (1, 0)):  # along x within rows, along y within columns
        s = c[np.lexsort((c[:, a], c[:, b]))]
        d = s[1:, a] - s[:-1, a]
        parts.append(d[(s[1:, b] == s[:-1, b]) & (d > 0)])
    d = np.concatenate(parts)
    if d.size == 0:
        return None
    values, counts = np.unique(d, return_counts=True)
    if counts.max() * 2 < d.size:
        return None
    return int(values[int(np.argmax(counts))])


# --------------------------------------------------------------------------- writing
def write_h5_file(
    path: PathLike,
    features: np.ndarray,
    coords: np.ndarray | None = None,
    *,
    labels: np.ndarray | None = None,
    attrs: Mapping[str, Any] | None = None,
    features_attrs: Mapping[str, Any] | None = None,
    coords_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide in the CLAM/Trident layout, atomically (temporary name, then rename).

    Args:
        path: the ``.h5`` to write (its folder is created).
        features: (N, C) (or (1, N, C)) real features; floating dtypes are kept, others
            stored as float32.
        coords: optional (N, 2) level-0 top-left patch corners (integers stored as int64).
        labels: optional (N,) instance labels.
        attrs, features_attrs, coords_attrs: root / ``features`` / ``coords`` attributes.

    Raises:
        SparsemilError: arrays that break the layout (the message names ``path``).
    """
    import h5py

    path = Path(path)
    feats = np.asarray(features)
    if not np.issubdtype(feats.dtype, np.floating):
        feats = feats.astype(np.float32)
    if coords is not None:
        coords = np.asarray(coords)
        if np.issubdtype(coords.dtype, np.integer):
            coords = coords.astype(np.int64)
    n = bag_arrays(path, feats, coords)[0].shape[0]  # the layout's shape rules
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise SparsemilError(
                f"{path}: labels has shape {tuple(labels.shape)}, expected ({n},) (one per "
                f"instance)"
            )
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dsets = [(f.create_dataset("features", data=feats), features_attrs)]
            if coords is not None:
                dsets.append((f.create_dataset("coords", data=coords), coords_attrs))
            if labels is not None:
                f.create_dataset("labels", data=labels)
            for obj, extra in [*dsets, (f, attrs)]:
                for k, v in (extra or {}).items():
                    obj.attrs[k] = v
    return path


ENCODER_ATTRS = ("backbone", "pretrained", "weights", "weights_sha256", "normalization")


def encoder_attrs(path: PathLike) -> dict[str, Any]:
    """The patch encoder recorded on the ``features`` dataset of a feature file written by
    ``sparsemil wsi extract`` (``backbone``, ``weights_sha256``, ...); ``{}`` when the file
    records none (e.g. CLAM's own files) or is not an h5 file. Reads attributes only."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            feats = f.get("features")
            attrs = dict(feats.attrs) if feats is not None else {}
    except OSError:
        return {}
    out: dict[str, Any] = {}
    for key in ENCODER_ATTRS:
        if key in attrs:
            value = attrs[key]
            value = value.decode() if isinstance(value, bytes) else value
            out[key] = value.item() if hasattr(value, "item") else value
    return out
