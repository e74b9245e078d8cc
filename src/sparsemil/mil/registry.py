"""The one table of MIL models: how each is built and what it can do.

Every module that needs a fact about a model (does it take a padding mask, coordinates,
more than two classes, padded batches; how many test passes make sense) reads it from
:data:`MODELS` -- never from a table of its own and never by probing signatures.

The torchmil baselines are the torchmil classes themselves (binary: ``(B,)`` logits,
``BCEWithLogitsLoss``); MMIL-Transformer is :class:`sparsemil.mil.mmil.MMILTransformer`
(``(B, n_classes)`` logits, cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sparsemil.errors import SparsemilError, suggest

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Options every torchmil baseline takes besides its constructor's: a CLAM-style instance
#: encoder ``Linear(C, feat_ext_dim) -> ReLU -> Dropout(feat_ext_dropout)`` as its
#: ``feat_ext`` (default: none, the features go straight to the model). A list of widths
#: stacks such layers: ``feat_ext_dim: [256, 128]`` is Ilse et al.'s (2018) embedding
#: network ``fc-256 + ReLU -> fc-128 + ReLU`` in front of the attention pooling.
ENCODER_OPTIONS: tuple[str, ...] = ("feat_ext_dim", "feat_ext_dropout")


@dataclass(frozen=True)
class ModelSpec:
    """One MIL model and its capabilities.

    Attributes:
        name: the registry key (``model`` in configs and checkpoints).
        display_name: the name for people (tables, plots).
        model_class: ``() -> class`` (imported lazily: torchmil loads only when needed).
        builder: ``(in_dim, n_classes, **kwargs) -> model`` (options already validated).
        accepts_mask: ``forward``/``predict``/``compute_loss`` take a ``mask``.
        supports_batch: the mask is honoured everywhere, so padded batches of more than one
            bag give the same losses as single bags; otherwise ``batch_size`` must be 1.
        batch_note: why padded batches are refused (empty when ``supports_batch``).
        accepts_coords: ``forward``/``predict``/``compute_loss`` take ``coords=(B, N, 2)``.
        accepts_group_ids: ... take ``group_ids=(B, N)`` (precomputed sub-bags).
        multiclass: more than two classes (``(B, K)`` logits); else binary ``(B,)`` logits.
        seeded: the constructor takes ``seed`` and the model owns a generator
            (``reseed``, ``get_rng_state``, ``set_rng_state``).
        stochastic_eval: evaluation passes differ (random grouping, random chunks).
        default_num_test: test passes worth running (more than one when stochastic).
        returns_attention: ``forward(X, ..., return_att=True)`` returns ``(output,
            attention)`` with one score per instance (DTFD-MIL's ``forward`` takes no
            ``return_att``: it has no attention map).
        extra_options: options besides the constructor's (handled by ``builder``).
    """

    name: str
    display_name: str
    model_class: Callable[[], type]
    builder: Callable[..., Any]
    accepts_mask: bool
    supports_batch: bool
    accepts_coords: bool = False
    accepts_group_ids: bool = False
    multiclass: bool = False
    seeded: bool = False
    stochastic_eval: bool = False
    default_num_test: int = 1
    returns_attention: bool = True
    batch_note: str = ""
    extra_options: tuple[str, ...] = field(default=())

    def build(self, in_dim: int, n_classes: int = 2, **kwargs: Any) -> torch.nn.Module:
        return self.builder(int(in_dim), int(n_classes), **kwargs)


# --------------------------------------------------------------------------- builders
def _mmil_class() -> type:
    from sparsemil.mil.mmil import MMILTransformer

    return MMILTransformer


def _build_mmil(in_dim: int, n_classes: int, **kwargs: Any) -> torch.nn.Module:
    return _mmil_class()(in_dim=in_dim, n_classes=n_classes, **kwargs)


def _torchmil_class(attr: str) -> Callable[[], type]:
    def load() -> type:
        from torchmil import models as tm

        return getattr(tm, attr)

    load.__name__ = f"torchmil_{attr}"
    return load


def _torchmil_builder(attr: str) -> Callable[..., Any]:
    def build(in_dim: int, n_classes: int, **kwargs: Any) -> torch.nn.Module:
        import torch

        enc_dim = kwargs.pop("feat_ext_dim", None)
        enc_drop = kwargs.pop("feat_ext_dropout", 0.0)
        # A fresh encoder and loss per model: torchmil's defaults are shared module instances.
        model = _torchmil_class(attr)()(
            in_shape=(in_dim,),
            feat_ext=instance_encoder(in_dim, enc_dim, enc_drop),
            criterion=torch.nn.BCEWithLogitsLoss(),
            **kwargs,
        )
        if attr == "CLAM_SB" and type(model.inst_loss_fn).__name__ == "SmoothTop1SVM":
            # torchmil's SmoothTop1SVM mis-broadcasts CLAM's (n, 1) targets (mil/losses.py).
            from sparsemil.mil.losses import SmoothTop1SVM

            model.inst_loss_fn = SmoothTop1SVM(n_classes=2)
        return model

    build.__name__ = f"build_{attr}"
    return build


def instance_encoder(
    in_dim: int, dim: int | list[int] | tuple[int, ...] | None, dropout: float = 0.0
) -> torch.nn.Module:
    """Per-instance encoder ``(B, N, in_dim) -> (B, N, width)``; identity if ``dim`` is None.

    ``dim`` an integer: one ``Linear(in_dim, dim) -> ReLU -> Dropout(dropout)`` (CLAM-style);
    a list of integers: one such layer per width, in order (``[256, 128]``: Ilse et al.'s
    embedding network for the classic MIL benchmarks); ``width`` is the last one.
    """
    import torch

    if dim is None:
        if dropout:
            raise SparsemilError("model_kwargs.feat_ext_dropout: needs feat_ext_dim")
        return torch.nn.Identity()
    widths = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise SparsemilError(
            "model_kwargs.feat_ext_dim must be an integer >= 1 or a non-empty list of them "
            f"(got {dim!r})"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SparsemilError(
            f"model_kwargs.feat_ext_dropout must be a number in [0, 1) (got {dropout!r})"
        )
    layers: list[torch.nn.Module] = []
    prev = in_dim
    for w in widths:
        layers += [torch.nn.Linear(prev, w), torch.nn.ReLU(), torch.nn.Dropout(float(dropout))]
        prev = w
    return torch.nn.Sequential(*layers)


def _baseline(name: str, attr: str, display: str, **caps: Any) -> ModelSpec:
    return ModelSpec(
        name=name,
        display_name=display,
        model_class=_torchmil_class(attr),
        builder=_torchmil_builder(attr),
        extra_options=ENCODER_OPTIONS,
        **caps,
    )


_PARTIAL = "ignores the padding mask in part of its computation"

_SPECS = (
    ModelSpec(
        name="mmil",
        display_name="MMIL-Transformer",
        model_class=_mmil_class,
        builder=_build_mmil,
        accepts_mask=True,
        supports_batch=True,
        accepts_coords=True,
        accepts_group_ids=True,
        multiclass=True,
        seeded=True,
        stochastic_eval=True,  # random grouping
        default_num_test=5,
    ),
    _baseline("abmil", "ABMIL", "ABMIL", accepts_mask=True, supports_batch=True),
    _baseline(
        "transmil",
        "TransMIL",
        "TransMIL",
        accepts_mask=False,
        supports_batch=False,
        batch_note="has no padding mask",
    ),
    _baseline(  # max over instance logits
        "dsmil", "DSMIL", "DSMIL", accepts_mask=True, supports_batch=False, batch_note=_PARTIAL
    ),
    _baseline(  # instance loss
        "clam_sb",
        "CLAM_SB",
        "CLAM-SB",
        accepts_mask=True,
        supports_batch=False,
        batch_note=_PARTIAL,
    ),
    _baseline(  # tier-2 pooling of the distilled features; random chunks
        "dtfdmil",
        "DTFDMIL",
        "DTFD-MIL",
        accepts_mask=True,
        supports_batch=False,
        batch_note=_PARTIAL,
        stochastic_eval=True,
        default_num_test=5,
        returns_attention=False,
    ),
)

#: Every model by name, in the order of tables and ``--help`` texts.
MODELS: Mapping[str, ModelSpec] = MappingProxyType({s.name: s for s in _SPECS})


def get_model_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; :class:`SparsemilError` (naming ``model``) if unknown."""
    spec = MODELS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise SparsemilError(f"model: unknown model {name!r}{suggest(str(name), MODELS)}")
    return spec


def spec_of(model: Any) -> ModelSpec | None:
    """The spec of a model instance (by class), or None for a model not in :data:`MODELS`."""
    for spec in MODELS.values():
        if isinstance(model, spec.model_class()):
            return spec
    return None


def registered_spec(model: Any) -> ModelSpec:
    """The registry entry of ``model``'s class; :class:`SparsemilError` for other models."""
    spec = spec_of(model)
    if spec is None:
        raise SparsemilError(
            f"model: {type(model).__name__} is not a registered MIL model "
            "(sparsemil.mil.registry.MODELS); build it with build_mil_model"
        )
    return spec


def require_attention(model: Any) -> None:
    """Raise a one-line :class:`SparsemilError` when ``model`` (a registered model) returns no
    per-instance attention (:attr:`ModelSpec.returns_attention`); models the registry does
    not know pass (their ``forward`` decides)."""
    spec = spec_of(model)
    if spec is not None and not spec.returns_attention:
        others = ", ".join(s.name for s in MODELS.values() if s.returns_attention)
        raise SparsemilError(
            f"model {spec.name} ({spec.display_name}) has no attention: its forward returns "
            f"no per-instance attention (no return_att), so there is no attention heatmap or "
            f"localisation for it; use a model with attention ({others})"
        )


def model_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword inputs of ``model``'s ``forward``/``predict``/``compute_loss`` from a batch.

    ``mask`` goes to every model that takes one (DTFD-MIL needs it even without padding);
    ``coords`` when present and taken (:class:`~sparsemil.mil.registry.ModelSpec`). A model
    that cannot take padded batches (TransMIL: no mask) never gets one --
    :func:`~sparsemil.train.trainer.check_batch_support` rejects that up front.
    """
    spec = registered_spec(model)
    kwargs: dict[str, Any] = {}
    if spec.accepts_mask:
        kwargs["mask"] = batch["mask"]
    if "coords" in batch and spec.accepts_coords:
        kwargs["coords"] = batch["coords"]
    return kwargs
