"""Process groups, wrapping and whole state dicts; two CPU processes (torchrun, gloo) train like one: DDP, FSDP2
and finetuning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers.train import FSDP2_PEAKS_BELOW_UNSHARDED, counted_train_flops_per_image
from mae_fast.training import distributed as dist_mod
from mae_fast.training.finetune import finetune
from mae_fast.training.pretrain import pretrain


def test_pick_device_honours_the_request(monkeypatch):
    """cpu is the CPU even with CUDA present; auto is CUDA when present; cuda without CUDA is an error."""
    monkeypatch.setattr(dist_mod.torch.cuda, "is_available", lambda: True)
    assert dist_mod.pick_device("cpu") == torch.device("cpu")
    assert dist_mod.pick_device("auto") == torch.device("cuda")
    assert dist_mod.pick_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(dist_mod.torch.cuda, "is_available", lambda: False)
    assert dist_mod.pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA"):
        dist_mod.pick_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        dist_mod.pick_device("gpu")


def test_setup_of_one_process_joins_no_group_and_of_several_takes_rank_from_the_environment(monkeypatch):
    """WORLD_SIZE=1: no process group, a world of one. On the CPU with WORLD_SIZE=8: gloo, the global RANK
    (not LOCAL_RANK) as rank."""
    joined = []
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_mod.dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    info = dist_mod.setup("cpu")
    assert not info.enabled and info.rank == 0 and joined == []
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist_mod.setup("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (5, 8, 1, False)
    assert info.device == torch.device("cpu") and info.initialized_here
    assert joined == [("gloo", {"device_id": None})]


def test_local_rank_must_name_a_visible_gpu():
    assert dist_mod.cuda_index_for(1, 2) == 1
    with pytest.raises(RuntimeError, match="LOCAL_RANK=2"):
        dist_mod.cuda_index_for(2, 2)


def test_process_group_counts_a_listed_error_as_finished(monkeypatch):
    """An error every rank raises at the same step (``finished_on``) still meets the others at teardown's
    barrier; any other error leaves at once."""
    ends = []
    monkeypatch.setattr(dist_mod, "setup", lambda request: dist_mod.DistInfo())
    monkeypatch.setattr(dist_mod, "teardown", lambda info, finished: ends.append(finished))
    with pytest.raises(KeyError):
        with dist_mod.process_group(finished_on=(KeyError,)):
            raise KeyError("all ranks")
    with pytest.raises(ValueError):
        with dist_mod.process_group(finished_on=(KeyError,)):
            raise ValueError("one rank")
    with dist_mod.process_group():
        pass
    assert ends == [True, False, True]


def test_strategy_choice_by_size_and_world(monkeypatch):
    """A world of one is never wrapped; auto takes DDP while 16 bytes a parameter stay under 35 % of the
    GPU's memory, FSDP past that; an unknown request is an error."""
    model = nn.Linear(99, 100)  # 9,999 + 100 = 10,000 parameters: 160,000 bytes replicated
    n = sum(p.numel() for p in model.parameters())
    gpu = dist_mod.DistInfo(rank=0, world_size=2, device=torch.device("cuda", 0))

    class Props:
        total_memory = 0

    monkeypatch.setattr(dist_mod.torch.cuda, "get_device_properties", lambda device: Props)
    Props.total_memory = int(16 * n / 0.35 * 1.01)
    assert dist_mod.choose_strategy("auto", model, gpu) == "ddp"
    Props.total_memory = int(16 * n / 0.35 * 0.99)
    assert dist_mod.choose_strategy("auto", model, gpu) == "fsdp"
    assert dist_mod.choose_strategy("ddp", model, gpu) == "ddp"
    for request in ("auto", "ddp", "fsdp", "none"):
        assert dist_mod.choose_strategy(request, model, dist_mod.DistInfo()) == "none"
    with pytest.raises(ValueError, match="auto, ddp, fsdp or none"):
        dist_mod.choose_strategy("zero", model, gpu)


def test_wrap_model_none_is_the_model_and_ddp_pins_the_cuda_device(monkeypatch):
    made = []

    class FakeDDP:
        def __init__(self, module, device_ids=None):
            made.append(device_ids)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    model = nn.Linear(3, 5)
    assert dist_mod.wrap_model(model, "none", dist_mod.DistInfo()) is model
    dist_mod.wrap_model(model, "ddp", dist_mod.DistInfo(world_size=2, device=torch.device("cuda", 3)))
    dist_mod.wrap_model(model, "ddp", dist_mod.DistInfo(world_size=2))
    assert made == [[3], None]


def test_whole_state_dicts_are_copies_not_views_of_the_live_model():
    """The saved model and optimizer state must not change when training goes on after it was taken."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 5)).square().sum().backward()
    opt.step()
    msd, osd = dist_mod.full_state_dicts(model, opt)
    saved_m = {k: v.clone() for k, v in msd.items()}
    saved_o = {k: {n: t.clone() for n, t in s.items()} for k, s in osd["state"].items()}
    opt.zero_grad()
    model(torch.randn(3, 5)).square().sum().backward()
    opt.step()
    for k, v in msd.items():
        assert torch.equal(v, saved_m[k]), k
    for k, s in osd["state"].items():
        for n, t in s.items():
            assert torch.equal(t, saved_o[k][n]), (k, n)
    assert not torch.equal(msd["0.weight"], model[0].weight.detach())


def test_loading_whole_state_dicts_is_strict():
    """A state dict with a key the model lacks (another architecture's checkpoint) is an error naming it."""
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["2.weight"] = torch.ones(7)
    with pytest.raises(RuntimeError, match="2.weight"):
        dist_mod.load_full_state_dicts(model, None, state, None)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(RuntimeError, match="2.weight"):
        dist_mod.load_full_state_dicts(model, opt, state, opt.state_dict())


def test_loading_whole_state_dicts_refuses_missing_entries():
    """A state dict lacking some of the model's entries (a parameter, a buffer) is an error naming them, with and
    without an optimizer: torch's strict loading alone leaves them at their current values silently."""
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    for drop in ("0.bias", "1.running_mean"):
        state = {k: v for k, v in full.items() if k != drop}
        with pytest.raises(RuntimeError, match=drop.replace(".", r"\.")):
            dist_mod.load_full_state_dicts(model, None, state, None)
        opt = torch.optim.AdamW(model.parameters())
        with pytest.raises(RuntimeError, match=drop.replace(".", r"\.")):
            dist_mod.load_full_state_dicts(model, opt, state, opt.state_dict())
    dist_mod.load_full_state_dicts(model, None, full, None)  # complete: loads


_COLLECTIVES = """
import importlib.util, json, sys
import torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("distributed_under_test", sys.argv[1])
d = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(d)  # train/distributed.py alone: it needs torch only, not the mae_fast package
rank, world, init_file, out = int(sys.argv[2]), 2, sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
total = d.all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * (rank + 2)]))
gathered = d.all_gather_objects({"rank": rank, "name": "r%d" % rank})
from_last = d.broadcast_object("sent by %d" % rank, src=world - 1)
from_first = d.broadcast_object([rank], src=0)
d.barrier()
json.dump(dict(total=total.tolist(), gathered=gathered, from_last=from_last, from_first=from_first), open(out, "w"))
dist.destroy_process_group()
"""


def test_collective_helpers_over_two_gloo_processes(tmp_path):
    """all_reduce_sum sums, all_gather_objects lists by rank, broadcast_object sends from ``src`` (rank 1 as
    well as rank 0): two CPU processes with gloo."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECTIVES, dist_mod.__file__, str(rank),
                               str(tmp_path / "init"), str(tmp_path / f"rank{rank}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["total"] == [3.0, 50.0]
        assert r["gathered"] == [{"rank": 0, "name": "r0"}, {"rank": 1, "name": "r1"}]
        assert r["from_last"] == "sent by 1" and r["from_first"] == [0]


def test_collective_helpers_without_a_group_are_the_identity():
    t = torch.tensor([1.5, -2.0])
    assert dist_mod.all_reduce_sum(t) is t and t.tolist() == [1.5, -2.0]
    assert dist_mod.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert dist_mod.broadcast_object("x", src=1) == "x"


REPO = Path(__file__).resolve().parents[2]


SCRIPT = REPO / "train" / "pretrain.py"


FT_MODEL = dict(embed_dim=32, depth=2, num_heads=2)  # the finetuning runs' encoder
MODEL_KWARGS = dict(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


MODEL = "model_kwargs={embed_dim: 48, depth: 2, num_heads: 2, decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}"


COMMON = ["data_source=synthetic", "synthetic_size=48", "img_size=32", MODEL, "batch_size=8", "steps=4",
          "warmup_steps=1", "lr=2e-3", "checkpoint_every=2", "log_every=1", "vis_every=0", "vis_images=2",
          "progress=false", "clip_grad=1.0"]


def _one_process(tmp_path) -> dict:
    from mae_fast.training.config import parse_value

    cfg = {"recipe": "demo", "name": "single", "output_dir": str(tmp_path)}
    for item in COMMON:
        k, v = item.split("=", 1)
        cfg[k] = parse_value(v)
    return torch.load(pretrain(cfg)["checkpoint"], weights_only=False)


# (run name, arguments after COMMON) of the two-process pretraining runs, in launch order: the FSDP run with
# accumulation stops at step 2, then the same run with resume=auto finishes it
PRETRAINS = [("ddp", ["distributed=ddp", "memory_budget_gib=50", "peak_flops=2.5e11"]),
             ("fsdp", ["distributed=fsdp", "memory_budget_gib=50", "peak_flops=2.5e11"]),
             ("fsdp_resume", ["distributed=fsdp", "accum_steps=2", "stop_at_step=2"]),
             ("fsdp_resume", ["distributed=fsdp", "accum_steps=2", "resume=auto"])]

# every two-process run in one torchrun launch (each starts 3 interpreters that import torch: seconds apiece):
# train/pretrain.py's main with each PRETRAINS command line, then each finetuning, all joining the process group
# opened here as the scaling runner's stages do
TWO_RANK_DRIVER = """
import json, runpy, sys
from mae_fast.training import distributed
from mae_fast.training.finetune import finetune

if __name__ == "__main__":  # the memory plan's FSDP2 simulation starts a spawned process, which imports this file
    pretrain_main = runpy.run_path(sys.argv[1])["main"]  # the script torchrun would run, its __main__ block aside
    with distributed.process_group("cpu"):
        for argv in json.loads(sys.argv[2]):
            if pretrain_main(argv) != 0:
                raise SystemExit("pretrain failed: " + " ".join(argv))
        for cfg in json.loads(sys.argv[3]):
            finetune(cfg)
"""


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Every PRETRAINS and FINETUNES run over 2 processes (torchrun, gloo); returns (their output folder, the
    launch's stdout)."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    pretrains = [[f"name={name}", f"output_dir={out_dir}", *COMMON, *extra] for name, extra in PRETRAINS]
    finetunes = [dict(_finetune_args(out_dir, mode, lr, batch), accum_steps=accum, name=f"{mode}-{batch}-{accum}")
                 for mode, lr, batch, accum in FINETUNES]
    (out_dir / "driver.py").write_text(TWO_RANK_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(out_dir / "driver.py"), str(SCRIPT), json.dumps(pretrains), json.dumps(finetunes)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(out_dir),
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    # FSDP2's warning about modules returning views is silenced for ours (they are never modified in place)
    assert "returned a view tensor" not in out.stderr, out.stderr[-3000:]
    return out_dir, out.stdout


def _checkpoint(out_dir, name: str, step: int = 4) -> dict:
    return torch.load(out_dir / name / "checkpoints" / f"checkpoint-{step:08d}.pt", weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("single"))


def _compare(a: dict, b: dict, atol: float = 1e-4):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        # float tolerance: the all-reduce sums in another order; Adam turns that into <~lr steps
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=atol, msg=k)
    assert abs(a["loss"] - b["loss"]) < 1e-4
    assert b["world_size"] == 2 and b["images_seen"] == a["images_seen"] == 4 * 8


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(two_rank_runs, single, strategy):
    out_dir, _ = two_rank_runs
    two = _checkpoint(out_dir, strategy)
    _compare(single, two)
    # the optimizer state is saved whole (unsharded), keyed like the single-process one
    assert two["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()
    # the memory plan was made for this strategy (FSDP2: simulated in a subprocess of rank 0) and fits
    import json

    from mae_fast.memory import estimate_mae_step

    result = json.loads((out_dir / strategy / "result.json").read_text())
    plan = result["memory_plan"]
    # MFU: FLOPs per image (counted independently) x the images/s of both ranks / (the peak of one x 2 devices)
    per_image = counted_train_flops_per_image(MODEL_KWARGS, 32, 0.75)
    assert result["mfu"] == pytest.approx(per_image * result["images_per_s"] / (2.5e11 * 2), rel=1e-9)
    rows = [json.loads(line) for line in (out_dir / strategy / "metrics.jsonl").read_text().splitlines()]
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


def test_fsdp_run_resumes_and_accumulates(two_rank_runs, single):
    """Stopped at step 2 and resumed, with 2 accumulation micro-steps per rank: still the same run (the same loss;
    the weights to 2.5e-4: four micro-batches of 2 summed in another order than one of 8 differ by rounding, which
    Adam turns into steps of up to ~lr = 2e-3 on near-zero gradients; torch 2.14 gave 1.2e-4 on one decoder bias
    without the resume, 2e-5 with the resume alone)."""
    out_dir, stdout = two_rank_runs
    assert _checkpoint(out_dir, "fsdp_resume", step=2)["world_size"] == 2  # the stopped run's last checkpoint
    assert f"resuming from {out_dir / 'fsdp_resume' / 'checkpoints' / 'checkpoint-00000002.pt'}" in stdout
    two = _checkpoint(out_dir, "fsdp_resume")
    _compare(single, two, atol=2.5e-4)


@pytest.mark.parametrize("finished", [True, False])
def test_teardown_waits_for_the_other_ranks_only_after_a_finished_run(monkeypatch, finished):
    """A finished run meets the other ranks at a barrier before leaving the group (so gloo's worker threads
    are done with the last collective before the interpreter exits); a failed one leaves at once, since
    the other ranks may never get there."""
    from mae_fast.training import distributed as dist_mod

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
    from mae_fast.training import distributed as dist_mod

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


@pytest.mark.parametrize("world", [2, 3])
def test_finetune_batches_are_the_global_batches_shared_by_rank(world):
    """Every rank sees its every-world-th share of the same global batches, each item once per epoch; a last
    batch too small to give each rank an item (and BatchNorm two in all) joins the previous one."""
    from mae_fast.data.samplers import epoch_batches as _epoch_batches

    for n, batch in [(11, 4), (13, 6), (9, 4), (40, 7)]:
        whole = _epoch_batches(n, batch, seed=3, epoch=1)
        shares = [_epoch_batches(n, batch, 3, 1, world, r) for r in range(world)]
        assert all(len(s) == len(whole) for s in shares)  # every rank takes the same number of steps
        for i, b in enumerate(whole):
            parts = [s[i] for s in shares]
            assert all(parts) and sorted(x for part in parts for x in part) == sorted(b)
        assert sorted(j for _, j in sum(whole, [])) == list(range(n))
        assert len(whole[-1]) >= max(2, world) and all(e == 1 for e, _ in whole[0])


# (mode, lr, global batch, accumulation micro-steps) of the two-process finetuning runs
FINETUNES = [("finetune", 3e-3, 14, 1), ("linprobe", 0.05, 14, 1), ("finetune", 3e-3, 16, 2), ("linprobe", 0.05, 12, 3)]

def _finetune_args(out_dir, mode, lr, batch) -> dict:
    return dict(mode=mode, output_dir=str(out_dir), epochs=2, batch_size=batch, warmup_epochs=1, lr=lr, drop_path=0.0,
                fraction=0.5, progress=False, pool="mean", img_size=32, model_kwargs=FT_MODEL, checkpoint=None)


@pytest.mark.parametrize("mode, lr, batch, accum", FINETUNES)
def test_two_process_finetune_matches_one(tmp_path, two_rank_runs, mode, lr, batch, accum):
    """torchrun over 2 processes gives the numbers of one process with the same global batch: DDP gradients
    (also accumulated over micro-batches, synchronised once a step), the probe's BatchNorm statistics over both
    ranks' rows, validation split and summed across ranks. The probe with micro-batches (its BatchNorm sees each)
    against one process with the same ones: 160 images in batches of 12 end with one of 4, 2 a rank, which 3
    micro-batches would leave one empty on both ranks (statistics of no rows: NaN)."""
    out_dir, stdout = two_rank_runs
    with pytest.warns(RuntimeWarning, match="random weights"):
        one = finetune(dict(_finetune_args(tmp_path, mode, lr, batch), name="one",
                            accum_steps=accum if mode == "linprobe" else 1))
    assert f"steps of {batch} ({batch // 2} x 2 ranks)" + (f" in {accum} micro-batches" if accum > 1 else "") \
        in stdout
    two = json.loads((out_dir / f"{mode}-{batch}-{accum}" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["val_images"] == one["val_images"]
    assert abs(one["history"][-1]["train_loss"] - one["history"][0]["train_loss"]) > 2e-3  # the weights moved
    for a, b in zip(one["history"], two["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])


def test_process_group_counts_a_run_finished_only_when_every_rank_gets_there(monkeypatch):
    """Returning, or an error every rank raises at the same step (finished_on), leaves through the barrier;
    any other error leaves at once."""
    from mae_fast.training import distributed as dist_mod

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
