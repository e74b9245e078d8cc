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


def test_library_errors_name_fields_and_the_cli_adds_the_flag(tmp_path, capsys):
    """A library message names the config field; the CLI appends that command's flag."""
    from sparsemil.cli.main import main as cli_main
    from sparsemil.cli.main import with_flags

    assert with_flags("config c.yaml: key 'data_dir' must be a folder", ["mil", "cv"]).endswith(
        "(flag: --data-dir)"
    )
    assert with_flags("key 'limit.hessian_samples' must be >= 1", ["prune", "run"]).endswith(
        "(flag: --hessian-samples)"
    )
    assert with_flags("key 'lanczos_iter' must be >= 1", ["prune", "run"]) == (
        "key 'lanczos_iter' must be >= 1"
    )  # a config-only key gets no flag
    cfg = tmp_path / "c.yaml"
    cfg.write_text("limit:\n  hessian_samples: 0\n")
    rc = cli_main(["prune", "run", "--config", str(cfg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "limit.hessian_samples" in err and "--hessian-samples" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
