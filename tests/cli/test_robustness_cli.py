"""Command-line edge cases: bad values are one line on stderr and exit code 2, and curves of very short
runs are visible."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mae_fast import info
from mae_fast.training import curves


@pytest.mark.parametrize("argv, msg", [
    (["--model", "mae_vit_demo_patch8", "--img-size", "36"], "must be divisible by patch_size 8"),
    (["--model", "mae_vit_demo_patch8", "--img-size", "0"], "img_size must be positive"),
    (["--model", "mae_vit_demo_patch8", "--mask-ratio", "1.5"], "mask_ratio must be in [0, 1)"),
    (["--model", "mae_vit_nope"], "unknown model 'mae_vit_nope'"),
])
def test_info_bad_model_or_size_is_one_line_and_exit_2(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr(info, "report", lambda: "REPORT")
    assert info.main(argv) == 2
    out, err = capsys.readouterr()
    assert msg in err and "Traceback" not in err and "REPORT" not in out  # nothing printed before the error


def test_info_model_report_at_a_valid_size(capsys, monkeypatch):
    monkeypatch.setattr(info, "report", lambda: "REPORT")
    assert info.main(["--model", "mae_vit_demo_patch8", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("REPORT") and "at 32 px" in out  # 16 patches: 4 visible + cls, all 16 + cls
    assert "encoder  5 tokens" in out and "decoder  17 tokens" in out


def test_python_m_info_exits_with_main_s_code():
    r = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['x', '--model', 'mae_vit_nope']; "
                        "import mae_fast.info as i; i.report = lambda: ''; "
                        "runpy.run_module('mae_fast.info', run_name='__main__', alter_sys=True)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown model" in r.stderr


def _lines_of(monkeypatch):
    saved = []
    monkeypatch.setattr(curves, "_save", lambda plt, fig, out: saved.append(fig))
    return saved


def test_a_single_logged_row_or_epoch_is_drawn_visibly(tmp_path, monkeypatch):
    saved = _lines_of(monkeypatch)
    row = {"step": 5, "images_seen": 40, "loss": 0.5, "lr": 1e-3, "images_per_s": 9.0, "mfu": 0.1, "data_wait": 0.2}
    curves.plot_pretrain({"one": [row]}, tmp_path / "p.png")
    curves.plot_finetune({"one": [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "top1": 50.0, "top5": 90.0}]},
                         tmp_path / "f.png")
    lines = [ln for fig in saved for ax in fig.axes for ln in ax.get_lines()]
    assert len(lines) == 5 + 4
    assert all(ln.get_marker() not in (None, "None", "") for ln in lines)  # a line through one point shows nothing


def test_a_longer_run_is_drawn_as_plain_lines(tmp_path, monkeypatch):
    saved = _lines_of(monkeypatch)
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    curves.plot_pretrain({"a": rows}, tmp_path / "p.png")
    assert [ln.get_marker() for ln in saved[0].axes[0].get_lines()] == ["None"]


@pytest.mark.parametrize("content", ["", '{"step": 1, "lo', '{"loss": 1.0}\n'])
def test_plot_of_a_run_with_no_logged_row_exits_2(tmp_path, capsys, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(content)
    assert curves.main([str(tmp_path / "run")]) == 2
    assert "no metrics logged yet in" in capsys.readouterr().err
    assert not (tmp_path / "run" / "curves.png").exists()


@pytest.mark.parametrize("content, msg", [('{"history": []}', "no epoch finished yet"),
                                          ("[]", "is not a finetuning result")])
def test_plot_of_an_empty_or_odd_results_json_exits_2(tmp_path, capsys, content, msg):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "results.json").write_text(content)
    assert curves.main([str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_plot_overlays_a_run_with_rows_and_one_without(tmp_path):
    for name, rows in (("a", [{"step": s, "loss": 1.0 / s} for s in (1, 2)]), ("b", [])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert curves.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "curves.png").is_file()


@pytest.mark.parametrize("out, written", [("noext", "noext.png"), ("adir", "adir/curves.png")])
def test_plot_prints_the_file_it_wrote(tmp_path, capsys, out, written):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (tmp_path / "adir").mkdir()
    assert curves.main([str(tmp_path / "run"), "--out", str(tmp_path / out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / written) and (tmp_path / written).is_file()


@pytest.mark.parametrize("argv", [["pretrain", "--help"], ["info"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(argv):
    """`mae-fast ... | head`: when the pipe's reader has gone, the command stops with the shell's SIGPIPE status
    and no traceback (here the reader is gone before the command writes, so the write surely fails)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err[-2000:]
