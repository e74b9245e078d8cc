"""Small vision datasets for the pruning experiments, read from local files only.

``load_vision_dataset(name, data_path=None, subset=None, seed=0, image_size=None, channels=None)
-> VisionData``; ``augment_batch(x, mode, generator, *, fill) -> Tensor`` (training augmentation).

Supported names (case-insensitive; ``-``/``_`` interchangeable):

- ``digits`` -- scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes). A seeded,
  stratified 80/20 train/test split (``sklearn.model_selection.train_test_split(test_size=0.2,
  stratify=y, random_state=seed)``, i.e. 1437 train / 360 test), then every pixel standardised
  with the training mean/std of that pixel (pixels constant in training keep std 1).
- ``fashion-mnist`` / ``mnist`` -- a folder holding the four idx files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Default folder for Fashion-MNIST:
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``cifar10`` / ``cifar100`` -- the standard "python version" batch folders
  (``cifar-10-batches-py`` / ``cifar-100-python``). These files are pickles; they are read by
  :class:`_ArrayOnlyUnpickler`, which resolves exactly four globals -- the NumPy array
  reconstructors ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
  ``numpy.ndarray`` and ``numpy.dtype`` -- and refuses every other global, so a batch file can
  only produce dicts, lists, strings, bytes, numbers and NumPy arrays.
- ``npz`` -- ``data_path`` is a ``.npz`` file with ``x_train, y_train, x_test, y_test``
  (read with ``allow_pickle=False``).

Image datasets (idx, CIFAR) are scaled to [0, 1] and standardised per channel with the
training-set mean/std (no augmentation at load time). ``npz`` arrays are used as given (uint8
scaled to [0, 1]). Images are returned as ``(N, C, H, W)`` float32; flat features as ``(N, D)``.
:attr:`VisionData.black` holds, per channel, the value a black (0) pixel has after this
standardisation (``-mean_c / std_c``; 0 for ``npz`` images; ``None`` for ``digits``, which is
standardised per pixel, and for flat features).

Input layout for CIFAR-style networks (config keys ``image_size`` / ``channels``):

- ``image_size=S`` pads every image (train and test) to ``S x S`` with black pixels
  (:attr:`VisionData.black`), ``(S - H) // 2`` rows on top and the rest below (likewise left /
  right), *after* the standardisation, whose statistics therefore stay those of the original
  images: Fashion-MNIST 28x28 -> 32x32 adds a 2-pixel black border and keeps every original
  pixel value exact (as ``transforms.Pad(2)`` before ``ToTensor``/``Normalize`` with the 28x28
  statistics). Images are never resized; ``S`` smaller than the images is refused.
- ``channels=3`` replicates a grey channel three times (``1x32x32`` -> ``3x32x32``), so the
  CIFAR-layout networks (alexnet, vgg16, resnet18, resnet50) take Fashion-MNIST unchanged.

Augmentation (:func:`augment_batch`, config key ``augment``) is applied per mini-batch by the
training loop, never at load time.

``subset`` keeps a seeded random ``subset`` of the *training* set (the test set is untouched).
A missing dataset raises :class:`~sparsemil.errors.SparsemilError` with a one-line message that
says where to put the files.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import importlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsemil.errors import SparsemilError

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "npz")
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass
class VisionData:
    """A classification dataset held in memory as tensors.

    Attributes:
        x_train: float32 ``(N_train, *in_shape)``.
        y_train: int64 ``(N_train,)`` labels in ``0..num_classes-1``.
        x_test: float32 ``(N_test, *in_shape)``.
        y_test: int64 ``(N_test,)``.
        in_shape: per-sample shape, e.g. ``(1, 8, 8)`` or ``(D,)``.
        num_classes: number of classes.
        name: canonical dataset name.
        black: per-channel value of a black (0) pixel after standardisation (the padding value
            of ``image_size`` and of :func:`augment_batch`), or ``None`` when undefined (digits:
            per-pixel standardisation; flat features).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    in_shape: tuple[int, ...]
    num_classes: int
    name: str
    black: tuple[float, ...] | None = None

    @property
    def in_features(self) -> int:
        """Number of input features when flattened."""
        return int(np.prod(self.in_shape))

    def to(self, device: str | torch.device) -> VisionData:
        """A copy with every tensor on ``device``."""
        return VisionData(
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.in_shape,
            self.num_classes,
            self.name,
            self.black,
        )


def canonical_dataset_name(name: str) -> str:
    """Normalise a dataset name (``FashionMNIST`` -> ``fashion-mnist``); unknown -> error."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))
    if key not in DATASETS:
        near = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SparsemilError(
            f"dataset: unknown name {name!r}{hint}; choose one of {', '.join(DATASETS)}"
        )
    return key


def load_vision_dataset(
    name: str,
    data_path: str | Path | None = None,
    subset: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    channels: int | None = None,
    test_subset: int | None = None,
) -> VisionData:
    """Load a dataset by name from local files (never downloads).

    Args:
        name: one of :data:`DATASETS` (aliases such as ``fashion_mnist`` accepted).
        data_path: folder (idx, CIFAR) or ``.npz`` file; ignored for ``digits``. For idx/CIFAR a
            parent folder holding a sub-folder named after the dataset also works (the official
            code's ``datasets/`` layout).
        subset: keep a seeded random subset of this many training samples.
        seed: seeds the digits split and the subset.
        image_size: pad the images with black to ``image_size x image_size`` (see the module
            docstring); ``None`` keeps them.
        channels: ``3`` replicates a grey channel to three; ``None`` (or the current number)
            keeps them.
        test_subset: keep a seeded random subset of this many test samples (a CPU reduction
            for large networks, whose sweep evaluates the test set at every ratio).
    """
    key = canonical_dataset_name(name)
    if key == "digits":
        data = _load_digits(seed)
    elif key in ("fashion-mnist", "mnist"):
        data = _load_idx(key, data_path)
    elif key in ("cifar10", "cifar100"):
        data = _load_cifar(key, data_path)
    else:
        data = _load_npz(data_path)
    if subset is not None:
        data = _take_subset(data, subset, seed)
    if test_subset is not None:
        data = _take_test_subset(data, test_subset, seed)
    return _layout(data, image_size, channels)


def _take_test_subset(data: VisionData, n_keep: int, seed: int) -> VisionData:
    """A seeded random subset of ``n_keep`` test samples (order kept)."""
    n = len(data.y_test)
    if not isinstance(n_keep, int) or isinstance(n_keep, bool) or n_keep < 1:
        raise SparsemilError(f"test_subset: must be a positive integer, got {n_keep!r}")
    if n_keep >= n:
        return data
    rng = np.random.default_rng(seed + 1)
    idx = torch.from_numpy(np.sort(rng.permutation(n)[:n_keep]))
    return dataclasses.replace(
        data, x_test=data.x_test[idx].contiguous(), y_test=data.y_test[idx].contiguous()
    )


# --------------------------------------------------------------------------- helpers


def _take_subset(data: VisionData, subset: int, seed: int) -> VisionData:
    n = len(data.y_train)
    if not isinstance(subset, int) or isinstance(subset, bool) or subset < 1:
        raise SparsemilError(f"subset: must be a positive integer, got {subset!r}")
    if subset >= n:
        return data
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(np.sort(rng.permutation(n)[:subset]))
    return VisionData(
        data.x_train[idx].contiguous(),
        data.y_train[idx].contiguous(),
        data.x_test,
        data.y_test,
        data.in_shape,
        data.num_classes,
        data.name,
        data.black,
    )


def _standardise_images(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Per-channel standardisation of ``(N, C, H, W)`` images with training statistics.

    Returns the two arrays and, per channel, the standardised value of a black (0) pixel
    (computed in float32 exactly as a pixel of the data is).
    """
    axes = (0, 2, 3)
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    mean, std = mean.astype(np.float32), std.astype(np.float32)  # keep float32 memory
    black = ((np.zeros_like(mean) - mean) / std).astype(np.float32).ravel()
    return (
        ((x_train - mean) / std).astype(np.float32, copy=False),
        ((x_test - mean) / std).astype(np.float32, copy=False),
        tuple(float(b) for b in black),
    )


def _make(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None = None,
    black: tuple[float, ...] | None = None,
) -> VisionData:
    y_train = np.asarray(y_train).astype(np.int64)
    y_test = np.asarray(y_test).astype(np.int64)
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return VisionData(
        torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        torch.from_numpy(y_train),
        torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        torch.from_numpy(y_test),
        tuple(int(s) for s in x_train.shape[1:]),
        int(num_classes),
        name,
        black,
    )


def _load_digits(seed: int) -> VisionData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float64)[:, None, :, :]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean = x_tr.mean(axis=0, keepdims=True)
    std = x_tr.std(axis=0, keepdims=True)
    std[std == 0] = 1.0
    return _make("digits", (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, 10)


def _resolve_folder(
    key: str, data_path: str | Path | None, default: Path | None, marker: str, hint: str
) -> Path:
    """Find the folder holding ``marker`` among ``data_path``, ``data_path/<key>``, default."""
    candidates: list[Path] = []
    if data_path is not None:
        base = Path(data_path).expanduser()
        candidates += [base, base / key, base / key.replace("-", "_"), base / key.replace("-", "")]
    elif default is not None:
        candidates.append(default)
    for folder in candidates:
        if (folder / marker).exists() or (folder / f"{marker}.gz").exists():
            return folder
    where = str(data_path) if data_path is not None else (str(default) if default else "")
    if where:
        raise SparsemilError(
            f"dataset {key!r}: no {hint} found in {where}; put the files there "
            f"or set data_path to the folder that holds them"
        )
    raise SparsemilError(f"dataset {key!r}: set data_path to a folder holding the {hint}")


# --------------------------------------------------------------------------- idx (MNIST-like)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into a NumPy array.

    Layout: two zero bytes, a dtype code, the number of dimensions ``d``, then ``d`` big-endian
    uint32 sizes and the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise SparsemilError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header != count * dtype.itemsize:
        raise SparsemilError(f"{path}: idx file is truncated or has trailing bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.exists():
            return cand
    raise SparsemilError(f"{folder}: missing {stem}.gz; put the four idx files in that folder")


def _load_idx(key: str, data_path: str | Path | None) -> VisionData:
    default = FASHION_MNIST_DEFAULT if key == "fashion-mnist" else None
    hint = "idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)"
    folder = _resolve_folder(key, data_path, default, _IDX_FILES["x_train"], hint)
    arrays = {k: read_idx(_idx_file(folder, stem)) for k, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise SparsemilError(f"{folder}: {split} images/labels have inconsistent shapes")
    x_tr = arrays["x_train"][:, None].astype(np.float32) / 255.0
    x_te = arrays["x_test"][:, None].astype(np.float32) / 255.0
    x_tr, x_te, black = _standardise_images(x_tr, x_te)
    return _make(key, x_tr, arrays["y_train"], x_te, arrays["y_test"], 10, black)


# --------------------------------------------------------------------------- CIFAR

_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _numpy_reconstruct() -> Any:
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(mod)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise SparsemilError("numpy: cannot locate multiarray._reconstruct")  # pragma: no cover


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the NumPy array reconstructors (see module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load_batch(path: str | Path) -> dict[str, Any]:
    """Read one CIFAR python batch file with :class:`_ArrayOnlyUnpickler`.

    Returns the batch dict with ``str`` keys. Anything other than a dict of plain data and NumPy
    arrays raises :class:`~sparsemil.errors.SparsemilError`.
    """
    path = Path(path)
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise SparsemilError(f"{path}: refused or unreadable CIFAR batch ({err})") from None
    if not isinstance(obj, dict):
        raise SparsemilError(f"{path}: a CIFAR batch must be a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def _cifar_split(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        if not path.exists():
            raise SparsemilError(
                f"{folder}: missing CIFAR batch {fname}; put the complete "
                f"python-version batch folder there"
            )
        batch = safe_load_batch(path)
        data, labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or labels is None:
            raise SparsemilError(f"{path}: CIFAR batch lacks 'data' or {label_key!r}")
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise SparsemilError(f"{path}: expected data of shape (N, 3072) with N labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar(key: str, data_path: str | Path | None) -> VisionData:
    sub, train_files, test_files, label_key, n_cls = _CIFAR[key]
    candidates: list[Path] = []
    if data_path is not None:
        base = Path(data_path).expanduser()
        candidates = [base, base / sub, base / key, base / key / sub]
    for folder in candidates:
        if (folder / train_files[0]).exists():
            break
    else:
        where = f"in {data_path}" if data_path is not None else "(data_path is not set)"
        raise SparsemilError(
            f"dataset {key!r}: no {sub}/ batch folder found {where}; set "
            f"data_path to the folder holding {sub}/"
        )
    x_tr, y_tr = _cifar_split(folder, train_files, label_key)
    x_te, y_te = _cifar_split(folder, test_files, label_key)
    x_tr, x_te, black = _standardise_images(
        x_tr.astype(np.float32) / 255.0, x_te.astype(np.float32) / 255.0
    )
    return _make(key, x_tr, y_tr, x_te, y_te, n_cls, black)


# --------------------------------------------------------------------------- npz


def _load_npz(data_path: str | Path | None) -> VisionData:
    if data_path is None:
        raise SparsemilError(
            "dataset 'npz': set data_path to a .npz file with x_train, y_train, x_test, y_test"
        )
    path = Path(data_path).expanduser()
    if not path.is_file():
        raise SparsemilError(
            f"dataset 'npz': file {path} not found; put a .npz with x_train, "
            f"y_train, x_test, y_test there"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _IDX_FILES if k not in npz.files]
            if missing:
                raise SparsemilError(f"{path}: missing arrays {', '.join(missing)}")
            arrays = {k: np.asarray(npz[k]) for k in _IDX_FILES}
    except (ValueError, OSError) as err:
        if isinstance(err, SparsemilError):
            raise
        raise SparsemilError(f"{path}: not a readable .npz without pickles ({err})") from None
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise SparsemilError(f"{path}: x_{split} must be (N, ...) and y_{split} (N,)")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise SparsemilError(f"{path}: y_{split} must hold non-negative integer labels")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise SparsemilError(f"{path}: x_{split} contains NaN or Inf")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        out[split] = (x, y)
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise SparsemilError(f"{path}: x_train and x_test have different sample shapes")
    x_tr = out["train"][0]
    black = (0.0,) * x_tr.shape[1] if x_tr.ndim == 4 else None  # images used as given
    return _make("npz", x_tr, out["train"][1], out["test"][0], out["test"][1], black=black)


# --------------------------------------------------------------------------- input layout


def _layout(data: VisionData, image_size: int | None, channels: int | None) -> VisionData:
    """Apply ``image_size`` (black padding) and ``channels`` (grey replication) to both splits."""
    shape = data.in_shape
    what = f"dataset {data.name!r} ({'x'.join(map(str, shape))})"
    if image_size is None and channels in (None, shape[0] if len(shape) == 3 else None):
        return data
    if len(shape) != 3:
        key = "image_size" if image_size is not None else "channels"
        raise SparsemilError(f"config key {key!r}: {what} is not (C, H, W) images; remove {key}")
    c, h, w = shape
    x_tr, x_te = data.x_train, data.x_test
    if image_size is not None and (image_size, image_size) != (h, w):
        if image_size < h or image_size < w:
            raise SparsemilError(
                f"config key 'image_size': {image_size} is smaller than the {h}x{w} images of "
                f"{what}; images are only padded, never resized"
            )
        if data.black is None:
            raise SparsemilError(
                f"config key 'image_size': {what} is standardised per pixel, so a black "
                "padding value is undefined; use image_size with mnist, fashion-mnist, cifar or "
                "npz images"
            )
        top, left = (image_size - h) // 2, (image_size - w) // 2
        x_tr, x_te = (_pad_black(x, data.black, top, left, image_size) for x in (x_tr, x_te))
    black = data.black
    if channels is not None and channels != c:
        if c != 1:
            raise SparsemilError(
                f"config key 'channels': {what} has {c} channels; only a grey (1-channel) "
                f"dataset can be replicated to {channels}"
            )
        x_tr, x_te = (x.expand(-1, channels, -1, -1).contiguous() for x in (x_tr, x_te))
        black = None if black is None else black * channels
    return VisionData(
        x_tr,
        data.y_train,
        x_te,
        data.y_test,
        tuple(int(s) for s in x_tr.shape[1:]),
        data.num_classes,
        data.name,
        black,
    )


def _pad_black(
    x: torch.Tensor, black: tuple[float, ...], top: int, left: int, size: int
) -> torch.Tensor:
    """``x (N, C, H, W)`` placed at ``(top, left)`` on a ``size x size`` black canvas."""
    n, c, h, w = x.shape
    fill = torch.tensor(black, dtype=x.dtype).view(1, c, 1, 1)
    out = fill.expand(n, c, size, size).clone()
    out[:, :, top : top + h, left : left + w] = x
    return out


# --------------------------------------------------------------------------- augmentation

AUGMENTS = ("none", "official")
CROP_PADDING = 4  # official: transforms.RandomCrop(32, padding=4)


def augment_batch(
    x: torch.Tensor,
    mode: str,
    generator: torch.Generator,
    *,
    fill: float | tuple[float, ...] | list[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Training augmentation of a mini-batch (vectorised, seeded by ``generator``).

    ``mode="official"`` is the official CIFAR training transform ``RandomCrop(32, padding=4)``
    followed by ``RandomHorizontalFlip(p=0.5)``, per image: pad by 4 on every side with
    ``fill``, take the ``H x W`` window at a top/left offset drawn uniformly from ``0..8``
    each, and mirror it left-right with probability 1/2. torchvision pads the PIL image with
    black *before* ``ToTensor``/``Normalize``; on standardised tensors the same padding is the
    standardised value of a black pixel, so pass ``fill=data.black`` (:attr:`VisionData.black`).
    The output has the input's shape (the 32x32 requirement is the config's, see
    :func:`check_augment`, not this function's).

    Random numbers, in this order, from ``generator`` (on its own device, then moved to
    ``x``'s): ``randint(0, 9, (B,))`` top offsets, ``randint(0, 9, (B,))`` left offsets,
    ``rand(B) < 0.5`` flips; the same generator state gives the same output on any device.

    Args:
        x: ``(B, C, H, W)`` float images.
        mode: ``"none"`` (``x`` itself is returned) or ``"official"``.
        generator: a ``torch.Generator`` (advanced by the draws above).
        fill: padding value, a scalar or one per channel; required for ``"official"``.

    Returns:
        a new ``(B, C, H, W)`` tensor (``x`` unchanged), or ``x`` for ``"none"``.
    """
    if mode == "none":
        return x
    if mode != "official":
        raise SparsemilError(f"augment: unknown mode {mode!r}; choose one of {', '.join(AUGMENTS)}")
    if x.ndim != 4:
        raise SparsemilError(f"augment: needs (B, C, H, W) images, got shape {tuple(x.shape)}")
    if fill is None:
        raise SparsemilError(
            "augment_batch: 'official' needs fill= the standardised black value (data.black)"
        )
    b, c, h, w = x.shape
    p = CROP_PADDING
    fill_t = torch.as_tensor(fill, dtype=x.dtype).reshape(-1)
    if fill_t.numel() not in (1, c):
        raise SparsemilError(f"augment: fill has {fill_t.numel()} values for {c} channels")
    canvas = fill_t.to(x.device).expand(c).view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p)
    canvas = canvas.clone()
    canvas[:, :, p : p + h, p : p + w] = x
    dev = generator.device
    top = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev).to(x.device)
    left = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev).to(x.device)
    flip = (torch.rand(b, generator=generator, device=dev) < 0.5).to(x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a mirrored crop reads columns backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = canvas.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def check_augment(mode: str, data: VisionData) -> None:
    """Refuse ``augment: official`` for data that are not 32x32 images (one-line error)."""
    if mode == "none":
        return
    shape = data.in_shape
    if len(shape) != 3 or shape[1:] != (32, 32):
        fix = "set image_size: 32" if len(shape) == 3 and max(shape[1:]) <= 32 else "remove it"
        raise SparsemilError(
            f"config key 'augment': 'official' (RandomCrop(32, padding=4) + horizontal flip, the "
            f"official CIFAR transform) is for 32x32 images, but dataset {data.name!r} has "
            f"shape {'x'.join(map(str, shape))}; {fix} (or augment: none)"
        )
    if data.black is None:
        raise SparsemilError(
            f"config key 'augment': dataset {data.name!r} has no black padding value; "
            "use augment: none"
        )
