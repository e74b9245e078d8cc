"""Build any MIL model by name: MMIL-Transformer or a torchmil baseline.

What each model is and can do lives in :mod:`sparsemil.mil.registry`; this module checks a
request against it and builds the model. The baselines are the torchmil classes themselves
(not re-implemented). They are binary: ``forward`` returns logits of shape ``(B,)`` and
``compute_loss`` uses ``BCEWithLogitsLoss`` on a float label. MMIL-Transformer returns
``(B, n_classes)`` logits and uses cross-entropy. :func:`bag_probabilities` turns either
output into ``(B, n_classes)`` class probabilities.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from sparsemil.errors import SparsemilError, suggest
from sparsemil.mil.registry import ENCODER_OPTIONS, MODELS, get_model_spec, instance_encoder

__all__ = [
    "BINARY_ONLY",
    "ENCODER_OPTIONS",
    "MODEL_NAMES",
    "bag_loss",
    "bag_probabilities",
    "build_mil_model",
    "check_model_kwargs",
    "check_model_name",
    "instance_encoder",
    "model_class",
]

#: Names accepted by :func:`build_mil_model` (the keys of the registry, in its order).
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
#: Models that take two classes only (the torchmil baselines).
BINARY_ONLY: frozenset[str] = frozenset(n for n, s in MODELS.items() if not s.multiclass)


def model_class(name: str) -> type[torch.nn.Module]:
    """The class behind ``name`` (see :data:`MODEL_NAMES`)."""
    return get_model_spec(name).model_class()


def check_model_name(name: str) -> None:
    """Raise :class:`SparsemilError` unless ``name`` is one of :data:`MODEL_NAMES`."""
    get_model_spec(name)


_RESERVED = frozenset({"self", "in_shape", "in_dim", "n_classes", "feat_ext", "criterion"})


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`SparsemilError` for a keyword ``name``'s constructor does not take."""
    spec = get_model_spec(name)
    params = inspect.signature(spec.model_class().__init__).parameters
    allowed = sorted({p for p in params if p not in _RESERVED} | set(spec.extra_options))
    for key in kwargs:
        if key not in allowed:
            raise SparsemilError(
                f"model_kwargs.{key}: not an option of model '{name}'{suggest(key, allowed)}"
            )


def build_mil_model(name: str, in_dim: int, n_classes: int = 2, **kwargs: Any) -> torch.nn.Module:
    """Build the MIL model called ``name``.

    Args:
        name: one of :data:`MODEL_NAMES` (``mmil``, ``abmil``, ``transmil``, ``dsmil``,
            ``clam_sb``, ``dtfdmil``).
        in_dim: C, the instance feature dimension.
        n_classes: number of bag classes (the torchmil baselines need 2).
        **kwargs: constructor options of the chosen class (e.g. ``embed_dim`` for MMIL,
            ``att_dim`` for ABMIL), plus :data:`ENCODER_OPTIONS` for the baselines; unknown
            options raise :class:`SparsemilError`.

    Returns:
        The model. Its ``compute_loss(Y, X, mask=...)`` returns ``(output, {name: loss})``;
        output is ``(B,)`` logits for the baselines and ``(B, n_classes)`` for MMIL.
    """
    spec = get_model_spec(name)
    if int(in_dim) < 1:
        raise SparsemilError(f"in_dim must be >= 1 (got {in_dim})")
    if int(n_classes) < 2:
        raise SparsemilError(f"n_classes must be >= 2 (got {n_classes})")
    check_model_kwargs(name, kwargs)
    if int(n_classes) != 2 and not spec.multiclass:
        multi = ", ".join(n for n, s in MODELS.items() if s.multiclass)
        raise SparsemilError(
            f"n_classes: model '{name}' is binary only (got n_classes={n_classes}); "
            f"use model {multi} for more than two classes"
        )
    return spec.build(int(in_dim), int(n_classes), **kwargs)


def bag_probabilities(output: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, n_classes)`` from a model output.

    ``(B,)`` or ``(B, 1)`` binary logits (torchmil baselines) give ``[1 - sigmoid, sigmoid]``;
    ``(B, K)`` logits (MMIL) give ``softmax`` over K.
    """
    if output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1):
        p1 = torch.sigmoid(output.reshape(-1))
        return torch.stack([1.0 - p1, p1], dim=-1)
    if output.ndim == 2:
        return torch.softmax(output, dim=-1)
    raise ValueError(f"expected logits of shape (B,) or (B, K), got {tuple(output.shape)}")


def bag_loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-bag loss ``(B,)`` of an output against labels ``y (B,)``.

    BCE-with-logits for ``(B,)`` logits, cross-entropy for ``(B, K)`` logits -- the
    criterion each model family trains with (without auxiliary losses).
    """
    if output.ndim == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            output.float(), y.float(), reduction="none"
        )
    return torch.nn.functional.cross_entropy(output.float(), y.long(), reduction="none")
