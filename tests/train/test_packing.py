"""Mixed-resolution pretraining: the step plan (resolutions, token budgets, phases), exact resume across a phase
boundary, init_from, and the FLOPs / memory counts of packed steps."""
from __future__ import annotations

import pytest
import torch

import mae_fast
from helpers.train import TINY_MODEL, assert_same_optimizer, assert_same_state, ckpt, rows_of, tiny
from mae_fast.models import mae_forward_flops
from mae_fast.training import packing
from mae_fast.training.config import ConfigError, PretrainConfig
from mae_fast.training.pretrain import pretrain

PHASES = [{"steps": 2, "img_sizes": [16, 32], "img_size_weights": [1, 2], "packing": True, "tokens_per_batch": 60},
          {"steps": 2, "img_size": 48, "batch_size": 3}]


def _plan(**kw):
    cfg = PretrainConfig.build(tiny("/unused", **kw))
    return packing.StepPlan(cfg, 8, (32, 32))


def test_plan_draws_sizes_by_weight_within_the_token_budget_and_switches_phases():
    plan = _plan(steps=None, phases=PHASES)
    assert plan.total_steps == 4 and plan.max_size == 48
    sizes = []
    for step in range(2):
        drawn = plan.draw(step, 48)
        assert drawn == plan.draw(step, 48)  # a pure function of (seed, step)
        patches = [plan.patches(s) for _, s in drawn]
        assert sum(patches) <= 60 and sum(patches) + 16 > 60 - 16  # filled until the next image would not fit
        assert len({i for i, _ in drawn}) == len(drawn)  # no image twice in a step
        sizes += [s for _, s in drawn]
    assert set(sizes) <= {16, 32}
    assert [s for _, s in plan.draw(2, 48)] == [48] * 3 == [s for _, s in plan.draw(3, 48)]
    weighted = _plan(img_sizes=[16, 32], img_size_weights=[1, 3], packing=True)
    many = [s for step in range(100) for _, s in weighted.draw(step, 48)]
    assert many.count(32) / len(many) == pytest.approx(0.75, abs=0.05)
    one_size = _plan(img_sizes=[16, 32], tokens_per_batch=64).draw(5, 48)  # unpacked: one size per step
    assert len({s for _, s in one_size}) == 1 and len(one_size) == 64 // plan.patches(one_size[0][1])
    assert plan.max_step_patches() == 3 * 36
    for bad, match in ((dict(phases=[{"steps": 2, "img_siz": 32}]), "unknown key"),
                       (dict(phases=[{"img_size": 32}]), "steps"),
                       (dict(img_sizes=[20, 32]), "not a multiple of the patch size 8"),
                       (dict(img_sizes=[16, 32], img_size_weights=[1]), "img_size_weights")):
        with pytest.raises(ConfigError, match=match):
            _plan(**bad)


def test_phases_resume_exactly_before_and_after_the_boundary(tmp_path):
    """Stopped one step before the phase boundary and one after, resumed each time: the same losses, weights and
    optimizer as the uninterrupted run."""
    kw = dict(steps=None, phases=PHASES, checkpoint_every=100)
    straight = pretrain(tiny(tmp_path, name="straight", **kw))
    assert straight["steps"] == 4 and straight["images_seen"] == sum(
        len(_plan(**kw).draw(s, 48)) for s in range(4))
    pretrain(tiny(tmp_path, name="cut", stop_at_step=1, **kw))
    pretrain(tiny(tmp_path, name="cut", stop_at_step=3, resume="auto", **kw))
    resumed = pretrain(tiny(tmp_path, name="cut", resume="auto", **kw))
    a, b = ckpt(straight["checkpoint"]), ckpt(resumed["checkpoint"])
    assert_same_state(a["model"], b["model"])
    assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert [r["loss"] for r in rows_of(straight)] == [r["loss"] for r in rows_of(resumed)]
    assert resumed["images_seen"] == straight["images_seen"]
    row = rows_of(straight)[0]
    packed = _plan(**kw).draw(0, 48)
    model = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, **TINY_MODEL)
    flops = sum(3 * mae_forward_flops(mae_fast.create_model("mae_vit_demo_patch8", img_size=s, **TINY_MODEL))
                for _, s in packed)  # each image as a model built at its size counts it
    assert packing.step_flops(model, 0.75, [torch.zeros(3, s, s) for _, s in packed]) == pytest.approx(flops)
    assert row["mfu"] == pytest.approx(flops * row["images_per_s"] / len(packed) / 1e12, rel=0.02)


def test_init_from_a_run_dir_or_weights_file_at_another_size(tmp_path):
    first = pretrain(tiny(tmp_path, name="low", steps=2))
    start = pretrain(tiny(tmp_path, name="high", img_size=48, init_from=first["run_dir"], stop_at_step=0))
    src, got = ckpt(first["checkpoint"])["model"], ckpt(start["checkpoint"])
    assert got["step"] == 0 and not any(st["exp_avg"].any() or st["exp_avg_sq"].any()
                                        for st in got["optimizer"]["state"].values())  # a fresh optimizer
    for k, v in src.items():
        if "pos_embed" in k:  # regenerated for the 6 x 6 grid
            assert got["model"][k].shape[1] == 37 and v.shape[1] == 17
        else:
            assert torch.equal(got["model"][k], v), k
    weights = tmp_path / "official.pth"  # an official-style checkpoint: {"model": state dict}, nothing else
    torch.save({"model": src}, weights)
    again = pretrain(tiny(tmp_path, name="high2", img_size=48, init_from=str(weights), stop_at_step=0))
    assert_same_state(ckpt(again["checkpoint"])["model"], got["model"])
    with pytest.raises(ConfigError, match="init_from must be"):
        pretrain(tiny(tmp_path, name="bad", init_from=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="does not fit this model"):
        pretrain(tiny(tmp_path, name="bad", init_from=str(weights), model_kwargs=dict(TINY_MODEL, embed_dim=64)))


def test_memory_plan_counts_the_largest_step():
    from mae_fast.memory import mae_memory_job

    cfg = PretrainConfig.build(tiny("/unused", steps=None, phases=PHASES))
    model = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, **TINY_MODEL)
    job = mae_memory_job(cfg, model, 8, None, "none", 1, 1 << 30)
    assert job["img_size"] == (48, 48) and job["micro"] == 3  # 3 images of 48 px: more than 60 packed patches
