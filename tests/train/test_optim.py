"""Optimizers and the schedule against hand-written references: LARS, MAE's LARS and param_groups_lrd, the per-step
lr schedule, the no-decay groups."""
from __future__ import annotations

import random

import pytest
import torch

import mae_fast
from helpers.train import expected_lr, mae_param_groups_lrd
from mae_fast.optim import LARS, layer_decay_groups, lr_at
from mae_fast.training import finetune as ft


def test_lars_matches_formula_over_steps():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    zero = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)  # zero norm: ratio falls back to 1
    opt = LARS([w, b, zero], lr=0.5, weight_decay=0.05, momentum=0.9, trust_coefficient=0.01)
    w_ref, b_ref, z_ref = w.detach().clone(), b.detach().clone(), zero.detach().clone()
    mw, mb, mz = torch.zeros_like(w_ref), torch.zeros_like(b_ref), torch.zeros_like(z_ref)
    for _ in range(4):
        gw, gb, gz = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (w, b, zero))
        w.grad, b.grad, zero.grad = gw.clone(), gb.clone(), gz.clone()
        opt.step()
        u = gw + 0.05 * w_ref
        u = u * (0.01 * w_ref.norm() / u.norm())
        mw = 0.9 * mw + u
        w_ref -= 0.5 * mw
        mb = 0.9 * mb + gb  # 1-D: no decay, no trust ratio
        b_ref -= 0.5 * mb
        uz = gz + 0.05 * z_ref
        if z_ref.norm() > 0:
            uz = uz * (0.01 * z_ref.norm() / uz.norm())
        mz = 0.9 * mz + uz
        z_ref -= 0.5 * mz
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.detach(), b_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(zero.detach(), z_ref, rtol=1e-12, atol=1e-12)
    assert zero.detach().abs().sum() > 0  # the zero-norm weight moved (ratio 1, not 0 or NaN)


def test_lars_rejects_negative_settings():
    with pytest.raises(ValueError, match="momentum"):
        LARS([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=-0.1)


def test_lars_is_maes_lars_on_a_probe_head():
    """mae_fast.optim.LARS against MAE's util/lars.py written out here (fp64), with the head's weight (2-D: decay and
    trust ratio) and bias (1-D: plain momentum), over 4 steps with new random gradients."""
    from mae_fast.optim import LARS

    g = torch.Generator().manual_seed(5)
    w = torch.randn(7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ref = {"w": w.detach().clone(), "b": b.detach().clone()}
    mu = {k: torch.zeros_like(v) for k, v in ref.items()}
    opt = LARS([w, b], lr=0.3, weight_decay=0.05, momentum=0.9)
    for _ in range(4):
        grads = {"w": torch.randn(7, 13, generator=g, dtype=torch.float64),
                 "b": torch.randn(7, generator=g, dtype=torch.float64)}
        w.grad, b.grad = grads["w"].clone(), grads["b"].clone()
        opt.step()
        for k in ("w", "b"):  # MAE: dp = g (+ wd p, x q for ndim > 1); mu = m mu + dp; p -= lr mu
            p, dp = ref[k], grads[k]
            if p.ndim > 1:
                dp = dp + 0.05 * p
                pn, un = p.norm(), dp.norm()
                q = 0.001 * pn / un if (pn > 0 and un > 0) else 1.0
                dp = dp * q
            mu[k] = 0.9 * mu[k] + dp
            ref[k] = p - 0.3 * mu[k]
    torch.testing.assert_close(w.detach(), ref["w"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.detach(), ref["b"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_at_is_maes_per_step_schedule(schedule):
    rng = random.Random(7)
    for _ in range(20):
        total, warmup = rng.randint(3, 97), rng.randint(0, 13)
        peak, min_lr = rng.uniform(1e-4, 1e-2), rng.uniform(0, 1e-4)
        for step in range(total):
            want = expected_lr(step, peak, total, warmup, schedule, min_lr)
            assert lr_at(step, peak, total, warmup, schedule, min_lr) == pytest.approx(want, rel=1e-12)
    assert lr_at(0, 1.0, 10, 4, schedule, 0.1) == 0.0  # warmup starts from 0, as MAE's


def test_no_weight_decay_on_biases_norms_tokens_pos_embed():
    import mae_fast
    from mae_fast.optim import param_groups

    m = mae_fast.create_model("mae_vit_demo_patch8")
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= nd
    assert all(m.get_parameter(n).ndim >= 2 for n in d) and "blocks.0.attn.qkv.weight" in d
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


@pytest.mark.parametrize("depth, pool", [(3, "mean_fc_norm"), (4, "cls")])
def test_layer_decay_groups_are_maes_param_groups_lrd(depth, pool):
    """Each trainable parameter lands in a group with MAE's lr_scale = decay ** (depth + 1 - layer_id) and MAE's
    weight decay (none on 1-D params, cls_token, pos_embed); frozen parameters are left out."""
    mae = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, depth=depth)
    model = ft.Classifier(mae_fast.create_timm_encoder(mae), num_classes=7, pool=pool)
    model.encoder.blocks[1].attn.qkv.bias.requires_grad_(False)
    groups = layer_decay_groups(model, weight_decay=0.037, layer_decay=0.63)
    want = mae_param_groups_lrd(model, 0.037, 0.63)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in got, "a parameter in two groups"
            got[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert got.keys() == want.keys() and "encoder.blocks.1.attn.qkv.bias" not in got
    for n in want:
        assert got[n][0] == pytest.approx(want[n][0], rel=1e-12) and got[n][1] == want[n][1], n
    # the decay reached every layer: depth + 2 distinct scales, the smallest decay ** (depth + 1)
    assert len({s for s, _ in got.values()}) == depth + 2
    assert min(s for s, _ in got.values()) == pytest.approx(0.63 ** (depth + 1))
