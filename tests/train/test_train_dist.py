"""Two CPU processes (torchrun, gloo) train like one process with the same global batch: DDP and FSDP2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FSDP2_PEAKS_BELOW_UNSHARDED
from mae_fast.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train" / "pretrain.py"
MODEL_KWARGS = dict(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
MODEL = "model_kwargs={embed_dim: 48, depth: 2, num_heads: 2, decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}"
COMMON = ["data_source=synthetic", "synthetic_size=48", "img_size=32", MODEL, "batch_size=8", "steps=4",
          "warmup_steps=1", "lr=2e-3", "checkpoint_every=2", "log_every=1", "vis_every=0", "vis_images=2",
          "progress=false", "clip_grad=1.0"]


def _one_process(tmp_path) -> dict:
    from mae_fast.train.config import parse_value

    cfg = {"recipe": "demo", "name": "single", "output_dir": str(tmp_path)}
    for item in COMMON:
        k, v = item.split("=", 1)
        cfg[k] = parse_value(v)
    return torch.load(pretrain(cfg)["checkpoint"], weights_only=False)


def _torchrun(tmp_path, name: str, *extra: str, step: int = 4) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), f"name={name}", f"output_dir={tmp_path}", *COMMON, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    # FSDP2's warning about modules returning views is silenced for ours (they are never modified in place)
    assert "returned a view tensor" not in out.stderr, out.stderr[-3000:]
    ckpt = tmp_path / name / "checkpoints" / f"checkpoint-{step:08d}.pt"
    return torch.load(ckpt, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("single"))


def _compare(a: dict, b: dict):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        # float tolerance: the all-reduce sums in another order; Adam turns that into <~lr steps
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-4, msg=k)
    assert abs(a["loss"] - b["loss"]) < 1e-4
    assert b["world_size"] == 2 and b["images_seen"] == a["images_seen"] == 4 * 8


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, strategy):
    two = _torchrun(tmp_path, strategy, f"distributed={strategy}", "memory_budget_gib=50", "peak_flops=2.5e11")
    _compare(single, two)
    # the optimizer state is saved whole (unsharded), keyed like the single-process one
    assert two["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()
    # the memory plan was made for this strategy (FSDP2: simulated in a subprocess of rank 0) and fits
    import json

    from mae_fast.memory import estimate_mae_step

    result = json.loads((tmp_path / strategy / "result.json").read_text())
    plan = result["memory_plan"]
    # MFU: FLOPs per image (counted independently) x the images/s of both ranks / (the peak of one x 2 devices)
    from test_train import counted_train_flops_per_image

    per_image = counted_train_flops_per_image(MODEL_KWARGS, 32, 0.75)
    assert result["mfu"] == pytest.approx(per_image * result["images_per_s"] / (2.5e11 * 2), rel=1e-9)
    rows = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    for r in [r for r in rows if r.get("mfu") is not None]:  # images_per_s is rounded to 2 decimals there
        assert r["mfu"] == pytest.approx(per_image * r["images_per_s"] / (2.5e11 * 2), rel=2e-3, abs=1e-12)
    assert plan["strategy"] == strategy and not plan["changed"]
    kw = MODEL_KWARGS
    alone = estimate_mae_step("mae_vit_demo_patch8", 32, 4, amp_dtype=None, norm_pix_loss=False, **kw)
    n_params = sum(p.numel() for p in single["model"].values())
    if strategy == "ddp":  # one process's peak plus DDP's gradient buckets
        assert plan["estimated_peak_bytes"] == alone.peak + 4 * n_params
    elif FSDP2_PEAKS_BELOW_UNSHARDED:  # FSDP2 shards weights and optimizer state over the 2 ranks
        assert plan["estimated_peak_bytes"] < alone.peak - (alone.parameters + alone.optimizer_state) / 4


@pytest.mark.slow
def test_fsdp_run_resumes_and_accumulates(tmp_path, single):
    """Stopped at step 2 and resumed, with 2 accumulation micro-steps per rank: still the same run."""
    _torchrun(tmp_path, "fsdp_resume", "distributed=fsdp", "accum_steps=2", "stop_at_step=2", step=2)
    two = _torchrun(tmp_path, "fsdp_resume", "distributed=fsdp", "accum_steps=2", "resume=auto")
    _compare(single, two)


@pytest.mark.parametrize("finished", [True, False])
def test_teardown_waits_for_the_other_ranks_only_after_a_finished_run(monkeypatch, finished):
    """A finished run meets the other ranks at a barrier before leaving the group (so gloo's worker threads
    are done with the last collective before the interpreter exits); a failed one leaves at once, since
    the other ranks may never get there."""
    from mae_fast.train import distributed as dist_mod

    calls = []
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist_mod.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist_mod.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist_mod.dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    dist_mod.teardown(dist_mod.DistInfo(rank=1, world_size=2, initialized_here=True), finished)
    assert calls == (["barrier", "destroy"] if finished else ["destroy"])
    calls.clear()
    dist_mod.teardown(dist_mod.DistInfo(rank=1, world_size=2, initialized_here=False), finished)
    assert calls == []  # a group the caller set up is the caller's to leave


@pytest.mark.parametrize("local_rank, visible, expect", [(3, 8, 3), (3, 1, 0), (0, 1, 0), (3, 2, "sees 2 GPUs")])
def test_each_rank_takes_its_own_gpu_or_the_only_one_it_sees(monkeypatch, local_rank, visible, expect):
    """torchrun (and SLURM tasks that see the node's GPUs): the GPU at LOCAL_RANK. SLURM with one GPU bound
    per task: that GPU, whatever LOCAL_RANK says. Fewer GPUs than local ranks: a clear error, not a crash
    inside CUDA."""
    from mae_fast.train import distributed as dist_mod

    chosen, group = [], []
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(dist_mod, "pick_device", lambda request: torch.device("cuda"))
    monkeypatch.setattr(dist_mod.torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(dist_mod.torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_mod.dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda backend, **kw: group.append((backend, kw)))
    if isinstance(expect, str):
        with pytest.raises(RuntimeError, match=expect):
            dist_mod.setup("auto")
        return
    info = dist_mod.setup("auto")
    assert chosen == [expect] and info.device == torch.device("cuda", expect) and info.local_rank == local_rank
    assert group == [("nccl", {"device_id": torch.device("cuda", expect)})]


FINETUNE = REPO / "train" / "finetune.py"


@pytest.mark.parametrize("world", [2, 3])
def test_finetune_batches_are_the_global_batches_shared_by_rank(world):
    """Every rank sees its every-world-th share of the same global batches, each item once per epoch; a last
    batch too small to give each rank an item (and BatchNorm two in all) joins the previous one."""
    from mae_fast.train.finetune import _epoch_batches

    for n, batch in [(11, 4), (13, 6), (9, 4), (40, 7)]:
        whole = _epoch_batches(n, batch, seed=3, epoch=1)
        shares = [_epoch_batches(n, batch, 3, 1, world, r) for r in range(world)]
        assert all(len(s) == len(whole) for s in shares)  # every rank takes the same number of steps
        for i, b in enumerate(whole):
            parts = [s[i] for s in shares]
            assert all(parts) and sorted(x for part in parts for x in part) == sorted(b)
        assert sorted(j for _, j in sum(whole, [])) == list(range(n))
        assert len(whole[-1]) >= max(2, world) and all(e == 1 for e, _ in whole[0])


@pytest.mark.parametrize("mode, lr, batch, accum", [("finetune", 3e-3, 14, 1), ("linprobe", 0.05, 14, 1),
                                                   ("finetune", 3e-3, 16, 2), ("linprobe", 0.05, 12, 3)])
def test_two_process_finetune_matches_one(tmp_path, mode, lr, batch, accum):
    """torchrun over 2 processes gives the numbers of one process with the same global batch: DDP gradients
    (also accumulated over micro-batches, synchronised once a step), the probe's BatchNorm statistics over both
    ranks' rows, validation split and summed across ranks. The probe with micro-batches (its BatchNorm sees each)
    against one process with the same ones: 160 images in batches of 12 end with one of 4, 2 a rank, which 3
    micro-batches would leave one empty on both ranks (statistics of no rows: NaN)."""
    from mae_fast.train.finetune import finetune

    args = dict(mode=mode, output_dir=str(tmp_path), epochs=2, batch_size=batch, warmup_epochs=1, lr=lr,
                drop_path=0.0, fraction=0.5, progress=False, pool="mean")
    with pytest.warns(RuntimeWarning, match="random weights"):
        one = finetune(dict(args, name="one", accum_steps=accum if mode == "linprobe" else 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(FINETUNE),
           *(f"{k}={v}" for k, v in args.items()), f"accum_steps={accum}", "name=two"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"steps of {batch} ({batch // 2} x 2 ranks)" + (f" in {accum} micro-batches" if accum > 1 else "") \
        in out.stdout
    import json

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["val_images"] == one["val_images"]
    assert abs(one["history"][-1]["train_loss"] - one["history"][0]["train_loss"]) > 2e-3  # the weights moved
    for a, b in zip(one["history"], two["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])


def test_process_group_counts_a_run_finished_only_when_every_rank_gets_there(monkeypatch):
    """Returning, or an error every rank raises at the same step (finished_on), leaves through the barrier;
    any other error leaves at once."""
    from mae_fast.train import distributed as dist_mod

    seen = []
    monkeypatch.setattr(dist_mod, "setup", lambda request: dist_mod.DistInfo(world_size=2, initialized_here=True))
    monkeypatch.setattr(dist_mod, "teardown", lambda info, finished: seen.append(finished))
    with dist_mod.process_group("cpu") as info:
        assert info.world_size == 2
    with pytest.raises(FloatingPointError), dist_mod.process_group("cpu", finished_on=(FloatingPointError,)):
        raise FloatingPointError
    with pytest.raises(KeyError), dist_mod.process_group("cpu", finished_on=(FloatingPointError,)):
        raise KeyError
    assert seen == [True, True, False]
