"""LARS against the formula written out in fp64, step by step."""
import pytest
import torch

from mae_fast.optim import LARS


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
