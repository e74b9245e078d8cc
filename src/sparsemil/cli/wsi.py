"""``sparsemil wsi`` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="wsi commands.", no_args_is_help=True)
