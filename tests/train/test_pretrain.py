"""Pretraining runs on the CPU: the steps against a hand-written AdamW loop, the schedule in the logs, non-finite
steps, accumulation and memory savers, the memory budget, metrics rows under a virtual clock, MFU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mae_fast
from helpers.train import (CKPT_S, FIRST_ITEM_S, ITEM_S, STEP_S, TINY_MODEL, assert_same_state, ckpt, clocked,
                           counted_train_flops_per_image, expected_lr, mae_lr, params, rows_of, tiny)
from mae_fast.data.samplers import SeededItems, StepBatchSampler, SyntheticImages, mix_seed
from mae_fast.training import checkpoint as checkpoint_io
from mae_fast.training import config as config_mod
from mae_fast.training import pretrain as pretrain_mod
from mae_fast.training.pretrain import NonFiniteLossError, pretrain


def reference_run(cfg: dict, n_steps: int):
    """``n_steps`` of pretraining written out by hand: the same init, images and masking noise as the trainer
    (its data order and noise seeding are taken as given), plain (non-fused) AdamW with its own no-decay rule,
    the MAE lr formula above, the mean loss over micro-batches and torch-style global-norm clipping in fp64.
    Returns (model, per-step losses, per-step pre-clip gradient norms)."""

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
        noise = torch.rand(B, L, generator=torch.Generator().manual_seed(mix_seed(seed, 15485863, step)))
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


@pytest.mark.curves  # draws curves.png
def test_demo_recipe_loss_falls_and_writes_everything(tmp_path):
    """The demo recipe, shortened; on the demo data when mae_fast.data provides it."""
    source = None  # the demo images
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


def test_a_run_that_waits_for_data_says_so_and_a_slow_step_does_not(tmp_path, clock, capsys):
    """Under the virtual clock a step loads 8 images (0.08 s) and then sleeps: after 0.25 s steps the share of
    training time blocked on the loader (0.16 s of each 0.66 s window) is large, and the run ends by saying so and
    what to do; after 2 s steps it is small (0.16 s of 4.16 s) and nothing is said."""
    waiting = pretrain(clocked(tmp_path, name="waiting"))
    out = capsys.readouterr().out
    assert waiting["data_wait"] == pytest.approx(0.16 / 0.66, rel=1e-9)
    assert "training waited for data 24% of the time (rank 0): raise num_workers (now 0) if the CPU has cores to " \
           "spare" in out and "mae_fast.data.shards" in out
    busy = pretrain(clocked(tmp_path, name="busy", debug_step_sleep_s=2.0))
    assert busy["data_wait"] == pytest.approx(0.16 / 4.16, rel=1e-9) and "waited for data" not in capsys.readouterr().out


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12),
    ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla V100-SXM2-16GB", 125e12),
    ("NVIDIA B200", 2250e12)])
def test_peak_flops_of_known_gpus_are_their_bf16_dense_datasheet_figures(monkeypatch, name, peak):
    """The MFU denominator per device (bf16 dense tensor-core FLOP/s from the vendors' datasheets), found by name
    (L40S and A10G are not an L40 or an A10); an override wins; an unknown GPU gets none (no MFU), not a guess."""

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert pretrain_mod.peak_flops_for(cuda, None)[0] == peak
    assert pretrain_mod.peak_flops_for(cuda, 3.5e12) == (3.5e12, "config")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future Accelerator")
    assert pretrain_mod.peak_flops_for(cuda, None)[0] is None


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
