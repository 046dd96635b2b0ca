"""The ``mossformer2`` dispatcher: every subcommand is present and user errors become one-line messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mossformer2.cli import SUBCOMMANDS, build_parser, main


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "separate" in capsys.readouterr().out


def test_user_error_is_one_line_with_exit_code_1(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert main(["info", "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mossformer2 info: error:") and "Traceback" not in err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mossformer2", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("mossformer2 ")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: mossformer2" in capsys.readouterr().out


def test_warnings_are_one_line_messages_and_the_format_is_restored():
    """A command's warnings read `mossformer2 CMD: warning: ...`, without source path and code line."""
    script = (
        "import warnings, mossformer2.cli.info as info\n"
        "from mossformer2.cli import main\n"
        "info.run = lambda args: warnings.warn('outputs over full scale')\n"
        "main(['info'])\n"
        "warnings.warn('after the command')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == "mossformer2 info: warning: outputs over full scale"
    assert "UserWarning: after the command" in out.stderr  # Python's own format again outside the command
