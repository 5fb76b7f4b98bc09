"""Bad inputs a user hits with the data pipeline and the training entry points: each is a clear error naming
the file, folder or key (or is recovered from), before any training starts where it can be."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_fast.data import build_labelled_datasets, build_pretrain_dataset
from mae_fast.data.shards import ShardDataset, write_shards
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.train import config as config_mod
from mae_fast.train.finetune import finetune
from mae_fast.train.pretrain import StreamBatches, pretrain

TINY_MODEL = dict(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny(tmp_path, **kw) -> dict:
    cfg = dict(recipe="demo", name="t", output_dir=str(tmp_path), data_source="synthetic", synthetic_size=16,
               img_size=32, model_kwargs=dict(TINY_MODEL), batch_size=8, steps=2, warmup_steps=0, lr=2e-3,
               checkpoint_every=1, log_every=1, vis_every=0, vis_images=2, progress=False,
               memory_budget_gib=None)
    cfg.update(kw)
    return cfg


def write_pngs(folder: Path, n: int, size=(20, 24)) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_video(path: Path, n_frames: int, fps: int = 8):
    av = pytest.importorskip("av")  # noqa: F841
    from mae_fast.data import demo

    rng = np.random.default_rng(n_frames)
    frames = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n_frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    demo.encode_mp4(frames, path, fps, demo.pick_codec())


# ---------------------------------------------------------------------------------------------- labelled data

def test_labelled_set_without_validation_images_is_a_clear_error(tmp_path):
    """Before: training ran a whole epoch, then evaluate() raised ZeroDivisionError."""
    for c in ("a", "b"):
        write_pngs(tmp_path / "tv" / "train" / c, 3)
    (tmp_path / "tv" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no readable validation images under .*val"):
        build_labelled_datasets(tmp_path / "tv", img_size=16)
    for c in ("a", "b"):  # val classes named otherwise than train's
        write_pngs(tmp_path / "other" / "train" / c, 3)
    write_pngs(tmp_path / "other" / "val" / "c", 2)
    with pytest.raises(FileNotFoundError, match="for the classes of .*train: a, b"):
        build_labelled_datasets(tmp_path / "other", img_size=16)
    for c in ("a", "b"):  # a single folder with one image per class: nothing to hold out
        write_pngs(tmp_path / "single" / c, 1)
    with pytest.raises(FileNotFoundError, match="no validation images can be held out of .*single"):
        build_labelled_datasets(tmp_path / "single", img_size=16)


def test_finetune_cli_reports_missing_validation_images_in_one_line(tmp_path, capsys):
    from mae_fast.train.finetune import main

    for c in ("a", "b"):
        write_pngs(tmp_path / "data" / "train" / c, 3)
    (tmp_path / "data" / "val").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no checkpoint: random init
        rc = main([f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path}", "epochs=1", "batch_size=4",
                   "progress=false", "memory_budget_gib=null"], mode="linprobe")
    err = capsys.readouterr().err
    assert rc == 2 and "no readable validation images under" in err and "Traceback" not in err
    assert not (tmp_path / "linprobe").exists()  # stopped before training


def test_finetune_bad_model_and_device_are_config_errors(tmp_path):
    for c in ("a", "b"):
        write_pngs(tmp_path / "data" / c, 3)
    base = dict(data_root=str(tmp_path / "data"), output_dir=str(tmp_path), epochs=1, batch_size=4, progress=False,
                memory_budget_gib=None, checkpoint=None, name="f")
    with pytest.raises(config_mod.ConfigError, match="device must be one of auto, cpu, cuda, got 'tpu'"):
        finetune(dict(base, device="tpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no checkpoint: random init
        with pytest.raises(config_mod.ConfigError, match="unknown model 'mae_vit_nope'; available: .*demo_patch8"):
            finetune(dict(base, model="mae_vit_nope"))
        with pytest.raises(config_mod.ConfigError, match="img_size 36x36 must be divisible by patch_size 8"):
            finetune(dict(base, img_size=36))


# ---------------------------------------------------------------------------------------------- shards

def test_write_shards_with_a_bad_source_keeps_the_existing_shards(tmp_path):
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


def test_write_shards_of_unreadable_videos_says_so_and_keeps_the_shards(tmp_path):
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


def test_stream_with_no_readable_sample_names_the_source(tmp_path):
    write_pngs(tmp_path / "imgs", 4)
    write_shards(tmp_path / "imgs", tmp_path / "shards")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.tar").write_bytes((tmp_path / "shards" / "shard-000000.tar").read_bytes()[:700])
    ds = ShardDataset(bad, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning, match="skipping"):
        with pytest.raises(RuntimeError, match=f"no full micro-batch of 2 in epoch 0 from {bad}; unreadable: .*a.tar"):
            next(iter(StreamBatches(ds, 2, 0, False)))


# ---------------------------------------------------------------------------------------------- videos

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


# ---------------------------------------------------------------------------------------------- pretrain config

@pytest.mark.parametrize("kw, msg", [
    (dict(mask_ratio=0.0), r"mask_ratio must be in \(0, 1\), got 0.0"),
    (dict(mask_ratio=0.99), "mask_ratio=0.99 leaves no visible patch out of 16"),
    (dict(model="mae_vit_nope"), "unknown model 'mae_vit_nope'; available: .*mae_vit_demo_patch8"),
    (dict(img_size=36), "img_size 36x36 must be divisible by patch_size 8"),
    (dict(model_kwargs=dict(TINY_MODEL, depthh=2)), r"unknown override\(s\) \['depthh'\]"),
    (dict(device="tpu"), "device must be one of auto, cpu, cuda, got 'tpu'"),
    (dict(distributed="ddpp"), "distributed must be one of auto, ddp, fsdp, none, got 'ddpp'"),
    (dict(subset="random"), "subset must be one of contiguous, uniform, got 'random'"),
    (dict(num_workers=-1), "num_workers must not be negative, got -1"),
    (dict(lr=-1e-3), "lr must be a positive number, got -0.001"),
    (dict(fps=0.0), "fps must be a positive number, got 0.0"),
    (dict(warmup_steps=-5), "warmup_steps must not be negative, got -5"),
    (dict(clip_grad=-1.0), "clip_grad must be a positive number, got -1.0"),
])
def test_bad_pretrain_values_are_config_errors_before_training(tmp_path, kw, msg):
    with pytest.raises(config_mod.ConfigError, match=msg):
        pretrain(tiny(tmp_path, **kw))
    assert not (tmp_path / "t").exists()  # nothing was written: no run started


def test_bad_model_from_cli_exits_2_with_one_line(tmp_path, capsys):
    from mae_fast.train.pretrain import main

    assert main([f"output_dir={tmp_path}", "img_size=65", "data_source=synthetic"]) == 2
    err = capsys.readouterr().err
    assert "img_size 65x65 must be divisible by patch_size 8" in err and "Traceback" not in err


def test_resuming_a_checkpoint_of_another_model_says_so(tmp_path):
    """Before: a RuntimeError traceback from load_state_dict listing every unexpected key."""
    ckpt = pretrain(tiny(tmp_path, steps=1))["checkpoint"]
    with pytest.raises(CheckpointError, match=f"cannot resume from {ckpt}: it does not fit this model "
                                              r"\(made with a different model_kwargs"):
        pretrain(tiny(tmp_path, steps=2, resume=ckpt, model_kwargs=dict(TINY_MODEL, depth=1)))
    assert torch.load(ckpt, weights_only=False)["step"] == 1  # left as it was


def test_unreadable_data_is_one_line_from_every_cli(tmp_path, capsys):
    """A folder whose every image is corrupt: pretrain, linprobe and the shard writer each print one line naming
    the folder and exit 2 (a DataError, still a RuntimeError for code that caught those)."""
    from mae_fast.data import DataError
    from mae_fast.data.shards import main as shards_main
    from mae_fast.train.finetune import main as finetune_main
    from mae_fast.train.pretrain import main as pretrain_main

    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (tmp_path / "bad" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "bad" / c / f"{i}.jpg").write_bytes(b"\xff\xd8" + rng.bytes(40))  # a JPEG cut short
    assert issubclass(DataError, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each skipped file warns
        runs = {"pretrain": lambda: pretrain_main([f"output_dir={tmp_path / 'out'}", f"data_source={tmp_path / 'bad'}",
                                                   "steps=1", "progress=false"]),
                "linprobe": lambda: finetune_main([f"data_root={tmp_path / 'bad'}", f"output_dir={tmp_path / 'out'}",
                                                   "epochs=1", "progress=false"], mode="linprobe"),
                "shards": lambda: shards_main([str(tmp_path / "bad"), str(tmp_path / "shards")])}
        for name, run in runs.items():
            rc = run()
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if "Warning" not in line and line.strip()]
            assert rc == 2, name
            assert len(lines) == 1 and str(tmp_path / "bad") in lines[0] and "Traceback" not in err, (name, err)
