"""Conventions of the test suite itself (issue: tests share fixtures and assert messages)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_pytest_raises_names_its_message() -> None:
    """A ``pytest.raises`` without ``match=`` passes on the wrong error; every one needs it."""
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "raises"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "pytest"
                and not any(k.arg == "match" for k in node.keywords)
            ):
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, "pytest.raises without match=: " + ", ".join(bad)


def test_tests_write_h5_with_the_library_writer() -> None:
    """Test h5 files come from the library's own CLAM/Trident writer, not hand-rolled h5py.

    Files that are broken on purpose (a missing dataset, a wrong shape, ...) are written by
    hand and marked ``# malformed on purpose``.
    """
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            writes = "h5py.File(" in line and any(m in line for m in ('"w"', "'w'", '"a"'))
            if writes and "malformed on purpose" not in line:
                bad.append(f"{path.name}:{lineno}")
    assert not bad, "tests writing h5 by hand: " + ", ".join(bad)
