"""Fit one MIL model on one train/val/test split with Lightning.

Run folder layout (``run_dir``)::

    config.json         the resolved MILTrainConfig + data description
    last.ckpt           Lightning's full training state (weights, AdamW moments, scheduler,
                        early-stopping counters, epoch, RNG states) -- used only to resume
                        a run inside this folder; it holds tensors and plain types only and is
                        loaded with ``torch.load(weights_only=True)``
    last.safetensors    weights after the last finished epoch (+ JSON metadata)
    best.safetensors    weights with the lowest validation loss so far
    model.safetensors   the final model (best validation loss; the last epoch without
                        validation bags) with everything needed to rebuild and apply it
    state.json          epoch, best epoch, best val loss, stop reason
    metrics.csv         per-epoch train/val losses (Lightning CSVLogger)
    result.json         test metrics of this split (written last: its presence = done)

Checkpoints are written at the end of every epoch through a temporary file and an atomic
rename, so a run killed at any moment resumes (``resume=True``) from the last finished epoch.
A checkpoint supplied by a user (``mil test/predict --checkpoint``) is always a
``.safetensors`` file; Lightning's ``last.ckpt`` is never read from outside the run folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch.utils.data import DataLoader, DistributedSampler

from sparsemil.data.bags import collate_bags
from sparsemil.data.sources import BagSource
from sparsemil.data.splits import Fold
from sparsemil.errors import SparsemilError
from sparsemil.io import atomic_path, atomic_write_json
from sparsemil.mil.checkpoint import save_mil_checkpoint
from sparsemil.mil.factory import build_mil_model
from sparsemil.mil.registry import get_model_spec
from sparsemil.train.config import MILTrainConfig
from sparsemil.train.data import MILDataset, Standardizer, standardize_for
from sparsemil.train.module import MILModule
from sparsemil.train.seeding import scoped_seed


# --------------------------------------------------------------------------- ranks
def global_rank(devices_per_node: int = 1) -> int:
    """This process's rank in a distributed run (0 when not distributed).

    Works before the process group exists: reads ``RANK`` (torchrun, SLURM via Lightning)
    or ``NODE_RANK``/``LOCAL_RANK`` (processes launched by Lightning's DDP strategy), with
    ``devices_per_node`` the config's ``devices`` (read, never written, environment).
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", 0))
    return node * int(devices_per_node) + local


def is_launched_child() -> bool:
    """True in a worker process started by Lightning/torchrun with rank > 0 (whatever the
    number of devices per node: rank 0 is node 0, local rank 0)."""
    return global_rank() > 0 or int(os.environ.get("NODE_RANK", 0)) > 0


# --------------------------------------------------------------------------- plumbing
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes, ``weights_only=True`` reads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = True
    ) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **kwargs)


class DelayedEarlyStopping(EarlyStopping):
    """Early stopping that counts epochs without improvement from the start (like CLAM) but
    never stops before epoch ``start_epoch`` (1-based: with ``start_epoch=50`` the earliest
    stop is after the 50th epoch). Non-finite losses stop at once.
    """

    def __init__(self, start_epoch: int = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_epoch = int(start_epoch)
        self._epoch = 0

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        self._epoch = int(trainer.current_epoch)
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if should_stop and torch.isfinite(current) and self._epoch + 1 < self.start_epoch:
            return False, None
        return should_stop, reason


class RunCheckpoint(Callback):
    """Every epoch: ``best.safetensors`` on a new best val loss; then ``last.safetensors``,
    ``last.ckpt`` (full state for resuming) and ``state.json``. Rank 0 writes."""

    def __init__(self, run_dir: Path, name: str, model_kwargs: dict, meta: dict) -> None:
        self.run_dir = Path(run_dir)
        self.name = name
        self.model_kwargs = model_kwargs
        self.meta = meta
        self.best_val_loss = float("inf")
        self.best_epoch = -1
        self.epochs_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_val_loss = float(state_dict["best_val_loss"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.epochs_done = int(state_dict["epochs_done"])

    def _save_weights(self, trainer: L.Trainer, module: MILModule, fname: str, epoch: int) -> None:
        if trainer.is_global_zero:
            save_mil_checkpoint(
                self.run_dir / fname,
                module.model,
                self.name,
                self.model_kwargs,
                {**self.meta, "epoch": epoch},
            )

    def on_validation_end(self, trainer: L.Trainer, module: MILModule) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val_loss")
        if val is None:
            return
        val = float(val)
        if val < self.best_val_loss:
            self.best_val_loss = val
            self.best_epoch = int(trainer.current_epoch)
            self._save_weights(trainer, module, "best.safetensors", self.best_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, module: MILModule) -> None:
        epoch = int(trainer.current_epoch)
        self.epochs_done = epoch + 1
        self._save_weights(trainer, module, "last.safetensors", epoch)
        trainer.save_checkpoint(self.run_dir / "last.ckpt", weights_only=False)  # all ranks call
        if trainer.is_global_zero:
            atomic_write_json(self.run_dir / "state.json", self.summary(trainer))

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        stop = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
        return {
            "epochs_done": self.epochs_done,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss if self.best_epoch >= 0 else None,
            "stopped_early": bool(stop and stop[0].stopped_epoch > 0),
            "stopped_epoch": int(stop[0].stopped_epoch) if stop else 0,
        }


class MILDataModule(L.LightningDataModule):
    """Loaders built after the process group exists, so the training sampler knows the
    world size: a :class:`DistributedSampler` (seeded, reshuffled per epoch) shards the
    training bags; every process sees all validation bags."""

    def __init__(
        self,
        train_ds: MILDataset,
        val_ds: MILDataset | None,
        batch_size: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        self.train_ds, self.val_ds = train_ds, val_ds
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        sampler = DistributedSampler(
            self.train_ds,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=self.seed,
            drop_last=False,
        )
        return DataLoader(
            self.train_ds,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_bags,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_ds,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_bags,
            num_workers=self.num_workers,
        )


def check_batch_support(name: str, batch_size: int) -> None:
    """Padded batches (``batch_size`` > 1) need a model that honours the padding mask
    everywhere (:attr:`~sparsemil.mil.registry.ModelSpec.supports_batch`): TransMIL has
    no mask, and DSMIL, CLAM-SB and DTFD-MIL ignore it in part of their computation."""
    if batch_size <= 1:
        return
    spec = get_model_spec(name)
    if not spec.supports_batch:
        raise SparsemilError(
            f"batch_size: model '{name}' {spec.batch_note}, so batch_size must be 1 "
            f"(got {batch_size}); set 'accumulate_grad_batches' to {batch_size} for the same "
            "effective batch"
        )


def needs_coords(cfg: MILTrainConfig) -> bool:
    """Whether the configured grouping places instances by their coordinates."""
    grouping = str(cfg.model_kwargs.get("grouping", ""))
    return grouping in ("kmeans_coords", "coords")


def first_bag_without_coords(data: BagSource) -> str | None:
    """The first bag lacking ``coords`` (``'<slide>' (<path>)``), read from shapes only."""
    from sparsemil.data.bags import BagRef
    from sparsemil.data.h5 import h5_info
    from sparsemil.data.readers import as_bag

    for b in data.bags:
        if isinstance(b, BagRef) and b.path.suffix.lower() in (".h5", ".hdf5"):
            has = h5_info(b.path)[2]
        else:
            has = as_bag(b).coords is not None
        if not has:
            return b.where()
    return None


def default_model_kwargs(cfg: MILTrainConfig, data: BagSource) -> dict[str, Any]:
    """``cfg.model_kwargs``; a model that owns a generator also gets ``seed`` unless given."""
    kwargs = dict(cfg.model_kwargs)
    if get_model_spec(cfg.model).seeded:
        kwargs.setdefault("seed", int(cfg.seed))
    return kwargs


def _trainer_kwargs(cfg: MILTrainConfig) -> dict[str, Any]:
    strategy = cfg.strategy
    if strategy == "auto" and (cfg.devices > 1 or cfg.num_nodes > 1):
        strategy = "ddp"
    deterministic: bool | str = True if cfg.accelerator == "cpu" else "warn"
    return {
        "accelerator": cfg.accelerator,
        "devices": cfg.devices,
        "num_nodes": cfg.num_nodes,
        "strategy": strategy,
        "precision": cfg.precision,
        "deterministic": deterministic,
    }


def preflight(cfg: MILTrainConfig, data: BagSource) -> None:
    """Checks that need the data: build the model once (bad ``model_kwargs`` fail here, not
    after a fold has trained) and check batch-size support and class count.

    Raises:
        SparsemilError: an explicit ``n_classes`` that disagrees with the number of distinct
            labels, a binary-only model on more classes, bad ``model_kwargs``, unsupported
            batching, or a GPU that is not there.
    """
    spec = get_model_spec(cfg.model)
    if not spec.multiclass and data.n_classes > 2:
        found = ", ".join(str(v) for v in np.unique(data.labels))
        raise SparsemilError(
            f"{data.source}: {data.n_classes} classes (labels {found}) but model "
            f"{cfg.model!r} is binary only; fix: relabel to 0/1, or use model 'mmil'"
        )
    distinct = int(np.unique(data.labels).size)
    if cfg.n_classes is not None and int(cfg.n_classes) != distinct:
        names = f" ({', '.join(data.class_names)})" if data.class_names else ""
        raise SparsemilError(
            f"n_classes {cfg.n_classes} disagrees with the {distinct} distinct labels{names} "
            f"of {data.source}; fix: remove 'n_classes' (it defaults to the labels) or fix "
            "the labels"
        )
    build_mil_model(cfg.model, data.dim, data.n_classes, **default_model_kwargs(cfg, data))
    check_batch_support(cfg.model, cfg.batch_size)
    if needs_coords(cfg):
        missing = first_bag_without_coords(data)
        if missing is not None:
            raise SparsemilError(
                f"model_kwargs.grouping {cfg.model_kwargs.get('grouping')!r} needs patch "
                f"coordinates, but bag {missing} has no coords; fix: extract features with "
                "coords or choose another grouping"
            )
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SparsemilError(
            f"accelerator: {cfg.accelerator!r} was requested but no CUDA device is visible; "
            "set accelerator to cpu"
        )


def prepare_out_dir(out: str | os.PathLike[str], resume: bool, marker: str) -> Path:
    """Create ``out``; refuse a folder that already holds a run unless ``resume``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SparsemilError(f"out {out} exists and is not a folder; choose another path")
    if not resume and not is_launched_child() and out.is_dir():
        taken = [
            p.name
            for p in out.iterdir()
            if p.name in (marker, "last.ckpt", "config.json") or p.name.startswith("fold_")
        ]
        if taken:
            raise SparsemilError(
                f"out {out} already holds a run ({taken[0]}); set 'resume' to continue it or "
                "choose a new 'out' folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def merge_epoch_logs(logs: Path, out: Path) -> None:
    """Concatenate the CSV logs of every attempt (first run, resumes) into ``out``; rows of
    an epoch that a later attempt re-ran (killed mid-epoch) are taken from the later one."""
    import csv

    attempts = sorted(
        logs.glob("attempt_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    rows: list[dict[str, str]] = []
    fields: list[str] = []
    for path in attempts:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            new = list(reader)
            for f in reader.fieldnames or []:
                if f not in fields:
                    fields.append(f)
        if new:
            first = min(int(r["epoch"]) for r in new if r.get("epoch", "") != "")
            rows = [r for r in rows if int(r["epoch"]) < first] + new
    if not fields:
        return
    import io

    from sparsemil.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out, buf.getvalue())


def absolute_paths(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """A config dict whose existing data paths are absolute, so a checkpoint that records it
    works from any working directory (benchmark names such as ``musk1`` stay as they are)."""
    out = dict(cfg_dict)
    for key in ("data", "data_dir", "labels", "folds_csv"):
        value = out.get(key)
        if isinstance(value, str) and value and Path(value).exists():
            out[key] = str(Path(value).resolve())
    return out


def encoder_of(data: BagSource) -> dict[str, Any]:
    """The patch encoder recorded in the first bag's h5 (``{}`` when unknown)."""
    from sparsemil.data.bags import BagRef
    from sparsemil.data.h5 import encoder_attrs

    first = data.bags[0] if data.bags else None
    if isinstance(first, BagRef) and first.path.suffix.lower() in (".h5", ".hdf5"):
        return encoder_attrs(first.path)
    return {}


def class_names_of(data: BagSource) -> list[str]:
    """Class names in index order: the label strings of the data, else ``"0"``, ``"1"``..."""
    if data.class_names:
        return [str(c) for c in data.class_names]
    return [str(i) for i in range(int(data.n_classes))]


@dataclass
class FoldSetup:
    """What :func:`build_fold` assembles for one split: the Lightning module, data module,
    callbacks and the metadata stored with every checkpoint."""

    module: MILModule
    datamodule: MILDataModule
    checkpoint: RunCheckpoint
    callbacks: list[Callback]
    std: Standardizer | None
    model_kwargs: dict[str, Any]
    meta: dict[str, Any]


def build_fold(
    cfg: MILTrainConfig,
    data: BagSource,
    fold: Fold,
    run_dir: Path,
    extra_callbacks: list[Callback] | None = None,
) -> FoldSetup:
    """Step 1 of :func:`fit_fold`: standardiser (training bags only), model, module, data
    module and callbacks (checkpointing, early stopping on ``fold.val`` from
    ``cfg.stop_start_epoch``)."""
    std = Standardizer.fit(data.bags, fold.train) if standardize_for(data, cfg) else None
    kwargs = default_model_kwargs(cfg, data)
    model = build_mil_model(cfg.model, data.dim, data.n_classes, **kwargs)
    check_batch_support(cfg.model, cfg.batch_size)
    meta = {
        "in_dim": data.dim,
        "n_classes": data.n_classes,
        "class_names": class_names_of(data),
        "needs_coords": needs_coords(cfg),
        "encoder": encoder_of(data),
        "standardize": std.to_meta() if std else None,
        "train_config": absolute_paths(cfg.to_dict()),
        "fold": fold.index,
        "slides": {  # what the model was fitted on and selected on (never to be scored)
            "train": [data.slide_ids[i] for i in fold.train],
            "val": [data.slide_ids[i] for i in fold.val],
        },
    }
    module = MILModule(
        model, data.n_classes, cfg.lr, cfg.weight_decay, cfg.max_epochs, cfg.min_lr, cfg.lmbda
    )
    train_ds = MILDataset(data.bags, fold.train, std)
    val_ds = MILDataset(data.bags, fold.val, std) if len(fold.val) else None
    dm = MILDataModule(
        train_ds, val_ds, cfg.batch_size, int(cfg.seed) * 1000 + int(fold.index), cfg.num_workers
    )
    ckpt_cb = RunCheckpoint(run_dir, cfg.model, kwargs, meta)
    callbacks: list[Callback] = [ckpt_cb]
    if cfg.early_stopping and val_ds is not None:
        callbacks.insert(0, DelayedEarlyStopping(
            start_epoch=cfg.stop_start_epoch, monitor="val_loss", mode="min",
            patience=cfg.patience, min_delta=cfg.min_delta, check_finite=True,
        ))  # fmt: skip
    callbacks += list(extra_callbacks or [])
    return FoldSetup(module, dm, ckpt_cb, callbacks, std, kwargs, meta)


def fit_setup(cfg: MILTrainConfig, setup: FoldSetup, run_dir: Path, resume: bool) -> L.Trainer:
    """Step 2 of :func:`fit_fold`: Lightning's fit (resuming from ``run_dir/last.ckpt``)."""
    from lightning.pytorch.loggers import CSVLogger

    logs = run_dir / "logs"
    attempt = len(list(logs.glob("attempt_*"))) if logs.is_dir() else 0
    trainer = L.Trainer(
        max_epochs=cfg.max_epochs,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.grad_clip or None,
        logger=CSVLogger(save_dir=str(logs), name="", version=f"attempt_{attempt}"),
        callbacks=setup.callbacks,
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.progress),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if setup.datamodule.val_ds is not None else 0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        plugins=[AtomicCheckpointIO()],
        **_trainer_kwargs(cfg),
    )
    ckpt_path = run_dir / "last.ckpt"
    trainer.fit(
        setup.module,
        datamodule=setup.datamodule,
        ckpt_path=str(ckpt_path) if resume and ckpt_path.is_file() else None,
        weights_only=True,
    )
    return trainer


def test_fold(
    cfg: MILTrainConfig,
    data: BagSource,
    fold: Fold,
    setup: FoldSetup,
    trainer: L.Trainer,
    run_dir: Path,
) -> dict[str, Any]:
    """Step 3 of :func:`fit_fold` (rank 0): reload the best weights, write
    ``model.safetensors`` and score ``fold.test`` with ``cfg.num_test`` passes."""
    from safetensors.torch import load_file

    from sparsemil.train.evaluate import evaluate_predictions, predict_bags, prediction_rows

    best = run_dir / "best.safetensors"
    if setup.checkpoint.best_epoch >= 0 and best.is_file():
        setup.module.model.load_state_dict(load_file(str(best)))
    model = setup.module.model.cpu()
    summary = setup.checkpoint.summary(trainer)
    epoch = summary["best_epoch"] if summary["best_epoch"] >= 0 else summary["epochs_done"] - 1
    save_mil_checkpoint(
        run_dir / "model.safetensors", model, cfg.model, setup.model_kwargs,
        {**setup.meta, "epoch": epoch},
    )  # fmt: skip
    result: dict[str, Any] = {
        "fold": fold.index,
        "n_train": len(fold.train),
        "n_val": len(fold.val),
        "n_test": len(fold.test),
        **summary,
        "checkpoint": str(run_dir / "model.safetensors"),
    }
    if len(fold.test):
        loader = DataLoader(
            MILDataset(data.bags, fold.test, setup.std),
            batch_size=1,
            shuffle=False,
            collate_fn=collate_bags,
        )
        pred = predict_bags(model, loader, num_test=cfg.num_test, seed=int(cfg.seed))
        ev = evaluate_predictions(pred, data.n_classes)
        result.update({k: ev[k] for k in ("metrics", "test_time", "ensemble")})
        result["predictions"] = prediction_rows(pred, class_names_of(data), fold=fold.index)
    return result


def fit_fold(
    cfg: MILTrainConfig,
    data: BagSource,
    fold: Fold,
    run_dir: str | os.PathLike[str],
    resume: bool = False,
    extra_callbacks: list[Callback] | None = None,
) -> dict[str, Any] | None:
    """Train ``cfg.model`` on ``fold.train`` (early stopping on ``fold.val``), then test on
    ``fold.test`` with ``cfg.num_test`` passes: build -> fit -> test -> write.

    Returns (on rank 0; ``None`` on other ranks) the result dict that is also written to
    ``run_dir/result.json``: split sizes, epochs, best epoch, test metrics (mean over passes),
    their test-time mean +- std, the ensemble over passes and per-slide predictions.
    With ``resume=True`` a finished run is returned as is and an interrupted one continues
    from ``run_dir/last.ckpt``. All global RNGs are seeded with ``cfg.seed * 1000 + fold``
    for the fold and restored afterwards (:func:`sparsemil.train.seeding.scoped_seed`).
    """
    run_dir = Path(run_dir)
    done = run_dir / "result.json"
    rank0 = not is_launched_child()
    if resume and done.is_file():
        return json.loads(done.read_text()) if rank0 else None
    run_dir.mkdir(parents=True, exist_ok=True)
    with scoped_seed(int(cfg.seed) * 1000 + int(fold.index)):
        setup = build_fold(cfg, data, fold, run_dir, extra_callbacks)
        if rank0:
            split = {"train": len(fold.train), "val": len(fold.val), "test": len(fold.test)}
            atomic_write_json(run_dir / "config.json", {
                **cfg.to_dict(), "data_source": data.source, "in_dim": data.dim,
                "n_classes": data.n_classes, "split": split,
            })  # fmt: skip
        trainer = fit_setup(cfg, setup, run_dir, resume)
        if not trainer.is_global_zero:
            return None
        merge_epoch_logs(run_dir / "logs", run_dir / "metrics.csv")
        result = test_fold(cfg, data, fold, setup, trainer, run_dir)
    atomic_write_json(done, result)
    return result
