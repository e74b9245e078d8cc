"""A synthetic slide-scale MIL cohort built from real images (``sparsemil mil synth``).

Every instance is a real image -- Fashion-MNIST (the Debian package's idx files) or
scikit-learn's digits -- seen through a fixed encoder; every bag is a "slide": its
instances sit on a 2-D grid of patch coordinates in a tissue-like shape, and a positive
slide holds one or more contiguous "tumour" regions covering a witness fraction ``w`` of
its instances. The cohort is written in the CLAM/Trident layout, so ``mil cv``,
``mil train``, ``mil test``, ``mil predict`` and ``wsi heatmap`` read it as they read
features extracted from real slides.

Images and encoder
------------------
The dataset's own train split is cut (seeded) into an *encoder pool*
(``min(10000, a quarter)`` of it) and the *train pool* (the rest); its test split is the
*test pool*. The encoder is a PCA with whitening
(``sklearn.decomposition.PCA(dim, whiten=True, svd_solver="randomized")``) fitted on the
encoder pool's pixels only -- it never sees an image label, a bag label or an image that
appears in a slide. Training slides draw their images from the train pool, test slides
from the test pool (no image is shared between the two). Features are computed once per
image and gathered. How hard the instance task is on these features is measured by a
linear probe (``LogisticRegression`` fitted on up to 20000 train-pool images, ROC AUC of
tumour against normal images of the test pool) and written to ``cohort.json``.

Slides
------
Bag sizes are log-normal (preset ``size``: ``small`` median 300, at most 1000; ``medium``
median 1500, tail to 15000 (the CPU-reduced benchmark); ``cpu`` median 5000, tail to 50000; ``large`` median 20000, tail to 150000), drawn independently
of the label. The tissue is the top-N cells of a field made of 1-3 random ellipses plus
smooth noise at two scales, so it is one to three blobs with ragged edges; coordinates are level-0 pixels of a
non-overlapping grid of ``patch_size`` patches, in raster order (as CLAM writes them).
Normal tissue is a patchwork of normal classes (each cell takes the class of its nearest
of 3-8 random "tissue-type" centres, a quarter of the cells a random normal class; the
class weights differ per slide). A positive slide gets ``1..max_regions`` tumour regions,
each grown from a random seed cell (on a piece of tissue with room for it) by best-first
search over 4-neighbouring tissue cells (priority: distance to the seed plus up to 2 cells
of noise), so each region is connected;
``max(1, round(w * N))`` cells are tumour in all. With several witness rates the slides
are the same in every cohort and a lower rate's regions are prefixes of a higher rate's.

Files (per cohort folder)
-------------------------
``h5_files/<slide_id>.h5`` (``features`` (N, dim) float32, ``coords`` (N, 2) int64 with
CLAM's and Trident's attributes, ``labels`` (N,) int8: 1 = tumour instance),
``labels.csv`` (``slide_id,label`` of every slide), ``train.csv`` and ``test.csv`` (the
same for each part), ``split.csv`` (the official MMIL/TransMIL layout
``train,train_label,test,test_label``), and ``cohort.json`` (parameters, encoder, probe
AUC, per-slide facts), written last. Every file is written atomically; the same seed and
options give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsemil import config as config_system
from sparsemil.data.h5 import write_h5_file
from sparsemil.errors import SparsemilError, suggest
from sparsemil.io import atomic_write_json, atomic_write_text

FORMAT = "sparsemil synthetic MIL cohort"
VERSION = 1


@dataclass(frozen=True)
class BagSizes:
    """Log-normal bag sizes: ``clip(round(median * exp(sigma * z)), low, high)``."""

    median: int
    sigma: float
    low: int
    high: int


SIZES: dict[str, BagSizes] = {
    "small": BagSizes(300, 0.5, 60, 1000),
    "medium": BagSizes(1500, 0.82, 150, 15000),
    "cpu": BagSizes(5000, 0.82, 500, 50000),
    "large": BagSizes(20000, 0.72, 2000, 150000),
}
"""Bag-size presets (``sigma`` puts the largest of ~400 bags near ``high``)."""

IMAGES = ("fashion-mnist", "digits")
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "t-shirt", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle-boot",
    ),
    "digits": tuple(str(i) for i in range(10)),
}  # fmt: skip
DEFAULT_TUMOUR = {"fashion-mnist": "coat", "digits": "8"}
DEFAULT_DIM = {"fashion-mnist": 64, "digits": 32}
MAX_WITNESS_RATE = 0.5
ENCODER_POOL = 10000  # at most this many (and a quarter of the train split) fit the encoder
PROBE_TRAIN = 20000  # instances the linear probe is fitted on (at most)
TISSUE_FILL = 0.3  # share of the bounding grid covered by tissue before cropping
MARGIN = 1  # empty grid cells around the tissue (the slide's border)


@dataclass
class SynthConfig:
    """Options of :func:`synth_cohort` (one per ``mil synth`` flag).

    Attributes:
        out: output folder (one cohort; with several witness rates one sub-folder
            ``w<rate>`` per rate).
        seed: seeds everything (pools, encoder, bag sizes, labels, slides).
        size: bag-size preset, one of :data:`SIZES`.
        witness_rate: witness fraction(s) ``w`` of a positive slide, each in (0, 0.5].
        n_train, n_test: slides per part (CAMELYON16: 270 / 130).
        positive_fraction: share of positive slides in each part.
        images: ``fashion-mnist`` or ``digits``.
        images_path: folder of the idx files (default: the Debian package's folder).
        dim: feature dimension (default 64 for Fashion-MNIST, 32 for digits).
        patch_size: patch side in level-0 pixels (the coordinate grid's step).
        tumour_class: the witness class (name or index; default coat / 8).
        normal_classes: the classes of normal tissue (default: every other class).
        max_regions: tumour regions per positive slide, drawn from ``1..max_regions`` (one
            more when a region uses up its piece of tissue; rare, at high witness rates).
        overwrite: replace a cohort already in ``out``.
    """

    out: str | None = None
    seed: int = 0
    size: str = "cpu"
    witness_rate: list[float] = field(default_factory=lambda: [0.05])
    n_train: int = 270
    n_test: int = 130
    positive_fraction: float = 0.4
    images: str = "fashion-mnist"
    images_path: str | None = None
    dim: int | None = None
    patch_size: int = 256
    tumour_class: str | None = None
    normal_classes: list[str] | None = None
    max_regions: int = 3
    overwrite: bool = False

    def validate(self, where: str = "synth") -> None:
        """Check every option (no data is read); raises :class:`SparsemilError` naming
        the field."""

        def bad(name: str, why: str) -> SparsemilError:
            return SparsemilError(f"{where}: '{name}' {why}")

        if not self.out:
            raise bad("out", "is required: the folder to write the cohort to")
        if self.size not in SIZES:
            raise bad("size", f"{self.size!r} is not a preset{suggest(self.size, SIZES)}")
        if self.images not in IMAGES:
            raise bad("images", f"{self.images!r} is not supported{suggest(self.images, IMAGES)}")
        if self.seed < 0:
            raise bad("seed", f"must be >= 0 (got {self.seed})")
        if not self.witness_rate:
            raise bad("witness_rate", "needs at least one rate")
        for w in self.witness_rate:
            if not (isinstance(w, float) and math.isfinite(w) and 0 < w <= MAX_WITNESS_RATE):
                raise bad("witness_rate", f"{w!r} must be in (0, {MAX_WITNESS_RATE}]")
        if len({_rate_name(w) for w in self.witness_rate}) != len(self.witness_rate):
            raise bad("witness_rate", f"lists a rate twice ({self.witness_rate})")
        if self.n_train < 2:
            raise bad("n_train", f"must be >= 2 (got {self.n_train})")
        if self.n_test < 1:
            raise bad("n_test", f"must be >= 1 (got {self.n_test})")
        if not 0 < self.positive_fraction < 1:
            raise bad("positive_fraction", f"must be in (0, 1) (got {self.positive_fraction})")
        if self.patch_size < 1:
            raise bad("patch_size", f"must be >= 1 level-0 pixels (got {self.patch_size})")
        if self.max_regions < 1:
            raise bad("max_regions", f"must be >= 1 (got {self.max_regions})")
        if self.dim is not None and not 1 <= self.dim <= max_dim(self.images):
            raise bad(
                "dim", f"must be in 1..{max_dim(self.images)} for {self.images} (got {self.dim})"
            )
        self.classes(where)  # names resolve, tumour not among the normal classes

    def classes(self, where: str = "synth") -> tuple[int, list[int]]:
        """``(tumour class, normal classes)`` as indices of :data:`CLASS_NAMES`."""
        names = CLASS_NAMES[self.images]
        tumour = class_index(self.tumour_class or DEFAULT_TUMOUR[self.images], names,
                             "tumour_class", where)  # fmt: skip
        if self.normal_classes is None:
            return tumour, [c for c in range(len(names)) if c != tumour]
        normal = [class_index(c, names, "normal_classes", where) for c in self.normal_classes]
        if not normal:
            raise SparsemilError(f"{where}: 'normal_classes' needs at least one class")
        if tumour in normal:
            raise SparsemilError(
                f"{where}: 'normal_classes' includes the tumour class {names[tumour]!r}; fix: "
                "drop it, or choose another 'tumour_class'"
            )
        return tumour, sorted(set(normal))

    @property
    def feature_dim(self) -> int:
        return int(self.dim) if self.dim is not None else DEFAULT_DIM[self.images]

    def cohort_dirs(self) -> list[Path]:
        """The cohort folder of each witness rate."""
        out = Path(str(self.out))
        if len(self.witness_rate) == 1:
            return [out]
        return [out / f"w{_rate_name(w)}" for w in self.witness_rate]


def max_dim(images: str) -> int:
    """The largest feature dimension of an image set (its number of pixels)."""
    return 784 if images == "fashion-mnist" else 64


def _rate_name(w: float) -> str:
    return f"{w:g}"


def class_index(value: Any, names: tuple[str, ...], key: str, where: str = "synth") -> int:
    """The index of class ``value`` (a name, case-insensitive, or an index)."""
    text = str(value).strip().lower()
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    raise SparsemilError(
        f"{where}: '{key}' {value!r} is not a class{suggest(text, names)} (or an index "
        f"0..{len(names) - 1})"
    )


def parse_rates(text: str) -> list[float]:
    """Witness rates from ``"0.002,0.01,5%"`` (a ``%`` suffix divides by 100)."""
    rates = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        scale = 0.01 if part.endswith("%") else 1.0
        try:
            rates.append(float(part.rstrip("%")) * scale)
        except ValueError:
            raise SparsemilError(
                f"witness_rate {part!r} is not a number; write e.g. 0.002,0.01,0.05 or 0.2%,1%,5%"
            ) from None
    return rates


# --------------------------------------------------------------------------- images, encoder
@dataclass
class Pools:
    """Encoded images: train pool (training slides), test pool (test slides)."""

    train_feats: np.ndarray
    train_labels: np.ndarray
    test_feats: np.ndarray
    test_labels: np.ndarray
    encoder: dict[str, Any]
    probe: dict[str, Any]

    def by_class(self, part: str) -> dict[int, np.ndarray]:
        labels = self.train_labels if part == "train" else self.test_labels
        return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def _images(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` as flat float32 pixels."""
    from sparsemil.data.vision import load_vision_dataset

    try:
        data = load_vision_dataset(cfg.images, cfg.images_path, seed=0)
    except SparsemilError as err:  # the reader's field is this command's images_path
        raise SparsemilError(str(err).replace("data_path", "'images_path'")) from None
    flat = lambda x: x.numpy().reshape(x.shape[0], -1)  # noqa: E731
    return flat(data.x_train), data.y_train.numpy(), flat(data.x_test), data.y_test.numpy()


def encode_pools(cfg: SynthConfig, rng: np.random.Generator) -> Pools:
    """Fit the encoder on the encoder pool, encode both slide pools, run the linear probe
    (see the module doc)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x_tr, y_tr, x_te, y_te = _images(cfg)
    perm = rng.permutation(len(y_tr))
    n_enc = min(ENCODER_POOL, len(y_tr) // 4)
    enc, pool = np.sort(perm[:n_enc]), np.sort(perm[n_enc:])
    dim = cfg.feature_dim
    if dim > n_enc:
        raise SparsemilError(f"synth: 'dim' {dim} exceeds the {n_enc} encoder images")
    pca = PCA(dim, whiten=True, svd_solver="randomized", random_state=int(cfg.seed))
    pca.fit(x_tr[enc].astype(np.float64))
    f_tr = pca.transform(x_tr[pool].astype(np.float64)).astype(np.float32)
    f_te = pca.transform(x_te.astype(np.float64)).astype(np.float32)
    comps = np.ascontiguousarray(np.concatenate([pca.mean_, pca.components_.ravel(),
                                                 pca.explained_variance_]), dtype="<f8")  # fmt: skip
    encoder = {
        "kind": "pca-whiten",
        "dim": dim,
        "fitted_on": f"{n_enc} unlabelled images of the {cfg.images} train split, held out "
        "of every slide",
        "explained_variance_ratio": float(pca.explained_variance_ratio_.sum()),
        "sha256": hashlib.sha256(comps.tobytes()).hexdigest(),
    }
    tumour, normal = cfg.classes()
    keep_tr = np.flatnonzero(np.isin(y_tr[pool], [tumour, *normal]))
    fit = np.sort(rng.permutation(keep_tr)[:PROBE_TRAIN])
    keep_te = np.isin(y_te, [tumour, *normal])
    clf = LogisticRegression(max_iter=1000).fit(f_tr[fit], y_tr[pool][fit] == tumour)
    scores = clf.decision_function(f_te[keep_te])
    probe = {
        "auc": float(roc_auc_score(y_te[keep_te] == tumour, scores)),
        "model": "sklearn LogisticRegression(max_iter=1000), tumour vs normal classes",
        "n_train": int(fit.size),
        "n_test": int(keep_te.sum()),
        "fitted_on": "train-pool images (those of training slides)",
        "tested_on": "test-pool images (those of test slides)",
    }
    return Pools(f_tr, y_tr[pool], f_te, y_te, encoder, probe)


# --------------------------------------------------------------------------- slides
@dataclass
class Slide:
    """One slide's geometry and instance classes, for the highest witness rate.

    ``rows``/``cols`` grid cells (raster order), ``grid`` (height, width) including the
    margin, ``normal_img``/``tumour_img`` image indices into the part's pool, ``regions``
    the growth order of each tumour region (instance indices; empty for negatives).
    """

    rows: np.ndarray
    cols: np.ndarray
    grid: tuple[int, int]
    normal_img: np.ndarray
    tumour_img: np.ndarray
    regions: list[np.ndarray]

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])


def tissue_cells(
    n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``n`` grid cells of a tissue-like shape: ``(rows, cols, (height, width))`` in raster
    order, cropped to the tissue plus :data:`MARGIN` empty cells on every side."""
    from scipy.ndimage import zoom

    aspect = rng.uniform(0.6, 1.0)
    w = max(2, math.ceil(math.sqrt(n / TISSUE_FILL / aspect)))
    h = max(2, math.ceil(n / TISSUE_FILL / w))
    side = float(max(h, w))
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    field = np.full((h, w), -np.inf, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        a, b = rng.uniform(0.15, 0.35, size=2) * side
        t = rng.uniform(0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(t) + dy * math.sin(t)) / a
        v = (-dx * math.sin(t) + dy * math.cos(t)) / b
        np.maximum(field, 1.0 - (u * u + v * v), out=field)
    for g, amplitude in ((6, 0.5), (24, 0.12)):  # broad lobes, then ragged edges
        low = rng.standard_normal((g, g))
        noise = zoom(low, ((h + 1) / g, (w + 1) / g), order=3, mode="nearest")[:h, :w]
        field += amplitude * noise.astype(np.float32)
    flat = field.ravel()
    idx = np.sort(np.argpartition(flat, flat.size - n)[flat.size - n :])
    rows, cols = np.divmod(idx, w)
    rows = rows - rows.min() + MARGIN  # raster order: idx is sorted
    cols = cols - cols.min() + MARGIN
    return rows, cols, (int(rows.max()) + 1 + MARGIN, int(cols.max()) + 1 + MARGIN)


def normal_classes(
    rows: np.ndarray, cols: np.ndarray, normal: list[int], rng: np.random.Generator
) -> np.ndarray:
    """The normal class of every cell: a patchwork of tissue types (module doc)."""
    n = rows.shape[0]
    weights = rng.dirichlet(np.ones(len(normal)))
    n_centres = min(n, int(rng.integers(3, 9)))
    centres = rng.choice(n, size=n_centres, replace=False)
    centre_class = rng.choice(len(normal), size=n_centres, p=weights)
    d = (rows[:, None] - rows[centres][None, :]).astype(np.float32) ** 2
    d += (cols[:, None] - cols[centres][None, :]).astype(np.float32) ** 2
    cls = centre_class[np.argmin(d, axis=1)]
    mixed = rng.random(n) < 0.25
    cls[mixed] = rng.choice(len(normal), size=int(mixed.sum()), p=weights)
    return np.asarray(normal)[cls]


def grow_regions(
    rows: np.ndarray,
    cols: np.ndarray,
    grid: tuple[int, int],
    sizes: list[int],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Grow one connected region per entry of ``sizes`` (instance indices in growth order:
    every prefix is connected). Seeds are drawn from tissue pieces (4-connected) of at least
    twice the region's size when there are such; a region whose piece still runs out
    continues as one more region seeded elsewhere, so the sizes always add up."""
    from scipy.ndimage import label

    n = rows.shape[0]
    total = int(sum(sizes))
    if total > n:
        raise SparsemilError(f"synth: {total} tumour cells do not fit in {n} instances")
    cell = np.full(grid, -1, np.int64)
    cell[rows, cols] = np.arange(n)
    piece = label(cell >= 0)[0][rows, cols]
    piece_size = np.bincount(piece)[piece]
    jitter = rng.random(n) * 2.0
    taken = np.zeros(n, bool)
    pending = [int(s) for s in sizes if s > 0]
    regions = []
    h, w = grid
    while pending:
        want = pending.pop(0)
        free = np.flatnonzero(~taken & (piece_size >= 2 * want))
        if not free.size:
            free = np.flatnonzero(~taken)
        seed = int(free[rng.integers(free.size)])
        r0, c0 = int(rows[seed]), int(cols[seed])
        queued = {seed}
        heap: list[tuple[float, int]] = [(0.0, seed)]
        order: list[int] = []
        while heap and len(order) < want:
            _, i = heapq.heappop(heap)
            taken[i] = True
            order.append(i)
            r, c = int(rows[i]), int(cols[i])
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w:
                    j = int(cell[rr, cc])
                    if j >= 0 and not taken[j] and j not in queued:
                        queued.add(j)
                        pri = math.hypot(rr - r0, cc - c0) + float(jitter[j])
                        heapq.heappush(heap, (pri, j))
        regions.append(np.asarray(order, np.int64))
        if len(order) < want:
            pending.append(want - len(order))
    return regions


def split_count(total: int, weights: np.ndarray, caps: np.ndarray | None = None) -> np.ndarray:
    """``total`` split in proportion to ``weights`` (largest remainder; at most ``caps``)."""
    w = np.asarray(weights, np.float64)
    raw = total * w / w.sum()
    out = np.floor(raw).astype(np.int64)
    rest = total - int(out.sum())
    for i in np.argsort(-(raw - out), kind="stable")[:rest]:
        out[i] += 1
    if caps is not None:
        assert (out <= caps).all(), (out, caps)
    return out


def n_witness(rate: float, n: int) -> int:
    """Tumour instances of a positive slide of ``n`` instances at witness rate ``rate``."""
    return max(1, int(round(rate * n)))


def make_slide(
    n: int,
    positive: bool,
    cfg: SynthConfig,
    by_class: dict[int, np.ndarray],
    rng: np.random.Generator,
) -> Slide:
    """One slide of ``n`` instances (tumour regions sized for the highest witness rate)."""
    tumour, normal = cfg.classes()
    rows, cols, grid = tissue_cells(n, rng)
    cls = normal_classes(rows, cols, normal, rng)
    normal_img = np.empty(n, np.int64)
    for c in np.unique(cls):
        where = np.flatnonzero(cls == c)
        pool = by_class[int(c)]
        normal_img[where] = pool[rng.integers(pool.size, size=where.size)]
    regions: list[np.ndarray] = []
    tumour_img = np.full(n, -1, np.int64)
    if positive:
        k = n_witness(max(cfg.witness_rate), n)
        r = int(min(k, rng.integers(1, cfg.max_regions + 1)))
        sizes = split_count(k - r, rng.dirichlet(np.full(r, 2.0))) + 1
        regions = grow_regions(rows, cols, grid, sizes.tolist(), rng)
        cells = np.concatenate(regions)
        pool = by_class[tumour]
        tumour_img[cells] = pool[rng.integers(pool.size, size=cells.size)]
    return Slide(rows, cols, grid, normal_img, tumour_img, regions)


def witness_cells(slide: Slide, rate: float) -> tuple[np.ndarray, int]:
    """``(instance labels (N,) int8, number of regions)`` of ``slide`` at ``rate``: each
    region keeps a prefix of its growth order (so stays connected)."""
    labels = np.zeros(slide.n, np.int8)
    if not slide.regions:
        return labels, 0
    lengths = np.array([r.size for r in slide.regions])
    k = min(n_witness(rate, slide.n), int(lengths.sum()))
    alloc = split_count(k, lengths, caps=lengths)
    for region, a in zip(slide.regions, alloc, strict=True):
        labels[region[:a]] = 1
    return labels, int((alloc > 0).sum())


# --------------------------------------------------------------------------- the cohort
@dataclass
class SynthResult:
    """What :func:`synth_cohort` wrote."""

    dirs: list[Path]
    probe_auc: float
    n_bags: int
    n_instances: int
    median_instances: float
    max_instances: int
    seconds: dict[str, float] = field(default_factory=dict)


def _plan(cfg: SynthConfig, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Slide ids, parts, labels and sizes."""
    spec = SIZES[cfg.size]
    plan = []
    for part, count in (("train", cfg.n_train), ("test", cfg.n_test)):
        n_pos = int(round(cfg.positive_fraction * count))
        n_pos = min(max(n_pos, 1), count - 1) if count >= 2 else n_pos
        labels = np.zeros(count, np.int64)
        labels[rng.permutation(count)[:n_pos]] = 1
        z = rng.standard_normal(count)
        sizes = np.clip(np.round(spec.median * np.exp(spec.sigma * z)), spec.low, spec.high)
        for i in range(count):
            plan.append({
                "slide_id": f"{part}_{i:04d}", "part": part,
                "label": int(labels[i]), "n_instances": int(sizes[i]),
            })  # fmt: skip
    return plan


def _check_out(cfg: SynthConfig) -> None:
    out = Path(str(cfg.out))
    if out.exists() and not out.is_dir():
        raise SparsemilError(f"synth: 'out' {out} exists and is not a folder; choose another path")
    if cfg.overwrite:
        return
    for d in cfg.cohort_dirs():
        if (d / "cohort.json").exists() or any((d / "h5_files").glob("*.h5")):
            raise SparsemilError(
                f"synth: 'out' {d} already holds a cohort; fix: choose another folder or set "
                "'overwrite'"
            )


def _h5_attrs(cfg: SynthConfig, slide: Slide, meta: dict[str, Any], encoder: dict[str, Any]):
    ps = int(cfg.patch_size)
    level_dim = np.array([slide.grid[1] * ps, slide.grid[0] * ps], dtype=np.int64)
    coords_attrs = {
        "patch_size": ps, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
        "downsampled_level_dim": level_dim, "level_dim": level_dim, "name": meta["slide_id"],
        "patch_size_level0": ps, "overlap": 0,
    }  # fmt: skip
    features_attrs = {
        "name": meta["slide_id"],
        "backbone": f"pca{encoder['dim']}-whiten-{cfg.images}",
        "pretrained": False,
        "weights_sha256": encoder["sha256"],
        "normalization": "images standardised with the train split's mean/std",
    }
    attrs = {"slide": meta["slide_id"], "synthetic": FORMAT, "label": meta["label"],
             "part": meta["part"]}  # fmt: skip
    return attrs, features_attrs, coords_attrs


def _csv(rows: list[tuple[Any, ...]], header: str) -> str:
    return header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows)


def _split_csv(plan: list[dict[str, Any]]) -> str:
    train = [(p["slide_id"], p["label"]) for p in plan if p["part"] == "train"]
    test = [(p["slide_id"], p["label"]) for p in plan if p["part"] == "test"]
    rows = []
    for i in range(max(len(train), len(test))):
        a = train[i] if i < len(train) else ("", "")
        b = test[i] if i < len(test) else ("", "")
        rows.append((*a, *b))
    return _csv(rows, "train,train_label,test,test_label")


def synth_cohort(cfg: SynthConfig, progress: bool = False) -> SynthResult:
    """Write the cohort(s) of ``cfg`` (see the module doc); checks every option and the
    output folder before reading any image.

    Raises:
        SparsemilError: a bad option (naming its field), an output folder that already
            holds a cohort (unless ``overwrite``), or missing image files.
    """
    from tqdm.auto import tqdm

    cfg = config_system.from_mapping(SynthConfig, config_system.to_mapping(cfg), "synth")
    _check_out(cfg)
    t0 = time.perf_counter()
    seeds = np.random.SeedSequence(int(cfg.seed)).spawn(3)
    rng_pools, rng_plan = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
    pools = encode_pools(cfg, rng_pools)
    t_encode = time.perf_counter() - t0
    plan = _plan(cfg, rng_plan)
    bag_seeds = seeds[2].spawn(len(plan))
    by_class = {"train": pools.by_class("train"), "test": pools.by_class("test")}
    tumour, normal = cfg.classes()
    for part in ("train", "test"):
        missing = [CLASS_NAMES[cfg.images][c] for c in [tumour, *normal] if c not in by_class[part]]
        if missing:
            raise SparsemilError(f"synth: the {part} pool has no image of class {missing[0]!r}")
    dirs = cfg.cohort_dirs()
    old = {d: _old_slides(d) for d in dirs} if cfg.overwrite else {}
    facts: list[list[dict[str, Any]]] = [[] for _ in dirs]
    t1 = time.perf_counter()
    for meta, ss in tqdm(list(zip(plan, bag_seeds, strict=True)), desc="slides",
                         disable=not progress, unit="slide"):  # fmt: skip
        part = meta["part"]
        slide = make_slide(meta["n_instances"], bool(meta["label"]), cfg, by_class[part],
                           np.random.default_rng(ss))  # fmt: skip
        feats_pool = pools.train_feats if part == "train" else pools.test_feats
        coords = np.stack([slide.cols, slide.rows], axis=1).astype(np.int64) * cfg.patch_size
        attrs = _h5_attrs(cfg, slide, meta, pools.encoder)
        for k, (d, rate) in enumerate(zip(dirs, cfg.witness_rate, strict=True)):
            labels, n_regions = witness_cells(slide, rate)
            img = np.where(labels == 1, slide.tumour_img, slide.normal_img)
            write_h5_file(
                d / "h5_files" / f"{meta['slide_id']}.h5", feats_pool[img], coords,
                labels=labels, attrs=attrs[0], features_attrs=attrs[1], coords_attrs=attrs[2],
            )  # fmt: skip
            facts[k].append({**meta, "n_witness": int(labels.sum()), "n_regions": n_regions,
                             "grid": [slide.grid[1], slide.grid[0]]})  # fmt: skip
    t_slides = time.perf_counter() - t1
    sizes = np.array([p["n_instances"] for p in plan])
    for k, (d, rate) in enumerate(zip(dirs, cfg.witness_rate, strict=True)):
        _write_tables(d, plan)
        _remove_stale(d, old.get(d, []), plan)
        atomic_write_json(d / "cohort.json", _manifest(cfg, rate, pools, sizes, facts[k]))
    if len(dirs) > 1:
        index = {"format": FORMAT, "version": VERSION,
                 "cohorts": {_rate_name(w): d.name for d, w in zip(dirs, cfg.witness_rate, strict=True)}}  # fmt: skip
        atomic_write_json(Path(str(cfg.out)) / "cohorts.json", index)
    return SynthResult(
        dirs=dirs,
        probe_auc=pools.probe["auc"],
        n_bags=len(plan),
        n_instances=int(sizes.sum()),
        median_instances=float(np.median(sizes)),
        max_instances=int(sizes.max()),
        seconds={"encode": t_encode, "slides": t_slides, "total": time.perf_counter() - t0},
    )


def _write_tables(d: Path, plan: list[dict[str, Any]]) -> None:
    pairs = [(p["slide_id"], p["label"]) for p in plan]
    atomic_write_text(d / "labels.csv", _csv(pairs, "slide_id,label"))
    for part in ("train", "test"):
        rows = [(p["slide_id"], p["label"]) for p in plan if p["part"] == part]
        atomic_write_text(d / f"{part}.csv", _csv(rows, "slide_id,label"))
    atomic_write_text(d / "split.csv", _split_csv(plan))


def _old_slides(d: Path) -> list[str]:
    try:
        return [s["slide_id"] for s in json.loads((d / "cohort.json").read_text())["slides"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _remove_stale(d: Path, old: list[str], plan: list[dict[str, Any]]) -> None:
    """Remove the h5 files of an overwritten cohort's slides that the new one lacks."""
    keep = {p["slide_id"] for p in plan}
    for sid in old:
        if sid not in keep:
            path = d / "h5_files" / f"{os.path.basename(sid)}.h5"
            if path.is_file():
                path.unlink()


def _manifest(
    cfg: SynthConfig,
    rate: float,
    pools: Pools,
    sizes: np.ndarray,
    slides: list[dict[str, Any]],
) -> dict[str, Any]:
    tumour, normal = cfg.classes()
    names = CLASS_NAMES[cfg.images]
    pos = [s for s in slides if s["label"] == 1]
    options = dataclasses.asdict(cfg)
    for key in ("out", "overwrite"):  # where and how, not what: the manifest moves with the files
        options.pop(key)
    return {
        "format": FORMAT,
        "version": VERSION,
        "witness_rate": rate,
        "options": options,
        "bag_sizes": dataclasses.asdict(SIZES[cfg.size]) | {"distribution": "log-normal"},
        "images": {
            "dataset": cfg.images,
            "tumour_class": names[tumour],
            "normal_classes": [names[c] for c in normal],
            "train_pool": int(pools.train_labels.size),
            "test_pool": int(pools.test_labels.size),
        },
        "encoder": pools.encoder,
        "linear_probe": pools.probe,
        "summary": {
            "n_bags": len(slides),
            "n_train": sum(s["part"] == "train" for s in slides),
            "n_test": sum(s["part"] == "test" for s in slides),
            "n_positive": len(pos),
            "instances": {
                "total": int(sizes.sum()),
                "median": float(np.median(sizes)),
                "mean": float(sizes.mean()),
                "min": int(sizes.min()),
                "max": int(sizes.max()),
            },
            "witness_fraction_of_positives": float(
                np.mean([s["n_witness"] / s["n_instances"] for s in pos])
            )
            if pos
            else None,
        },
        "files": {
            "h5": "h5_files/<slide_id>.h5 (features, coords, labels: 1 = tumour instance)",
            "labels_csv": "labels.csv",
            "train_csv": "train.csv",
            "test_csv": "test.csv",
            "split_csv": "split.csv",
        },
        "slides": slides,
    }
