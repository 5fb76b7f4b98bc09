"""Training curves and `mae-fast plot` (training/curves.py): metrics.jsonl read as a killed-and-resumed run leaves it
(rows in step order), the panels drawn from exactly those rows (log scale only for positive losses, the x axis,
labels, very short runs drawn visibly), several runs overlaid, finetuning histories, and clear errors and warnings
for what is not a run."""
from __future__ import annotations

import json
import random
import warnings

import pytest
from PIL import Image

from mae_fast.training import curves
from mae_fast.training.curves import main, plot_finetune, plot_pretrain, plot_runs, read_metrics

# this file tests the curves themselves; tests/train/conftest.py stubs draw_or_warn for the other training tests
pytestmark = pytest.mark.curves


def _rows(steps, seed):
    rng = random.Random(seed)
    return [{"step": s, "images_seen": 24 * s, "loss": 1.0 / (1 + s) + rng.random() * 0.01, "lr": rng.random() * 1e-3,
             "images_per_s": 100 + rng.random() * 50, "mfu": rng.random() * 0.5, "data_wait": rng.random() * 0.2}
            for s in steps]


def _write(run, rows, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resumed_run_keeps_the_newer_rows_and_skips_a_cut_line(tmp_path):
    first, after_resume = _rows([10, 20, 30, 40], 1), _rows([30, 40, 50], 2)
    _write(tmp_path / "run", first + after_resume, tail='{"step": 60, "loss": 0.')  # killed mid-line
    got = read_metrics(tmp_path / "run")
    assert [r["step"] for r in got] == [10, 20, 30, 40, 50]
    assert got[2] == after_resume[0] and got[3] == after_resume[1] and got[0] == first[0]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "nowhere")


def test_pretrain_panels_draw_exactly_the_rows(tmp_path):
    a, b = _rows(range(5, 105, 5), 3), _rows(range(7, 77, 7), 4)
    b[3]["mfu"] = None  # a CPU without a measured peak logs no MFU at some steps
    drawn = plot_pretrain({"a": a, "b": b}, tmp_path / "c.png", x="images_seen")
    assert drawn["loss"]["a"] == ([r["images_seen"] for r in a], [r["loss"] for r in a])
    assert drawn["MFU and data wait (%)"]["b"][1] == [100 * r["mfu"] for r in b if r["mfu"] is not None]
    assert drawn["data wait (%)"]["a"][1] == pytest.approx([100 * r["data_wait"] for r in a])
    assert drawn["learning rate"]["b"][0] == [r["images_seen"] for r in b]
    assert Image.open(tmp_path / "c.png").size[0] > 500
    with pytest.raises(ValueError, match="step or images_seen"):
        plot_pretrain({"a": a}, tmp_path / "d.png", x="epoch")


def test_finetune_histories_and_the_command(tmp_path, capsys):
    hist = [{"epoch": e, "train_loss": 2.0 - 0.1 * e, "val_loss": 2.1 - 0.05 * e, "top1": 10.0 + e, "top5": 40.0 + e}
            for e in range(4)]
    drawn = plot_finetune({"probe": hist}, tmp_path / "f.png")
    assert drawn["accuracy (%)"]["probe top1"] == ([0, 1, 2, 3], [10.0, 11.0, 12.0, 13.0])
    assert drawn["loss"]["probe val_loss"][1] == [h["val_loss"] for h in hist]
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "results.json").write_text(json.dumps({"history": hist}))
    assert main([str(tmp_path / "ft")]) == 0 and (tmp_path / "ft" / "curves.png").is_file()
    _write(tmp_path / "pre", _rows([1, 2, 3], 5))
    _write(tmp_path / "other" / "pre", _rows([1, 2], 6))  # same name: labelled by path
    out = plot_runs([tmp_path / "pre", tmp_path / "other" / "pre"], tmp_path / "two.png")
    assert out == tmp_path / "two.png" and out.is_file()
    capsys.readouterr()
    assert main([str(tmp_path / "pre"), str(tmp_path / "ft")]) == 2  # pretraining and finetuning mixed
    assert "not both" in capsys.readouterr().err
    assert main([str(tmp_path / "empty")]) == 2
    assert "neither a pretraining run" in capsys.readouterr().err


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
