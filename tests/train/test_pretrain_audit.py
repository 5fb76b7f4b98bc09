"""Pretraining entry point, from a mutation audit: the optimizer steps against a hand-written AdamW loop, the
learning-rate schedule, the non-finite-step limits (also across a resume), what a resume restores, the metrics
rows under a virtual clock, and checkpoint_io's keep / digest / damaged-file handling."""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mae_fast
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.train import checkpoint_io, pretrain as pretrain_mod
from mae_fast.train.pretrain import NonFiniteLossError, pretrain

TINY_MODEL = dict(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny(tmp_path, **kw) -> dict:
    """The small synthetic-data config of tests/test_train.py, without the reconstruction picture and with a given
    MFU peak (no CPU matmuls to measure it) to keep these runs short."""
    cfg = dict(recipe="demo", name="t", output_dir=str(tmp_path), data_source="synthetic", synthetic_size=48,
               img_size=32, model_kwargs=dict(TINY_MODEL), batch_size=8, steps=8, warmup_steps=2,
               lr=2e-3, checkpoint_every=3, log_every=1, vis_every=0, vis_images=0, progress=False, peak_flops=1e12)
    cfg.update(kw)
    return cfg


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """No curves.png (matplotlib takes longer than these runs' training; tests/test_curves.py covers it)."""
    monkeypatch.setattr(pretrain_mod.curves, "draw_or_warn", lambda run_dir, draw: None)


def rows_of(res) -> list[dict]:
    return [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def mae_lr(epoch, lr, min_lr, warmup_epochs, epochs):
    """MAE's util/lr_sched.adjust_learning_rate at a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def expected_lr(step, peak, total, warmup, schedule, min_lr):
    """MAE's schedule (util/lr_sched.py), per step: linear warmup from 0, then a half-cosine to min_lr."""
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


# ---------------------------------------------------------------------------------------------
# the optimizer steps against a hand-written loop
# ---------------------------------------------------------------------------------------------
def reference_run(cfg: dict, n_steps: int):
    """``n_steps`` of pretraining written out by hand: the same init, images and masking noise as the trainer
    (its data order and noise seeding are taken as given), plain (non-fused) AdamW with its own no-decay rule,
    the MAE lr formula above, the mean loss over micro-batches and torch-style global-norm clipping in fp64.
    Returns (model, per-step losses, per-step pre-clip gradient norms)."""
    from mae_fast.train.pretrain import SeededItems, StepBatchSampler, SyntheticImages, _mix

    B, A, seed = cfg["batch_size"], cfg["accum_steps"], 0
    torch.manual_seed(seed)
    model = mae_fast.create_model("mae_vit_demo_patch8", img_size=cfg["img_size"], norm_pix_loss=False,
                                  **cfg["model_kwargs"])
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "token" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.0, betas=(0.9, 0.95), fused=True)
    items = SeededItems(SyntheticImages(cfg["synthetic_size"], cfg["img_size"], seed), seed)
    sampler = StepBatchSampler(cfg["synthetic_size"], B, seed, 0, cfg["steps"])
    L, micro = model.num_patches, B // A
    losses, norms = [], []
    for step in range(n_steps):
        lr = expected_lr(step, cfg["lr"], cfg["steps"], cfg["warmup_steps"], "cosine", cfg["min_lr"])
        epoch, idx = sampler.global_batch(step)
        imgs = torch.stack([items[(epoch, int(i))] for i in idx])
        noise = torch.rand(B, L, generator=torch.Generator().manual_seed(_mix(seed, 15485863, step)))
        opt.zero_grad(set_to_none=True)
        micro_losses = []
        for a in range(A):
            part = slice(a * micro, (a + 1) * micro)
            loss = model(imgs[part], mask_ratio=0.75, noise=noise[part], masked_only=True).loss
            (loss / A).backward()
            micro_losses.append(loss.item())
        losses.append(sum(micro_losses) / A)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        coef = min(1.0, cfg["clip_grad"] / (norm + 1e-6))
        for g in grads:
            g.mul_(coef)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return model, losses, norms


@pytest.mark.parametrize("accum", [1, 3])
def test_steps_match_a_hand_written_adamw_loop(tmp_path, accum):
    """Six steps (two of warmup, then into the cosine, which ends at a large min_lr) with the clip active on most
    steps: the weights, the logged lr / loss / grad_norm of every step, images_seen and final_loss follow the loop
    above; the global batch of 9 is cut into ``accum`` micro-batches."""
    cfg = tiny(tmp_path, name=f"a{accum}", batch_size=9, accum_steps=accum, steps=10, warmup_steps=2,
               stop_at_step=6, lr=3e-3, min_lr=1e-3, clip_grad=0.4, checkpoint_every=100)
    res = pretrain(cfg)
    model, losses, norms = reference_run(cfg, 6)
    assert sum(n > cfg["clip_grad"] for n in norms) >= 3  # the clip is exercised
    rows = rows_of(res)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r, loss, norm in zip(rows, losses, norms):
        s = r["step"] - 1
        assert r["lr"] == pytest.approx(expected_lr(s, 3e-3, 10, 2, "cosine", 1e-3), rel=1e-12)
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert r["images_seen"] == 9 * r["step"]
    assert res["images_seen"] == 6 * 9 and res["steps"] == 6
    assert res["final_loss"] == pytest.approx(np.mean(losses), rel=1e-5)  # the mean of the (fewer than 20) steps
    got = ckpt(res["checkpoint"])["model"]
    for name, p in model.state_dict().items():
        a, b = got[name], p
        if name.endswith("attn.qkv.bias"):  # the key bias has a zero gradient in exact arithmetic (softmax is
            d = a.numel() // 3              # shift-invariant): Adam turns its rounding noise into lr-sized steps
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_at_is_maes_per_step_schedule(schedule):
    rng = random.Random(7)
    for _ in range(20):
        total, warmup = rng.randint(3, 97), rng.randint(0, 13)
        peak, min_lr = rng.uniform(1e-4, 1e-2), rng.uniform(0, 1e-4)
        for step in range(total):
            want = expected_lr(step, peak, total, warmup, schedule, min_lr)
            assert pretrain_mod.lr_at(step, peak, total, warmup, schedule, min_lr) == pytest.approx(want, rel=1e-12)
    assert pretrain_mod.lr_at(0, 1.0, 10, 4, schedule, 0.1) == 0.0  # warmup starts from 0, as MAE's


def test_base_lr_and_warmup_epochs_set_the_logged_lr(tmp_path):
    """lr=null: the peak is base_lr x the GLOBAL batch / 256 (not the micro-batch); warmup_epochs x steps per epoch
    (48 images / 8 = 6 steps an epoch, so 0.5 epochs = 3 steps)."""
    res = pretrain(tiny(tmp_path, lr=None, base_lr=0.02, warmup_steps=None, warmup_epochs=0.5, accum_steps=2,
                        steps=7, min_lr=1e-4, checkpoint_every=100))
    peak = 0.02 * 8 / 256
    lrs = [r["lr"] for r in rows_of(res)]
    assert lrs == pytest.approx([expected_lr(s, peak, 7, 3, "cosine", 1e-4) for s in range(7)], rel=1e-12)
    assert max(lrs) == pytest.approx(peak, rel=1e-12)


def test_fractional_warmup_epochs_follow_maes_fractional_epoch(tmp_path):
    """warmup_epochs x steps per epoch need not be whole: 48 images / 8 = 6 steps an epoch, 0.45 epochs = 2.7 steps.
    MAE's schedule runs on the fractional epoch step / 6 (util/lr_sched.py); rounding the warmup to 3 steps would
    change every logged lr."""
    res = pretrain(tiny(tmp_path, lr=4e-3, warmup_steps=None, warmup_epochs=0.45, steps=7, min_lr=1e-4,
                        checkpoint_every=100))
    lrs = [r["lr"] for r in rows_of(res)]
    want = [mae_lr(s / 6, 4e-3, 1e-4, 0.45, 7 / 6) for s in range(7)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert lrs[3] != pytest.approx(expected_lr(3, 4e-3, 7, 3, "cosine", 1e-4), rel=1e-6)  # not the rounded warmup


@pytest.mark.parametrize("batch, accum, world, ok", [
    (12, 2, 2, True), (12, 3, 2, True), (12, 1, 12, True),
    (12, 2, 4, False), (12, 5, 1, False), (10, 1, 4, False), (6, 2, 6, False),
])
def test_global_batch_must_split_evenly_over_ranks_and_micro_batches(tmp_path, batch, accum, world, ok):
    """batch_size is the global batch: every rank takes batch / (accum x world) images a micro-batch, so the check
    uses the world size (a check with world = 1 would let 12 / (2 x 4) through and train on fewer images)."""
    from mae_fast.train import config as config_mod

    cfg = config_mod.build_config(tiny(tmp_path, batch_size=batch, accum_steps=accum), config_mod.PRETRAIN_KEYS)
    if ok:
        pretrain_mod._check(cfg, world)
    else:
        with pytest.raises(config_mod.ConfigError, match=f"divisible by accum_steps x world_size = {accum * world}"):
            pretrain_mod._check(cfg, world)


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
    from mae_fast.train import config as config_mod

    with pytest.raises(config_mod.ConfigError, match=msg):
        pretrain(tiny(tmp_path, **kw))
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------------------------------------
# non-finite steps and their limits
# ---------------------------------------------------------------------------------------------
def test_max_bad_steps_counts_only_non_finite_steps_in_a_row(tmp_path):
    """NaN at steps 1, 3 and 5 with max_bad_steps=2: never two in a row, so the run finishes; the skipped steps
    still consume their images; logged losses, the checkpointed loss and final_loss are over finite steps only."""
    clean = pretrain(tiny(tmp_path, name="clean", steps=1))  # step 0's loss does not depend on the schedule
    res = pretrain(tiny(tmp_path, name="nan", steps=7, log_every=2, max_bad_steps=2, debug_nan_steps=[1, 3, 5]))
    assert res["steps"] == 7 and res["skipped_steps"] == 3 and res["stopped"] == "finished"
    assert res["images_seen"] == 7 * 8
    rows = rows_of(res)
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows), rows
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3, 3]
    # the first window (steps 0, 1) holds only step 0's loss: the clean run's step-0 loss (same weights, batch)
    assert rows[0]["loss"] == pytest.approx(rows_of(clean)[0]["loss"], rel=1e-6)
    assert math.isfinite(res["final_loss"]) and math.isfinite(res["last_step_loss"])
    mid = ckpt(Path(res["run_dir"]) / "checkpoints" / "checkpoint-00000006.pt")  # after step 5, a NaN step
    assert math.isfinite(mid["loss"]) and mid["skipped_steps"] == 3 and mid["bad_in_a_row"] == 1


def test_non_finite_run_limit_holds_across_a_resume(tmp_path):
    """Two NaN steps before a stop and one after the resume are three in a row: max_bad_steps=3 stops the resumed
    run at once; the skipped steps of before the stop are counted in the resumed run's total."""
    first = pretrain(tiny(tmp_path, name="r", steps=8, stop_at_step=4, debug_nan_steps=[2, 3], max_bad_steps=3))
    assert first["skipped_steps"] == 2
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row .* at step 5"):
        pretrain(tiny(tmp_path, name="r", steps=8, resume="auto", debug_nan_steps=[2, 3, 4], max_bad_steps=3))
    state = checkpoint_io.load_checkpoint(tmp_path / "r" / "checkpoints" / "checkpoint-00000005.pt")
    assert state["skipped_steps"] == 3 and state["bad_in_a_row"] == 3
    # a run that was only one NaN into its streak goes on, and keeps counting its skipped steps
    pretrain(tiny(tmp_path, name="s", steps=6, stop_at_step=3, debug_nan_steps=[1]))
    res = pretrain(tiny(tmp_path, name="s", steps=6, resume="auto", debug_nan_steps=[4], max_bad_steps=2))
    assert res["steps"] == 6 and res["skipped_steps"] == 2


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped(tmp_path, monkeypatch):
    """An overflowing gradient under a finite loss (fp32, clip on): the step makes no update and counts as skipped;
    the weights stay finite."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip_with_an_inf_on_the_second_step(params, max_norm, *a, **k):
        params = list(params)
        calls.append(1)
        if len(calls) == 2:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("inf")
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_an_inf_on_the_second_step)
    res = pretrain(tiny(tmp_path, steps=3, checkpoint_every=1, keep_checkpoints=5, clip_grad=1.0))
    assert res["skipped_steps"] == 1 and len(calls) == 3
    by_step = {s: ckpt(p)["model"] for s, p in checkpoint_io.list_checkpoints(res["run_dir"])}
    for k, v in by_step[2].items():
        assert torch.equal(v, by_step[1][k]), k  # step 1 (the 2nd) made no update
        assert torch.isfinite(by_step[3][k]).all()


# ---------------------------------------------------------------------------------------------
# metrics rows and time limits under a virtual clock
# ---------------------------------------------------------------------------------------------
class VirtualClock:
    """Stands in for the time module inside pretrain: perf_counter only moves when something sleeps (the step's
    debug sleep, the data loader, a checkpoint write below), so every window's length is known exactly."""

    def __init__(self):
        import time

        self._time, self.now = time, 1000.0

    def __getattr__(self, name):
        return getattr(self._time, name)

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


STEP_S, ITEM_S, FIRST_ITEM_S, CKPT_S = 0.25, 0.01, 0.4, 1.0


@pytest.fixture
def clock(monkeypatch):
    """Each step sleeps STEP_S, each image takes ITEM_S to load (the first one of step 0 FIRST_ITEM_S more: the
    first window is slow, as compilation makes it) and each checkpoint write CKPT_S."""
    from mae_fast.train.pretrain import StepBatchSampler, SyntheticImages

    clk = VirtualClock()
    monkeypatch.setattr(pretrain_mod, "time", clk)
    first = int(StepBatchSampler(48, 8, 0, 0, 6).global_batch(0)[1][0])
    real_item, real_save = SyntheticImages.__getitem__, checkpoint_io.save_checkpoint

    def item(self, i):
        clk.sleep(ITEM_S + (FIRST_ITEM_S if i == first else 0.0))
        return real_item(self, i)

    def save(*a, **k):
        clk.sleep(CKPT_S)
        return real_save(*a, **k)

    monkeypatch.setattr(SyntheticImages, "__getitem__", item)
    monkeypatch.setattr(checkpoint_io, "save_checkpoint", save)
    return clk


def clocked(tmp_path, **kw):
    # peak_flops given: the CPU peak is otherwise measured with perf_counter
    return tiny(tmp_path, **{**dict(steps=6, log_every=2, checkpoint_every=3, debug_step_sleep_s=STEP_S,
                                    peak_flops=1e9), **kw})


def test_throughput_data_wait_and_time_rows_follow_the_clock(tmp_path, clock):
    """Windows of 2 steps of 8 images: the loss is the mean of the window's steps, images/s = 16 / window time, data_wait = time blocked on the loader / window
    time, the checkpoint write after step 3 kept out of its window but in time_s; the run's figures leave out the
    first (warm-up) window."""
    res = pretrain(clocked(tmp_path))
    rows = rows_of(res)
    every = rows_of(pretrain(clocked(tmp_path, name="every", log_every=1)))  # the same steps, a row each
    assert [r["loss"] for r in rows] == pytest.approx([np.mean([every[i]["loss"], every[i + 1]["loss"]])
                                                       for i in (0, 2, 4)], rel=1e-12)  # the window's mean
    load = 8 * ITEM_S
    # the step's sleep comes after its row is written: the first window has one, the others two
    windows = [STEP_S + 2 * load + FIRST_ITEM_S, 2 * (STEP_S + load), 2 * (STEP_S + load)]
    waits = [2 * load + FIRST_ITEM_S, 2 * load, 2 * load]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r["images_per_s"] for r in rows] == pytest.approx([round(16 / w, 2) for w in windows], abs=1e-9)
    assert [r["data_wait"] for r in rows] == pytest.approx([round(a / w, 4) for a, w in zip(waits, windows)], abs=1e-9)
    assert [r["time_s"] for r in rows] == pytest.approx(
        [round(windows[0], 3), round(windows[0] + windows[1] + CKPT_S, 3), round(sum(windows) + CKPT_S, 3)], abs=1e-9)
    assert [r["mfu"] for r in rows] == pytest.approx([res_rate * _flops() / 1e9 for res_rate in
                                                      [r["images_per_s"] for r in rows]], rel=2e-3)
    assert res["images_per_s"] == pytest.approx(32 / (windows[1] + windows[2]), rel=1e-9)
    assert res["data_wait"] == pytest.approx((waits[1] + waits[2]) / (windows[1] + windows[2]), rel=1e-9)
    assert ckpt(res["checkpoint"])["wall_time_s"] == pytest.approx(sum(windows) + CKPT_S + STEP_S, rel=1e-9)


def _flops() -> float:
    from mae_fast.models import mae_train_flops

    return mae_train_flops(mae_fast.create_model("mae_vit_demo_patch8", img_size=32, **TINY_MODEL), 0.75)


def test_time_limit_counts_training_time_and_the_wall_time_survives_a_resume(tmp_path, clock):
    """time_limit_s=0.9: step k's all-reduce comes 0.4 + (k + 1) x 0.08 + k x 0.25 s into training, past 0.9 first
    at step 2, so the run stops after 3 steps (a 5 s start-up before them does not count). A run stopped at step 4 and resumed (time between the runs does not count)
    ends with the wall time of one that was not."""
    real_peak = pretrain_mod.peak_flops_for

    def slow_peak(*a):  # a slow start-up (before the first step) is not training time
        clock.sleep(5.0)
        return real_peak(*a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_mod, "peak_flops_for", slow_peak)
        res = pretrain(clocked(tmp_path, name="limit", time_limit_s=0.9))
    assert res["steps"] == 3 and res["stopped"] == "time_limit_s=0.9" and res["startup_s"] == pytest.approx(5.0)
    straight = pretrain(clocked(tmp_path, name="straight"))
    pretrain(clocked(tmp_path, name="resumed", stop_at_step=4))
    clock.sleep(100.0)  # between the runs: not training time
    resumed = pretrain(clocked(tmp_path, name="resumed", resume="auto"))
    assert resumed["steps"] == 6
    assert ckpt(resumed["checkpoint"])["wall_time_s"] == pytest.approx(ckpt(straight["checkpoint"])["wall_time_s"],
                                                                         rel=1e-9)
    assert rows_of(resumed)[-1]["time_s"] == rows_of(straight)[-1]["time_s"]


# ---------------------------------------------------------------------------------------------
# what a resume restores
# ---------------------------------------------------------------------------------------------
def _rng_states_equal(a: dict, b: dict) -> bool:
    return (torch.equal(a["torch"], b["torch"]) and a["numpy"][0] == b["numpy"][0]
            and np.array_equal(a["numpy"][1], b["numpy"][1]) and a["numpy"][2:] == b["numpy"][2:]
            and a["python"] == b["python"])


def test_a_resumed_run_goes_on_with_the_restored_rng_states(tmp_path):
    """The torch, numpy and python RNG states in the final checkpoint of a stopped-and-resumed run are those of an
    uninterrupted run, although the process's numpy / python generators were seeded otherwise before the resume.
    (Before the fix the CPU's MFU peak was measured on a matrix drawn from the global torch generator after the
    restore, so the resumed run's torch state was one 1024x1024 draw ahead.)"""
    np.random.seed(11)
    random.seed(11)
    straight = pretrain(tiny(tmp_path, name="s", steps=5, peak_flops=None))  # measured on the CPU
    np.random.seed(11)
    random.seed(11)
    pretrain(tiny(tmp_path, name="r", steps=5, stop_at_step=2, peak_flops=None))
    np.random.seed(12)
    random.seed(12)
    torch.manual_seed(12)
    resumed = pretrain(tiny(tmp_path, name="r", steps=5, resume="auto", peak_flops=None))
    a, b = ckpt(straight["checkpoint"])["rng"], ckpt(resumed["checkpoint"])["rng"]
    assert len(a) == len(b) == 1 and _rng_states_equal(a[0], b[0])


def test_fp16_resume_restores_the_grad_scaler(tmp_path):
    """precision=fp16 (a GradScaler, on the CPU too): the scaler's state (scale, growth tracker) in the final
    checkpoint of a resumed run is that of an uninterrupted one, and so are the weights."""
    straight = pretrain(tiny(tmp_path, name="s", steps=4, precision="fp16"))
    pretrain(tiny(tmp_path, name="r", steps=4, precision="fp16", stop_at_step=2))
    resumed = pretrain(tiny(tmp_path, name="r", steps=4, precision="fp16", resume="auto"))
    a, b = ckpt(straight["checkpoint"]), ckpt(resumed["checkpoint"])
    assert a["scaler"]["_growth_tracker"] == 4 - a["skipped_steps"] and a["scaler"] == b["scaler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_images_seen_carries_over_a_resume_with_another_batch_size(tmp_path):
    pretrain(tiny(tmp_path, name="r", steps=6, stop_at_step=3))
    with pytest.warns(RuntimeWarning, match=r"different batch_size \(8 -> 16\)"):
        res = pretrain(tiny(tmp_path, name="r", steps=6, batch_size=16, resume="auto"))
    assert res["images_seen"] == 3 * 8 + 3 * 16


def test_a_weights_only_checkpoint_is_refused_as_resume(tmp_path):
    path = tmp_path / "weights.pt"
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, **TINY_MODEL)
    torch.save({"model": m.state_dict()}, path)
    with pytest.raises(CheckpointError, match="holds weights only"):
        pretrain(tiny(tmp_path, resume=str(path)))


def test_fresh_runs_never_reuse_a_run_directory_with_checkpoints_and_resume_uses_the_named_one(tmp_path):
    dirs = [pretrain(tiny(tmp_path, name="x", steps=1))["run_dir"] for _ in range(3)]
    assert [Path(d).name for d in dirs] == ["x", "x-2", "x-3"]
    with pytest.warns(RuntimeWarning, match=r"different steps \(1 -> 2\)"):
        assert Path(pretrain(tiny(tmp_path, name="x", steps=2, resume="auto"))["run_dir"]).name == "x"


def test_keep_checkpoints_through_pretrain(tmp_path):
    res = pretrain(tiny(tmp_path, name="k2", steps=5, checkpoint_every=1, keep_checkpoints=2))
    assert [s for s, _ in checkpoint_io.list_checkpoints(res["run_dir"])] == [5, 4]
    res = pretrain(tiny(tmp_path, name="k0", steps=4, checkpoint_every=1, keep_checkpoints=0))
    assert Path(res["checkpoint"]).is_file()  # 0: none is deleted, never the one just written


# ---------------------------------------------------------------------------------------------
# checkpoint_io
# ---------------------------------------------------------------------------------------------
def test_checkpoint_io_digests_and_damaged_files(tmp_path):
    run = tmp_path / "run"
    rng = torch.Generator().manual_seed(3)
    w = {s: torch.randn(7, generator=rng) for s in (3, 11, 20)}
    for s in w:
        checkpoint_io.save_checkpoint({"model": {"w": w[s]}, "step": s}, run, s, keep=0)
    assert [s for s, _ in checkpoint_io.list_checkpoints(run)] == [20, 11, 3]  # numerically, newest first
    newest = checkpoint_io.list_checkpoints(run)[0][1]
    # a file that still loads but does not match its digest is damaged
    newest.with_name(newest.name + ".sha256").write_text("0" * 64)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        checkpoint_io.load_checkpoint(newest)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):
        path, state = checkpoint_io.latest_valid_checkpoint(run)
    assert path.name == "checkpoint-00000011.pt" and torch.equal(state["model"]["w"], w[11])
    # a torch file without a "model" entry is not a checkpoint
    other = run / "checkpoints" / "checkpoint-00000030.pt"
    torch.save({"weights": w[3]}, other)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        checkpoint_io.load_checkpoint(other)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):
        assert checkpoint_io.latest_valid_checkpoint(run)[0].name == "checkpoint-00000011.pt"
    checkpoint_io.remove_checkpoints(run, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-00000030.pt"]


def test_a_checkpoint_is_never_deleted_by_its_own_save(tmp_path):
    """A run resumed from an earlier checkpoint of its directory writes checkpoints of lower steps than those there:
    keep=K keeps the one just written (and the newest K-1 others) instead of deleting it at once and returning a
    path that is gone (the run's result, NonFiniteLossError's message and the scaling runner use that path)."""
    for s in (8, 9, 10):
        checkpoint_io.save_checkpoint({"model": {}, "step": s}, tmp_path, s, keep=3)
    path = checkpoint_io.save_checkpoint({"model": {}, "step": 6}, tmp_path, 6, keep=3)
    assert path.is_file() and checkpoint_io.load_checkpoint(path)["step"] == 6
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path)] == [10, 9, 6]
    path = checkpoint_io.save_checkpoint({"model": {}, "step": 7}, tmp_path, 7, keep=1)
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path)] == [7] and path.is_file()
    assert sorted(p.name for p in checkpoint_io.checkpoint_dir(tmp_path).glob("*.sha256")) == [path.name + ".sha256"]


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_its_own_checkpoints(tmp_path):
    first = pretrain(tiny(tmp_path, name="x", steps=6, checkpoint_every=1, keep_checkpoints=6))
    back = Path(first["run_dir"]) / "checkpoints" / "checkpoint-00000002.pt"
    with pytest.raises(NonFiniteLossError) as e:  # going back to step 2 (keeping 2), then stopped on NaNs at step 4
        pretrain(tiny(tmp_path, name="x", steps=6, checkpoint_every=1, keep_checkpoints=2, debug_nan_steps=[2, 3],
                      max_bad_steps=2, resume=str(back)))
    saved = Path(str(e.value).split("State saved to inspect: ")[1])
    assert saved.name == "checkpoint-00000004.pt" and checkpoint_io.load_checkpoint(saved)["note"] == "non-finite"
    # the first run's steps 3-6 were set aside (not deleted) when it went back to step 2: resume=auto now goes on
    # with the new continuation, not with the abandoned one's step 6
    assert [s for s, _ in checkpoint_io.list_checkpoints(first["run_dir"])] == [4, 3]
    aside = Path(first["run_dir"]) / "checkpoints" / "set-aside-after-step-2"
    assert sorted(p.name for p in aside.iterdir()) == [f"checkpoint-{s:08d}.pt{x}" for s in (3, 4, 5, 6)
                                                        for x in ("", ".sha256")]
    assert checkpoint_io.load_checkpoint(aside / "checkpoint-00000006.pt")["step"] == 6  # intact, digest and all
    found, _ = checkpoint_io.latest_valid_checkpoint(first["run_dir"])
    assert found == saved
