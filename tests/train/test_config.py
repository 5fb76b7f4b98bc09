"""Typed configs: recipes, overrides in every form, types, nullable and string keys, and the errors that name the key."""
from __future__ import annotations

import warnings

import pytest

from helpers.train import TINY_MODEL, tiny, write_pngs
from mae_fast.training import config as config_mod
from mae_fast.training import pretrain as pretrain_mod
from mae_fast.training.finetune import finetune
from mae_fast.training.pretrain import pretrain


def test_all_recipes_load_and_follow_their_papers():
    names = config_mod.list_recipes()
    for want in ["demo", "mae_official", "humanlike_vits14", "humanlike_vitb14", "humanlike_vitl14",
                 "humanlike_vith14", "humanlike_vith14_448", "humanlike_vith14_476"]:
        assert want in names
    for n in names:
        config_mod.load_recipe(n)
    off = config_mod.load_recipe("mae_official")
    assert (off["norm_pix_loss"], off["mask_ratio"], off["base_lr"], off["batch_size"], off["epochs"]) == \
        (True, 0.75, 1.5e-4, 4096, 800)
    assert (off["warmup_epochs"], off["weight_decay"], off["lr_schedule"], off["model"]) == \
        (40, 0.05, "cosine", "mae_vit_large_patch16")
    # the human-like study's train_mae_sayavakepicutego4d.sh: per-GPU batch x GPUs, --lr, --mask_ratio (448 / 476 px
    # only; train_mae.py's default 0.75 otherwise), no --norm_pix_loss; steps from its pretraining logs
    for name, mask, lr, batch, img in [("vits14", 0.75, 3e-4, 1024, 224), ("vitb14", 0.75, 3e-4, 256, 224),
                                       ("vitl14", 0.75, 3e-4, 512, 224), ("vith14", 0.75, 1e-4, 512, 224),
                                       ("vith14_448", 0.8, 1e-4, 168, 448), ("vith14_476", 0.8, 1e-4, 136, 476)]:
        r = config_mod.load_recipe(f"humanlike_{name}")
        assert (r["mask_ratio"], r["lr"], r["lr_schedule"], r["weight_decay"]) == (mask, lr, "constant", 0.0)
        assert (r["batch_size"], r["img_size"], r["norm_pix_loss"], r["warmup_epochs"]) == (batch, img, False, 0)
        assert r["model"].endswith("_patch14") and r["steps"] > 400_000


def test_overrides_parse_every_form():
    cfg = config_mod.config_from_argv(["--config", "demo", "steps=7", "--lr", "1e-4", "--clip_grad=null",
                                       "model_kwargs.depth=2", "betas=[0.9, 0.99]", "compile=true"])
    assert cfg["steps"] == 7 and cfg["lr"] == 1e-4 and cfg["clip_grad"] is None
    assert cfg["model_kwargs"] == {"depth": 2} and cfg["betas"] == [0.9, 0.99] and cfg["compile"] is True
    assert config_mod.config_from_argv(["mask_ratio=1"])["mask_ratio"] == 1.0  # int where float expected


@pytest.mark.parametrize("argv, msg", [
    (["bogus=1"], "unknown config key 'bogus'"),
    (["--lrr", "1"], "did you mean lr"),
    (["steps=many"], "steps must be an integer"),
    (["compile=yes please"], "compile must be auto, true or false"),
    (["epochs.sub=1"], "epochs is not a mapping"),
    (["--config", "no_such_recipe"], "recipe 'no_such_recipe' not found"),
    (["justaword"], "cannot parse argument"),
])
def test_bad_configs_get_clear_errors(argv, msg):
    with pytest.raises(config_mod.ConfigError, match=msg) as e:
        config_mod.config_from_argv(argv)
    if "unknown" in msg:
        assert "valid keys:" in str(e.value) and "batch_size" in str(e.value)


def test_bad_values_are_rejected_before_training(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="divisible"):
        pretrain(tiny(tmp_path, batch_size=8, accum_steps=3))
    with pytest.raises(config_mod.ConfigError, match="fewer than one batch"):
        pretrain(tiny(tmp_path, batch_size=64))
    with pytest.raises(config_mod.ConfigError, match="unknown config key"):
        pretrain({"recipe": "demo", "stepz": 3})


def test_config_values_take_their_keys_types():
    argv = ["mask_ratio=1", "steps=8.0", "lr=3", "betas=[0.8, 0.9]", "name=a: b: c", "--output-dir", "o",
            "--data_source=x=y", "model_kwargs.extra.deep=2"]
    cfg = config_mod.config_from_argv(argv)
    assert type(cfg["mask_ratio"]) is float and cfg["mask_ratio"] == 1.0
    assert type(cfg["steps"]) is int and cfg["steps"] == 8
    assert type(cfg["lr"]) is float and cfg["lr"] == 3.0
    assert cfg["name"] == "a: b: c"  # not valid YAML: the text itself
    assert cfg["output_dir"] == "o" and cfg["data_source"] == "x=y"
    assert cfg["model_kwargs"] == {"extra": {"deep": 2}}
    assert config_mod.config_from_argv(["img_size=[32, 48]"])["img_size"] == [32, 48]
    assert config_mod.build_config({"betas": (0.9, 0.98)})["betas"] == [0.9, 0.98]
    assert config_mod.config_from_argv(["memory_budget_gib=3"])["memory_budget_gib"] == 3.0


@pytest.mark.parametrize("override, msg", [
    ("steps=7.5", "steps must be an integer"), ("epochs=true", "epochs must be an integer"),
    ("lr=true", "lr must be a number"), ("lr=fast", "lr must be a number"), ("steps=[1]", "steps must be an integer"),
    ("progress=1", "progress must be true or false"), ("name=[1, 2]", "name must be a string"),
    ("model={a: 1}", "model must be a string"), ("betas=0.9", "betas must be a list"),
    ("model_kwargs=3", "model_kwargs must be a mapping"), ("memory_budget_gib=0", "memory_budget_gib must be"),
    ("memory_budget_gib=true", "memory_budget_gib must be"), ("img_size=[32, 32, 32]", "img_size must be an integer"),
    ("img_size=[32, 4.5]", "img_size must be an integer"), ("grad_checkpointing=-1", "grad_checkpointing must be"),
])
def test_config_rejects_values_of_the_wrong_type(override, msg):
    with pytest.raises(config_mod.ConfigError, match=msg):
        config_mod.config_from_argv([override])


def test_config_parser_edge_cases(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="--lr needs a value"):
        config_mod.parse_overrides(["steps=3", "--lr"])
    assert config_mod.parse_overrides(["--config", "r.yaml", "--img-size", "[8, 8]"]) == ("r.yaml", {"img_size": [8, 8]})
    (tmp_path / "norecipe").write_text("steps: 3\nmodel_kwargs: {depth: 2}\n")  # a path without a suffix
    cfg = config_mod.load_recipe(tmp_path / "norecipe")
    assert cfg["steps"] == 3 and cfg["name"] == "norecipe" and cfg["model_kwargs"] == {"depth": 2}
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(config_mod.ConfigError, match="must be a mapping of key: value"):
        config_mod.load_recipe(tmp_path / "list.yaml")
    with pytest.raises(config_mod.ConfigError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("steps: [1\n")
        config_mod.load_recipe(tmp_path / "bad.yaml")


def test_configs_share_no_mutable_state(tmp_path):
    """Changing one config's lists or dicts (or passing dicts in) changes no other config, default or argument."""
    (tmp_path / "short.yaml").write_text("steps: 3\n")  # every list and dict left at its default
    first = config_mod.load_recipe(tmp_path / "short.yaml")
    first["betas"].append(0.5), first["model_kwargs"].update(depth=1), first["debug_nan_steps"].append(3)
    again = config_mod.load_recipe(tmp_path / "short.yaml")
    assert again["betas"] == [0.9, 0.95] and again["model_kwargs"] == {} and again["debug_nan_steps"] == []
    base = config_mod.defaults(config_mod.FINETUNE_KEYS)
    merged = config_mod.merge(base, {"model_kwargs.depth": 2, "epochs": 3}, config_mod.FINETUNE_KEYS)
    assert base["model_kwargs"] == {} and base["epochs"] == 50 and merged["model_kwargs"] == {"depth": 2}
    given = {"depth": 3}
    cfg = config_mod.build_config({"model_kwargs": given, "model_kwargs.num_heads": 2})
    assert cfg["model_kwargs"] == {"depth": 3, "num_heads": 2} and given == {"depth": 3}


def test_string_keys_keep_the_command_lines_text():
    """Run names, paths and choices that YAML would read as numbers or booleans (2024, 007, 1e3, nan, true) are the
    text given; null still clears a nullable key, and number keys still parse numbers."""
    argv = ["name=007", "output_dir=1e3", "data_root=2024", "--auto-augment", "true", "checkpoint=null", "lr=1e-4",
            "memory_budget_gib=3", "epochs=4"]
    cfg = config_mod.config_from_argv(argv, config_mod.FINETUNE_KEYS, None, fixed={"mode": "finetune"})
    assert (cfg["name"], cfg["output_dir"], cfg["data_root"], cfg["auto_augment"]) == ("007", "1e3", "2024", "true")
    assert cfg["checkpoint"] is None and cfg["lr"] == 1e-4 and cfg["memory_budget_gib"] == 3.0 and cfg["epochs"] == 4
    assert config_mod.config_from_argv(["--resume", "1"])["resume"] == "1"  # pretraining's nullable path key
    with pytest.raises(config_mod.ConfigError, match="name must be a string"):  # a list is no text
        config_mod.config_from_argv(["name=[1, 2]"])


@pytest.mark.parametrize("batch, accum, world, ok", [
    (12, 2, 2, True), (12, 3, 2, True), (12, 1, 12, True),
    (12, 2, 4, False), (12, 5, 1, False), (10, 1, 4, False), (6, 2, 6, False),
])
def test_global_batch_must_split_evenly_over_ranks_and_micro_batches(tmp_path, batch, accum, world, ok):
    """batch_size is the global batch: every rank takes batch / (accum x world) images a micro-batch, so the check
    uses the world size (a check with world = 1 would let 12 / (2 x 4) through and train on fewer images)."""
    cfg = config_mod.PretrainConfig.build(tiny(tmp_path, batch_size=batch, accum_steps=accum))
    if ok:
        pretrain_mod.check_config(cfg, world)
    else:
        with pytest.raises(config_mod.ConfigError, match=f"divisible by accum_steps x world_size = {accum * world}"):
            pretrain_mod.check_config(cfg, world)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_bad_steps=0), "max_bad_steps must be at least 1"),
    (dict(checkpoint_every=0), "checkpoint_every and log_every must be at least 1"),
    (dict(log_every=0), "checkpoint_every and log_every must be at least 1"),
    (dict(keep_checkpoints=-1), "keep_checkpoints must not be negative"),
    (dict(min_lr=-1e-5), "min_lr must not be negative"),
    (dict(accum_steps=0), r"batch_size \(8\) and accum_steps \(0\) must be positive"),
    (dict(lr_schedule="step"), "lr_schedule must be cosine or constant"),
    (dict(warmup_steps=None, warmup_epochs=-0.5), "warmup_epochs must not be negative"),
])
def test_bad_schedule_and_checkpoint_values_are_config_errors(tmp_path, kw, msg):
    from mae_fast.training import config as config_mod

    with pytest.raises(config_mod.ConfigError, match=msg):
        pretrain(tiny(tmp_path, **kw))
    assert not (tmp_path / "t").exists()


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


def test_config_accepts_a_block_count():
    from mae_fast.training.config import ConfigError, config_from_argv

    assert config_from_argv(["grad_checkpointing=3"])["grad_checkpointing"] == 3
    assert config_from_argv(["--grad-checkpointing", "true"])["grad_checkpointing"] is True
    for bad in ("-2", "lots", "1.5"):
        with pytest.raises(ConfigError, match="grad_checkpointing"):
            config_from_argv([f"grad_checkpointing={bad}"])
