"""Every ``sparsemil ...`` command line in README.md and docs/ parses with the real CLI.

Parsing goes through the Typer/click command objects (``make_context``): unknown options,
missing required options and values of the wrong type fail, nothing is executed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from sparsemil.cli.main import app

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _command_lines() -> list[tuple[str, str]]:
    """``(where, command)`` for each full ``sparsemil <group> <command> ...`` line."""
    found = []
    for path in DOCS:
        text = path.read_text()
        # join shell continuation lines
        text = re.sub(r"\\\n\s*", " ", text)
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in re.finditer(r"(?:^|`|\s)(sparsemil (?:mil|prune|wsi|demo)\b[^`#\n]*)", line):
                cmd = m.group(1).strip()
                if "|" in cmd or "..." in cmd or "${" in cmd:
                    continue  # a synopsis or a placeholder for more options, not one command
                found.append((f"{path.relative_to(REPO)}:{lineno}", cmd))
    return found


COMMANDS = _command_lines()


def _parse(argv: list[str]) -> None:
    cmd = typer.main.get_command(app)
    names = ["sparsemil"]
    rest = list(argv)
    while rest and hasattr(cmd, "commands") and rest[0] in cmd.commands:
        names.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    assert not hasattr(cmd, "commands") or not rest, f"unknown command in {argv}"
    if hasattr(cmd, "commands") or not rest:
        return  # a group, or a command named in prose (`sparsemil prune mil`): it exists
    ctx = cmd.make_context(" ".join(names), rest)
    ctx.close()


def test_docs_hold_commands() -> None:
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where: str, command: str) -> None:
    argv = shlex.split(command)[1:]
    try:
        _parse(argv)
    except Exception as err:  # click usage errors
        pytest.fail(f"{where}: `{command}` does not parse: {err}")
