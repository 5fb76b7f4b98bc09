"""Training curves: metrics.jsonl read as a killed-and-resumed run leaves it, the panels drawn from exactly
those rows, several runs overlaid, finetuning histories, and clear errors for what is not a run."""
from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from mae_fast.training.curves import main, plot_finetune, plot_pretrain, plot_runs, read_metrics


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
