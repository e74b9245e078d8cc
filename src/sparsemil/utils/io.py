"""Atomic output helpers: write to a temporary sibling, then ``os.replace``.

A crash or a validation error never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    The temporary name keeps ``path``'s suffix so libraries that dispatch on it work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp creates 0600; give the output the usual umask-based mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_nonfinite(obj: Any) -> Any:
    """Replace NaN/Inf floats by None so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_nonfinite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN/Inf become null) to ``path`` atomically."""
    obj = json.loads(json.dumps(obj, default=_json_default))
    text = json.dumps(_clean_nonfinite(obj), indent=indent, allow_nan=False) + "\n"
    return atomic_write_text(path, text)
