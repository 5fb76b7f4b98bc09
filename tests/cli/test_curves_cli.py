"""Training curves and `mae-fast plot` (train/curves.py): rows in step order after a resume, log scale only for
positive losses, the x axis, labels, runs without rows, very short runs drawn visibly, the file written and the
warning when drawing fails. (Subject: the training package; kept beside the CLI tests it grew from.)"""
from __future__ import annotations

import json
import warnings

import pytest

from mae_fast.training import curves


@pytest.fixture
def figures(monkeypatch):
    saved = []
    monkeypatch.setattr(curves, "_save", lambda plt, fig, out: saved.append((fig, out)))
    return saved


def _run(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"step": s, "images_seen": 24 * s, "loss": 1.0 / s, "lr": 1e-3, "images_per_s": 50.0, "mfu": 0.2}
        for s in (1, 2, 3)]


def test_rows_logged_after_a_resume_at_another_interval_come_back_in_step_order(tmp_path):
    """Logged 10-40, resumed from step 20 logging every 5: steps 25 and 35 are new and belong between the old
    ones; 30 is the resumed run's."""
    first = [{"step": s, "loss": 1.0} for s in (10, 20, 30, 40)]
    resumed = [{"step": s, "loss": 2.0} for s in (25, 30, 35)]
    _run(tmp_path / "run", first + resumed)
    got = curves.read_metrics(tmp_path / "run")
    assert [(r["step"], r["loss"]) for r in got] == [(10, 1.0), (20, 1.0), (25, 2.0), (30, 2.0), (35, 2.0),
                                                     (40, 1.0)]


def test_loss_panel_is_log_scaled_only_when_every_loss_is_positive(figures, tmp_path):
    curves.plot_pretrain({"a": ROWS}, tmp_path / "a.png")
    curves.plot_pretrain({"a": ROWS, "b": [dict(ROWS[0], loss=0.0), ROWS[1]]}, tmp_path / "b.png")
    (fig_a, _), (fig_b, _) = figures
    assert fig_a.axes[0].get_yscale() == "log" and fig_b.axes[0].get_yscale() == "linear"
    assert fig_a.axes[1].get_yscale() == "linear"  # the learning rate is never log-scaled


def test_plot_command_x_axis_images_seen(figures, tmp_path, capsys):
    run = _run(tmp_path / "run", ROWS)
    assert curves.main([str(run), "--x", "images_seen"]) == 0
    (fig, out), = figures
    assert out == run / "curves.png" and capsys.readouterr().out.strip() == str(run / "curves.png")
    for ax in fig.axes:
        assert ax.get_xlabel() == "images seen"
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [24, 48, 72]


def test_a_metrics_file_is_a_run_labelled_by_its_directory_and_drawn_beside_it(figures, tmp_path):
    run = _run(tmp_path / "myrun", ROWS)
    out = curves.plot_runs([run / "metrics.jsonl"])
    assert out == run / "curves.png" and figures[0][1] == out
    assert [t.get_text() for t in figures[0][0].axes[0].get_legend().get_texts()] == ["myrun"]


def test_runs_with_the_same_name_are_labelled_by_their_paths(figures, tmp_path):
    a, b = _run(tmp_path / "x" / "run", ROWS), _run(tmp_path / "y" / "run", ROWS[:2])
    curves.plot_runs([a, b], tmp_path / "both.png")
    assert [t.get_text() for t in figures[0][0].axes[0].get_legend().get_texts()] == [str(a), str(b)]


def test_finetune_runs_overlay_one_without_a_finished_epoch(figures, tmp_path):
    hist = [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.2, "top1": 40.0, "top5": 80.0}]
    for name, h in (("done", hist), ("started", [])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"history": h}))
    out = curves.plot_runs([tmp_path / "done", tmp_path / "started"])
    assert out == tmp_path / "done" / "curves.png" and len(figures) == 1


def test_draw_or_warn_warns_for_a_run_with_results_and_stays_quiet_without(tmp_path):
    def fail():
        raise OSError("disk full")

    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "results.json").write_text("{}")
    with pytest.warns(RuntimeWarning, match="training curves not drawn: OSError: disk full"):
        assert curves.draw_or_warn(tmp_path / "ft", fail) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert curves.draw_or_warn(tmp_path, fail) is None
        assert curves.draw_or_warn(tmp_path, lambda: tmp_path / "c.png") == str(tmp_path / "c.png")


def test_a_single_logged_row_or_epoch_is_drawn_visibly(figures, tmp_path):
    row = {"step": 5, "images_seen": 40, "loss": 0.5, "lr": 1e-3, "images_per_s": 9.0, "mfu": 0.1, "data_wait": 0.2}
    curves.plot_pretrain({"one": [row]}, tmp_path / "p.png")
    curves.plot_finetune({"one": [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "top1": 50.0, "top5": 90.0}]},
                         tmp_path / "f.png")
    lines = [ln for fig, _ in figures for ax in fig.axes for ln in ax.get_lines()]
    assert len(lines) == 5 + 4
    assert all(ln.get_marker() not in (None, "None", "") for ln in lines)  # a line through one point shows nothing


def test_a_longer_run_is_drawn_as_plain_lines(figures, tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    curves.plot_pretrain({"a": rows}, tmp_path / "p.png")
    assert [ln.get_marker() for ln in figures[0][0].axes[0].get_lines()] == ["None"]


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
