"""The masked-token ops' public functions: input checks and the torch reference backend against plain formulas
(official MAE order, conv patch embedding). The Triton and CUDA kernels: test_kernels_masking.py."""
import math

import pytest
import torch

from mae_fast import ops


def _perm_ids(B, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return shuffle[:, :K], torch.argsort(shuffle, 1)


@pytest.mark.parametrize("B,L,K,D", [(1, 7, 1, 5), (3, 37, 9, 24), (2, 50, 50, 3)])
def test_gather_visible(B, L, K, D):
    x = torch.randn(B, L, D, dtype=torch.float64)
    pos = torch.randn(L, D, dtype=torch.float64)
    ids, _ = _perm_ids(B, L, K)
    out = ops.gather_visible(x, ids, pos)
    for b in range(B):
        for j in range(K):
            torch.testing.assert_close(out[b, j], x[b, ids[b, j]] + pos[ids[b, j]])
    torch.testing.assert_close(ops.gather_visible(x, ids.int(), pos[None]), out)
    assert torch.equal(ops.gather_visible(x, ids), torch.stack([x[b, ids[b]] for b in range(B)]))


@pytest.mark.parametrize("B,L,K,D", [(1, 7, 1, 5), (3, 37, 9, 24), (2, 16, 15, 8)])
def test_unshuffle_with_mask_token(B, L, K, D):
    x_vis = torch.randn(B, 1 + K, D, dtype=torch.float64)
    token = torch.randn(1, 1, D, dtype=torch.float64)
    pos = torch.randn(1 + L, D, dtype=torch.float64)
    ids_keep, ids_restore = _perm_ids(B, L, K, seed=1)
    out = ops.unshuffle_with_mask_token(x_vis, ids_restore, token, pos)
    assert out.shape == (B, 1 + L, D)
    for b in range(B):
        torch.testing.assert_close(out[b, 0], x_vis[b, 0] + pos[0])
        for i in range(L):
            r = int(ids_restore[b, i])
            src = x_vis[b, 1 + r] if r < K else token[0, 0]
            torch.testing.assert_close(out[b, 1 + i], src + pos[1 + i])
    # the visible rows land where ids_keep says
    no_cls = ops.unshuffle_with_mask_token(x_vis[:, 1:], ids_restore, token, cls_token=False)
    for b in range(B):
        torch.testing.assert_close(no_cls[b, ids_keep[b]], x_vis[b, 1:])


def test_unshuffle_gradients():
    B, L, K, D = 2, 11, 4, 6
    x_vis = torch.randn(B, 1 + K, D, dtype=torch.float64, requires_grad=True)
    token = torch.randn(D, dtype=torch.float64, requires_grad=True)
    _, ids_restore = _perm_ids(B, L, K)
    assert torch.autograd.gradcheck(lambda a, t: ops.unshuffle_with_mask_token(a, ids_restore, t), (x_vis, token))
    out = ops.unshuffle_with_mask_token(x_vis, ids_restore, token)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    masked = (ids_restore >= K)
    expected = (w[:, 1:][masked]).sum(0)
    torch.testing.assert_close(token.grad, expected)


@pytest.mark.parametrize("C,H,W,p", [(3, 24, 40, 8), (1, 14, 14, 7), (3, 32, 32, 16)])
def test_patchify_gather_equals_conv(C, H, W, p):
    B = 2
    imgs = torch.randn(B, C, H, W, dtype=torch.float64)
    L = (H // p) * (W // p)
    K = max(1, L // 3)
    ids, _ = _perm_ids(B, L, K)
    conv = torch.nn.Conv2d(C, 10, p, p).double()
    full = conv(imgs).flatten(2).transpose(1, 2)
    pix = ops.patchify_gather(imgs, ids, p)
    assert pix.shape == (B, K, C * p * p)
    emb = pix @ conv.weight.reshape(10, -1).T + conv.bias
    torch.testing.assert_close(emb, torch.stack([full[b, ids[b]] for b in range(B)]))


def test_patchify_roundtrip():
    imgs = torch.randn(2, 3, 24, 40)
    x = ops.patchify(imgs, 8)
    assert x.shape == (2, 15, 192)
    torch.testing.assert_close(x[0, 6].reshape(8, 8, 3).permute(2, 0, 1), imgs[0, :, 8:16, 8:16])
    torch.testing.assert_close(ops.unpatchify(x, 8, (3, 5)), imgs)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_mse(norm_pix):
    B, C, H, W, p = 2, 3, 16, 24, 8
    imgs = torch.randn(B, C, H, W, dtype=torch.float64)
    L = 6
    pred = torch.randn(B, L, p * p * C, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.float64)
    total, n = 0.0, 0
    for b in range(B):
        for i in range(L):
            if mask[b, i]:
                r, c = divmod(i, W // p)
                t = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    t = (t - t.mean()) / math.sqrt(t.var(unbiased=True).item() + 1e-6)
                total += ((pred[b, i] - t) ** 2).mean().item()
                n += 1
    got = ops.masked_patch_mse(pred, imgs, mask, p, norm_pix)
    assert got.dtype == torch.float32
    assert abs(got.item() - total / n) < 1e-5


def test_masking_bad_inputs():
    x = torch.randn(2, 10, 4)
    ids = torch.tensor([[0, 3], [9, 1]])
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        ops.gather_visible(x, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(IndexError):
        ops.gather_visible(x, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(TypeError, match="dtype"):
        ops.gather_visible(x, ids.float())
    with pytest.raises(ValueError, match="batch"):
        ops.gather_visible(x, ids[:1])
    with pytest.raises(ValueError, match="3 dims"):
        ops.gather_visible(x[0], ids)
    with pytest.raises(ValueError, match="pos_embed"):
        ops.gather_visible(x, ids, torch.randn(9, 4))
    with pytest.raises(TypeError, match="dtype"):
        ops.gather_visible(x.long(), ids)
    with pytest.raises(ValueError, match="not divisible"):
        ops.patchify_gather(torch.randn(1, 3, 20, 16), ids[:1], 8)
    with pytest.raises(ValueError, match="mask_token"):
        ops.unshuffle_with_mask_token(x, torch.argsort(torch.rand(2, 12), 1), torch.randn(5))
    with pytest.raises(ValueError, match="pred must be"):
        ops.masked_patch_mse(torch.randn(1, 3, 10), torch.randn(1, 3, 16, 16), torch.ones(1, 4), 8)


def test_masking_odd_argument_types_are_named():
    x = torch.randn(2, 9, 5)
    keep = _perm_ids(2, 9, 4, seed=3)[0]
    with pytest.raises(TypeError, match="gather_visible: ids must be a tensor"):
        ops.gather_visible(x, keep.tolist())
    with pytest.raises(TypeError, match="patchify_gather: ids must be a tensor"):
        ops.patchify_gather(torch.randn(2, 3, 9, 6), keep[:, :2].tolist(), 3)
    with pytest.raises(TypeError, match="pos_embed must be a tensor"):
        ops.gather_visible(x, keep, x[0].tolist())
    with pytest.raises(TypeError, match="pos_embed must be a tensor"):
        ops.unshuffle_with_mask_token(x[:, :5], _perm_ids(2, 9, 4)[1], torch.randn(5), 0.5)
    # True is an int, but not a patch size (it silently patchified with p=1)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ops.patchify_gather(torch.randn(2, 3, 9, 6), keep[:, :2], True)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ops.masked_patch_mse(torch.randn(2, 54, 3), torch.randn(2, 3, 9, 6), torch.ones(2, 54), True)


def test_masking_refuses_tensors_on_another_device():
    x = torch.randn(2, 9, 5)
    keep, restore = _perm_ids(2, 9, 4)
    with pytest.raises(ValueError, match="gather_visible: ids on meta but input on cpu"):
        ops.gather_visible(x, keep.to("meta"), backend="torch")
    with pytest.raises(ValueError, match="gather_visible: pos_embed on meta but input on cpu"):
        ops.gather_visible(x, keep, torch.randn(9, 5, device="meta"), backend="torch")
    x_vis = torch.randn(2, 5, 5)
    with pytest.raises(ValueError, match="mask_token on meta but x_vis on cpu"):
        ops.unshuffle_with_mask_token(x_vis, restore, torch.randn(5, device="meta"), backend="torch")
    imgs, pred = torch.randn(2, 3, 6, 9), torch.randn(2, 6, 27)
    with pytest.raises(ValueError, match="pred, imgs and mask must share a device"):
        ops.masked_patch_mse(pred, imgs, torch.ones(2, 6, device="meta"), 3, backend="torch")
    with pytest.raises(ValueError, match="pred, imgs and mask must share a device"):
        ops.masked_patch_mse(pred, imgs.to("meta"), torch.ones(2, 6), 3, backend="torch")


def test_masking_refuses_bad_shapes():
    x = torch.randn(2, 9, 5)
    keep, restore = _perm_ids(2, 9, 4)
    with pytest.raises(ValueError, match=r"pos_embed must be \(1, N, D\) or \(N, D\)"):  # not one table per image
        ops.gather_visible(x, keep, torch.randn(2, 9, 5), backend="torch")
    token = torch.randn(5)
    with pytest.raises(ValueError, match="10 visible tokens but only 9 positions"):
        ops.unshuffle_with_mask_token(torch.randn(2, 11, 5), restore, token, backend="torch")
    with pytest.raises(ValueError, match="x_vis has no rows but cls_token=True"):
        ops.unshuffle_with_mask_token(torch.randn(2, 0, 5), restore, token, backend="torch")
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        ops.patchify_gather(torch.randn(2, 3, 6, 9), keep, 0)
    with pytest.raises(ValueError, match="image size 6x10 is not divisible by patch size 3"):
        ops.patchify_gather(torch.randn(2, 3, 6, 10), keep, 3)
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 6\)"):
        ops.masked_patch_mse(torch.randn(2, 6, 27), torch.randn(2, 3, 6, 9), torch.ones(2, 5), 3, backend="torch")
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 6\)"):  # would broadcast over the batch
        ops.masked_patch_mse(torch.randn(2, 6, 27), torch.randn(2, 3, 6, 9), torch.ones(1, 6), 3, backend="torch")


def test_check_ids_false_skips_the_range_check():
    """check_ids=False is the no-host-sync path: no range check in Python (a bad id fails inside the op)."""
    x = torch.randn(2, 9, 5)
    bad = torch.tensor([[0, 9], [1, 2]])
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 9\)"):
        ops.gather_visible(x, bad, backend="torch")
    with pytest.raises(RuntimeError, match="out of bounds"):
        ops.gather_visible(x, bad, backend="torch", check_ids=False)
    keep = torch.tensor([[8, 0], [3, 2]])
    torch.testing.assert_close(ops.gather_visible(x, keep, backend="torch", check_ids=False),
                               torch.stack([x[0, [8, 0]], x[1, [3, 2]]]))


@pytest.mark.parametrize("cls_token", [True, False])
def test_unshuffle_cls_row_and_pos_rows(cls_token):
    B, L, K, D = 2, 11, 4, 7
    keep, restore = _perm_ids(B, L, K, seed=4)
    x_vis = torch.randn(B, K + cls_token, D, dtype=torch.float64)
    token = torch.randn(1, 1, D, dtype=torch.float64)
    pos = torch.randn(L + cls_token, D, dtype=torch.float64)
    out = ops.unshuffle_with_mask_token(x_vis, restore, token, pos[None], cls_token=cls_token, backend="torch")
    want = token[0].expand(B, L, D).clone()
    for b in range(B):
        want[b, keep[b]] = x_vis[b, cls_token:]
    if cls_token:
        want = torch.cat([x_vis[:, :1], want], 1)
    torch.testing.assert_close(out, want + pos)


def test_masked_patch_mse_norm_pix_eps_is_the_official_1e6():
    """On nearly flat patches the eps decides the loss: target = (t - mean) / sqrt(var_unbiased + 1e-6)."""
    B, C, p = 2, 3, 3
    g = torch.Generator().manual_seed(6)
    imgs = (0.5 + 1e-3 * torch.randn(B, C, 6, 9, generator=g, dtype=torch.float64))
    pred = torch.randn(B, 6, p * p * C, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, 6, generator=g) < 0.6).double()
    mask[0, 0] = 1
    total = 0.0
    for b in range(B):
        for i in range(6):
            r, c = divmod(i, 3)
            t = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
            t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
            total += mask[b, i].item() * ((pred[b, i] - t) ** 2).mean().item()
    got = ops.masked_patch_mse(pred, imgs, mask, p, True, backend="torch")
    assert abs(got.item() - total / mask.sum().item()) < 1e-5 * abs(total / mask.sum().item())
