"""``sparsemil mil`` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="mil commands.", no_args_is_help=True)
