"""The CLI shell: usage errors and user errors exit non-zero with no traceback."""

from __future__ import annotations

import subprocess
import sys

from sparsemil.cli.main import main


def test_unknown_option_is_a_usage_error(capsys):
    rc = main(["mil", "cv", "--bogus"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "No such option" in err and "Traceback" not in err


def test_unknown_command(capsys):
    assert main(["nosuch"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_console_script_exit_status_and_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsemil.cli.main", "prune", "run",
         "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.yaml" in lines[0] and "Traceback" not in proc.stderr
