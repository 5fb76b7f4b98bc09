"""Unreadable or too-short data sources: shards, streams and videos give clear errors and keep what exists."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from mae_fast.data import build_pretrain_dataset
from mae_fast.data.samplers import StreamBatches
from mae_fast.data.shards import ShardDataset, write_shards


def write_video(path: Path, n_frames: int, fps: int = 8):
    av = pytest.importorskip("av")  # noqa: F841
    from mae_fast.data import demo

    rng = np.random.default_rng(n_frames)
    frames = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n_frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    demo.encode_mp4(frames, path, fps, demo.pick_codec())


def test_write_shards_with_a_bad_source_keeps_the_existing_shards(tmp_path, write_pngs):
    """Before: with overwrite=True the old shards were deleted before the source was even checked."""
    write_pngs(tmp_path / "imgs", 4)
    out = tmp_path / "shards"
    write_shards(tmp_path / "imgs", out, maxcount=2)
    before = sorted(p.name for p in out.glob("*.tar"))
    assert before == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_shards(tmp_path / "imgz", out, overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos or images found under .*empty"):
        write_shards(tmp_path / "empty", out, overwrite=True)
    with pytest.raises(ValueError, match="hours applies to video sources"):
        write_shards(tmp_path / "imgs", out, overwrite=True, hours=1.0)
    assert sorted(p.name for p in out.glob("*.tar")) == before
    assert sum(1 for _ in ShardDataset(out, shuffle_buffer=0)) == 4


def test_write_shards_of_unreadable_videos_says_so_and_keeps_the_shards(tmp_path, write_pngs):
    """Before: 'the videos are shorter than one sample period' (they were unreadable), old shards gone."""
    write_pngs(tmp_path / "imgs", 2)
    out = tmp_path / "shards"
    write_shards(tmp_path / "imgs", out)
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "broken.mp4").write_bytes(b"\x00" * 2000)
    with pytest.warns(RuntimeWarning, match="skipping unreadable video"):
        with pytest.raises(RuntimeError, match="none of the 1 videos under .*vids could be read"):
            write_shards(tmp_path / "vids", out, overwrite=True)
    assert (out / "shard-000000.tar").exists()


def test_shards_cli_bad_source_is_one_line_exit_2(tmp_path, capsys):
    from mae_fast.data.shards import main

    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"data source '{tmp_path / 'nope'}' does not exist" in err and "Traceback" not in err


def test_stream_with_no_readable_sample_names_the_source(tmp_path, write_pngs):
    write_pngs(tmp_path / "imgs", 4)
    write_shards(tmp_path / "imgs", tmp_path / "shards")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.tar").write_bytes((tmp_path / "shards" / "shard-000000.tar").read_bytes()[:700])
    ds = ShardDataset(bad, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning, match="skipping"):
        with pytest.raises(RuntimeError, match=f"no full micro-batch of 2 in epoch 0 from {bad}; unreadable: .*a.tar"):
            next(iter(StreamBatches(ds, 2, 0, False)))


def test_video_shorter_than_one_sample_is_left_out_not_called_unreadable(tmp_path):
    """Before: a 0.5 s video at fps=1 was 'skipping unreadable ...: IndexError: list index out of range'."""
    write_video(tmp_path / "vids" / "long.mp4", 40)   # 5 s at 8 fps
    write_video(tmp_path / "vids" / "short.mp4", 4)   # 0.5 s: no 1 fps sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_pretrain_dataset(tmp_path / "vids", img_size=16, fps=1.0)
    assert len(ds) == 5 and ds.skipped == [] and ds.record["skipped"] == []
    assert [Path(e["file"]).name for e in ds.record["files"]] == ["long.mp4"]
    assert ds.record["n_videos_available"] == 2
    write_video(tmp_path / "only" / "short.mp4", 4)
    with pytest.raises(ValueError, match=r"shorter than one sample period \(1 s\): .*short.mp4 \(0.5 s\)"):
        build_pretrain_dataset(tmp_path / "only", img_size=16, fps=1.0)
