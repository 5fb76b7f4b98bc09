"""Tests from a mutation audit of the MAE model, the built-in demo data and the distributed helpers.

Covers mae_fast/models/mae.py (the whole forward against an fp64 re-implementation of the official MAE
formulas written here, on a non-square image with 2 channels; masking semantics; initialisation; input
checks), mae_fast/data/base.py (item substitution, skip bookkeeping, file listing), mae_fast/data/demo.py
(value noise, bilinear lookup, BT.601 conversion, mip levels, cache folder handling, the camera walk) and
train/distributed.py (device and strategy choice, wrapping, the collective helpers over two gloo processes,
whole state dicts). Each test kills a mutation that the rest of the suite let survive; expectations are
computed independently (hand-computed values, fp64 formulas, small loops), on random inputs of odd sizes.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mae_fast
from mae_fast.data import base as base_mod
from mae_fast.data import demo as demo_mod
from mae_fast.train import distributed as dist_mod


# ============================================================================================ distributed.py

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
