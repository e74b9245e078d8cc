"""The ``sparsemil`` command line (Typer). Heavy imports happen inside commands."""
