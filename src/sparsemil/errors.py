"""User-facing errors.

Every problem caused by the user's input (a file, a field, a flag) is raised as
:class:`SparsemilError` -- a ``ValueError`` subclass -- with a one-line message that
names the file or field and says how to fix it. The CLI prints it without a traceback
and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class SparsemilError(ValueError):
    """A bad input; the message is one line naming the file/field and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def require(cond: bool, message: str) -> None:
    """Raise :class:`SparsemilError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise SparsemilError(message)


def suggest(value: str, choices: Iterable[str]) -> str:
    """The "did you mean" tail of an error about ``value`` not being one of ``choices``.

    Returns ``"; did you mean 'x'?"`` for the nearest choice (difflib ratio >= 0.5), else
    ``"; valid: a, b, c"``. The one suggestion helper of the package.
    """
    import difflib

    options = sorted({str(c) for c in choices})
    near = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
    if near:
        return f"; did you mean {near[0]!r}?"
    return f"; valid: {', '.join(options)}"


def resolve_device(device: str | None, field: str = "device") -> str:
    """The torch device string for a requested ``device`` (the one device resolver).

    Args:
        device: ``"auto"``/``None`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"gpu"`` (= ``"cuda"``) or ``"mps"``.
        field: the field named in errors.

    Raises:
        SparsemilError: not a torch device, or CUDA (that index) / MPS asked for where none
            is visible.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = "cuda" if device == "gpu" else str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise SparsemilError(
            f"{field} {device!r}: not a torch device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SparsemilError(f"{field} {device!r}: no CUDA device is visible; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SparsemilError(
            f"{field} {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "use cuda:0 .. cuda:N-1"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SparsemilError(f"{field} {device!r}: MPS is not available here; use cpu")
    return text
