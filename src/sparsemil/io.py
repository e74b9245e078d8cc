"""Output helpers: atomic writes, strict JSON, and the one safetensors + JSON checkpoint writer.

Every file is written to a temporary sibling, then ``os.replace``-d onto its name, so a crash or
a validation error never leaves a half-written output behind. Weights are stored as
safetensors with JSON metadata under one key per kind of checkpoint; nothing is pickled.
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


def json_default(obj: Any) -> Any:
    """``default=`` hook of :func:`json.dumps` for arrays, numpy scalars and paths."""
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
    obj = json.loads(json.dumps(obj, default=json_default))
    text = json.dumps(_clean_nonfinite(obj), indent=indent, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def state_tensors(model: Any) -> dict[str, Any]:
    """Contiguous CPU copies of ``model.state_dict()``'s tensors, as a plain model holds them.

    Each tensor is cloned, so tied weights (two names, one storage) save as two entries
    instead of safetensors' shared-storage error; ``load_state_dict`` restores the tie.
    A weight that carries ``torch.nn.utils.prune`` hooks (``<name>_orig`` and ``<name>_mask``
    in the state dict) is folded into ``<name> = <name>_orig * <name>_mask``, so the file
    loads into the same architecture without hooks and stores no mask.
    """
    import torch

    out = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    for key, folded in _folded_pruning_weights(model).items():
        out.pop(f"{key}_orig", None)
        out.pop(f"{key}_mask", None)
        out[key] = folded
    return out


def _folded_pruning_weights(model: Any) -> dict[str, Any]:
    """``{qualified name: orig * mask}`` of every weight reparametrised by
    ``torch.nn.utils.prune`` (empty for a model without such hooks)."""
    from torch.nn.utils import prune as torch_prune

    folded = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for hook in module._forward_pre_hooks.values():
            if not isinstance(hook, torch_prune.BasePruningMethod):
                continue
            name = hook._tensor_name
            orig = getattr(module, f"{name}_orig", None)
            mask = getattr(module, f"{name}_mask", None)
            if orig is None or mask is None:
                continue
            key = f"{prefix}.{name}" if prefix else name
            folded[key] = (orig.detach() * mask.to(orig.dtype)).to("cpu").contiguous()
    return folded


def tied_names(model: Any) -> dict[str, str]:
    """``{name: first name}`` for every ``state_dict`` entry that is the same tensor (same
    storage, offset, shape and stride) as an earlier entry: tied weights."""
    import torch

    first: dict[tuple, str] = {}
    aliases = {}
    for key, v in model.state_dict(keep_vars=True).items():
        if not isinstance(v, torch.Tensor) or v.numel() == 0:
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Any], meta_key: str, meta: Any
) -> Path:
    """Write ``tensors`` and the JSON ``meta`` (under metadata key ``meta_key``) atomically.

    Extra string metadata keys can be passed as ``meta`` being a ``dict`` of ``{key: obj}``
    through repeated keys in ``tensors``' metadata; here one key is enough for every caller.
    """
    from safetensors.torch import save_file

    text = json.dumps(meta, default=json_default)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={meta_key: text})
    return Path(path)


def read_safetensors_meta(path: str | os.PathLike[str], meta_key: str) -> dict[str, Any] | None:
    """The JSON metadata ``meta_key`` of a safetensors file, or ``None`` if the key is absent.

    Raises:
        SparsemilError: the file is missing, not safetensors, or the metadata is not JSON.
    """
    from safetensors import safe_open

    from sparsemil.errors import SparsemilError

    path = Path(path)
    if not path.is_file():
        raise SparsemilError(f"checkpoint {path}: file not found; pass a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(meta_key)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SparsemilError(
            f"checkpoint {path}: not a readable safetensors file ({first})"
        ) from None
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise SparsemilError(f"checkpoint {path}: metadata is not valid JSON ({err})") from None


def shared_roots() -> list[Path]:
    """Where the project's shared reference folder may be, in order: ``$SPARSEMIL_SHARED``,
    ``../shared`` next to the working folder, ``../shared`` next to this source checkout
    (``data/mil``: Fox and Tiger; ``data/wsi``: the demo slide)."""
    roots = []
    env = os.environ.get("SPARSEMIL_SHARED")
    if env:
        roots.append(Path(env))
    roots.append(Path.cwd().parent / "shared")
    roots.append(Path(__file__).resolve().parents[2].parent / "shared")
    return roots
