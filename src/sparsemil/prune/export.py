"""Checkpoints and compressed sparse export, all as safetensors (never pickle).

**Checkpoints** (:func:`save_checkpoint` / :func:`sparsemil.experiments.vision.models.load_checkpoint`): one ``.safetensors`` file with
the model's ``state_dict``; its metadata key ``"sparsemil_prune"`` holds JSON ``{"model",
"in_shape", "num_classes", "widths", "init", "config": {...}, ...}`` so the model can be rebuilt
with :func:`sparsemil.experiments.vision.models.build_model`.

**Sparse export** (:func:`save_sparse` / :func:`load_sparse`), format ``sparsemil-bitmask-v1``:
every floating-point tensor of the ``state_dict`` is stored either densely under its own name or,
when that is smaller, as

- ``<name>::mask`` -- uint8, the row-major nonzero pattern packed 8 per byte with
  ``numpy.packbits`` (big bit order), ``ceil(numel / 8)`` bytes;
- ``<name>::values`` -- the nonzero values in row-major order (same dtype).

A tensor with ``nnz`` nonzeros of ``b``-byte elements costs ``numel/8 + nnz*b`` bytes instead of
``numel*b``: smaller as soon as ``nnz/numel < 1 - 1/(8b)`` (87.5% for float32). The metadata key
``"sparsemil_sparse"`` records every tensor's name, shape, dtype and encoding. Loading rebuilds the
exact tensors (a stored ``-0.0`` comes back as ``+0.0``, which changes no output).

Both writers store the weights as a plain model holds them (:func:`sparsemil.io.state_tensors`):
a weight carrying ``torch.nn.utils.prune`` hooks is folded into ``orig * mask`` (no
``*_orig`` / ``*_mask`` entries). Tied weights (one tensor under several names) save and load;
the sparse export stores such a tensor once and lists its other names under ``"aliases"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from torch import nn

from sparsemil.errors import SparsemilError
from sparsemil.io import (
    atomic_path,
    json_default,
    read_safetensors_meta,
    save_safetensors,
    state_tensors,
    tied_names,
)

CHECKPOINT_KEY = "sparsemil_prune"
SPARSE_KEY = "sparsemil_sparse"
SPARSE_FORMAT = "sparsemil-bitmask-v1"


def save_checkpoint(path: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and the JSON ``meta`` (see module docstring) atomically."""
    return save_safetensors(path, state_tensors(model), CHECKPOINT_KEY, dict(meta))


def read_metadata(path: str | Path, key: str = CHECKPOINT_KEY) -> dict[str, Any]:
    """The JSON metadata ``key`` of a safetensors file.

    Raises:
        SparsemilError: missing/unreadable file, or no ``key`` metadata.
    """
    meta = read_safetensors_meta(path, key)
    if meta is None:
        raise SparsemilError(f"checkpoint {path}: no {key!r} metadata; write it with sparsemil")
    return meta


# --------------------------------------------------------------------------- sparse export


def sparse_state_dict(
    state: Mapping[str, torch.Tensor], aliases: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Encode a state dict (see module docstring); returns ``(tensors, layout)``.

    ``aliases`` (``{name: earlier name}``, tied weights) are stored once, under the earlier
    name, and listed in the layout's ``"aliases"``.
    """
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    aliases = {k: v for k, v in (aliases or {}).items() if k in state and v in state}
    for name, t in state.items():
        if name in aliases:
            continue
        if "::" in name:
            raise SparsemilError(f"sparse export: tensor name {name!r} contains '::'")
        t = t.detach().cpu().contiguous()
        entry = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if t.is_floating_point() and t.numel() > 0:
            nz = t.reshape(-1) != 0
            nnz = int(nz.sum())
            packed_bytes = (t.numel() + 7) // 8 + nnz * t.element_size()
            if packed_bytes < t.numel() * t.element_size():
                bits = np.packbits(nz.numpy().astype(np.uint8))
                tensors[f"{name}::mask"] = torch.from_numpy(bits)
                tensors[f"{name}::values"] = t.reshape(-1)[nz].contiguous()
                entry["encoding"] = "bitmask"
                layout[name] = entry
                continue
        tensors[name] = t
        entry["encoding"] = "dense"
        layout[name] = entry
    return tensors, {"format": SPARSE_FORMAT, "tensors": layout, "aliases": aliases}


def dense_from_sparse(
    tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Decode :func:`sparse_state_dict` output back into dense tensors."""
    if layout.get("format") != SPARSE_FORMAT:
        raise SparsemilError(f"sparse export: unknown format {layout.get('format')!r}")
    out = {}
    for name, entry in layout["tensors"].items():
        shape = tuple(entry["shape"])
        if entry["encoding"] == "dense":
            out[name] = tensors[name].reshape(shape)
            continue
        values = tensors[f"{name}::values"]
        numel = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(tensors[f"{name}::mask"].numpy(), count=numel).astype(bool)
        if int(bits.sum()) != values.numel():
            raise SparsemilError(f"sparse export: tensor {name!r} has a corrupt mask")
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[torch.from_numpy(bits)] = values
        out[name] = flat.reshape(shape)
    for alias, target in layout.get("aliases", {}).items():
        if target not in out:
            raise SparsemilError(f"sparse export: alias {alias!r} names a missing {target!r}")
        out[alias] = out[target]
    return out


def save_sparse(
    path: str | Path, model: nn.Module, meta: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Write ``model``'s state dict in the compressed format, atomically.

    Tied weights are stored once (the layout's ``"aliases"`` restores every name), and
    weights carrying ``torch.nn.utils.prune`` hooks are folded (``orig * mask``, see
    :func:`sparsemil.io.state_tensors`), so the file loads into the plain architecture.

    Args:
        path: output ``.safetensors`` file.
        model: the (pruned) model; exact zeros are not stored.
        meta: optional checkpoint metadata (as for :func:`save_checkpoint`) so that
            :func:`sparsemil.experiments.vision.models.load_checkpoint` can rebuild the model from this file alone.

    Returns:
        ``{"dense_bytes", "sparse_bytes"}``: the size of the dense checkpoint of the same model
        and ``meta`` (what :func:`save_checkpoint` writes) and of the written compressed file.
    """
    state = state_tensors(model)
    tensors, layout = sparse_state_dict(state, tied_names(model))
    dense_meta = {}
    if meta is not None:
        dense_meta[CHECKPOINT_KEY] = json.dumps(dict(meta), default=json_default)
    metadata = {SPARSE_KEY: json.dumps(layout), **dense_meta}
    dense_bytes = len(st_save(state, metadata=dense_meta or None))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return {"dense_bytes": dense_bytes, "sparse_bytes": Path(path).stat().st_size}


def load_sparse(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a :func:`save_sparse` file into ``model`` (strict); returns ``model``."""
    path = Path(path)
    layout = read_metadata(path, SPARSE_KEY)
    from safetensors.torch import load as st_load

    tensors = st_load(path.read_bytes())
    state = dense_from_sparse(tensors, layout)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SparsemilError(f"{path}: weights do not match the model ({err})") from None
    return model


def serialized_bytes(model: nn.Module) -> int:
    """Size in bytes of ``model``'s state dict as a dense safetensors blob."""
    return len(st_save(state_tensors(model)))


__all__ = [
    "dense_from_sparse",
    "load_sparse",
    "read_metadata",
    "save_checkpoint",
    "save_sparse",
    "serialized_bytes",
    "sparse_state_dict",
]
