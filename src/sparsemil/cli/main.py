"""Entry point of the ``sparsemil`` console script.

Sub-commands live in one module each (``mil``, ``prune``, ``wsi``, ``demo``); this module
only assembles them and turns :class:`~sparsemil.errors.SparsemilError` into a one-line
message on stderr with exit status 2 (no traceback).
"""

from __future__ import annotations

import sys

import typer

from sparsemil.cli import demo, mil, prune, wsi
from sparsemil.cli.flags import append_flags, flags_of
from sparsemil.errors import SparsemilError

app = typer.Typer(
    name="sparsemil",
    help="Multi-level MIL for whole-slide images, and how sparse a network can be pruned.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(mil.app, name="mil")
app.add_typer(prune.app, name="prune")
app.add_typer(wsi.app, name="wsi")
app.command("demo")(demo.demo)


def command_flags(argv: list[str] | None) -> dict[str, str]:
    """``{field: --flag}`` of the sub-command named by ``argv`` (its Typer parameters).

    Typer derives each flag from the function parameter, which has the library's field name
    (``data_dir`` -> ``--data-dir``), so this table is read off the commands, never written.
    """
    cmd = typer.main.get_command(app)
    for token in argv or []:
        sub = getattr(cmd, "commands", {}).get(token)
        if sub is None:
            break
        cmd = sub
    return flags_of(cmd)


def with_flags(message: str, argv: list[str] | None) -> str:
    """Library errors name fields (``'data_dir'``, ``limit.hessian_samples``); append the
    command-line flag of each named field that this command has
    (:func:`sparsemil.cli.flags.append_flags`)."""
    return append_flags(message, command_flags(argv if argv is not None else sys.argv[1:]))


def quiet_lightning() -> None:
    """Entry-point console policy: no Lightning banners (GPU/TPU lines, adverts, dataloader
    notes) and no third-party deprecation chatter; warnings and errors still show."""
    import logging
    import warnings

    # Lightning sets its package loggers to INFO on import; the banners come from the
    # rank-zero loggers below them, whose own level wins.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=Warning)


def resume_hint(argv: list[str] | None) -> str:
    """What to say on Ctrl-C: training commands can be resumed."""
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:2] in (["mil", "train"], ["mil", "cv"]):
        return "; rerun the same command with --resume to continue from the last finished epoch"
    if args[:2] == ["mil", "benchmark"]:
        return "; rerun the same command: finished runs are reused"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also used by the console script)."""
    quiet_lightning()
    try:
        rc = app(args=argv, standalone_mode=False)
    except SparsemilError as err:
        print(f"sparsemil: error: {with_flags(str(err), argv)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        name = getattr(err, "filename", None) or ""
        print(f"sparsemil: error: {err.strerror or err}: {name}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsemil: interrupted{resume_hint(argv)}", file=sys.stderr)
        return 130
    except typer.Exit as exc:  # raised by commands that exit early
        return int(exc.exit_code or 0)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    except Exception as exc:  # click usage errors (click is vendored by recent typer)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        if type(exc).__name__ == "Abort":
            return 1
        raise
    return int(rc) if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
