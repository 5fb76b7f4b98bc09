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


def _without(module: str, folder) -> dict:
    """An environment in which ``import <module>`` fails as for a package that is not installed (a module of that
    name, first on the path, raising ModuleNotFoundError)."""
    import os

    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))


def test_a_plain_install_without_pyav_says_in_one_line_what_to_install(tmp_path):
    """`mae-fast pretrain` on a machine where PyAV cannot be imported (a fresh user, no demo data yet): exit 2 and
    one line naming the package and the extra, no traceback and no warnings."""
    env = _without("av", tmp_path / "blocked")
    env["MAE_FAST_DATA"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "mae_fast.cli", "pretrain", f"output_dir={tmp_path / 'runs'}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        'mae-fast pretrain: generating the demo videos needs PyAV: pip install "mae_fast[video]"']
    assert not (tmp_path / "runs").exists()


def test_reading_videos_without_pyav_is_one_error_not_every_file_unreadable(tmp_path, monkeypatch, capsys):
    """Videos on disk (e.g. the demo's, already generated) but PyAV gone: one line, not a warning per file."""
    import warnings

    for k in range(3):
        (tmp_path / f"v{k}.mp4").write_bytes(b"not decoded")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ModuleNotFoundError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = cli.main(["pretrain", f"data_source={tmp_path}", f"output_dir={tmp_path / 'runs'}", "progress=false"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.strip().splitlines() == ['mae-fast pretrain: reading video needs PyAV: pip install "mae_fast[video]"']


def test_warnings_are_one_line_and_interrupts_and_unknown_options_have_no_traceback(monkeypatch, capsys):
    """A warning under a command reads `mae-fast <cmd>: warning: <message>` (no source line); Ctrl-C in any command
    is one line and exit 130; an unknown option is named as such, with a suggestion only for a near miss."""
    import warnings

    def warn_then_stop(argv, **kw):
        assert warnings.formatwarning("kept 3 files", RuntimeWarning, "x.py", 9, "return self.dataset[i]") == \
            "mae-fast memory: warning: kept 3 files\n"
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("mae_fast.memory"), "main", warn_then_stop)
    assert cli.main(["memory"]) == 130
    assert capsys.readouterr().err == "mae-fast memory: interrupted\n"
    assert "return self" in warnings.formatwarning("m", RuntimeWarning, "x.py", 9, "return self")  # put back
    assert cli.main(["pretrain", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mae-fast pretrain: unknown option --bogus;") and "did you mean" not in err
    assert cli.main(["pretrain", "--bach-size", "3"]) == 2
    assert "unknown option --bach-size (did you mean --batch_size?)" in capsys.readouterr().err
