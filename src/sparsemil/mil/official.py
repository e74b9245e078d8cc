"""Bridge to the official MMIL-Transformer code (hustvl/MMIL-Transformer).

- :func:`official_config_to_kwargs`: official argparse names -> MMILTransformer kwargs.
- :func:`convert_official_state_dict`: official state_dict keys/shapes -> ours; every
  missing key, unexpected key and shape mismatch is reported in one SparsemilError.
- :func:`load_official_checkpoint`: read an official ``.pt`` checkpoint safely
  (``torch.load(weights_only=True)``), or a ``.safetensors`` file.

Official key -> ours (``i`` = layer):

====================================================================  =========================================
``fc1.{weight,bias}`` (applied only when ``type == "camelyon16"``)     ``proj.{weight,bias}``
``fc2.{weight,bias}``                                                  ``classifier.{weight,bias}``
``msgcls_token`` (1, 1, 1, D)                                          ``msgcls_token`` (D,)
``msg_tokens`` (1, 1, 1, D), one vector copied ``num_msg`` times       ``msg_tokens`` (num_msg, D)
``absolute_pos_embed`` (1, 1, D)                                       ``absolute_pos_embed`` (D,)
``layers.i.GroupsAttenLayer.AttenLayer.attn.to_qkv.weight``           ``layers.i.subbag_attn.to_qkv.weight``
``layers.i.GroupsAttenLayer.AttenLayer.attn.to_out.0.{weight,bias}``  ``layers.i.subbag_attn.to_out.{weight,bias}``
``layers.i.GroupsMSGAttenLayer.AttenLayer.attn.*``                    ``layers.i.msg_attn.*`` (same suffixes)
====================================================================  =========================================
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparsemil.errors import SparsemilError
from sparsemil.mil.grouping import OFFICIAL_MODES

#: Official config keys that :func:`official_config_to_kwargs` needs.
REQUIRED_CONFIG_KEYS: tuple[str, ...] = (
    "type",
    "mode",
    "in_chans",
    "num_subbags",
    "embed_dim",
    "num_msg",
    "ape",
    "n_classes",
    "num_layers",
)
#: The official code's fixed attention layout.
OFFICIAL_HEADS, OFFICIAL_DIM_HEAD = 8, 64

_SUB = {"GroupsAttenLayer": "subbag_attn", "GroupsMSGAttenLayer": "msg_attn"}
_ATT = {
    "to_qkv.weight": "to_qkv.weight",
    "to_out.0.weight": "to_out.weight",
    "to_out.0.bias": "to_out.bias",
}


def parse_bool(value: Any, name: str) -> bool:
    """Parse a boolean correctly ("False", "0", "no" are False).

    The official argparse uses ``type=bool``, under which ``--ape False`` is True.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes", "y", "on"):
            return True
        if v in ("false", "0", "no", "n", "off"):
            return False
    raise SparsemilError(f"config field '{name}' must be a boolean (got {value!r})")


def official_config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """MMILTransformer keyword arguments for an official config (argparse names).

    ``fc1`` is used only for ``type == "camelyon16"`` (``project=True``); otherwise the
    official model feeds features in unprojected, so ``in_chans`` must equal
    ``embed_dim``. ``mode`` maps ``seq``/``random``/``embed``/``coords``/``idx`` to our
    grouping names. Other official keys (``attn`` -- never wired in the official model --,
    ``cls``, ``gm``, paths, seeds) are ignored.
    """
    if not isinstance(config, Mapping):
        raise SparsemilError("official config must be a dict with the official argparse names")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise SparsemilError(f"official config is missing {', '.join(missing)}")
    mode = str(config["mode"])
    if mode not in OFFICIAL_MODES:
        raise SparsemilError(
            f"official config field 'mode' must be one of {', '.join(OFFICIAL_MODES)} (got '{mode}')"
        )
    try:
        ints = {
            k: int(config[k])
            for k in ("in_chans", "num_subbags", "embed_dim", "num_msg", "n_classes", "num_layers")
        }
    except (TypeError, ValueError) as e:
        raise SparsemilError(f"official config: integer field is not an integer ({e})") from None
    project = str(config["type"]) == "camelyon16"
    if not project and ints["in_chans"] != ints["embed_dim"]:
        raise SparsemilError(
            f"official config type '{config['type']}' feeds features in without fc1, so "
            f"in_chans ({ints['in_chans']}) must equal embed_dim ({ints['embed_dim']})"
        )
    return {
        "in_dim": ints["in_chans"],
        "n_classes": ints["n_classes"],
        "embed_dim": ints["embed_dim"],
        "num_subbags": ints["num_subbags"],
        "num_msg": ints["num_msg"],
        "num_layers": ints["num_layers"],
        "grouping": OFFICIAL_MODES[mode],
        "project": project,
        "ape": parse_bool(config["ape"], "ape"),
        "heads": OFFICIAL_HEADS,
        "dim_head": OFFICIAL_DIM_HEAD,
    }


def official_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Official state_dict keys and shapes of the model that ``kwargs`` describes.

    ``fc1`` is always present in an official model (it is built even when unused).
    """
    d, c, k = kwargs["embed_dim"], kwargs["in_dim"], kwargs["n_classes"]
    inner = kwargs.get("heads", OFFICIAL_HEADS) * kwargs.get("dim_head", OFFICIAL_DIM_HEAD)
    shapes: dict[str, tuple[int, ...]] = {
        "fc1.weight": (d, c),
        "fc1.bias": (d,),
        "fc2.weight": (k, d),
        "fc2.bias": (k,),
        "msgcls_token": (1, 1, 1, d),
        "msg_tokens": (1, 1, 1, d),
    }
    if kwargs["ape"]:
        shapes["absolute_pos_embed"] = (1, 1, d)
    for i in range(kwargs["num_layers"]):
        for sub in _SUB:
            base = f"layers.{i}.{sub}.AttenLayer.attn."
            shapes[base + "to_qkv.weight"] = (3 * inner, d)
            shapes[base + "to_out.0.weight"] = (d, inner)
            shapes[base + "to_out.0.bias"] = (d,)
    return shapes


def _our_key(key: str) -> str:
    if key == "fc1.weight" or key == "fc1.bias":
        return "proj." + key.split(".")[1]
    if key.startswith("fc2."):
        return "classifier." + key.split(".")[1]
    if key.startswith("layers."):
        _, i, sub, _, _, rest = key.split(".", 5)
        return f"layers.{i}.{_SUB[sub]}.{_ATT[rest]}"
    return key


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Our state_dict from an official one (after :func:`official_config_to_kwargs`).

    Raises SparsemilError listing every missing key, unexpected key and shape mismatch.
    ``fc1.*`` may be absent when ``project`` is False (it is unused then) and is dropped.
    """
    expected = official_shapes(kwargs)
    optional = set() if kwargs["project"] else {"fc1.weight", "fc1.bias"}
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing))
        if unexpected:
            hint = ""
            if "absolute_pos_embed" in unexpected:
                hint = (
                    " (absolute_pos_embed present although ape is false: the official "
                    "argparse reads '--ape False' as True; set ape: true)"
                )
            parts.append("unexpected keys: " + ", ".join(unexpected) + hint)
        if wrong:
            parts.append("shape mismatches: " + "; ".join(wrong))
        raise SparsemilError("official state_dict does not match the config: " + " | ".join(parts))
    d, m = kwargs["embed_dim"], kwargs["num_msg"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in optional:
            continue
        t = value.detach().clone()
        if key == "msgcls_token" or key == "absolute_pos_embed":
            t = t.reshape(d)
        elif key == "msg_tokens":  # the official model repeats one vector num_msg times
            t = t.reshape(1, d).repeat(m, 1)
        out[_our_key(key)] = t
    return out


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise SparsemilError(
            f"{source}: expected a state_dict (a dict of tensors), got {type(obj).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise SparsemilError(
                f"{source}: entry '{key}' is not a tensor ({type(value).__name__})"
            )
        k = str(key)
        while k.startswith("module."):  # DataParallel / DDP prefix
            k = k[len("module.") :]
        out[k] = value
    return out


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Official state_dict from a checkpoint file.

    ``.pt``/``.pth``: ``torch.load(map_location="cpu", weights_only=True)`` (no arbitrary
    unpickling); a ``state_dict``/``model`` wrapper and ``module.`` prefixes are removed.
    ``.safetensors``: the tensors; a ``state.`` prefix (the reference-case layout) is
    removed and other entries (``input``, ``expected_logits``) are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise SparsemilError(f"{p}: checkpoint file not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(p))
        if any(k.startswith("state.") for k in raw):
            raw = {k[len("state.") :]: v for k, v in raw.items() if k.startswith("state.")}
        return _unwrap(raw, str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or corrupt file
        raise SparsemilError(
            f"{p}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    return _unwrap(obj, str(p))
