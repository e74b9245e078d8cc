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


def _corrupt(path: Path, exc: BaseException) -> SparsemilError:
    return SparsemilError(
        f"{path}: corrupt or unreadable HDF5 file ({_first_line(exc)}); fix: re-copy the "
        f"file or re-run feature extraction for this slide (truncated copies and "
        f"interrupted extractions leave such files)"
    )


def _open(path: Path):
    import h5py

    if not path.exists():
        raise SparsemilError(
            f"data file {path} does not exist; fix: check the path (and the data folder / "
            f"slide_id in your dataset or split CSV)"
        )
    if not path.is_file():
        raise SparsemilError(f"{path} is not a file; fix: point at a per-slide .h5 file")
    try:
        return h5py.File(path, "r")
    except Exception as exc:  # h5py raises OSError for bad signatures and truncated files
        raise _corrupt(path, exc) from None


_MISSING_FIX = {
    "features": "point at CLAM/Trident feature files (datasets 'features' (N, C) and 'coords' "
    "(N, 2)), not patch coordinate files, or re-run feature extraction",
    "coords": "use feature files with patch coordinates (CLAM/Trident layout), or re-run "
    "feature extraction",
}


def _dataset(f, path: Path, key: str):
    import h5py

    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
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
