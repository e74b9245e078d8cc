"""``sparsemil wsi`` sub-commands."""
# NOTE TO DEVELOPERS: read /work/main/CONTRIBUTING.md (rules + cross-module API) before editing.

from __future__ import annotations

import typer

app = typer.Typer(help="wsi commands.", no_args_is_help=True)
