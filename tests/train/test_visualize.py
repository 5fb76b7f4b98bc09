"""Reconstruction pictures: norm-pix un-normalisation from visible patches only (the grid PNG is checked by the demo
run in test_pretrain.py and by tests/cli)."""
from __future__ import annotations


import torch

import mae_fast
from mae_fast.training import visualize


def test_norm_pix_unnormalisation_uses_visible_statistics_only():

    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32) * 0.7 + 0.3
    target = m.patchify(imgs)
    mask = (torch.rand(2, m.num_patches) < 0.6).float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normed = (target - mean) / (var + 1e-6) ** 0.5
    rec = visualize.reconstruct(m, imgs, normed, mask)
    # a perfect prediction comes back exactly on visible patches
    vis = (mask == 0)
    torch.testing.assert_close(m.patchify(rec)[vis], target[vis], rtol=1e-4, atol=1e-4)
    # removed patches' statistics do not depend on their own (hidden) pixels
    imgs2 = imgs.clone()
    hidden = m.unpatchify(mask[..., None].expand_as(target)).bool()
    imgs2[hidden] = imgs2[hidden] * 3.0 + 1.0
    est1 = visualize.visible_stats(m.patchify(imgs), mask, m.grid_size)
    est2 = visualize.visible_stats(m.patchify(imgs2), mask, m.grid_size)
    torch.testing.assert_close(est1[0], est2[0]) and torch.testing.assert_close(est1[1], est2[1])
