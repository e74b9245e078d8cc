"""Build any MIL model by name: MMIL-Transformer or a torchmil baseline.

The baselines are the torchmil classes themselves (not re-implemented). They are binary:
``forward`` returns logits of shape ``(B,)`` and ``compute_loss`` uses
``BCEWithLogitsLoss`` on a float label. MMIL-Transformer returns ``(B, n_classes)`` logits
and uses cross-entropy. :func:`bag_probabilities` turns either output into ``(B, n_classes)``
class probabilities.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from sparsemil.errors import SparsemilError

#: Names accepted by :func:`build_mil_model`.
MODEL_NAMES: tuple[str, ...] = ("mmil", "abmil", "transmil", "dsmil", "clam_sb", "dtfdmil")
#: Baselines whose torchmil implementation is binary only.
BINARY_ONLY: frozenset[str] = frozenset({"abmil", "transmil", "dsmil", "clam_sb", "dtfdmil"})
#: Options every torchmil baseline takes besides its constructor's: a CLAM-style instance
#: encoder ``Linear(C, feat_ext_dim) -> ReLU -> Dropout(feat_ext_dropout)`` as its
#: ``feat_ext`` (default: none, the features go straight to the model).
ENCODER_OPTIONS: tuple[str, ...] = ("feat_ext_dim", "feat_ext_dropout")


def _torchmil_class(name: str) -> type[torch.nn.Module]:
    from torchmil import models as tm

    return {
        "abmil": tm.ABMIL,
        "transmil": tm.TransMIL,
        "dsmil": tm.DSMIL,
        "clam_sb": tm.CLAM_SB,
        "dtfdmil": tm.DTFDMIL,
    }[name]


def _mmil_class() -> type[torch.nn.Module]:
    from sparsemil.mil.mmil import MMILTransformer

    return MMILTransformer


def model_class(name: str) -> type[torch.nn.Module]:
    """The class behind ``name`` (see :data:`MODEL_NAMES`)."""
    check_model_name(name)
    return _mmil_class() if name == "mmil" else _torchmil_class(name)


def check_model_name(name: str) -> None:
    """Raise :class:`SparsemilError` unless ``name`` is one of :data:`MODEL_NAMES`."""
    if name not in MODEL_NAMES:
        import difflib

        near = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise SparsemilError(
            f"unknown model '{name}'{hint}; choose one of {', '.join(MODEL_NAMES)}"
        )


def model_accepts(model: torch.nn.Module, method: str, arg: str) -> bool:
    """Whether ``model.<method>`` takes a keyword argument called ``arg``."""
    fn = getattr(model, method, None)
    if fn is None:
        return False
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`SparsemilError` for a keyword ``name``'s constructor does not take."""
    cls = model_class(name)
    params = inspect.signature(cls.__init__).parameters
    reserved = {"self", "in_shape", "in_dim", "n_classes", "feat_ext", "criterion"}
    allowed = sorted(p for p in params if p not in reserved)
    if name != "mmil":
        allowed = sorted([*allowed, *ENCODER_OPTIONS])
    for key in kwargs:
        if key not in allowed:
            import difflib

            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise SparsemilError(
                f"model_kwargs: '{key}' is not an option of model '{name}'{hint}; "
                f"valid options: {', '.join(allowed)}"
            )


def build_mil_model(name: str, in_dim: int, n_classes: int = 2, **kwargs: Any) -> torch.nn.Module:
    """Build the MIL model called ``name``.

    Args:
        name: one of ``mmil``, ``abmil``, ``transmil``, ``dsmil``, ``clam_sb``, ``dtfdmil``.
        in_dim: C, the instance feature dimension.
        n_classes: number of bag classes (the torchmil baselines need 2).
        **kwargs: constructor options of the chosen class (e.g. ``embed_dim`` for MMIL,
            ``att_dim`` for ABMIL), plus :data:`ENCODER_OPTIONS` for the baselines; unknown
            options raise :class:`SparsemilError`.

    Returns:
        The model. Its ``compute_loss(Y, X, mask=...)`` returns ``(output, {name: loss})``;
        output is ``(B,)`` logits for the baselines and ``(B, n_classes)`` for MMIL.
    """
    check_model_name(name)
    if int(in_dim) < 1:
        raise SparsemilError(f"in_dim must be >= 1 (got {in_dim})")
    if int(n_classes) < 2:
        raise SparsemilError(f"n_classes must be >= 2 (got {n_classes})")
    check_model_kwargs(name, kwargs)
    if name == "mmil":
        return _mmil_class()(in_dim=int(in_dim), n_classes=int(n_classes), **kwargs)
    if int(n_classes) != 2:
        raise SparsemilError(
            f"model '{name}' (torchmil) is binary only, but n_classes={n_classes}; "
            "use --model mmil for more than two classes"
        )
    cls = _torchmil_class(name)
    enc_dim = kwargs.pop("feat_ext_dim", None)
    enc_drop = kwargs.pop("feat_ext_dropout", 0.0)
    # A fresh encoder and loss per model: torchmil's defaults are shared module instances.
    model = cls(
        in_shape=(int(in_dim),),
        feat_ext=instance_encoder(int(in_dim), enc_dim, enc_drop),
        criterion=torch.nn.BCEWithLogitsLoss(),
        **kwargs,
    )
    if name == "clam_sb" and type(model.inst_loss_fn).__name__ == "SmoothTop1SVM":
        # torchmil's SmoothTop1SVM mis-broadcasts CLAM's (n, 1) targets (see mil/losses.py).
        from sparsemil.mil.losses import SmoothTop1SVM

        model.inst_loss_fn = SmoothTop1SVM(n_classes=2)
    return model


def instance_encoder(in_dim: int, dim: int | None, dropout: float = 0.0) -> torch.nn.Module:
    """CLAM-style per-instance encoder ``(B, N, in_dim) -> (B, N, dim)``; identity if ``dim`` is None."""
    if dim is None:
        if dropout:
            raise SparsemilError("model_kwargs: feat_ext_dropout needs feat_ext_dim")
        return torch.nn.Identity()
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise SparsemilError(f"model_kwargs: feat_ext_dim must be an integer >= 1 (got {dim!r})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SparsemilError(
            f"model_kwargs: feat_ext_dropout must be a number in [0, 1) (got {dropout!r})"
        )
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, dim), torch.nn.ReLU(), torch.nn.Dropout(float(dropout))
    )


def bag_probabilities(output: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, n_classes)`` from a model output.

    ``(B,)`` binary logits (torchmil baselines) give ``[1 - sigmoid, sigmoid]``;
    ``(B, K)`` logits (MMIL) give ``softmax`` over K.
    """
    if output.ndim == 1:
        p1 = torch.sigmoid(output)
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
