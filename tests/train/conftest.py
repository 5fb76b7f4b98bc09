"""The training tests' fixtures: no curves.png unless a test asks, and a virtual clock (their helpers are in
tests/helpers/train.py)."""
from __future__ import annotations

import pytest

from helpers.train import CKPT_S, FIRST_ITEM_S, ITEM_S, STEP_S, VirtualClock


@pytest.fixture(autouse=True)
def no_curves(request, monkeypatch):
    """No curves.png (matplotlib takes longer than these runs' training; test_curves.py covers it), except in
    tests marked ``curves``."""
    if request.node.get_closest_marker("curves") is None:
        from mae_fast.training import curves

        monkeypatch.setattr(curves, "draw_or_warn", lambda run_dir, draw: None)


@pytest.fixture
def clock(monkeypatch):
    """Each step sleeps STEP_S, each image takes ITEM_S to load (the first one of step 0 FIRST_ITEM_S more: the
    first window is slow, as compilation makes it) and each checkpoint write CKPT_S."""
    from mae_fast.data.samplers import StepBatchSampler, SyntheticImages
    from mae_fast.training import checkpoint, metrics, pretrain

    clk = VirtualClock()
    monkeypatch.setattr(pretrain, "time", clk)
    monkeypatch.setattr(metrics, "time", clk)
    first = int(StepBatchSampler(48, 8, 0, 0, 6).global_batch(0)[1][0])
    real_item, real_save = SyntheticImages.__getitem__, checkpoint.save_checkpoint

    def item(self, i):
        clk.sleep(ITEM_S + (FIRST_ITEM_S if i == first else 0.0))
        return real_item(self, i)

    def save(*a, **k):
        clk.sleep(CKPT_S)
        return real_save(*a, **k)

    monkeypatch.setattr(SyntheticImages, "__getitem__", item)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    return clk
