"""``sparsemil prune`` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="prune commands.", no_args_is_help=True)
