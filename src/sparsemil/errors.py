"""User-facing errors.

Every problem caused by the user's input (a file, a field, a flag) is raised as
:class:`SparsemilError` -- a ``ValueError`` subclass -- with a one-line message that
names the file or field and says how to fix it. The CLI prints it without a traceback
and exits with status 2.
"""

from __future__ import annotations


class SparsemilError(ValueError):
    """A bad input; the message is one line naming the file/field and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def require(cond: bool, message: str) -> None:
    """Raise :class:`SparsemilError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise SparsemilError(message)
