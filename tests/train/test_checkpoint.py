"""Checkpoint files: atomic writes that survive a kill, digests, keep-last-K."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.train import tiny
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.training import checkpoint as checkpoint_io
from mae_fast.training.pretrain import pretrain


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


def test_keep_checkpoints_through_pretrain(tmp_path):
    """keep_checkpoints=K keeps the newest K checkpoints (and their digests) of a run; 0 deletes none."""
    res = pretrain(tiny(tmp_path, name="k2", steps=5, checkpoint_every=1, keep_checkpoints=2))
    assert [s for s, _ in checkpoint_io.list_checkpoints(res["run_dir"])] == [5, 4]
    assert len(list(checkpoint_io.checkpoint_dir(res["run_dir"]).glob("*.sha256"))) == 2
    res = pretrain(tiny(tmp_path, name="k0", steps=4, checkpoint_every=1, keep_checkpoints=0))
    assert Path(res["checkpoint"]).is_file()  # 0: none is deleted, never the one just written


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
from mae_fast.training import checkpoint as checkpoint_io
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
