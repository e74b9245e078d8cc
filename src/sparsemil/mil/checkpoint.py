"""MIL checkpoints: one ``.safetensors`` file = weights + the JSON that rebuilds the model.

The file's metadata key ``"sparsemil"`` holds
``{"model": name, "in_dim": C, "n_classes": K, "model_kwargs": {...}, **extra}``;
:func:`load_mil_checkpoint` rebuilds the model with
:func:`sparsemil.mil.factory.build_mil_model` and loads the tensors. Nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sparsemil.errors import SparsemilError
from sparsemil.io import read_safetensors_meta, save_safetensors, state_tensors

META_KEY = "sparsemil"


def save_mil_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    name: str,
    model_kwargs: dict[str, Any],
    extra: dict[str, Any] | None = None,
    in_dim: int | None = None,
    n_classes: int | None = None,
) -> Path:
    """Write ``model``'s weights and rebuild information to one ``.safetensors`` file.

    Args:
        path: output file (written atomically).
        model: a model built by :func:`~sparsemil.mil.factory.build_mil_model`.
        name: its factory name (``mmil``, ``abmil``, ...).
        model_kwargs: the keyword options it was built with (JSON-able).
        extra: more JSON-able metadata (training config, epoch, feature statistics ...).
        in_dim, n_classes: taken from ``model.config`` (MMIL) or ``extra`` when omitted.

    Returns:
        ``path``.
    """
    extra = dict(extra or {})
    cfg = getattr(model, "config", None)
    if in_dim is None:
        in_dim = extra.pop("in_dim", None)
        if in_dim is None and isinstance(cfg, dict):
            in_dim = cfg.get("in_dim")
    if n_classes is None:
        n_classes = extra.pop("n_classes", None)
        if n_classes is None and isinstance(cfg, dict):
            n_classes = cfg.get("n_classes")
    if n_classes is None:
        n_classes = 2
    if in_dim is None:
        raise ValueError("save_mil_checkpoint needs in_dim (pass it or put it in extra)")
    meta = {
        "model": name,
        "in_dim": int(in_dim),
        "n_classes": int(n_classes),
        "model_kwargs": dict(model_kwargs),
        **extra,
    }
    return save_safetensors(path, state_tensors(model), META_KEY, meta)


def read_mil_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``"sparsemil"`` metadata of a checkpoint, without loading the weights."""
    meta = read_safetensors_meta(path, META_KEY)
    if meta is None:
        raise SparsemilError(
            f"checkpoint {path} has no '{META_KEY}' metadata; it was not written by sparsemil "
            "(official MMIL checkpoints: use MMILTransformer.from_official)"
        )
    for key in ("model", "in_dim", "n_classes", "model_kwargs"):
        if key not in meta:
            raise SparsemilError(
                f"checkpoint {path}: metadata lacks '{key}'; re-save it with save_mil_checkpoint"
            )
    return meta


def load_mil_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in ``path`` and load its weights.

    Returns:
        ``(model, meta)``; the model is in eval mode, ``meta`` the ``"sparsemil"`` JSON.
    """
    from safetensors.torch import load_file

    from sparsemil.mil.factory import build_mil_model

    meta = read_mil_checkpoint_meta(path)
    model = build_mil_model(
        meta["model"], meta["in_dim"], meta["n_classes"], **meta["model_kwargs"]
    )
    state = load_file(str(path), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SparsemilError(
            f"checkpoint {path} does not match model '{meta['model']}' "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); "
            "it was saved by a different version or edited"
        )
    model.eval()
    return model, meta
