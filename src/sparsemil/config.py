"""The one configuration system: typed dataclasses read from YAML/JSON, flags override keys.

A configuration is a dataclass whose **signature is the schema** (the Lightning-CLI idea):

- :func:`from_mapping` builds it from a mapping, coercing each value by the field's annotation
  (``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``dict[...]``, ``X | None`` and nested
  config dataclasses, which become nested sections such as ``limit:`` or ``mil:``); an unknown
  key raises :class:`~sparsemil.errors.SparsemilError` naming the nearest valid key;
- :func:`load_mapping` reads a YAML (``.yaml``/``.yml``) or JSON file into a mapping;
- :func:`override` applies command-line values (``None`` = not given) on top of a config;
- every config dataclass may define ``validate(self, where: str) -> None`` that raises
  :class:`SparsemilError` naming the field; it runs after every build and override;
- a class attribute ``RENAMED = {old: (new, why)}`` turns an old key into an error that names
  its new name.

Nothing is registered at import time: a section exists because a field of that type exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sparsemil.errors import SparsemilError, suggest

T = TypeVar("T")


def field_names(cls: type) -> list[str]:
    """The keys a config dataclass accepts (its ``init`` fields)."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; errors name ``where`` and ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except SparsemilError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise SparsemilError(f"{where}: key {key!r} has invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_mapping(tp, {} if value is None else value, f"{where} [{key}]")
    if origin is list or tp is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise SparsemilError(f"{where}: key {key!r} must be a list, got {value!r}")
        return [_coerce(v, inner, key, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise SparsemilError(f"{where}: key {key!r} must be a mapping, got {value!r}")
        return dict(value)
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


def _unknown_key(cls: type, key: str, names: list[str], where: str) -> SparsemilError:
    """The error for ``key``: a renamed key names its new name (``cls.RENAMED``), any other
    the nearest valid key."""
    renamed = getattr(cls, "RENAMED", {}).get(key)
    if renamed:
        return SparsemilError(f"{where}: key {key!r} is now {renamed[0]!r} ({renamed[1]})")
    return SparsemilError(f"{where}: unknown key {key!r}{suggest(key, names)}")


def _validate(obj: Any, where: str) -> None:
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(where)


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build and validate config dataclass ``cls`` from ``data``.

    Args:
        cls: a dataclass; its annotations are the schema.
        data: the keys (``None`` = all defaults).
        where: the source named in errors, e.g. ``"config run.yaml"``.

    Raises:
        SparsemilError: not a mapping, an unknown key (with the nearest valid key), a value
            of the wrong type, or a failed ``validate``.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SparsemilError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in names:
            raise _unknown_key(cls, key, names, where)
        kwargs[key] = _coerce(value, hints[key], key, where)
    obj = cls(**kwargs)
    _validate(obj, where)
    return obj


def to_mapping(obj: Any) -> dict[str, Any]:
    """A JSON-able dict of a config (nested sections as dicts) that :func:`from_mapping` reads."""
    return dataclasses.asdict(obj)


def override(obj: T, where: str = "command line", **values: Any) -> T:
    """A copy of config ``obj`` with every value that is not ``None`` replacing its key.

    Values are coerced by annotation like file keys, and the result is validated.

    Raises:
        SparsemilError: an unknown key, a wrong type, or a failed ``validate``.
    """
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return obj
    hints = typing.get_type_hints(type(obj))
    names = field_names(type(obj))
    updates = {}
    for key, value in given.items():
        if key not in names:
            raise _unknown_key(type(obj), key, names, where)
        updates[key] = _coerce(value, hints[key], key, where)
    new = dataclasses.replace(obj, **updates)
    _validate(new, where)
    return new


def load_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file into a mapping (an empty file is ``{}``).

    Raises:
        SparsemilError: the file is missing, unparsable, or its top level is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise SparsemilError(f"config {path}: file not found; pass a YAML or JSON file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - YAML/JSON parse errors of every kind
        first = " ".join(str(err).split()) or type(err).__name__
        raise SparsemilError(
            f"config {path}: invalid YAML/JSON ({first}); fix the syntax"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SparsemilError(f"config {path}: the top level must be a mapping of keys")
    return dict(raw)


def load(cls: type[T], path: str | os.PathLike[str], path_keys: Sequence[str] = ()) -> T:
    """Read config ``cls`` from a YAML/JSON file.

    Args:
        cls: the config dataclass.
        path: the file.
        path_keys: top-level string keys holding paths; a relative one that exists next to the
            config file is resolved against the config's folder.
    """
    path = Path(path)
    raw = load_mapping(path)
    for key in path_keys:
        value = raw.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            if (path.parent / value).exists():
                raw[key] = str(path.parent / value)
    return from_mapping(cls, raw, where=f"config {path}")
