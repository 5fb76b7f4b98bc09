"""Efficient stochastic depth: per-sample outcomes, equality in expectation with timm's DropPath, the block wiring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer

from mae_fast.models.drop_path import drop_add_residual, drop_path_rates, efficient_drop_path

B, N, D = 7, 3, 5  # 7 * (1 - 0.3) = 4.9: four or five samples kept


@pytest.fixture
def one_thread():
    """Thousands of tiny ops: one intra-op thread (two threads of a busy CPU wait on each other at every op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def branch():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))


def test_each_row_is_the_scaled_branch_or_unchanged(branch):
    x = torch.randn(B, N, D)
    full = branch(x)
    counts = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = drop_add_residual(x, branch, 0.3)
        kept = [i for i in range(B) if not torch.equal(out[i], x[i])]
        counts.add(len(kept))
        for i in range(B):
            want = x[i] + full[i] * (B / len(kept)) if i in kept else x[i]
            torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)
    assert counts == {4, 5}  # floor and ceil of B (1 - r)
    assert torch.equal(drop_add_residual(x, branch, 0.3, training=False), x + full)
    assert torch.equal(drop_add_residual(x, branch, 0.0), x + full)


def test_mean_over_draws_is_the_no_drop_output_as_timm(branch, one_thread):
    """Over many draws the mean of ``x + branch(x)`` under stochastic depth is the no-drop output, within 5
    standard errors per element, for this and for timm's DropPath; each sample is kept 1 - r of the time."""
    torch.manual_seed(1)
    x = torch.randn(B, N, D)
    with torch.no_grad():
        want = x + branch(x)
        draws = 2000
        ours = torch.stack([drop_add_residual(x, branch, 0.3) for _ in range(draws)])
        timm = torch.stack([x + DropPath(0.3)(branch(x)) for _ in range(draws)])
    for name, out in (("ours", ours), ("timm", timm)):
        err = (out.mean(0) - want).abs()
        se = out.std(0) / math.sqrt(draws)
        assert bool((err <= 5 * se + 1e-6).all()), (name, float((err / (se + 1e-12)).max()))
    kept = (ours != x).any(-1).any(-1).float().mean(0)  # per sample, the fraction of draws it was kept
    assert float(kept.mean()) == pytest.approx(0.7, abs=0.01)
    assert bool(((kept - 0.7).abs() < 0.04).all())


def test_efficient_blocks_keep_weights_and_eval_output_and_draw_as_the_branches_compose():
    torch.manual_seed(2)
    enc = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                            drop_path_rate=0.3)
    keys = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randn(6, 3, 16, 16)
    enc.eval()
    with torch.no_grad():
        before = enc(x)
    rates = drop_path_rates(enc)
    efficient_drop_path(enc)
    assert drop_path_rates(enc) == rates
    assert rates == [(0.0, 0.0), pytest.approx((0.15, 0.15)), pytest.approx((0.3, 0.3))]
    assert set(enc.state_dict()) == set(keys) and all(torch.equal(v, keys[k]) for k, v in enc.state_dict().items())
    with torch.no_grad():
        assert torch.equal(enc(x), before)
    enc.train()
    blk = enc.blocks[2]
    h = torch.randn(6, 5, 32)
    torch.manual_seed(3)
    got = blk(h)
    torch.manual_seed(3)
    y = drop_add_residual(h, lambda t: blk.ls1(blk.attn(blk.norm1(t))), 0.3)
    want = drop_add_residual(y, lambda t: blk.ls2(blk.mlp(blk.norm2(t))), 0.3)
    assert torch.equal(got, want)
    got.sum().backward()  # the dropped rows' branch gets no gradient, the weights do
    assert blk.mlp.fc1.weight.grad is not None
    not_timm = nn.Module()
    not_timm.blocks = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="timm Blocks"):
        efficient_drop_path(not_timm)
