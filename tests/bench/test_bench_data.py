"""Smoke of the data-loading benchmark: every row measured, written, and its correctness gate able to fail."""
import json

import numpy as np
import pytest

pytest.importorskip("av")
import bench_data  # noqa: E402  (bench/, on sys.path from tests/conftest.py)


def test_smoke_measures_every_mode_and_writes_json_and_table(tmp_path):
    out = tmp_path / "data.json"
    assert bench_data.main(["--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    modes = {(r["mode"], r["backend"]) for r in result["rows"]}
    assert {("sampled", "pyav"), ("random", "pyav"), ("shards", "jpeg"), ("transform", "train 32px")} <= modes
    if result["torchcodec"] == "usable":
        assert {("sampled", "torchcodec"), ("random", "torchcodec")} <= modes
    for r in result["rows"]:
        assert r["frames"] > 0 and r["frames_per_s"] > 0 and len(r["seconds_all"]) == 1
    sampled = next(r for r in result["rows"] if r["mode"] == "sampled")
    assert sampled["frames"] == 6  # 6 s at 1 fps
    assert 0 <= result["jpeg_mean_abs_err"] < 8 and result["video"]["bytes"] > 0
    assert "| shards | jpeg | 6 |" in out.with_suffix(".md").read_text()


def test_a_reader_returning_the_wrong_frame_is_caught_before_timing(tmp_path, monkeypatch):
    real = bench_data.RandomAccessReader.read

    def one_frame_late(self, path, t):
        return real(self, path, t + 0.1)  # the next frame at 10 fps

    monkeypatch.setattr(bench_data.RandomAccessReader, "read", one_frame_late)
    with pytest.raises(AssertionError):
        bench_data.run(64, 48, 6.0, 10, 10, n_random=6, img_size=32, repeats=1, workdir=tmp_path)


def test_bad_sizes_are_refused(capsys):
    for argv in (["--width", "63"], ["--height", "8"], ["--seconds", "1"]):
        with pytest.raises(SystemExit):
            bench_data.main(argv)
    assert "even and at least 16" in capsys.readouterr().err


def test_synthetic_video_is_what_was_asked(tmp_path):
    path = bench_data.make_video(tmp_path / "v.mp4", 64, 48, 3.0, 10, 10)
    info = bench_data.probe_video(path, "pyav")
    assert (info.width, info.height) == (64, 48) and info.duration_s == pytest.approx(3.0, abs=0.11)
    frames = [f for _, f in bench_data.iter_frames_at(path, [0.0, 1.0, 2.0], "pyav")]
    assert len(frames) == 3 and not np.array_equal(frames[0], frames[1])  # it moves
    assert frames[0].std() > 10  # and is not flat
