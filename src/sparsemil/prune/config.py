"""YAML configuration of the pruning experiments (accepts the official config keys).

``load_prune_config(path) -> PruneConfig``

Top-level keys are the fields of :class:`PruneConfig`. The official keys (``model, dataset,
data_path, batch_size, optim, lr, momentum, weight_decay, epoch, l1, lmbda, regularizer, schedu,
schedumode, milestones, gamma, warm, sparse_epoch, lanczos_iter, lanczos_num``) have the official
meaning; the official files' bookkeeping keys (``init, use_full_data, gpu, criterion, mode,
sparse, file_path, save_model``) are accepted so official configs load unchanged; ``init`` and
``criterion`` are honoured, the others have no effect here (outputs go to ``--out``; the device
is ``device``).

Other modules add nested sections (e.g. ``mil:``) with :func:`register_config_section`; a
section's mapping is parsed into its dataclass with the same checks and stored in
``PruneConfig.sections[name]``. An unknown key anywhere raises
:class:`~sparsemil.errors.SparsemilError` naming the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsemil.errors import SparsemilError

_SECTIONS: dict[str, type] = {}


def register_config_section(name: str, cls: type) -> None:
    """Allow a nested mapping ``name:`` in prune configs, parsed into dataclass ``cls``.

    Registering the same (name, cls) twice is a no-op; a different class for a taken name is an
    error. ``cls`` may define ``validate(self) -> None`` raising ``SparsemilError``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section {name!r}: {cls!r} is not a dataclass")
    if name in {f.name for f in dataclasses.fields(PruneConfig)}:
        raise ValueError(f"config section {name!r} clashes with a PruneConfig field")
    old = _SECTIONS.get(name)
    if old is not None and old is not cls:
        raise ValueError(f"config section {name!r} is already registered to {old.__name__}")
    _SECTIONS[name] = cls


def registered_sections() -> dict[str, type]:
    """The registered section names and their dataclasses."""
    return dict(_SECTIONS)


@dataclass
class PruneConfig:
    """Settings of L1 training, the pruning sweep and the spectrum (official names)."""

    model: str = "fc"
    dataset: str = "digits"
    data_path: str | None = None
    batch_size: int = 128
    optim: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epoch: int = 20
    l1: bool = True
    lmbda: float = 5e-5
    regularizer: str = "L1"
    schedu: bool = False
    schedumode: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [60, 120, 180])
    gamma: float = 0.2
    warm: int = 0
    sparse_epoch: int = 1000
    lanczos_iter: int = 128
    lanczos_num: int = 1
    seed: int = 0
    # --- sparsemil additions
    widths: list[int] | None = None
    subset: int | None = None
    l1_scope: str = "all"
    device: str = "auto"
    eval_batch_size: int = 8192
    actual_criterion: str = "drop_1pt"
    loss_eps: float | None = None
    # --- official bookkeeping keys
    init: str = "kaiming_normal"
    criterion: str = "cross_entropy"
    use_full_data: bool = True
    gpu: int | None = None
    mode: str = "train"
    sparse: bool = True
    file_path: str | None = None
    save_model: bool = True
    # --- registered nested sections (name -> dataclass instance)
    sections: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`SparsemilError` on an out-of-range value."""
        from sparsemil.data.vision import canonical_dataset_name
        from sparsemil.prune.models import INITS, canonical_model_name

        self.model = canonical_model_name(self.model)
        self.dataset = canonical_dataset_name(self.dataset)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _check(self.optim.lower() in ("sgd", "adam"), "optim", "must be 'sgd' or 'adam'")
        self.optim = self.optim.lower()
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.epoch >= 0, "epoch", "must be >= 0")
        _check(self.lmbda >= 0, "lmbda", "must be >= 0")
        _check(self.regularizer in ("L1", "L2"), "regularizer", "must be 'L1' or 'L2'")
        _check(self.schedumode in ("multistep", "cos"), "schedumode", "must be multistep or cos")
        _check(all(m >= 0 for m in self.milestones), "milestones", "must be epochs >= 0")
        _check(self.gamma > 0, "gamma", "must be > 0")
        _check(self.warm >= 0, "warm", "must be >= 0")
        _check(self.sparse_epoch >= 1, "sparse_epoch", "must be >= 1")
        _check(self.lanczos_iter >= 1, "lanczos_iter", "must be >= 1")
        _check(self.lanczos_num >= 1, "lanczos_num", "must be >= 1")
        _check(self.subset is None or self.subset >= 1, "subset", "must be >= 1")
        _check(self.l1_scope in ("all", "weights"), "l1_scope", "must be 'all' or 'weights'")
        _check(self.init in INITS, "init", f"must be one of {', '.join(INITS)}")
        _check(self.criterion == "cross_entropy", "criterion", "only cross_entropy is supported")
        _check(self.loss_eps is None or self.loss_eps > 0, "loss_eps", "must be > 0")
        from sparsemil.prune.sweep import CRITERIA

        _check(
            self.actual_criterion in CRITERIA,
            "actual_criterion",
            f"must be one of {', '.join(CRITERIA)}",
        )
        _check(
            self.device == "auto" or self.device.startswith(("cpu", "cuda", "mps")),
            "device",
            "must be auto, cpu, cuda, cuda:N or mps",
        )
        if self.model == "mlp":
            _check(bool(self.widths), "widths", "the mlp model needs widths, e.g. [256, 128]")

    def resolved_device(self) -> str:
        """``device`` with ``auto`` resolved to ``cuda`` when available, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (sections as nested dicts) that :func:`config_from_dict` reads back."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"
        }
        for name, sec in self.sections.items():
            out[name] = dataclasses.asdict(sec)
        return out


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise SparsemilError(f"config key {key!r}: {msg}")


def _unknown(key: str, valid: list[str], where: str) -> SparsemilError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    return SparsemilError(f"{where}: unknown key {key!r}{hint}")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check/convert ``value`` against a simple annotation (int/float/bool/str/list/Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except SparsemilError:
                continue
        raise SparsemilError(f"{where}: key {key!r} has invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise SparsemilError(f"{where}: key {key!r} must be a list, got {value!r}")
        return [_coerce(v, inner, key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SparsemilError(f"{where}: key {key!r} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SparsemilError(f"{where}: key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise SparsemilError(f"{where}: key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise SparsemilError(f"{where}: key {key!r} must be a string, got {value!r}")
    return value


def dataclass_from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and simple types."""
    if not isinstance(data, Mapping):
        raise SparsemilError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "sections"]
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in names:
            raise _unknown(key, names + list(_SECTIONS) if cls is PruneConfig else names, where)
        kwargs[key] = _coerce(value, hints[key], key, where)
    obj = cls(**kwargs)
    validate: Callable[[], None] | None = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def config_from_dict(data: Mapping[str, Any], where: str = "config") -> PruneConfig:
    """Build a validated :class:`PruneConfig` from a mapping (sections included)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SparsemilError(f"{where}: the top level must be a mapping of keys")
    top = {k: v for k, v in data.items() if str(k) not in _SECTIONS}
    cfg = dataclass_from_mapping(PruneConfig, top, where)
    for name, cls in _SECTIONS.items():
        if name in data:
            sec = data[name] if data[name] is not None else {}
            cfg.sections[name] = dataclass_from_mapping(cls, sec, f"{where} [{name}]")
    return cfg


def load_prune_config(path: str | Path) -> PruneConfig:
    """Read a YAML config file into a validated :class:`PruneConfig`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SparsemilError(f"config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SparsemilError(f"config {path}: invalid YAML ({err})") from None
    return config_from_dict(data or {}, where=f"config {path}")
