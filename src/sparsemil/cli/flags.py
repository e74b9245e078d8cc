"""Library messages name fields (``'data_dir'``, ``limit.hessian_samples``); the CLI appends
the command-line flag of each named field that the command has.

The table of flags is read off the (Typer/click) command itself -- each parameter has the
library's field name (``data_dir`` -> ``--data-dir``) -- never written by hand.
"""

from __future__ import annotations

import re
from typing import Any

_FIELD = re.compile(r"'([A-Za-z_][\w.]*)'|^([a-z_][\w.]*)[ :]")


def flags_of(command: Any) -> dict[str, str]:
    """``{field: --flag}`` of a click command's parameters (their first long option)."""
    flags = {}
    for param in getattr(command, "params", []):
        longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        if param.name and longs:
            flags[param.name] = longs[0]
    if "threads" in flags:  # the config field behind --threads
        flags.setdefault("num_threads", flags["threads"])
    return flags


def append_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` plus ``(flag: --x, --y)`` for each field it names that has a flag."""
    hits = []
    for quoted, leading in _FIELD.findall(message):
        if leading == "config":  # "config FILE: key 'x' ..." names the key, not the file
            continue
        field = (quoted or leading).rsplit(".", 1)[-1]
        flag = flags.get(field)
        if flag and flag not in hits and flag not in message:
            hits.append(flag)
    return f"{message} (flag: {', '.join(hits)})" if hits else message
