"""Apply a trained MIL checkpoint: one loader returns a ready predictor.

A checkpoint written by the trainer (:func:`sparsemil.mil.checkpoint.save_mil_checkpoint`)
carries the model, the feature dimension, the number of classes, the feature standardiser of
its training bags and, when known, the class names. :func:`load_predictor` turns it into a
:class:`Predictor` that applies all of it, so that ``mil test``, ``mil predict``,
``wsi heatmap`` and ``prune mil`` score a bag the same way: standardise with the training
statistics, run the model in eval mode, turn the output into class probabilities.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsemil.data.sources import BagSource
from sparsemil.errors import SparsemilError, resolve_device
from sparsemil.mil.checkpoint import load_mil_checkpoint
from sparsemil.mil.factory import bag_probabilities
from sparsemil.mil.registry import model_inputs, registered_spec, require_attention
from sparsemil.train.data import Standardizer


@dataclass
class Predictor:
    """A trained MIL model with everything needed to apply it.

    Attributes:
        model: the network, in eval mode, on ``device``.
        meta: the checkpoint's JSON metadata.
        standardizer: z-scoring of the training instances (``None``: features used as they are).
        checkpoint: the file it was loaded from.
        device: torch device string.
    """

    model: torch.nn.Module
    meta: dict[str, Any]
    standardizer: Standardizer | None
    checkpoint: Path
    device: str = "cpu"

    @property
    def model_name(self) -> str:
        return str(self.meta["model"])

    @property
    def in_dim(self) -> int:
        """Feature dimension C the model expects."""
        return int(self.meta["in_dim"])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def class_names(self) -> list[str]:
        """Class names in index order (``"0"``, ``"1"``, ... when the checkpoint has none)."""
        names = self.meta.get("class_names")
        if names and len(names) == self.n_classes:
            return [str(n) for n in names]
        return [str(i) for i in range(self.n_classes)]

    @property
    def takes_coords(self) -> bool:
        """Whether the model's ``forward`` accepts instance coordinates."""
        return registered_spec(self.model).accepts_coords

    def check_features(self, n_features: int, where: str) -> None:
        """Raise :class:`SparsemilError` naming ``where`` if the dimension differs from C."""
        if int(n_features) != self.in_dim:
            raise SparsemilError(
                f"{where}: features are {n_features}-d but checkpoint {self.checkpoint} expects "
                f"{self.in_dim}-d; use features from the encoder the model was trained on"
            )

    def prepare(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(N, C)`` features -> the standardised ``(1, N, C)`` float32 input on ``device``."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if x.dim() != 2 or x.shape[0] == 0:
            raise SparsemilError(f"features must be (N, C) with N >= 1, got {tuple(x.shape)}")
        if self.standardizer is not None:
            x = self.standardizer(x)
        return x.unsqueeze(0).to(self.device)

    def __call__(
        self,
        features: np.ndarray | torch.Tensor,
        coords: np.ndarray | torch.Tensor | None = None,
        return_att: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities ``(K,)`` of one bag and, with ``return_att``, the per-instance
        attention ``(N,)`` (averaged over heads/branches when the model returns several; a
        trailing axis of size 1, as DSMIL's ``(1, N, 1)``, is dropped).

        Raises:
            SparsemilError: wrong feature shape, or ``return_att`` for a model that has no
                attention (DTFD-MIL) or returns none.
        """
        x = self.prepare(features)
        n = int(x.shape[1])
        if return_att:
            require_attention(self.model)
        # the inputs the trainer and ``mil predict`` give (model_inputs): an all-True mask
        # to every model that takes one (DTFD-MIL needs it), coords to those that take them
        batch: dict[str, Any] = {"mask": torch.ones((1, n), dtype=torch.bool, device=x.device)}
        if coords is not None:
            c = torch.as_tensor(np.asarray(coords), dtype=torch.float32).unsqueeze(0)
            batch["coords"] = c.to(self.device)
        kwargs = model_inputs(self.model, batch)
        with torch.inference_mode():
            out = (
                self.model(x, return_att=return_att, **kwargs)
                if return_att
                else self.model(x, **kwargs)
            )
        att = None
        if return_att:
            if not isinstance(out, tuple | list) or len(out) < 2:
                raise SparsemilError(
                    f"model {self.model_name} returned no attention for return_att=True"
                )
            out, att = out[0], instance_attention(out[1], n, f"model {self.model_name}")
        probs = bag_probabilities(torch.as_tensor(out).detach().float().cpu())
        return probs.reshape(-1).double().numpy(), att


def instance_attention(att: Any, n: int, what: str) -> np.ndarray:
    """One score per instance ``(N,)`` float64 from a model's attention output: a trailing
    axis of size 1 (DSMIL's ``(1, N, 1)`` instance scores) is dropped and extra leading
    axes (heads, branches) are averaged.

    Raises:
        SparsemilError: naming ``what``, when the last axis is not the bag's ``n``.
    """
    a = torch.as_tensor(att).detach().float().cpu()
    if a.dim() >= 2 and a.shape[-1] == 1 and a.shape[-2] == n:
        a = a[..., 0]  # DSMIL: (1, N, 1) instance scores
    if a.dim() == 0 or a.shape[-1] != n:
        raise SparsemilError(f"{what} attention has shape {tuple(a.shape)}; expected (1, {n})")
    return a.reshape(-1, n).mean(dim=0).double().numpy()


def load_predictor(path: str | os.PathLike[str], device: str | None = "cpu") -> Predictor:
    """Load a MIL checkpoint into a :class:`Predictor` (model, standardiser, classes).

    Args:
        path: a ``model.safetensors`` written by ``sparsemil mil train``/``cv``.
        device: ``cpu``, ``cuda``, ``auto``, ...

    Raises:
        SparsemilError: missing or unreadable file, not a sparsemil MIL checkpoint, weights
            that do not match the recorded model, or an unavailable device.
    """
    dev = resolve_device(device)
    path = Path(path)
    model, meta = load_mil_checkpoint(path)
    return Predictor(
        model=model.to(dev).eval(),
        meta=meta,
        standardizer=Standardizer.from_meta(meta.get("standardize")),
        checkpoint=path,
        device=dev,
    )


# --------------------------------------------------------------------------- consumers
PARTS = ("auto", "all", "train", "val", "test")


def label_map_of(predictor: Predictor) -> dict[str, int] | None:
    """``{class name: index}`` of a checkpoint trained on string labels (``None`` for
    integer labels), so a test CSV's names map to the training indices, never re-mapped."""
    names = predictor.meta.get("class_names")
    if not names or [str(n) for n in names] == [str(i) for i in range(len(names))]:
        return None
    return {str(n): i for i, n in enumerate(names)}


def seen_slides(predictor: Predictor) -> set[str]:
    """Slide ids the checkpoint was trained on or selected (early-stopped) on."""
    slides = predictor.meta.get("slides") or {}
    return {str(s) for part in ("train", "val") for s in slides.get(part, [])}


def _selected(source: BagSource, part: str) -> list[int]:
    if part not in PARTS:
        raise SparsemilError(f"part {part!r}: use one of {', '.join(PARTS)}")
    everything = list(range(len(source.bags)))
    if part == "all":
        return everything
    if part == "auto":
        test = source.splits[0].test.tolist() if source.splits else []
        return test or everything
    if not source.splits:
        raise SparsemilError(
            f"part {part!r} needs predefined splits; fix: pass an official split CSV as 'data' "
            "(format split) or use part 'all'"
        )
    return getattr(source.splits[0], part).tolist()


def score_bags(
    predictor: Predictor, bags: Any, indices: list[int], num_test: int = 1, seed: int = 0
) -> dict[str, Any]:
    """``num_test`` passes of the predictor's model over ``bags[indices]``, standardised with
    the checkpoint's statistics (:func:`sparsemil.train.evaluate.predict_bags` output)."""
    from torch.utils.data import DataLoader

    from sparsemil.data.bags import collate_bags
    from sparsemil.train.data import MILDataset
    from sparsemil.train.evaluate import predict_bags

    if num_test < 1:
        raise SparsemilError(f"num_test {num_test}: must be >= 1")
    loader = DataLoader(
        MILDataset(bags, indices, predictor.standardizer),
        batch_size=1,
        shuffle=False,
        collate_fn=collate_bags,
    )
    return predict_bags(predictor.model, loader, num_test=num_test, seed=seed,
                        device=predictor.device)  # fmt: skip


def evaluate_checkpoint(
    predictor: Predictor,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    format: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    part: str = "auto",
    num_test: int = 1,
    seed: int = 0,
    allow_seen: bool = False,
) -> dict[str, Any]:
    """``mil test``: score a checkpoint on labelled bags; writes ``metrics.json`` and
    ``predictions.csv`` (``prob_<class name>`` columns) atomically and returns the metrics.

    Labels are read with the checkpoint's class names (a CSV holding only ``tumor_tissue``
    keeps that class's training index). Bags the model was trained or selected on are refused
    unless ``allow_seen``, which then marks them in every output.

    Raises:
        SparsemilError: bad data spec, a label the checkpoint does not know, a feature
            dimension that differs, an empty selection, or seen bags without ``allow_seen``.
    """
    from sparsemil.data.sources import load_bag_source
    from sparsemil.io import atomic_write_json
    from sparsemil.train.evaluate import (
        evaluate_predictions,
        prediction_rows,
        write_predictions_csv,
    )

    source = load_bag_source(
        data, format, data_dir=data_dir, labels=labels, n_classes=predictor.n_classes,
        label_map=label_map_of(predictor),
    )  # fmt: skip
    predictor.check_features(source.dim, f"data {data}")
    idx = _selected(source, part)
    if not idx:
        raise SparsemilError(f"data {data}: the selected part ({part}) has no bags")
    seen = sorted(set(source.slide_ids[i] for i in idx) & seen_slides(predictor))
    if seen and not allow_seen:
        raise SparsemilError(
            f"data {data}: {len(seen)} of {len(idx)} bags were used to train or select "
            f"checkpoint {predictor.checkpoint} (e.g. {seen[0]!r}); their scores would be "
            "optimistic; fix: evaluate on held-out bags, or set 'allow_seen' to flag them"
        )
    pred = score_bags(predictor, source.bags, idx, num_test, seed)
    ev = evaluate_predictions(pred, predictor.n_classes)
    rows = prediction_rows(pred, predictor.class_names)
    for row in rows:
        row["seen_in_training"] = row["slide_id"] in seen
    metrics = {
        **ev["test_time"], "ensemble": ev["ensemble"], "passes": ev["passes"],
        "n_bags": len(idx), "class_names": predictor.class_names,
        "checkpoint": str(predictor.checkpoint), "data": source.source, "num_test": num_test,
        "seen_in_training": {"n_bags": len(seen), "slide_ids": seen},
        "predictions": rows,
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", rows)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def unlabelled_bags(data: str | os.PathLike[str], format: str = "auto") -> list[Any]:
    """The bags of ``mil predict``: one per-slide file, a folder of them, or (``mil-csv``)
    a classic-MIL CSV. Labels are not needed (``-1``)."""
    from sparsemil.data.bags import BagRef
    from sparsemil.data.readers import BAG_SUFFIXES, read_mil_csv

    if format not in ("auto", "mil-csv"):
        raise SparsemilError(f"format {format!r}: predict takes auto or mil-csv")
    path = Path(data)
    if not path.exists():
        raise SparsemilError(f"data {path}: no such file or folder")
    if format == "mil-csv":
        return list(read_mil_csv(path))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in BAG_SUFFIXES)
        if not files:
            raise SparsemilError(f"data {path}: holds no .h5/.pt/.csv feature files")
        return [BagRef(path=p, label=-1, slide_id=p.stem) for p in files]
    return [BagRef(path=path, label=-1, slide_id=path.stem)]


def predict_checkpoint(
    predictor: Predictor,
    data: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    *,
    format: str = "auto",
    num_test: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``mil predict``: class probabilities of new slides; writes one CSV row per slide
    (slide_id, predicted class index and name, ``prob_<class name>``) atomically.

    Every bag is read and checked (non-empty, feature dimension) before any is scored.
    """
    from sparsemil.data.readers import as_bag
    from sparsemil.train.evaluate import prediction_rows, write_predictions_csv

    bags = unlabelled_bags(data, format)
    for b in bags:
        bag = as_bag(b)
        if bag.n_instances == 0:
            raise SparsemilError(f"bag {bag.where()}: empty; remove it")
        predictor.check_features(bag.dim, f"bag {bag.where()}")
    pred = score_bags(predictor, bags, list(range(len(bags))), num_test, seed)
    names = predictor.class_names
    rows = []
    for r in prediction_rows(pred, names):
        r.pop("label")
        r["pred_class"] = names[r["pred"]]
        rows.append(r)
    write_predictions_csv(out_csv, rows)
    return rows


def attention_auc(
    predictor: Predictor, bags: Any, indices: list[int] | None = None
) -> dict[str, Any]:
    """How well a checkpoint's attention finds the positive instances (localisation).

    For every bag of ``bags[indices]`` whose instance labels (the h5 ``labels`` dataset,
    :attr:`~sparsemil.data.bags.Bag.instance_labels`) hold both classes, the ROC AUC of the
    per-instance attention (``predictor(features, coords, return_att=True)``, as
    ``wsi heatmap`` draws it) against those labels (> 0 = positive).

    Returns:
        ``{"mean", "std" (population), "n_bags", "per_bag": {slide_id: auc}}``; mean and
        std are ``None`` when no bag qualifies.

    Raises:
        SparsemilError: a model that returns no attention, or features of another dimension.
    """
    from sklearn.metrics import roc_auc_score

    from sparsemil.data.readers import as_bag

    require_attention(predictor.model)
    per_bag: dict[str, float] = {}
    for i in range(len(bags)) if indices is None else indices:
        bag = as_bag(bags[i])
        y = bag.instance_labels
        if y is None or np.unique(np.asarray(y) > 0).size < 2:
            continue
        predictor.check_features(bag.dim, f"bag {bag.where()}")
        _, att = predictor(bag.features, bag.coords, return_att=True)
        per_bag[bag.slide_id] = float(roc_auc_score(np.asarray(y) > 0, att))
    values = np.array(list(per_bag.values()), dtype=np.float64)
    return {
        "mean": float(values.mean()) if values.size else None,
        "std": float(values.std()) if values.size else None,
        "n_bags": int(values.size),
        "per_bag": per_bag,
    }
