"""Training entry points on the CPU: loss falls, exact resume, atomic checkpoints, NaN skipping,
config errors, reconstruction pictures, finetune / linear-probe smoke tests."""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mae_fast
from mae_fast.train import checkpoint_io, config as config_mod, visualize
from mae_fast.train.pretrain import NonFiniteLossError, SeededItems, StepBatchSampler, SyntheticImages, pretrain

TINY_MODEL = dict(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny(tmp_path, **kw) -> dict:
    """A small, fast pretraining config on the synthetic source."""
    cfg = dict(recipe="demo", name="t", output_dir=str(tmp_path), data_source="synthetic", synthetic_size=48,
               img_size=32, model_kwargs=dict(TINY_MODEL), batch_size=8, steps=8, warmup_steps=2,
               lr=2e-3, checkpoint_every=3, log_every=1, vis_every=0, vis_images=2, progress=False)
    cfg.update(kw)
    return cfg


def params(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_same_optimizer(a: dict, b: dict):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, va in a["state"][k].items():
            vb = b["state"][k][name]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), f"optimizer {k}.{name} differs"


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_all_recipes_load_and_follow_their_papers():
    names = config_mod.list_recipes()
    for want in ["demo", "mae_official", "humanlike_vits14", "humanlike_vitb14", "humanlike_vitl14",
                 "humanlike_vith14"]:
        assert want in names
    for n in names:
        config_mod.load_recipe(n)
    off = config_mod.load_recipe("mae_official")
    assert (off["norm_pix_loss"], off["mask_ratio"], off["base_lr"], off["batch_size"], off["epochs"]) == \
        (True, 0.75, 1.5e-4, 4096, 800)
    assert (off["warmup_epochs"], off["weight_decay"], off["lr_schedule"], off["model"]) == \
        (40, 0.05, "cosine", "mae_vit_large_patch16")
    for s, lr in [("s", 3e-4), ("b", 3e-4), ("l", 3e-4), ("h", 1e-4)]:
        r = config_mod.load_recipe(f"humanlike_vit{s}14")
        assert (r["mask_ratio"], r["lr"], r["lr_schedule"], r["weight_decay"]) == (0.8, lr, "constant", 0.0)
        assert r["model"].endswith("_patch14") and r["img_size"] in (224, 448, 476)


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
    (["compile=yes please"], "compile must be true or false"),
    (["epochs.sub=1"], "epochs is not a mapping"),
    (["--config", "no_such_recipe"], "recipe 'no_such_recipe' not found"),
    (["justaword"], "cannot parse argument"),
])
def test_bad_configs_get_clear_errors(argv, msg):
    with pytest.raises(config_mod.ConfigError, match=msg) as e:
        config_mod.config_from_argv(argv)
    if "unknown" in msg:
        assert "valid keys:" in str(e.value) and "batch_size" in str(e.value)


def test_bad_config_from_cli_exits_2_with_message(capsys):
    from mae_fast.train.pretrain import main

    assert main(["not_a_key=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'not_a_key'" in err and "valid keys" in err


def test_missing_data_and_damaged_checkpoints_exit_2_with_one_line(tmp_path, capsys):
    """A wrong path or a damaged file is the user's input: one line on stderr, exit code 2, no traceback."""
    from mae_fast.train.finetune import main as finetune_main
    from mae_fast.train.pretrain import main as pretrain_main

    missing = tmp_path / "no_such_dir"
    assert pretrain_main([f"data_source={missing}", f"output_dir={tmp_path}"]) == 2
    assert f"data source '{missing}' does not exist" in capsys.readouterr().err

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02 this is not a checkpoint")
    assert pretrain_main([f"resume={damaged}", f"output_dir={tmp_path}", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {damaged} could not be read" in err and "Traceback" not in err

    assert finetune_main([f"checkpoint={damaged}", f"output_dir={tmp_path}"]) == 2
    assert f"could not read checkpoint {damaged}" in capsys.readouterr().err
    with pytest.raises(mae_fast.CheckpointError):  # the library raises it, a RuntimeError like before
        mae_fast.load_pretrained(mae_fast.create_model("mae_vit_small_patch16"), damaged)


def test_bad_values_are_rejected_before_training(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="divisible"):
        pretrain(tiny(tmp_path, batch_size=8, accum_steps=3))
    with pytest.raises(config_mod.ConfigError, match="fewer than one batch"):
        pretrain(tiny(tmp_path, batch_size=64))
    with pytest.raises(config_mod.ConfigError, match="unknown config key"):
        pretrain({"recipe": "demo", "stepz": 3})


# ---------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------
def test_batch_sampler_resumes_mid_epoch_and_splits_global_batches():
    full = list(StepBatchSampler(20, 6, seed=3, start_step=0, total_steps=7))
    assert len(full) == 7 and all(len(b) == 6 for b in full)
    assert sorted(j for b in full[:3] for _, j in b) == sorted(set(j for b in full[:3] for _, j in b))
    assert [e for b in full for e, _ in b[:1]] == [0, 0, 0, 1, 1, 1, 2]
    assert list(StepBatchSampler(20, 6, seed=3, start_step=4, total_steps=7)) == full[4:]
    # accum 2 x world 2: each rank's micro-batches tile the global batch in order
    parts = [list(StepBatchSampler(20, 8, 3, 0, 2, accum_steps=2, world_size=2, rank=r)) for r in (0, 1)]
    one = list(StepBatchSampler(20, 8, 3, 0, 2))
    for s in range(2):
        pieces = [parts[0][2 * s], parts[1][2 * s], parts[0][2 * s + 1], parts[1][2 * s + 1]]
        assert sum(pieces, []) == one[s]


def test_seeded_items_are_reproducible_and_leave_global_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i

    class NumpyAndPython(Noisy):
        def __getitem__(self, i):
            return torch.tensor([np.random.rand(), random.random()]) + super().__getitem__(i)[:2]

    class TorchOnly(Noisy):
        draws_only_torch_rng = True

    for dataset in (Noisy(), NumpyAndPython(), TorchOnly()):
        items = SeededItems(dataset, seed=5)
        torch.manual_seed(0)
        np.random.seed(1)
        random.seed(2)
        before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        a, b = items[(1, 2)], items[(1, 2)]
        assert torch.equal(a, b) and not torch.equal(a, items[(2, 2)])
        assert torch.equal(before[0], torch.get_rng_state())
        assert (before[1] == np.random.get_state()[1]).all() and before[2] == random.getstate()
    # a torch-only dataset draws what it drew when numpy and python were seeded as well
    assert torch.equal(SeededItems(TorchOnly(), 5)[(3, 1)], SeededItems(Noisy(), 5)[(3, 1)])
    # the datasets here declare it: the synthetic source, and file/video data with the built-in transforms
    from mae_fast.data.images import ImageFileDataset
    from mae_fast.data.transforms import build_transform

    assert SyntheticImages(4, 8).draws_only_torch_rng
    assert ImageFileDataset([], transform=build_transform(8, train=True)).draws_only_torch_rng
    assert not ImageFileDataset([], transform=lambda im: np.random.rand()).draws_only_torch_rng


# ---------------------------------------------------------------------------------------------
# pretraining
# ---------------------------------------------------------------------------------------------
def _demo_data_available() -> bool:
    try:
        from mae_fast.data import build_pretrain_dataset  # noqa: F401
    except ImportError:
        return False
    return True


def test_demo_recipe_loss_falls_and_writes_everything(tmp_path):
    """The demo recipe, shortened; on the demo data when mae_fast.data provides it."""
    source = None if _demo_data_available() else "synthetic"
    cfg = dict(recipe="demo", output_dir=str(tmp_path), data_source=source, steps=30, warmup_steps=5,
               batch_size=16, log_every=5, checkpoint_every=15, vis_every=15, progress=False)
    res = pretrain(cfg)
    run = Path(res["run_dir"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
    assert res["final_loss"] == pytest.approx(rows[-1]["loss"], rel=0.5)
    assert res["images_seen"] == 30 * 16 and res["wall_time_s"] > 0
    assert Path(res["checkpoint"]).is_file() and (run / "reconstruction.png").is_file()
    assert (run / "reconstructions" / "step-00000015.png").is_file()
    from PIL import Image

    img = Image.open(run / "reconstruction.png")
    assert img.size[0] > 8 * 64 and img.size[1] > 4 * 64
    assert res["curves"] == str(run / "curves.png") and Image.open(run / "curves.png").size[0] > 500
    # the checkpoint loads as pretrained weights
    import mae_fast

    m = mae_fast.create_model("mae_vit_demo_patch8")
    mae_fast.load_pretrained(m, res["checkpoint"])
    # a second fresh run does not reuse a run directory that has checkpoints
    res2 = pretrain(dict(cfg, steps=1, checkpoint_every=1, vis_every=0))
    assert res2["run_dir"] != res["run_dir"] and res2["run_dir"].endswith("demo-2")


def test_kill_and_resume_is_bit_exact(tmp_path):
    straight = pretrain(tiny(tmp_path, name="straight"))
    first = pretrain(tiny(tmp_path, name="killed", stop_at_step=5))
    assert first["steps"] == 5 and first["stopped"].startswith("stop_at_step")
    ckpts = [s for s, _ in checkpoint_io.list_checkpoints(first["run_dir"])]
    assert ckpts == [5, 3]
    resumed = pretrain(tiny(tmp_path, name="killed", resume="auto"))
    assert resumed["steps"] == 8 and resumed["images_seen"] == straight["images_seen"]
    a = torch.load(straight["checkpoint"], weights_only=False)
    b = torch.load(resumed["checkpoint"], weights_only=False)
    assert_same_state(a["model"], b["model"])
    assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert a["loss"] == b["loss"]
    assert b["step"] == 8 and (b["epoch"], b["index_in_epoch"]) == divmod(8, 48 // 8)


class _SignalAfterSteps:
    """Stands in for the time module inside pretrain: its debug per-step sleep sends ``signals`` to this process
    after step ``after`` (the handler runs before the next step starts), so the stop is at a known step."""

    def __init__(self, after: int, *signals):
        import time

        self._time, self.after, self.signals, self.calls = time, after, signals, 0

    def __getattr__(self, name):
        return getattr(self._time, name)

    def sleep(self, seconds):
        import signal

        self.calls += 1
        if self.calls == self.after:
            for sig in self.signals:
                signal.raise_signal(sig)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_the_end_of_a_step_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, signame):
    """Ctrl-C or SIGTERM (SLURM's time limit, preemption) during training: the step under way (the 4th; the
    signal came after the 3rd, between checkpoints) finishes, a checkpoint of it is written, and the run
    raises TrainingInterrupted; resume=auto then ends where an uninterrupted run ends, bit for bit."""
    import signal

    from mae_fast.train import pretrain as pretrain_mod

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    straight = pretrain(tiny(tmp_path, name="straight"))
    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(3, getattr(signal, signame)))
    with pytest.raises(pretrain_mod.TrainingInterrupted) as info:
        pretrain(tiny(tmp_path, name="sig", debug_step_sleep_s=1e-3))
    assert info.value.signum == getattr(signal, signame) and info.value.step == 4
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back
    run_dir = tmp_path / "sig"
    assert [s for s, _ in checkpoint_io.list_checkpoints(run_dir)][0] == 4
    assert json.loads((run_dir / "result.json").read_text())["stopped"] == f"signal {signame}"
    monkeypatch.undo()
    resumed = pretrain(tiny(tmp_path, name="sig", resume="auto"))
    assert resumed["steps"] == 8 and resumed["stopped"] == "finished"
    a = torch.load(straight["checkpoint"], weights_only=False)
    b = torch.load(resumed["checkpoint"], weights_only=False)
    assert_same_state(a["model"], b["model"])
    assert_same_optimizer(a["optimizer"], b["optimizer"])


def test_a_signal_in_the_last_step_is_still_honoured(tmp_path, monkeypatch):
    """After the last step's all-reduce there is no step left to stop at: the run ends and is saved as usual, then
    the signal is raised all the same (a sweep or script that got Ctrl-C must not go on to its next stage)."""
    import signal

    from mae_fast.train import pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(8, signal.SIGINT))
    with pytest.raises(pretrain_mod.TrainingInterrupted, match="finished at step 8/8, then SIGINT") as info:
        pretrain(tiny(tmp_path, name="last", debug_step_sleep_s=1e-3))
    assert info.value.step == 8 and [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "last")][0] == 8


def test_a_second_signal_stops_at_once_and_the_cli_exits_as_the_signal(tmp_path, monkeypatch, capsys):
    import signal

    from mae_fast.train import pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(2, signal.SIGINT, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt) as info:  # Python's own, raised inside the step: no wait, no checkpoint
        pretrain(tiny(tmp_path, name="twice", debug_step_sleep_s=1e-3))
    assert type(info.value) is KeyboardInterrupt
    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(2, signal.SIGTERM))
    args = [f"{k}={json.dumps(v)}" for k, v in tiny(tmp_path, name="cli", debug_step_sleep_s=1e-3).items()
            if k != "recipe"]
    assert pretrain_mod.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "signal SIGTERM at step 3/8" in err and "resume=auto" in err


def test_time_limit_stops_with_a_checkpoint_at_the_step_it_ran_out(tmp_path):
    """Each step sleeps 0.2 s and the limit is 0.5 s: the run stops after the first step whose loss all-reduce
    comes past the limit (the 3rd or 4th on an idle machine, the 2nd when a busy one adds 0.1 s to a step; all
    ranks see the same flag), well before the 8 scheduled."""
    res = pretrain(tiny(tmp_path, name="timed", time_limit_s=0.5, debug_step_sleep_s=0.2))
    assert res["stopped"] == "time_limit_s=0.5" and 2 <= res["steps"] < 8
    ckpt = torch.load(res["checkpoint"], weights_only=False)
    assert ckpt["step"] == res["steps"] and ckpt["images_seen"] == res["steps"] * 8


def _peer_flag(monkeypatch, index: int, from_call: int) -> list:
    """Simulates another rank raising flag ``index`` of the loss all-reduce ([loss, over time, SIGTERM, SIGINT])
    from its ``from_call``-th step on; returns what this rank itself sent."""
    from mae_fast.train import distributed as dist_mod

    calls = []

    def all_reduce_sum(t):
        calls.append(t.clone())
        if t.numel() == 4 and len(calls) >= from_call:
            t[index] += 1.0  # the other rank's flag
        return t

    monkeypatch.setattr(dist_mod, "all_reduce_sum", all_reduce_sum)
    return calls


def test_a_rank_past_the_time_limit_stops_every_rank(tmp_path, monkeypatch):
    """The over-time flag travels in the loss all-reduce: here a simulated other rank reports being past the
    limit from step 3 on, and this process (nowhere near it) stops there too, as a rank of that run would."""
    calls = _peer_flag(monkeypatch, 1, 3)
    res = pretrain(tiny(tmp_path, name="peer", time_limit_s=1e6))
    assert res["stopped"] == "time_limit_s=1000000.0" and res["steps"] == 3
    assert all(c.numel() == 4 and not c[1:].any() for c in calls)  # this rank's own flags stayed down


def test_a_signal_to_one_rank_stops_every_rank(tmp_path, monkeypatch):
    """torchrun or SLURM may signal one rank first: its SIGTERM flag stops this rank at the same step, with the
    same checkpoint and exception."""
    import signal

    from mae_fast.train import pretrain as pretrain_mod

    calls = _peer_flag(monkeypatch, 2, 5)
    with pytest.raises(pretrain_mod.TrainingInterrupted) as info:
        pretrain(tiny(tmp_path, name="peer_term"))
    assert info.value.signum == signal.SIGTERM and info.value.step == 5
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "peer_term")][0] == 5
    assert all(not c[1:].any() for c in calls)


def test_resume_skips_a_corrupt_newest_checkpoint_and_stays_exact(tmp_path):
    straight = pretrain(tiny(tmp_path, name="straight", steps=7))
    first = pretrain(tiny(tmp_path, name="run", steps=7, stop_at_step=6))
    newest = checkpoint_io.list_checkpoints(first["run_dir"])[0][1]
    assert newest.name == "checkpoint-00000006.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damage in the middle: digest catches it
    newest.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):
        resumed = pretrain(tiny(tmp_path, name="run", steps=7, resume="auto"))
    assert_same_state(params(straight["checkpoint"]), params(resumed["checkpoint"]))


def test_truncated_checkpoint_without_digest_is_skipped(tmp_path):
    run = tmp_path / "r"
    checkpoint_io.save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, run, 1)
    p2 = checkpoint_io.save_checkpoint({"model": {"w": torch.full((3,), 2.0)}, "step": 2}, run, 2)
    p2.write_bytes(p2.read_bytes()[:100])
    p2.with_name(p2.name + ".sha256").unlink()
    with pytest.warns(RuntimeWarning, match="skipping damaged"):
        path, state = checkpoint_io.latest_valid_checkpoint(run)
    assert state["step"] == 1 and path.name == "checkpoint-00000001.pt"


def test_atomic_save_keeps_last_good_checkpoint_when_killed_mid_write(tmp_path, monkeypatch):
    run = tmp_path / "r"
    checkpoint_io.save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, run, 1)

    def die(fd):  # the process dies after the bytes are written but before the rename
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint_io.os, "fsync", die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, run, 2)
    monkeypatch.undo()
    assert [s for s, _ in checkpoint_io.list_checkpoints(run)] == [1]
    assert not list(checkpoint_io.checkpoint_dir(run).glob(".*tmp*"))
    path, state = checkpoint_io.latest_valid_checkpoint(run)
    assert torch.equal(state["model"]["w"], torch.ones(3))


def test_atomic_write_survives_sigkill_of_the_writer(tmp_path):
    """A real kill -9 in the middle of a (slow) checkpoint write leaves the previous one intact."""
    run = tmp_path / "r"
    checkpoint_io.save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, run, 1)
    code = f"""
import os, sys, time, torch
from mae_fast.train import checkpoint_io
real_write = None
class Slow:
    def __init__(self, f): self.f = f
import builtins
orig_open = builtins.open
def slow_open(path, mode='r', *a, **k):
    f = orig_open(path, mode, *a, **k)
    if 'w' in mode and 'tmp' in str(path):
        w = f.write
        def write(data):
            n = w(data[:len(data)//2]); f.flush(); print('HALF', flush=True); time.sleep(60); return n + w(data[len(data)//2:])
        f.write = write
    return f
builtins.open = slow_open
checkpoint_io.save_checkpoint({{"model": {{"w": torch.zeros(1000)}}, "step": 2}}, {str(run)!r}, 2)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HALF"
    proc.kill()
    proc.wait()
    assert [s for s, _ in checkpoint_io.list_checkpoints(run)] == [1]
    checkpoint_io.clean_temporaries(run)
    assert not list(checkpoint_io.checkpoint_dir(run).glob(".*tmp*"))
    assert checkpoint_io.latest_valid_checkpoint(run)[1]["step"] == 1


def test_keep_last_k(tmp_path):
    for s in range(1, 6):
        checkpoint_io.save_checkpoint({"model": {}, "step": s}, tmp_path, s, keep=2)
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path)] == [5, 4]
    assert len(list(checkpoint_io.checkpoint_dir(tmp_path).glob("*.sha256"))) == 2


def test_non_finite_loss_skips_the_step(tmp_path):
    clean = pretrain(tiny(tmp_path, name="clean", steps=3, checkpoint_every=1, keep_checkpoints=5))
    res = pretrain(tiny(tmp_path, name="nan", steps=3, checkpoint_every=1, keep_checkpoints=5, debug_nan_steps=[1]))
    assert res["skipped_steps"] == 1 and res["steps"] == 3
    ck = {s: p for s, p in checkpoint_io.list_checkpoints(res["run_dir"])}
    ck_clean = {s: p for s, p in checkpoint_io.list_checkpoints(clean["run_dir"])}
    # step 1 (the 2nd) made no update: the weights after it equal those after step 0
    assert_same_state(params(ck[1]), params(ck[2]))
    assert_same_state(params(ck[1]), params(ck_clean[1]))
    for v in params(ck[3]).values():
        assert torch.isfinite(v).all()


def test_too_many_non_finite_losses_stop_with_a_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row") as e:
        pretrain(tiny(tmp_path, name="bad", steps=8, debug_nan_steps=[2, 3, 4], max_bad_steps=3))
    assert "checkpoint-00000005.pt" in str(e.value)
    state = checkpoint_io.load_checkpoint(tmp_path / "bad" / "checkpoints" / "checkpoint-00000005.pt")
    assert state["skipped_steps"] == 3 and state["note"] == "non-finite"


def test_accumulation_matches_one_big_batch(tmp_path):
    a = pretrain(tiny(tmp_path, name="a", steps=3))
    b = pretrain(tiny(tmp_path, name="b", steps=3, accum_steps=2))
    pa, pb = params(a["checkpoint"]), params(b["checkpoint"])
    for k in pa:
        # Adam turns tiny gradient differences into up to ~lr-sized steps on near-zero gradients
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-4)


def test_options_grad_checkpointing_clip_bf16_run(tmp_path):
    res = pretrain(tiny(tmp_path, name="opts", steps=2, grad_checkpointing=True, clip_grad=0.5,
                        precision="bf16", norm_pix_loss=True, lr_schedule="constant"))
    assert res["steps"] == 2 and res["final_loss"] == res["final_loss"]


def test_lean_activations_run_matches_plain(tmp_path):
    a = pretrain(tiny(tmp_path, name="plain", steps=3))
    b = pretrain(tiny(tmp_path, name="lean", steps=3, lean_activations=True))
    pa, pb = params(a["checkpoint"]), params(b["checkpoint"])
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_regionally_compiled_run_matches_eager(tmp_path):
    """compile=true, compile_scope=blocks (what the floor analysis says a fast GPU step needs) trains the same
    parameters as eager, to float rounding (Inductor reorders reductions)."""
    from torch._dynamo.utils import counters

    a = pretrain(tiny(tmp_path, name="eager", steps=3))
    counters.clear()
    b = pretrain(tiny(tmp_path, name="compiled", steps=3, compile=True, compile_scope="blocks"))
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really ran compiled
    pa, pb = params(a["checkpoint"]), params(b["checkpoint"])
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-3, atol=1e-3)


def test_no_weight_decay_on_biases_norms_tokens_pos_embed():
    import mae_fast
    from mae_fast.train.pretrain import param_groups

    m = mae_fast.create_model("mae_vit_demo_patch8")
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= nd
    assert all(m.get_parameter(n).ndim >= 2 for n in d) and "blocks.0.attn.qkv.weight" in d
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_cli_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mae_fast.cli", "pretrain", "data_source=synthetic",
                          "synthetic_size=16", "img_size=32", "model_kwargs.depth=1", "batch_size=8", "steps=2",
                          f"output_dir={tmp_path}", "progress=false", "vis_every=0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "run dir:" in out.stdout and "checkpoint-00000002.pt" in out.stdout


# ---------------------------------------------------------------------------------------------
# reconstruction pictures
# ---------------------------------------------------------------------------------------------
def test_norm_pix_unnormalisation_uses_visible_statistics_only():
    import mae_fast

    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32) * 0.7 + 0.3
    target = m.patchify(imgs)
    mask = (torch.rand(2, m.num_patches) < 0.6).float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normed = (target - mean) / (var + 1e-6) ** 0.5
    rec = visualize.reconstruct(m, imgs, normed, mask)
    # a perfect prediction comes back exactly on visible patches
    vis = (mask == 0)
    torch.testing.assert_close(m.patchify(rec)[vis], target[vis], rtol=1e-4, atol=1e-4)
    # removed patches' statistics do not depend on their own (hidden) pixels
    imgs2 = imgs.clone()
    hidden = m.unpatchify(mask[..., None].expand_as(target)).bool()
    imgs2[hidden] = imgs2[hidden] * 3.0 + 1.0
    est1 = visualize.visible_stats(m.patchify(imgs), mask, m.grid_size)
    est2 = visualize.visible_stats(m.patchify(imgs2), mask, m.grid_size)
    torch.testing.assert_close(est1[0], est2[0]) and torch.testing.assert_close(est1[1], est2[1])


def test_reconstruction_grid_png(tmp_path):
    import mae_fast
    from PIL import Image

    m = mae_fast.create_model("mae_vit_demo_patch8")
    rows = visualize.save_reconstruction_grid(m, torch.randn(3, 3, 64, 64), tmp_path / "g.png")
    assert rows.shape == (4, 3, 3, 64, 64) and 0 <= rows.min() and rows.max() <= 1
    # the masked row is grey exactly where the reconstruction row was pasted
    assert Image.open(tmp_path / "g.png").size[1] >= 4 * 128


# ---------------------------------------------------------------------------------------------
# finetune / linear probe
# ---------------------------------------------------------------------------------------------
class Shapes(torch.utils.data.Dataset):
    """Labelled stand-in: class c is a bright square in quadrant c, on noise."""

    def __init__(self, n, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g) * 0.3
        self.y = torch.arange(n) % 4
        h = size // 2
        for i in range(n):
            r, c = divmod(int(self.y[i]), 2)
            self.x[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_finetune_and_linprobe_smoke(tmp_path, mode):
    from mae_fast.train.finetune import finetune

    pre = pretrain(tiny(tmp_path, name="pre", steps=2))
    res = finetune(dict(mode=mode, checkpoint=pre["run_dir"], output_dir=str(tmp_path), epochs=3, batch_size=16,
                        warmup_epochs=1, lr=3e-3 if mode == "finetune" else 0.05, progress=False, pool="mean"),
                   datasets=(Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"]))
    assert 0 <= res["top1"] <= 100 and res["top1"] <= res["top5"] <= 100 and res["top5"] == 100.0  # 4 classes
    assert res["best_epoch"] in range(3) and len(res["history"]) == 3
    saved = json.loads(Path(res["results"]).read_text())
    assert saved["top1"] == res["top1"] and saved["checkpoint"].endswith("checkpoint-00000002.pt")
    assert Path(saved["curves"]).is_file() and Path(saved["curves"]).parent == Path(res["results"]).parent
    assert res["model"] == "mae_vit_demo_patch8"


def test_linprobe_freezes_encoder_and_uses_affine_free_batchnorm(tmp_path):
    import mae_fast
    from mae_fast.train.finetune import Classifier

    enc = mae_fast.create_timm_encoder(mae_fast.create_model("mae_vit_demo_patch8"))
    c = Classifier(enc, 5, "cls", linprobe=True)
    assert not any(p.requires_grad for p in c.encoder.parameters())
    assert isinstance(c.bn, torch.nn.BatchNorm1d) and not c.bn.affine
    c.train()
    assert not c.encoder.training and c.bn.training
    before = {k: v.clone() for k, v in c.encoder.state_dict().items()}
    c(torch.randn(4, 3, 64, 64)).sum().backward()
    assert c.head.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in c.encoder.state_dict().items())


def test_finetune_loads_official_and_timm_style_checkpoints(tmp_path):
    import mae_fast
    from mae_fast.train.finetune import build_classifier

    src = mae_fast.create_model("mae_vit_demo_patch8")
    torch.save({"model": src.state_dict()}, tmp_path / "official.pth")
    torch.save(mae_fast.export_timm(src), tmp_path / "timm.pth")
    cfg = config_mod.defaults(config_mod.FINETUNE_KEYS)
    for f in ("official.pth", "timm.pth"):
        model, *_ = build_classifier(dict(cfg, checkpoint=str(tmp_path / f)), 3, linprobe=False)
        torch.testing.assert_close(model.encoder.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_layer_decay_groups():
    import mae_fast
    from mae_fast.train.finetune import Classifier, layer_decay_groups

    enc = mae_fast.create_timm_encoder(mae_fast.create_model("mae_vit_demo_patch8"))
    groups = layer_decay_groups(Classifier(enc, 3), 0.05, 0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.5 ** k for k in range(5, -1, -1)]  # depth 4: layers 0..5
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in Classifier(enc, 3).parameters())


class Stream(torch.utils.data.IterableDataset):
    """A deterministic per-epoch stream of 20 images (like shards with set_epoch), no len()."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        for _ in range(20):
            yield torch.randn(3, 32, 32, generator=g)


def test_streaming_source_resumes_at_its_position(tmp_path):
    kw = dict(steps=7, warmup_steps=1, batch_size=6, checkpoint_every=2)
    with pytest.raises(config_mod.ConfigError, match="stream of unknown length"):
        pretrain(tiny(tmp_path, name="x", steps=None), dataset=Stream())
    straight = pretrain(tiny(tmp_path, name="s", **kw), dataset=Stream())
    pretrain(tiny(tmp_path, name="r", stop_at_step=4, **kw), dataset=Stream())
    resumed = pretrain(tiny(tmp_path, name="r", resume="auto", **kw), dataset=Stream())
    a, b = (torch.load(r["checkpoint"], weights_only=False) for r in (straight, resumed))
    assert a["stream_positions"] == b["stream_positions"] == [(2, 1)]  # 3 batches of 6 per epoch
    assert_same_state(a["model"], b["model"])


def test_sigkilled_run_resumes_bit_exactly_with_workers(tmp_path):
    """kill -9 of a real training process, then resume=auto (with 2 DataLoader workers this time):
    the final weights equal an uninterrupted in-process run's."""
    straight = pretrain(tiny(tmp_path, name="straight", steps=10, checkpoint_every=2))
    args = [f"name=killed", f"output_dir={tmp_path}", "data_source=synthetic", "synthetic_size=48", "img_size=32",
            "model_kwargs={embed_dim: 48, depth: 2, num_heads: 2, decoder_embed_dim: 32, decoder_depth: 1, "
            "decoder_num_heads: 2}", "batch_size=8", "steps=10", "warmup_steps=2", "lr=2e-3", "checkpoint_every=2",
            "log_every=1", "vis_every=0", "vis_images=2", "progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", "pretrain", *args, "debug_step_sleep_s=0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt4 = tmp_path / "killed" / "checkpoints" / "checkpoint-00000004.pt"
    try:
        import time

        deadline = time.time() + 240
        while not ckpt4.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ckpt4.exists() and proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    steps_left = [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "killed")]
    assert max(steps_left) < 10
    resumed = pretrain(tiny(tmp_path, name="killed", steps=10, checkpoint_every=2, resume="auto", num_workers=2))
    assert_same_state(params(straight["checkpoint"]), params(resumed["checkpoint"]))


def test_linprobe_on_the_demo_labelled_set(tmp_path):
    pytest.importorskip("mae_fast.data")
    from mae_fast.data import build_labelled_datasets  # noqa: F401
    from mae_fast.train.finetune import finetune

    with pytest.warns(RuntimeWarning, match="random weights"):  # no runs/demo under tmp_path
        res = finetune(dict(mode="linprobe", output_dir=str(tmp_path), checkpoint=None, epochs=1, fraction=0.25,
                            batch_size=32, warmup_epochs=0, progress=False))
    assert res["num_classes"] == 8 and res["val_images"] > 0 and res["train_images"] < res["val_images"] * 4
    assert 0 <= res["top1"] <= res["top5"] <= 100 and Path(res["results"]).is_file()


def test_resume_with_another_schedule_warns(tmp_path):
    pretrain(tiny(tmp_path, name="w", steps=3))
    with pytest.warns(RuntimeWarning, match=r"different steps \(3 -> 5\)"):
        res = pretrain(tiny(tmp_path, name="w", steps=5, resume="auto"))
    assert res["steps"] == 5


def test_linprobe_with_lars_runs_and_bad_optimizer_errors(tmp_path):
    from mae_fast.train import config as config_mod
    from mae_fast.train.finetune import finetune

    base = dict(mode="linprobe", output_dir=str(tmp_path), checkpoint=None, epochs=1, fraction=0.1, batch_size=16,
                warmup_epochs=0, progress=False)
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = finetune(dict(base, linprobe_optimizer="lars"))
    assert 0 <= res["top1"] <= 100
    with pytest.raises(config_mod.ConfigError, match="lars or sgd"), pytest.warns(RuntimeWarning):
        finetune(dict(base, name="bad", linprobe_optimizer="adam"))


def test_memory_budget_turns_on_the_fewest_savers(tmp_path, monkeypatch, capsys):
    """A budget between the lean and the plain estimate turns lean on; one below lean checkpoints the fewest
    blocks that fit; one below everything is a clear error before any step; a roomy one changes nothing."""
    from mae_fast.memory import GiB, estimate_mae_step

    base = tiny(tmp_path, steps=1, checkpoint_every=1)
    micro, img = base["batch_size"], base["img_size"]

    def est(batch=micro, **kw):
        return estimate_mae_step("mae_vit_demo_patch8", img, batch, amp_dtype=None, norm_pix_loss=False, **TINY_MODEL,
                                 **kw).peak / GiB

    plain, lean, everything = est(), est(lean=True), est(lean=True, grad_checkpointing=True)
    assert plain > lean > everything
    res = pretrain(dict(base, name="roomy", memory_budget_gib=2 * plain))
    assert res["memory_plan"]["changed"] is False and res["memory_plan"]["lean_activations"] is False
    res = pretrain(dict(base, name="lean", memory_budget_gib=(plain + lean) / 2))
    assert res["memory_plan"]["lean_activations"] and res["memory_plan"]["checkpointed_blocks"] == 0
    assert abs(res["memory_plan"]["estimated_peak_gib"] - lean) < 1e-3
    res = pretrain(dict(base, name="ckpt", memory_budget_gib=(lean + everything) / 2))
    n = res["memory_plan"]["checkpointed_blocks"]
    assert n >= 1 and res["memory_plan"]["recompute_flops_pct"] > 0
    assert est(lean=True, grad_checkpointing=n) <= (lean + everything) / 2 < est(lean=True, grad_checkpointing=n - 1)
    with pytest.raises(config_mod.ConfigError, match="even with every block checkpointed"):
        pretrain(dict(base, name="tight", memory_budget_gib=everything / 2))
    # a budget that fits a smaller micro-batch fully checkpointed: the error names the accum_steps that works
    half = est(lean=True, grad_checkpointing=True, batch=micro // 2)
    with pytest.raises(config_mod.ConfigError, match=r"raise accum_steps to 2 \(a micro-batch of [4-7] fits"):
        pretrain(dict(base, name="accum", memory_budget_gib=(half + everything) / 2))
    assert pretrain(dict(base, name="off", memory_budget_gib=None))["memory_plan"] is None
    import mae_fast.memory

    def broken(*a, **k):
        raise NotImplementedError("an op fake tensors cannot run")

    monkeypatch.setattr(mae_fast.memory, "estimate_mae_step", broken)
    res = pretrain(dict(base, name="unestimable", memory_budget_gib=(plain + lean) / 2))
    assert res["memory_plan"] is None and res["steps"] == 1  # the run goes on as configured
    assert "could not estimate" in capsys.readouterr().out
    with pytest.raises(config_mod.ConfigError, match="memory_budget_gib"):
        pretrain(dict(base, name="bad", memory_budget_gib="lots"))


def test_finetune_memory_budget_turns_on_checkpointing_with_the_same_results(tmp_path):
    from mae_fast.train import config as config_mod
    from mae_fast.train.finetune import finetune

    pre = pretrain(tiny(tmp_path, name="pre", steps=1))
    base = dict(mode="finetune", checkpoint=pre["run_dir"], output_dir=str(tmp_path), epochs=1, batch_size=16,
                warmup_epochs=0, lr=3e-3, progress=False, drop_path=0.0)
    data = (Shapes(32), Shapes(16, seed=1), ["a", "b", "c", "d"])
    roomy = finetune(dict(base, name="roomy", memory_budget_gib=100.0), datasets=data)
    plan = roomy["memory_plan"]
    assert plan["changed"] is False and plan["grad_checkpointing"] is False and plan["estimated_peak_bytes"] > 0
    squeezed = finetune(dict(base, name="squeezed", memory_budget_gib=plan["estimated_peak_bytes"] * 0.999 / 2**30),
                        datasets=data)
    plan2 = squeezed["memory_plan"]
    assert plan2["changed"] and plan2["grad_checkpointing"]
    assert plan2["estimated_peak_bytes"] < plan["estimated_peak_bytes"] * 0.999
    assert [h["top1"] for h in squeezed["history"]] == [h["top1"] for h in roomy["history"]]  # checkpointing is exact
    with pytest.raises(config_mod.ConfigError, match="raise accum_steps .* or lower batch_size"):
        finetune(dict(base, name="tight", memory_budget_gib=1e-4), datasets=data)
    with_drop_path = finetune(dict(base, name="dp", drop_path=0.1, memory_budget_gib=100.0), datasets=data)
    assert with_drop_path["memory_plan"]["estimated_peak_bytes"] > 0  # timm's drop-path set-up is estimable
    with pytest.raises(config_mod.ConfigError, match="true or false"):
        finetune(dict(base, name="partial", grad_checkpointing=3), datasets=data)


def test_time_waiting_for_data_is_measured_and_a_slow_loader_is_named(tmp_path, monkeypatch, capsys):
    """metrics.jsonl and result.json carry the share of each window spent blocked on the loader; when it is large
    the run ends by saying so and what to do. A slow step with fast data must not read as data-bound."""
    import time as time_mod

    from mae_fast.train import pretrain as pretrain_mod

    fast = pretrain(tiny(tmp_path / "fast", steps=4, debug_step_sleep_s=0.4))
    assert 0 <= fast["data_wait"] < 0.1
    assert "waited for data" not in capsys.readouterr().out

    slow_item = pretrain_mod.SyntheticImages.__getitem__

    def slow(self, i):
        time_mod.sleep(0.1)  # 8 items a step: 0.8 s of loading against a few ms of compute (0.4 s on a busy CPU)
        return slow_item(self, i)

    monkeypatch.setattr(pretrain_mod.SyntheticImages, "__getitem__", slow)
    res = pretrain(tiny(tmp_path / "slow"))
    assert 0.5 < res["data_wait"] <= 1.0
    out = capsys.readouterr().out
    assert "training waited for data" in out and "num_workers (now 0)" in out and "mae_fast.data.shards" in out
    rows = [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in rows if "data_wait" in r]
    assert len(waits) == 8 and all(0.5 < w <= 1.0 for w in waits[1:])


def test_interrupted_finetune_resumes_after_its_last_epoch_with_the_same_numbers(tmp_path, monkeypatch, capsys):
    """Killed during epoch 3 of 4, the run continues after epoch 2 (model, optimizer, schedule, RNG and
    history restored) and ends with the numbers of a run never interrupted; a finished run leaves no
    epoch checkpoint; a checkpoint of other settings is not resumed."""
    import mae_fast.train.finetune as ft

    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(mode="finetune", output_dir=str(tmp_path), epochs=4, batch_size=8, warmup_epochs=1, lr=3e-3,
                drop_path=0.1, progress=False, pool="mean", checkpoint=None, img_size=32)
    with pytest.warns(RuntimeWarning, match="random weights"):
        straight = ft.finetune(dict(base, name="straight"), datasets=data)
    assert not (tmp_path / "straight" / "checkpoints").exists() or \
        not list((tmp_path / "straight" / "checkpoints").glob("*.pt"))

    real_evaluate, calls = ft.evaluate, []

    def killed_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ft, "evaluate", killed_in_epoch_3)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(KeyboardInterrupt):
        ft.finetune(dict(base, name="killed"), datasets=data)
    monkeypatch.setattr(ft, "evaluate", real_evaluate)
    saved = [p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.pt")]
    assert saved == ["checkpoint-00000010.pt"]  # numbered by step: after epoch 1, 2 x 5 steps
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="random weights"):
        resumed = ft.finetune(dict(base, name="killed"), datasets=data)
    assert "resumed after epoch 1" in capsys.readouterr().out
    assert resumed["history"] == straight["history"] and resumed["top1"] == straight["top1"]
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.pt"))

    # other settings in the same directory: a warning, and a fresh run (not a resume of the old state)
    monkeypatch.setattr(ft, "evaluate", killed_in_epoch_3)
    calls.clear()
    with pytest.warns(RuntimeWarning), pytest.raises(KeyboardInterrupt):
        ft.finetune(dict(base, name="changed"), datasets=data)
    monkeypatch.setattr(ft, "evaluate", real_evaluate)
    with pytest.warns(RuntimeWarning, match=r"other settings \(lr\): starting over"):
        fresh = ft.finetune(dict(base, name="changed", lr=1e-3), datasets=data)
    with pytest.warns(RuntimeWarning, match="random weights"):
        reference = ft.finetune(dict(base, name="reference", lr=1e-3), datasets=data)
    assert fresh["history"] == reference["history"]
    with pytest.raises(config_mod.ConfigError, match="resume must be auto or null"):
        ft.finetune(dict(base, name="bad", resume="yes"), datasets=data)


def _finetune_signal_at(monkeypatch, call: int, *signals, peer_flag: int | None = None) -> list:
    """Finetuning's loss all-reduce ([loss, SIGTERM, SIGINT]): from its ``call``-th call on, either ``signals``
    arrive right after it (during that step) or a simulated peer rank raises flag ``peer_flag``. Returns what this
    rank sent."""
    import signal

    from mae_fast.train import distributed as dist_mod

    sent = []

    def all_reduce_sum(t):
        sent.append(t.clone())
        if len(sent) == call:
            for sig in signals:
                signal.raise_signal(sig)
        if peer_flag is not None and len(sent) >= call:
            t[peer_flag] += 1.0
        return t

    monkeypatch.setattr(dist_mod, "all_reduce_sum", all_reduce_sum)
    return sent


FT_BASE = dict(mode="finetune", epochs=3, batch_size=8, warmup_epochs=1, lr=3e-3, drop_path=0.1, progress=False,
               pool="mean", checkpoint=None, img_size=32)


@pytest.mark.parametrize("signame,extra", [("SIGINT", {}), ("SIGTERM", {}),
                                           ("SIGINT", {"mixup": 0.8, "cutmix": 1.0})])
def test_a_signal_stops_finetuning_within_its_epoch_and_resume_is_exact(tmp_path, monkeypatch, signame, extra):
    """Ctrl-C or SIGTERM during step 7 of 15 (epoch 1, 5 steps an epoch): that step finishes, a checkpoint of it
    is written and TrainingInterrupted raised, not at the next epoch's end; resume=auto continues with the 3rd
    batch of epoch 1 (drop-path RNG and mixup / cutmix draws included) and ends with the uninterrupted run's
    numbers, bit for bit."""
    import signal

    import mae_fast.train.finetune as ft

    sig = getattr(signal, signame)
    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), **extra)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.warns(RuntimeWarning, match="random weights"):
        straight = ft.finetune(dict(base, name="straight"), datasets=data)
    sent = _finetune_signal_at(monkeypatch, 7, sig)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted) as info:
        ft.finetune(dict(base, name="sig"), datasets=data)
    assert info.value.signum == sig and info.value.step == 8 and len(sent) == 8
    assert f"signal {signame} in epoch 1 after 3 of its 5 steps (step 8/15)" in str(info.value)
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back
    saved = checkpoint_io.list_checkpoints(tmp_path / "sig")
    assert [s for s, _ in saved] == [8] and str(saved[0][1]) == str(info.value.checkpoint)
    state = torch.load(saved[0][1], weights_only=False)
    assert state["epoch"] == 1 and state["batches_done"] == 3 and len(state["history"]) == 1
    assert not (tmp_path / "sig" / "results.json").exists()
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="random weights"):
        resumed = ft.finetune(dict(base, name="sig"), datasets=data)
    assert resumed["history"] == straight["history"] and resumed["top1"] == straight["top1"]
    assert not checkpoint_io.list_checkpoints(tmp_path / "sig")


def test_a_signal_in_finetunings_last_step_evaluates_on_resume(tmp_path, monkeypatch, capsys):
    """Stopped after an epoch's last step, before its evaluation: the resumed run trains nothing more in that
    epoch, evaluates it and goes on; the CLI exits as the signal would have."""
    import signal

    import mae_fast.train.finetune as ft

    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), epochs=2)
    with pytest.warns(RuntimeWarning, match="random weights"):
        straight = ft.finetune(dict(base, name="straight"), datasets=data)
    _finetune_signal_at(monkeypatch, 4, signal.SIGINT)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted) as info:
        ft.finetune(dict(base, name="edge"), datasets=data)
    assert info.value.step == 5 and "in epoch 0 after 5 of its 5 steps" in str(info.value)
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="random weights"):
        resumed = ft.finetune(dict(base, name="edge"), datasets=data)
    assert "resumed in epoch 0 after 5 of its 5 steps" in capsys.readouterr().out
    assert resumed["history"] == straight["history"]

    monkeypatch.setattr(ft, "finetune", lambda cfg: (_ for _ in ()).throw(
        ft.TrainingInterrupted("signal SIGTERM in epoch 0", signal.SIGTERM, 3, None)))
    assert ft.main(["epochs=1"], mode="finetune") == 128 + signal.SIGTERM
    assert "mae-fast finetune: signal SIGTERM in epoch 0" in capsys.readouterr().err


def test_a_signal_to_one_finetuning_rank_stops_every_rank(tmp_path, monkeypatch):
    """A simulated other rank's SIGTERM flag from step 4 on: this rank (no signal of its own) stops at step 4
    with the same checkpoint and exception; a signal after the last step still stops, once the run is saved."""
    import signal

    import mae_fast.train.finetune as ft

    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), epochs=2)
    sent = _finetune_signal_at(monkeypatch, 4, peer_flag=1)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted) as info:
        ft.finetune(dict(base, name="peer"), datasets=data)
    assert info.value.signum == signal.SIGTERM and info.value.step == 4
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "peer")] == [4]
    assert all(t.numel() == 3 and not t[1:].any() for t in sent)  # this rank's own flags stayed down

    real_evaluate, calls = ft.evaluate, []

    def sigint_in_last_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.undo()
    monkeypatch.setattr(ft, "evaluate", sigint_in_last_evaluation)
    with pytest.warns(RuntimeWarning, match="random weights"), \
            pytest.raises(ft.TrainingInterrupted, match="finished at step 10/10, then SIGINT"):
        ft.finetune(dict(base, name="last"), datasets=data)
    assert json.loads((tmp_path / "last" / "results.json").read_text())["epochs"] == 2


def _smoothed(labels, num_classes, smoothing):
    off = smoothing / num_classes
    return torch.nn.functional.one_hot(labels, num_classes).double() * (1 - smoothing) + off


def test_batch_mixer_follows_the_mixup_and_cutmix_formulas():
    """Against the formulas: mixup x' = lam x + (1 - lam) x[flip], cutmix pastes one box of x[flip] with
    lam = 1 - box area / image area, soft targets lam y~ + (1 - lam) y~[flip] of label-smoothed one-hots y~. lam
    is read back from the images. An odd batch keeps its last image, with a smoothed one-hot target. The draws
    are a function of (seed, step) and leave numpy's global generator alone."""
    from mae_fast.train.finetune import BatchMixer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 11, 13, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    smooth = _smoothed(y, 5, 0.1)

    mixup = BatchMixer(0.8, 0.0, 0.1, 5, seed=3)
    np_state = np.random.get_state()
    out, soft = mixup(x.clone(), y, step=4)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    a, b = x[:6], x[:6].flip(0)
    lam = float(((out[0] - b[0]) * (a[0] - b[0])).sum() / ((a[0] - b[0]) ** 2).sum())
    assert 0 < lam < 1
    torch.testing.assert_close(out[:6], lam * a + (1 - lam) * b)
    torch.testing.assert_close(out[6], x[6])
    torch.testing.assert_close(soft[:6].double(), lam * smooth[:6] + (1 - lam) * smooth[:6].flip(0), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(soft[6].double(), smooth[6], atol=1e-6, rtol=0)
    torch.testing.assert_close(soft.sum(1), torch.ones(7))
    again, _ = mixup(x.clone(), y, step=4)
    other, _ = BatchMixer(0.8, 0.0, 0.1, 5, seed=3)(x.clone(), y, step=5)
    assert torch.equal(again, out) and not torch.allclose(other, out)

    cutmix = BatchMixer(0.0, 1.0, 0.1, 5, seed=3)
    for step in range(6):
        out, soft = cutmix(x[:6].clone(), y[:6], step=step)
        pasted = (out != x[:6]).any(0).any(0)  # (H, W): where the flipped batch shows
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):  # the box is a rectangle of x[flip], the rest x
            box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            torch.testing.assert_close(out[:, :, box[0], box[1]], x[:6].flip(0)[:, :, box[0], box[1]])
        lam = 1 - float(pasted.sum()) / (11 * 13)
        torch.testing.assert_close(out[:, :, ~pasted], x[:6][:, :, ~pasted])
        torch.testing.assert_close(soft.double(), lam * smooth[:6] + (1 - lam) * smooth[:6].flip(0), atol=1e-6,
                                   rtol=0)


def test_finetuning_augmentation_keys(tmp_path):
    """MAE's finetuning recipe (its FINETUNE.md numbers) loads for finetune, not for pretrain; bad augmentation
    keys stop before any data is read; the keys join the run identity only when on (older checkpoints resume)."""
    import mae_fast.train.finetune as ft

    r = config_mod.config_from_argv(["--config", "mae_official_finetune"], config_mod.FINETUNE_KEYS, None,
                                    fixed={"mode": "finetune"})
    assert (r["auto_augment"], r["reprob"], r["mixup"], r["cutmix"], r["label_smoothing"]) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    assert (r["base_lr"], r["batch_size"], r["epochs"], r["layer_decay"], r["drop_path"], r["warmup_epochs"]) == \
        (5e-4, 1024, 100, 0.65, 0.1, 5)
    assert r["pool"] == "mean_fc_norm"
    assert "mae_official_finetune" not in config_mod.list_recipes()
    with pytest.raises(config_mod.ConfigError, match="recipe 'mae_official_finetune' not found"):
        config_mod.config_from_argv(["--config", "mae_official_finetune"])
    base = dict(output_dir=str(tmp_path), data_root=str(tmp_path / "absent"), checkpoint=None, progress=False)
    with pytest.raises(config_mod.ConfigError, match="auto_augment 'randaug' is not a policy timm knows"):
        ft.finetune(dict(base, auto_augment="randaug"))
    with pytest.raises(config_mod.ConfigError, match="reprob must be in"):
        ft.finetune(dict(base, reprob=1.5))
    with pytest.raises(config_mod.ConfigError, match="mixup, cutmix >= 0"):
        ft.finetune(dict(base, cutmix=-1.0))
    cfg = config_mod.build_config({}, config_mod.FINETUNE_KEYS, default_recipe=None)
    assert not set(ft.LATER_IDENTITY) & set(ft.run_identity(cfg, None))
    assert {k: cfg[k] for k in ft.LATER_IDENTITY} == ft.LATER_IDENTITY  # the defaults it leaves out
    assert ft.run_identity(dict(cfg, mixup=0.8), None)["mixup"] == 0.8
    data = (Shapes(16), Shapes(8, seed=1), ["a", "b", "c", "d"])
    with pytest.warns(RuntimeWarning, match="datasets given keep their own transforms"):
        plain = ft.finetune(dict(FT_BASE, output_dir=str(tmp_path), epochs=1, name="own", auto_augment="original",
                                 label_smoothing=0.0), datasets=data)
    with pytest.warns(RuntimeWarning, match="random weights"):
        mixed = ft.finetune(dict(FT_BASE, output_dir=str(tmp_path), epochs=1, name="mixed", cutmix=1.0,
                                 label_smoothing=0.0), datasets=data)
    assert mixed["history"][0]["train_loss"] != plain["history"][0]["train_loss"]  # the mixer is in the loop


def test_linprobe_of_the_finetuning_recipe_stops_on_its_pool_before_reading_data(tmp_path, monkeypatch, capsys):
    """`mae-fast linprobe --config mae_official_finetune` (mode fixed by the subcommand) meets the recipe's
    pool=mean_fc_norm, which a probe refuses: the CLI says so before scanning the labelled set (an ImageNet scan
    took minutes before the refusal); pool=cls passes that check."""
    import mae_fast.data as data_mod
    import mae_fast.train.finetune as ft

    scanned = []
    monkeypatch.setattr(data_mod, "build_labelled_datasets", lambda *a, **k: scanned.append(1) or 1 / 0)
    argv = ["--config", "mae_official_finetune", f"output_dir={tmp_path}", "checkpoint=null"]
    assert ft.main(argv, mode="linprobe") == 2
    assert "pool=mean_fc_norm trains a new LayerNorm" in capsys.readouterr().err and not scanned
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ZeroDivisionError):
        ft.main([*argv, "pool=cls"], mode="linprobe")
    assert scanned == [1]


def test_finetune_progress_counts_steps_with_the_epoch_loss_and_accuracy(tmp_path, capsys):
    """An epoch of a large labelled set is long: the bar moves every step and shows the epoch, the epoch's running
    loss and the last evaluation."""
    import mae_fast.train.finetune as ft

    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = ft.finetune(dict(FT_BASE, output_dir=str(tmp_path), epochs=2, progress=True), datasets=data)
    out = capsys.readouterr().out
    assert "10/10" in out and "epoch=2/2" in out
    assert f"top1={res['history'][-1]['top1']:.1f}" in out and f"best={res['top1']:.1f}" in out


def test_finetune_gradient_accumulation_gives_one_batchs_step(tmp_path, monkeypatch, capsys):
    """accum_steps=2 (two micro-batches of 4, one optimizer step) follows the run of whole batches of 8 to float
    rounding: the same gradient, so a run stopped with whole batches resumes with micro-batches (a smaller GPU).
    The memory plan is made for the micro-batch; a batch that does not split into the micro-steps is refused
    before anything is built."""
    import signal

    import mae_fast.train.finetune as ft

    planned, trained_on = [], []
    real_forward = ft.Classifier.forward
    monkeypatch.setattr(ft, "fit_memory_budget", lambda cfg, spec, n, lp, batch, *a: planned.append(batch))

    def forward(self, x):
        if self.training:
            trained_on.append(len(x))
        return real_forward(self, x)

    monkeypatch.setattr(ft.Classifier, "forward", forward)
    data = (Shapes(44), Shapes(20, seed=1), ["a", "b", "c", "d"])  # 44 = 5 batches of 8 and a last of 4
    base = dict(FT_BASE, output_dir=str(tmp_path), epochs=2, drop_path=0.0)  # drop path draws per forward
    with pytest.warns(RuntimeWarning, match="random weights"):
        whole = ft.finetune(dict(base, name="whole"), datasets=data)
        assert trained_on == ([8] * 5 + [4]) * 2
        trained_on.clear()
        accum = ft.finetune(dict(base, name="accum", accum_steps=2), datasets=data)
        assert trained_on == ([4] * 10 + [2, 2]) * 2
    assert planned == [8, 4]
    _finetune_signal_at(monkeypatch, 8, signal.SIGTERM)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted):
        ft.finetune(dict(base, name="moved"), datasets=data)
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="random weights"):
        moved = ft.finetune(dict(base, name="moved", accum_steps=2), datasets=data)
    assert "resumed in epoch 1 after 3 of its 6 steps" in capsys.readouterr().out
    for a, *others in zip(whole["history"], accum["history"], moved["history"]):
        for b in others:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4) and b["top1"] == a["top1"]
    with pytest.raises(config_mod.ConfigError, match="batch_size 8 must be a multiple of the 1 processes x 3 "
                                                     "accumulation steps"):
        ft.finetune(dict(base, name="bad", accum_steps=3), datasets=data)
    with pytest.raises(config_mod.ConfigError, match="accum_steps >= 1"):
        ft.finetune(dict(base, name="bad", accum_steps=0), datasets=data)


@pytest.mark.parametrize("mode, extra", [("linprobe", {}), ("finetune", {"mixup": 0.8, "cutmix": 1.0})])
def test_accumulation_on_a_short_last_batch_keeps_micro_batches_usable(tmp_path, monkeypatch, mode, extra):
    """batch_size=8 accum_steps=4 on 42 images: five batches of 8 (micro-batches of 2) and a last one of 2, which
    split four ways would give micro-batches of 1 and 0 images: the probe's BatchNorm cannot take statistics over
    one row (it raised) and mixup cannot pair one image (it left it unmixed). The last batch takes one micro-batch
    of 2. Micro-batches of 1 in every step are refused before any data is read."""
    import mae_fast.train.finetune as ft

    trained_on, real_forward = [], ft.Classifier.forward

    def forward(self, x):
        if self.training:
            trained_on.append(len(x))
        return real_forward(self, x)

    monkeypatch.setattr(ft.Classifier, "forward", forward)
    data = (Shapes(42), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), mode=mode, epochs=1, accum_steps=4,
                lr=0.05 if mode == "linprobe" else 3e-3, **extra)
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = ft.finetune(base, datasets=data)
    assert trained_on == [2] * 20 + [2]
    assert np.isfinite(res["history"][0]["train_loss"]) and np.isfinite(res["history"][0]["val_loss"])
    with pytest.raises(config_mod.ConfigError, match="micro-batches of 1 image.*must be >= 2"):
        ft.finetune(dict(base, accum_steps=8, data_root=str(tmp_path / "absent")))


def test_finetune_records_its_settings_and_labelled_subset(tmp_path):
    """config.yaml holds every setting of the run (it loads back as the same config) and data_record.json the
    training images the low-label fraction kept, so a top-1 can be traced to what produced it."""
    import yaml

    import mae_fast.train.finetune as ft
    from mae_fast.data import build_labelled_datasets

    cfg = dict(FT_BASE, output_dir=str(tmp_path), epochs=1, fraction=0.25, reprob=0.25, name="rec", img_size=None)
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = ft.finetune(cfg)
    run_dir = tmp_path / "rec"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == config_mod.build_config(cfg, config_mod.FINETUNE_KEYS, default_recipe=None)
    record = json.loads((run_dir / "data_record.json").read_text())
    train, _, _ = build_labelled_datasets(None, img_size=64, fraction=0.25, seed=0)
    assert record["train_files"] == train.record["train_files"] and record["n_train"] == res["train_images"]


def test_mean_fc_norm_pool_is_maes_global_pool():
    """pool=mean_fc_norm against timm's VisionTransformer(global_pool='avg', fc_norm=True), MAE's finetuning model:
    the same features from the same encoder and fc_norm weights; the encoder's final norm is not applied; the new
    LayerNorm sits in the last layer-decay group without weight decay; a linear probe refuses it."""
    from timm.models.vision_transformer import VisionTransformer

    import mae_fast
    from mae_fast.models import create_timm_encoder, export_timm, timm_model_kwargs
    from mae_fast.train.finetune import Classifier, layer_decay_groups

    mae = mae_fast.create_model("mae_vit_demo_patch8", img_size=40)
    torch.manual_seed(0)
    for p in mae.parameters():  # random everywhere, final norm included, so that skipping it shows
        p.data.normal_(0.0, 0.2)
    clf = Classifier(create_timm_encoder(mae), num_classes=5, pool="mean_fc_norm")
    clf.fc_norm.weight.data.uniform_(0.5, 1.5), clf.fc_norm.bias.data.normal_()
    ref = VisionTransformer(**timm_model_kwargs(mae), global_pool="avg", fc_norm=True)
    state = {k: v for k, v in export_timm(mae).items() if not k.startswith("norm.")}
    state.update({"fc_norm.weight": clf.fc_norm.weight.data, "fc_norm.bias": clf.fc_norm.bias.data})
    ref.load_state_dict(state, strict=True)
    clf.eval(), ref.eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(clf.features(x), ref(x), rtol=1e-5, atol=1e-5)
        plain_mean = Classifier(create_timm_encoder(mae), num_classes=5, pool="mean").eval().features(x)
    assert not torch.allclose(clf.features(x), plain_mean, atol=1e-3)
    groups = layer_decay_groups(clf, weight_decay=0.05, layer_decay=0.75)
    fc_group = next(g for g in groups if any(p is clf.fc_norm.weight for p in g["params"]))
    assert fc_group["lr_scale"] == 1.0 and fc_group["weight_decay"] == 0.0
    with pytest.raises(config_mod.ConfigError, match="pool=mean_fc_norm trains a new LayerNorm"):
        Classifier(create_timm_encoder(mae), num_classes=5, pool="mean_fc_norm", linprobe=True)
    with pytest.raises(config_mod.ConfigError, match="pool must be one of cls, mean, mean_fc_norm, got 'max'"):
        Classifier(create_timm_encoder(mae), num_classes=5, pool="max")


def test_finetune_with_an_empty_validation_set_stops_before_training(tmp_path):
    from mae_fast.train.finetune import finetune

    with pytest.warns(RuntimeWarning, match="random weights"), \
            pytest.raises(config_mod.ConfigError, match="no validation images"):
        finetune(dict(mode="linprobe", checkpoint=None, output_dir=str(tmp_path), epochs=1, batch_size=8, img_size=32,
                      progress=False, memory_budget_gib=None), datasets=(Shapes(8), Shapes(0), ["a", "b", "c", "d"]))
    assert not (tmp_path / "linprobe").exists()


# ---------------------------------------------------------------------------------------------
# MFU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12),
    ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla V100-SXM2-16GB", 125e12),
    ("NVIDIA B200", 2250e12)])
def test_peak_flops_of_known_gpus_are_their_bf16_dense_datasheet_figures(monkeypatch, name, peak):
    """The MFU denominator per device (bf16 dense tensor-core FLOP/s from the vendors' datasheets), found by name
    (L40S and A10G are not an L40 or an A10); an override wins; an unknown GPU gets none (no MFU), not a guess."""
    from mae_fast.train import pretrain as pretrain_mod

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert pretrain_mod.peak_flops_for(cuda, None)[0] == peak
    assert pretrain_mod.peak_flops_for(cuda, 3.5e12) == (3.5e12, "config")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future Accelerator")
    assert pretrain_mod.peak_flops_for(cuda, None)[0] is None


def counted_train_flops_per_image(model_kwargs: dict, img_size: int, mask_ratio: float) -> float:
    """3 x the forward matmul FLOPs per image that torch's FlopCounterMode counts on a real forward of the model
    (torch backend: plain matmuls): the model-FLOPs convention of MFU (backward = 2 x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    old = os.environ.get("MAE_FAST_BACKEND")
    os.environ["MAE_FAST_BACKEND"] = "torch"
    try:
        m = mae_fast.create_model("mae_vit_demo_patch8", img_size=img_size, **model_kwargs)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(torch.randn(2, 3, img_size, img_size), mask_ratio)
    finally:
        if old is None:
            os.environ.pop("MAE_FAST_BACKEND")
        else:
            os.environ["MAE_FAST_BACKEND"] = old
    return 3 * fc.get_total_flops() / 2


def test_mfu_is_counted_flops_times_images_per_s_over_the_peak(tmp_path):
    """MFU in metrics.jsonl and result.json: FLOPs per image (counted independently, at the run's mask ratio 0.6)
    x images/s / the configured peak. No other factor: one process, so the world size is 1."""
    res = pretrain(tiny(tmp_path, steps=3, mask_ratio=0.6, peak_flops=2.5e11, checkpoint_every=100))
    per_image = counted_train_flops_per_image(TINY_MODEL, 32, 0.6)
    assert per_image != pytest.approx(counted_train_flops_per_image(TINY_MODEL, 32, 0.75), rel=0.01)
    assert res["mfu"] == pytest.approx(per_image * res["images_per_s"] / 2.5e11, rel=1e-9)
    rows = [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("mfu") is not None]
    assert len(rows) >= 2
    for r in rows:  # images_per_s is rounded to 2 decimals there
        assert r["mfu"] == pytest.approx(per_image * r["images_per_s"] / 2.5e11, rel=2e-3, abs=1e-12)
