"""The `mae-fast` command: usage and exit codes, the arguments and mode each subcommand receives, and a reader
that goes away (`mae-fast ... | head`)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from mae_fast import cli


def test_no_command_is_a_usage_error_and_help_is_not(capsys):
    """No arguments: the usage and exit 2 (nothing was asked); -h / --help: the usage and exit 0."""
    assert cli.main([]) == 2
    assert "usage: mae-fast <command>" in capsys.readouterr().out
    for flag in ("-h", "--help"):
        assert cli.main([flag]) == 0
        out = capsys.readouterr().out
        assert "usage: mae-fast <command>" in out and all(f"  {name} " in out for name in cli.COMMANDS)


def test_unknown_command_is_exit_2_on_stderr(capsys):
    assert cli.main(["pretrian", "steps=1"]) == 2
    out, err = capsys.readouterr()
    assert "unknown command 'pretrian'" in err and out == ""


@pytest.mark.parametrize("command, module, kwargs", [
    ("pretrain", "mae_fast.training.pretrain", {}),
    ("finetune", "mae_fast.training.finetune", {"mode": "finetune"}),
    ("linprobe", "mae_fast.training.finetune", {"mode": "linprobe"}),
    ("plot", "mae_fast.training.curves", {}),
    ("memory", "mae_fast.memory", {}),
    ("info", "mae_fast.info", {}),
])
def test_each_subcommand_gets_the_rest_of_the_line_its_mode_and_gives_its_exit_code(monkeypatch, command, module,
                                                                                    kwargs):
    seen = []

    def fake_main(argv, **kw):
        seen.append((argv, kw))
        return 3

    monkeypatch.setattr(importlib.import_module(module), "main", fake_main)
    assert cli.main([command, "a=1", "--b", "c"]) == 3
    assert seen == [(["a=1", "--b", "c"], kwargs)]
    monkeypatch.setattr(importlib.import_module(module), "main", lambda argv, **kw: None)
    assert cli.main([command]) == 0


@pytest.mark.parametrize("argv", [["pretrain", "--help"], ["info"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(argv):
    """`mae-fast ... | head`: when the pipe's reader has gone, the command stops with the shell's SIGPIPE status
    and no traceback (here the reader is gone before the command writes, so the write surely fails)."""
    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err[-2000:]
