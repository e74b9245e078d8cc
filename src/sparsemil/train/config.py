"""Configuration of MIL training (YAML or JSON file; command-line flags override it).

Defaults are the recipe the MMIL-Transformer paper never published (see ``docs/training.md``):
AdamW, cosine schedule over ``max_epochs``, lr 2e-4, weight decay 1e-5, batch size 1 bag with
gradient accumulation, early stopping on validation loss with CLAM's patience 20, not
before epoch 50.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sparsemil import config as config_system
from sparsemil.errors import SparsemilError, suggest


@dataclass
class MILTrainConfig:
    """Everything a MIL training / CV / test run needs.

    Data:
        data: the bags -- a classic-MIL CSV (``mil-csv``; or a benchmark name ``musk1``,
            ``musk2``, ``elephant``, ``ucsb_breast_cancer``), a CLAM dataset CSV
            (``clam``: ``slide_id,label``), an official MMIL/TransMIL split CSV (``split``),
            or a folder of per-slide ``.h5``/``.pt``/DSMIL ``.csv`` files (``folder``, or
            ``h5``/``pt``/``dsmil-csv`` to name the file type; labels from ``labels``), or a
            DSMIL bag-list CSV (``dsmil-csv``).
        format: one of :data:`sparsemil.data.sources.FORMATS` (``auto``, ``mil-csv``, ``h5``,
            ``pt``, ``dsmil-csv``, ``folder``, ``clam``, ``split``); the data spec
            (``data``, ``format``, ``data_dir``, ``labels``, ``n_classes``) goes to
            :func:`sparsemil.data.sources.load_bag_source`.
        data_dir: folder of the per-slide feature files (``clam`` / ``split``).
        labels: CSV ``slide_id,label`` (CLAM dataset CSV) for the folder formats.
        n_classes: number of bag classes (default: the number of distinct labels; a value
            that disagrees with the labels is an error).
        standardize: z-score features with training-fold statistics (``None`` = yes for
            ``mil-csv``, no for slide features).
        val_fraction: share of the training bags held out for validation / early stopping
            when the split does not define a validation set.
        folds: number of CV folds; ``train`` without a split file trains on fold ``fold``.
        folds_csv: a ``folds.csv`` of an earlier ``mil cv`` run
            (:func:`sparsemil.data.splits.write_folds_csv`); its folds are replayed instead of
            drawing new ones (``folds`` is then the CSV's number of folds).
    Model:
        model: ``mmil``, ``abmil``, ``transmil``, ``dsmil``, ``clam_sb`` or ``dtfdmil``.
        model_kwargs: constructor options (e.g. ``{embed_dim: 128, num_subbags: 4}``).
    Optimisation:
        lr, weight_decay, max_epochs, min_lr (cosine floor), batch_size (bags per step per
        process; >1 pads and masks), accumulate_grad_batches, lmbda (L1 strength: loss += lmbda * sum |theta|
        over every ``.weight``/``.bias``), grad_clip (0 = off).
    Early stopping:
        early_stopping, patience, stop_start_epoch (no stop before this epoch), min_delta.
    Evaluation:
        num_test: repeated test passes (random grouping makes them differ).
    Runtime:
        seed, accelerator (``cpu``, ``gpu``, ``auto``), devices, num_nodes, strategy
        (``auto``, ``ddp``, ...), precision, num_workers, num_threads (torch intra-op
        threads per process; 0 = torch's default; 1 is fastest for small MIL models on a
        busy CPU), progress, out.
    """

    RENAMED: ClassVar[dict[str, tuple[str, str]]] = {
        "l1": (
            "lmbda",
            "the L1 strength, named as in the official pruning configs, where "
            "'l1' is the on/off switch",
        ),
    }

    # data
    data: str | None = None
    format: str = "auto"
    data_dir: str | None = None
    labels: str | None = None
    n_classes: int | None = None
    standardize: bool | None = None
    val_fraction: float = 0.1
    folds: int = 10
    fold: int = 0
    folds_csv: str | None = None
    # model
    model: str = "mmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 1e-5
    min_lr: float = 0.0
    max_epochs: int = 100
    batch_size: int = 1
    accumulate_grad_batches: int = 1
    lmbda: float = 0.0
    grad_clip: float = 0.0
    # early stopping
    early_stopping: bool = True
    patience: int = 20
    stop_start_epoch: int = 50
    min_delta: float = 0.0
    # evaluation
    num_test: int = 1
    # runtime
    seed: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0
    num_threads: int = 0
    progress: bool = True
    out: str | None = None

    # ------------------------------------------------------------------ helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return config_system.field_names(cls)

    def to_dict(self) -> dict[str, Any]:
        return config_system.to_mapping(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "config") -> MILTrainConfig:
        """Build from a mapping; unknown keys raise an error naming the nearest valid key."""
        return config_system.from_mapping(cls, d, source)

    def override(self, **flags: Any) -> MILTrainConfig:
        """A copy with every value that is not ``None`` replacing the config value."""
        return config_system.override(self, "command line", **flags)

    def validate(self, source: str = "config") -> None:
        """Type and range checks; raises :class:`SparsemilError` naming the field."""
        from sparsemil.data.sources import FORMATS
        from sparsemil.mil.factory import MODEL_NAMES

        def bad(name: str, why: str) -> SparsemilError:
            return SparsemilError(f"{source}: '{name}' {why}")

        ints = {
            "n_classes": 2, "folds": 2, "fold": 0, "max_epochs": 1, "batch_size": 1,
            "accumulate_grad_batches": 1, "patience": 1, "stop_start_epoch": 0, "num_test": 1,
            "devices": 1, "num_nodes": 1, "num_workers": 0, "seed": 0, "num_threads": 0,
        }  # fmt: skip
        for name, lo in ints.items():
            v = getattr(self, name)
            if v is None and name == "n_classes":
                continue  # from the data: the number of distinct labels
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, f"must be an integer (got {v!r})")
            if v < lo:
                raise bad(name, f"must be >= {lo} (got {v})")
        floats = {"lr": (0.0, False), "weight_decay": (0.0, True), "min_lr": (0.0, True),
                  "lmbda": (0.0, True), "grad_clip": (0.0, True), "min_delta": (0.0, True)}  # fmt: skip
        for name, (lo, inclusive) in floats.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise bad(name, f"must be a number (got {v!r})")
            if v < lo or (v == lo and not inclusive):
                raise bad(name, f"must be {'>=' if inclusive else '>'} {lo} (got {v})")
            setattr(self, name, float(v))
        if not (0.0 <= float(self.val_fraction) < 1.0):
            raise bad("val_fraction", f"must be in [0, 1) (got {self.val_fraction})")
        if self.fold >= self.folds and not self.folds_csv:
            raise bad("fold", f"must be < folds={self.folds} (got {self.fold})")
        if self.format not in FORMATS:
            raise bad("format", f"is {self.format!r}{suggest(self.format, FORMATS)}")
        if self.model not in MODEL_NAMES:
            raise bad("model", f"is {self.model!r}{suggest(self.model, MODEL_NAMES)}")
        if not isinstance(self.model_kwargs, dict):
            raise bad("model_kwargs", "must be a mapping of model options")
        if self.model != "mmil" and self.n_classes not in (None, 2):
            raise bad("n_classes", f"must be 2 for the binary torchmil baseline '{self.model}'")
        if self.accelerator not in ("cpu", "gpu", "cuda", "mps", "auto"):
            raise bad(
                "accelerator", f"must be cpu, gpu, cuda, mps or auto (got {self.accelerator!r})"
            )


def load_config(path: str | os.PathLike[str]) -> MILTrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into :class:`MILTrainConfig`.

    Relative ``data``/``data_dir``/``labels``/``folds_csv`` paths are resolved against the
    config's folder.
    """
    return config_system.load(
        MILTrainConfig, path, path_keys=("data", "data_dir", "labels", "folds_csv")
    )
