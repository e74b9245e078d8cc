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

from sparsemil.errors import SparsemilError, resolve_device
from sparsemil.mil.checkpoint import load_mil_checkpoint
from sparsemil.mil.factory import bag_probabilities, model_accepts
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
        return model_accepts(self.model, "forward", "coords")

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
        attention ``(N,)`` (averaged over heads/branches when the model returns several).

        Raises:
            SparsemilError: wrong feature shape, or a model that returns no attention.
        """
        x = self.prepare(features)
        n = int(x.shape[1])
        kwargs: dict[str, Any] = {}
        if coords is not None and self.takes_coords:
            c = torch.as_tensor(np.asarray(coords), dtype=torch.float32).unsqueeze(0)
            kwargs["coords"] = c.to(self.device)
        with torch.inference_mode():
            out = self.model(x, return_att=return_att, **kwargs) if return_att else self.model(
                x, **kwargs
            )
        att = None
        if return_att:
            if not isinstance(out, tuple | list) or len(out) < 2:
                raise SparsemilError(
                    f"model {self.model_name} returned no attention for return_att=True"
                )
            out, att_t = out[0], torch.as_tensor(out[1]).detach().float().cpu()
            if att_t.shape[-1] != n:
                raise SparsemilError(
                    f"model {self.model_name} attention has shape {tuple(att_t.shape)}; "
                    f"expected (1, {n})"
                )
            att = att_t.reshape(-1, n).mean(dim=0).double().numpy()
        probs = bag_probabilities(torch.as_tensor(out).detach().float().cpu())
        return probs.reshape(-1).double().numpy(), att


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
