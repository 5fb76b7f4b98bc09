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

# ============================================================================================ the model

# a 24 x 40 image of 2 channels, 8-pixel patches: a 3 x 5 grid of 15 patches, 128 values per patch
ODD = dict(img_size=(24, 40), patch_size=8, in_chans=2, embed_dim=32, depth=2, num_heads=4,
           decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, mlp_ratio=2.0)
GRID = (3, 5)
L = 15


def _odd_model(seed=0, **kw) -> mae_fast.MaskedAutoencoderViT:
    """The ODD model in fp64 with every parameter (pos tables and their cls rows included) made non-trivial,
    as after training or loading a checkpoint with learned tables."""
    torch.manual_seed(seed)
    m = mae_fast.MaskedAutoencoderViT(**{**ODD, **kw}).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _sincos_table(dim: int, grid) -> torch.Tensor:
    """The official 2-D table, by its formula: token t = row * w + col; the first half of the width encodes
    the column, the second the row; each half is [sin(pos * omega), cos(pos * omega)], omega = 1/10000^(2i/d)."""
    h, w = grid
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
    rows = []
    for r in range(h):
        for c in range(w):
            rows.append(torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega),
                                   torch.cos(r * omega)]))
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.stack(rows)])


def _patches(imgs, p):
    """Official patchify: patch t = row * w + col, pixels ordered (row in patch, col in patch, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    return imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _block(x, blk):
    """timm's pre-norm block written out: x + attn(norm1(x)), then + mlp(norm2(x)) with exact GELU."""
    B, N, D = x.shape
    H = blk.attn.num_heads
    h = _layer_norm(x, blk.norm1)
    q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
    x = x + att.transpose(1, 2).reshape(B, N, D) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = _layer_norm(x, blk.norm2)
    h = h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def _official_forward(m, imgs, mask_ratio, noise):
    """facebookresearch/mae ``models_mae.py`` forward, from its formulas, with m's parameters."""
    B = imgs.shape[0]
    p = m.patch_size
    x = F.conv2d(imgs, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    x = x + m.pos_embed[:, 1:]
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    mask = torch.ones(B, L, dtype=torch.float64)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
    for blk in m.blocks:
        x = _block(x, blk)
    latent = _layer_norm(x, m.norm)
    x = latent @ m.decoder_embed.weight.T + m.decoder_embed.bias
    tokens = m.mask_token.expand(B, L + 1 - x.shape[1], -1)
    body = torch.cat([x[:, 1:], tokens], dim=1)
    body = torch.gather(body, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], body], dim=1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = _block(x, blk)
    x = _layer_norm(x, m.decoder_norm)
    pred = (x @ m.decoder_pred.weight.T + m.decoder_pred.bias)[:, 1:]
    target = _patches(imgs, p)
    if m.norm_pix_loss:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)  # unbiased
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    loss = (per_patch * mask).sum() / mask.sum()
    return loss, pred, mask, ids_restore, latent


def _inputs(seed, B=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    imgs = scale * torch.randn(B, 2, 24, 40, generator=g, dtype=torch.float64) + 0.3
    noise = torch.rand(B, L, generator=g, dtype=torch.float64)
    return imgs, noise


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.6, 0.75])
def test_forward_is_the_official_mae_on_a_non_square_two_channel_image(norm_pix, mask_ratio):
    """Loss, predictions of every patch, mask, ids_restore and latent of ``forward`` equal the official
    formulas (with learned, non-zero cls rows in both position tables) on a 3 x 5 grid of 2-channel patches:
    the grid is (rows, cols), the position table follows it and the loss covers removed patches only."""
    m = _odd_model(norm_pix_loss=norm_pix)
    imgs, noise = _inputs(1)
    loss, pred, mask, ids_restore, latent = _official_forward(m, imgs, mask_ratio, noise)
    out = m(imgs, mask_ratio, noise)
    assert torch.equal(out.mask, mask.float()) and torch.equal(out.ids_restore, ids_restore)
    assert int(out.mask.sum(1)[0]) == L - int(L * (1 - mask_ratio))
    torch.testing.assert_close(out.pred, pred, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.latent, latent, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.loss.double(), loss, rtol=2e-6, atol=0)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("decoder_depth", [0, 2])
def test_masked_only_forward_is_the_official_mae_on_a_non_square_two_channel_image(norm_pix, decoder_depth):
    """The training path returns, for each removed patch (``ids_masked``, each once), the official prediction,
    the official loss, mask and latent (cls row first), on the odd non-square 2-channel model."""
    m = _odd_model(norm_pix_loss=norm_pix, decoder_depth=decoder_depth)
    imgs, noise = _inputs(2)
    loss, pred, mask, ids_restore, latent = _official_forward(m, imgs, 0.6, noise)
    out = m(imgs, 0.6, noise, masked_only=True)
    removed = mask.nonzero()[:, 1].reshape(3, -1)
    assert torch.equal(out.ids_masked.sort(1).values, removed)
    want = torch.gather(pred, 1, out.ids_masked[..., None].expand(-1, -1, pred.shape[-1]))
    torch.testing.assert_close(out.pred, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.latent, latent, rtol=1e-9, atol=1e-10)
    assert torch.equal(out.mask, mask.float()) and torch.equal(out.ids_restore, ids_restore)
    torch.testing.assert_close(out.loss.double(), loss, rtol=2e-6, atol=0)


@pytest.mark.parametrize("masked_only", [False, True])
def test_norm_pix_loss_of_low_contrast_patches_uses_the_official_epsilon(masked_only):
    """Patches of variance ~1e-6 make the 1e-6 in (var + 1e-6) ** 0.5 decisive: the loss is the official one
    (unbiased variance, eps 1e-6), not one with another eps or the biased variance."""
    m = _odd_model(norm_pix_loss=True)
    imgs, noise = _inputs(3, scale=1e-3)
    loss = _official_forward(m, imgs, 0.6, noise)[0]
    got = m(imgs, 0.6, noise, masked_only=masked_only).loss
    torch.testing.assert_close(got.double(), loss, rtol=2e-6, atol=0)


def test_fresh_position_tables_are_the_official_sincos_on_the_rows_by_cols_grid():
    """A fresh model's encoder and decoder tables are the official sin-cos of the (rows, cols) = (3, 5)
    grid with an all-zero cls row (not the (5, 3) grid, whose table differs)."""
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    assert m.grid_size == GRID and m.num_patches == L
    torch.testing.assert_close(m.pos_embed[0].double(), _sincos_table(32, GRID), rtol=0, atol=1e-6)
    torch.testing.assert_close(m.decoder_pos_embed[0].double(), _sincos_table(24, GRID), rtol=0, atol=1e-6)


def test_fresh_weights_follow_the_official_initialisation():
    """As official MAE: the patch embedding is xavier-uniform over its (D, C*p*p) matrix view, every Linear
    xavier-uniform with zero bias, LayerNorms 1 and 0, cls and mask tokens normal with std 0.02."""
    torch.manual_seed(0)
    m = mae_fast.MaskedAutoencoderViT(**{**ODD, "embed_dim": 256, "decoder_embed_dim": 512, "depth": 1,
                                         "num_heads": 4, "decoder_num_heads": 4, "decoder_depth": 1})
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))  # fan_in C*p*p = 128, fan_out D = 256
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            b = math.sqrt(6 / sum(mod.weight.shape))
            assert mod.weight.abs().max() <= b and mod.weight.abs().max() > 0.9 * b, name
            assert torch.count_nonzero(mod.bias) == 0, name
        elif isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    assert abs(m.cls_token.std().item() - 0.02) < 0.004
    assert abs(m.mask_token.std().item() - 0.02) < 0.003


def test_unpatchify_inverts_the_official_patch_order_on_a_non_square_grid():
    """``unpatchify`` puts patch row * 5 + col back at (row, col) of the 3 x 5 grid, 2 channels."""
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    imgs = torch.randn(2, 2, 24, 40)
    assert torch.equal(m.patchify(imgs), _patches(imgs, 8))
    assert torch.equal(m.unpatchify(_patches(imgs, 8)), imgs)


def test_random_masking_ids_are_keep_restore_and_mask():
    """``random_masking_ids`` returns (ids_keep, ids_restore, mask) of the official argsort(noise) masking."""
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    noise = torch.rand(4, L)
    ids_keep, ids_restore, mask = m.random_masking_ids(4, 0.6, noise)
    order = torch.argsort(noise, 1)
    assert torch.equal(ids_keep, order[:, :6])
    assert torch.equal(ids_restore, torch.argsort(order, 1))
    want = torch.ones(4, L)
    want[torch.arange(4)[:, None], ids_keep] = 0
    assert torch.equal(mask, want)


def test_mask_ratio_zero_keeps_every_patch():
    """mask_ratio 0 is allowed (ratios lie in [0, 1)): every patch visible, none removed."""
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    noise = torch.rand(2, L)
    ids_keep, ids_restore, mask = m.random_masking_ids(2, 0.0, noise)
    assert torch.equal(ids_keep, torch.argsort(noise, 1)) and not mask.any() and m.num_visible(0.0) == L


def test_a_width_that_heads_do_not_divide_is_refused_when_building():
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        mae_fast.MaskedAutoencoderViT(**{**ODD, "embed_dim": 32, "num_heads": 3})


def test_grad_checkpointing_takes_decoder_blocks_first():
    """A number of checkpointed blocks counts decoder blocks first (they free the most memory per FLOP),
    then encoder blocks; True takes all."""
    m = mae_fast.MaskedAutoencoderViT(**{**ODD, "depth": 3})
    for n, dec, enc in ((1, 1, 0), (2, 2, 0), (3, 2, 1), (9, 2, 3), (True, 2, 3), (False, 0, 0)):
        m.set_grad_checkpointing(n)
        assert (m._checkpointed_decoder, m._checkpointed_encoder) == (dec, enc), n
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="grad checkpointing takes"):
            m.set_grad_checkpointing(bad)


def test_inputs_of_the_wrong_batch_device_or_channels_are_clear_errors():
    """Noise of another batch size or device, images of another channel count or device: a ValueError that
    says so, from ``forward`` and from ``forward_features``, not a failure deep inside an op."""
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    imgs = torch.randn(2, 2, 24, 40)
    with pytest.raises(ValueError, match="noise must be"):
        m(imgs, 0.6, torch.rand(3, L))
    with pytest.raises(ValueError, match="noise on"):
        m(imgs, 0.6, torch.rand(2, L, device="meta"))
    with pytest.raises(ValueError, match=r"imgs must be \(B, 2, 24, 40\)"):
        m(torch.randn(2, 3, 24, 40))
    with pytest.raises(ValueError, match="imgs on meta"):
        m(torch.randn(2, 2, 24, 40, device="meta"))
    with pytest.raises(ValueError, match=r"imgs must be \(B, 2, 24, 40\)"):
        m.forward_features(torch.randn(2, 2, 40, 24))


# ============================================================================================ base.py

class _Items(base_mod.SkippingDataset):
    """Items 0..n-1; those in ``bad`` fail to load. Counts loads per item."""

    def __init__(self, n, bad=()):
        super().__init__()
        self.n, self.bad, self.loads = n, set(bad), []

    def __len__(self):
        return self.n

    def _path(self, i):
        return f"item{i}"

    def _load(self, i):
        self.loads.append(i)
        if i in self.bad:
            raise OSError(f"cannot read {i}")
        return i


def test_item_indices_are_python_sequence_indices():
    """-n .. n-1 are items (-n is item 0); n and -n-1 are IndexErrors."""
    ds = _Items(7)
    assert [ds[i] for i in (0, 6, -1, -7)] == [0, 6, 6, 0]
    for i in (7, -8):
        with pytest.raises(IndexError):
            ds[i]


def test_unreadable_item_is_replaced_by_the_next_readable_one_wrapping_round():
    """A bad item gives the next readable item (wrapping past the end); each bad file is logged and warned
    about once and never decoded again."""
    ds = _Items(7, bad={3, 4, 6})
    with pytest.warns(RuntimeWarning) as rec:
        assert ds[3] == 5 and ds[6] == 0
    assert len(rec) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[4] == 5 and ds[3] == 5 and ds[-1] == 0
    assert [p for p, _ in ds.skipped] == ["item3", "item4", "item6"] and ds.num_skipped == 3
    assert sorted(ds.loads).count(3) == 1 and ds.loads.count(4) == 1 and ds.loads.count(6) == 1
    assert "OSError: cannot read 3" in ds.skipped[0][1]


def test_a_file_reported_bad_twice_is_logged_and_warned_about_once():
    """Subclasses report files found bad while indexing or streaming (a bad shard, each epoch) straight to
    ``_skip``: a second report of the same file adds no entry and no warning."""
    ds = _Items(3)
    with pytest.warns(RuntimeWarning) as rec:
        ds._skip("shard-7.tar", "OSError: truncated")
        ds._skip("shard-7.tar", "OSError: truncated")
        ds._skip("shard-8.tar", "OSError: truncated")
    assert len(rec) == 2 and ds.skipped == [("shard-7.tar", "OSError: truncated"), ("shard-8.tar", "OSError: truncated")]


def test_max_substitutes_counts_the_item_itself():
    """With max_substitutes = 5, four bad items in a row are passed over, five are a DataError."""
    ds = _Items(9, bad={1, 2, 3, 4})
    ds.max_substitutes = 5
    with pytest.warns(RuntimeWarning):
        assert ds[1] == 5
    ds = _Items(9, bad={1, 2, 3, 4, 5})
    ds.max_substitutes = 5
    with pytest.warns(RuntimeWarning), pytest.raises(base_mod.DataError, match="5 consecutive unreadable"):
        ds[1]


def test_list_files_sorted_any_case_hidden_only_below_the_root(tmp_path):
    """Files whose names end in the extensions, any letter case, sorted; hidden files and folders below the
    root are left out, but a root inside a hidden folder (like ~/.cache) still lists; a single file is
    listed only if it matches."""
    root = tmp_path / ".cache" / "imgs"
    for rel in ("z.png", "sub/y.PNG", "a.Png", "b.txt", ".hidden.png", ".dot/c.png", "sub/.d/e.png", "m.jpeg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    got = base_mod.list_files(root, (".png", ".jpeg"))
    assert got == [str(root / r) for r in ("a.Png", "m.jpeg", "sub/y.PNG", "z.png")]
    assert base_mod.list_files(root / "b.txt", (".png",)) == []
    assert base_mod.list_files(root / "a.Png", (".png",)) == [str(root / "a.Png")]


def test_a_dataset_without_transform_draws_from_torch_only():
    """No transform (or one of mae_fast's transforms): only torch's generator needs seeding per item; a
    foreign transform may draw from numpy or Python too."""
    from mae_fast.data.transforms import Normalize

    ds = _Items(3)
    assert ds.draws_only_torch_rng
    ds.transform = Normalize()
    assert ds.draws_only_torch_rng
    ds.transform = lambda x: x
    assert not ds.draws_only_torch_rng


# ============================================================================================ demo.py

def test_value_noise_is_smoothstep_interpolation_between_cell_values_at_pixel_centres():
    """value_noise(size, cells): pixel i samples at (i + 0.5) * cells / size - 0.5 cell units, between the
    cell values around it (wrapping), with smoothstep weights on both axes."""
    size, cells = 14, 4
    got = demo_mod.value_noise(np.random.default_rng(7), size, cells)
    grid = np.random.default_rng(7).random((cells, cells), dtype=np.float32).astype(np.float64)

    def weights(i):
        c = (i + 0.5) * cells / size - 0.5
        i0 = math.floor(c)
        f = c - i0
        return i0 % cells, (i0 + 1) % cells, f * f * (3 - 2 * f)

    want = np.empty((size, size))
    for r in range(size):
        r0, r1, fr = weights(r)
        for c in range(size):
            c0, c1, fc = weights(c)
            top = grid[r0, c0] * (1 - fc) + grid[r0, c1] * fc
            bottom = grid[r1, c0] * (1 - fc) + grid[r1, c1] * fc
            want[r, c] = top * (1 - fr) + bottom * fr
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _bilinear_by_hand(raster, u, v, wrap):
    """Bilinear at continuous coordinates whose pixel centres are at k + 0.5; wrap or clamp at the edges."""
    h, w, _ = raster.shape
    out = []
    for uu, vv in zip(u, v):
        x, y = uu - 0.5, vv - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0

        def px(r, c):
            if wrap:
                return raster[r % h, c % w]
            return raster[min(max(r, 0), h - 1), min(max(c, 0), w - 1)]

        top = px(y0, x0) * (1 - fx) + px(y0, x0 + 1) * fx
        bottom = px(y0 + 1, x0) * (1 - fx) + px(y0 + 1, x0 + 1) * fx
        out.append(top * (1 - fy) + bottom * fy)
    return np.array(out)


@pytest.mark.parametrize("wrap", [True, False])
def test_bilinear_lookup_by_hand_on_a_non_square_raster(wrap):
    """Pixel centres return the pixel; points between them mix the four neighbours; past an edge the lookup
    wraps round (ground) or clamps (object patches), on a 5 x 7 raster, at points on and near every edge."""
    rng = np.random.default_rng(3)
    raster = rng.random((5, 7, 3)).astype(np.float32)
    u = np.array([0.5, 6.5, 3.2, 6.9, 7.0, 0.1, 0.0, 4.75, 6.99, 2.5])
    v = np.array([0.5, 4.5, 2.7, 4.9, 5.0, 0.2, 2.2, 0.01, 3.3, 4.99])
    got = demo_mod._bilinear(raster.reshape(-1, 3), 5, 7, u, v, wrap)
    np.testing.assert_allclose(got, _bilinear_by_hand(raster.astype(np.float64), u, v, wrap), rtol=0, atol=1e-5)


def test_bt601_conversion_by_hand():
    """Limited-range BT.601 of known colours (white 235/128/128, black 16/128/128, red 81/90/240, blue
    41/240/110), chroma as the mean of each 2 x 2 block, planes Y, Cb, Cr in that order."""
    red, blue, white, black = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
    frame = np.zeros((2, 6, 3), np.uint8)
    frame[:, 0:2] = white
    frame[:, 2:4] = red
    frame[:, 4] = red  # a block half red, half blue: chroma of the mean
    frame[:, 5] = blue
    frame[1, 0] = black  # luma per pixel, chroma of the block mean
    out = demo_mod.rgb_to_yuv420p(frame)
    assert out.shape == (3, 6) and out.dtype == np.uint8
    assert out[:2].tolist() == [[235, 235, 81, 81, 81, 41], [16, 235, 81, 81, 81, 41]]
    cb_white_black = 128  # both neutral
    cr_mixed = round(128 + (112.0 * 255 / 2 - 18.214 * 255 / 2) / 255)
    cb_mixed = round(128 + (-37.797 * 255 / 2 + 112.0 * 255 / 2) / 255)
    assert out[2, :3].tolist() == [cb_white_black, 90, cb_mixed]  # Cb plane: 3 values
    assert out[2, 3:].tolist() == [128, 240, cr_mixed]             # Cr plane: 3 values


def test_video_frames_need_even_sides():
    with pytest.raises(ValueError, match="even sides"):
        demo_mod.encode_mp4([np.zeros((4, 5, 3), np.uint8)], "unused.mp4", 8, "mpeg4")
    with pytest.raises(ValueError, match="even sides"):
        demo_mod.encode_mp4([np.zeros((5, 4, 3), np.uint8)], "unused.mp4", 8, "mpeg4")


def test_to_uint8_rounds_to_nearest_and_clips():
    got = demo_mod.to_uint8(np.array([-0.2, 0.0, 0.3 / 255, 0.6 / 255, 127.5 / 255, 0.999, 1.0, 1.7]))
    assert got.tolist() == [0, 0, 0, 1, 128, 255, 255, 255]
    assert demo_mod.to_uint8(np.array([0.49, 0.5, 254.6]), 1.0).tolist() == [0, 1, 255]


def test_mip_levels_are_two_by_two_means():
    """Level k + 1 is the mean of each 2 x 2 block of level k (stored rounded to uint8)."""
    raster = np.random.default_rng(5).random((12, 20, 3)).astype(np.float32)
    pyr = demo_mod.mip_pyramid(raster, 3)
    means = raster.reshape(6, 2, 10, 2, 3).mean(axis=(1, 3))
    flat, h, w = pyr.levels[1]
    assert (h, w) == (6, 10)
    np.testing.assert_array_equal(flat, np.clip(np.floor(means * 255 + 0.5), 0, 255).astype(np.uint8).reshape(-1, 3))
    flat2, h2, w2 = pyr.levels[2]
    means2 = means.reshape(3, 2, 5, 2, 3).mean(axis=(1, 3))
    assert (h2, w2) == (3, 5)
    assert np.abs(flat2.astype(int) - np.floor(means2 * 255 + 0.5).reshape(-1, 3)).max() <= 1


def test_painting_near_the_edge_without_wrap_stays_inside_and_with_wrap_comes_round():
    """An object at a corner of a non-square canvas: without wrap it is clipped at the edges (nothing
    drawn on the far side); with wrap its parts past the edges appear on the far sides."""
    canvas = np.full((20, 30, 3), 0.5, np.float32)
    obj = demo_mod.random_instance(np.random.default_rng(1), 2, 28.6, 1.3, 5.0)
    flat = canvas.copy()
    demo_mod.paint(flat, obj, wrap=False)
    assert not np.array_equal(flat[:8, 22:], canvas[:8, 22:])
    assert np.array_equal(flat[:, :15], canvas[:, :15]) and np.array_equal(flat[12:], canvas[12:])
    wrapped = canvas.copy()
    demo_mod.paint(wrapped, obj, wrap=True)
    assert not np.array_equal(wrapped[:8, :4], canvas[:8, :4]) and not np.array_equal(wrapped[16:], canvas[16:])
    np.testing.assert_array_equal(wrapped[:8, 22:], flat[:8, 22:])  # same pixels where both draw


def test_camera_walks_along_its_heading_for_the_whole_duration():
    """seconds x fps frames (rounded, not truncated: 0.29 s at 100 fps is 29); each step moves along the
    heading the renderer looks at (yaw 0 looks along +y; +x is to the left of it at yaw pi/2)."""
    x, y, yaw, bob = demo_mod.camera_path(np.random.default_rng(4), 0.29, 100, 512)
    assert len(x) == len(y) == len(yaw) == len(bob) == 29
    x, y, yaw, _ = demo_mod.camera_path(np.random.default_rng(4), 30, 8, 512)
    dx, dy = np.diff(x), np.diff(y)
    step = np.hypot(dx, dy)
    moving = step > 1e-9
    assert moving.sum() > 100
    head_x, head_y = -np.sin(yaw[1:]), np.cos(yaw[1:])
    np.testing.assert_allclose((dx * head_x + dy * head_y)[moving], step[moving], rtol=1e-9)


def _fake_generate(calls):
    """Writes a minimal complete demo set (one 7-byte video, train and val folders) instead of rendering."""

    def fake(out_dir, seed=0, **overrides):
        calls.append((seed, overrides))
        (out_dir / "videos").mkdir(parents=True)
        (out_dir / "videos" / "walk_000.mp4").write_bytes(b"1234567")
        for split in ("train", "val"):
            (out_dir / "labelled" / split).mkdir(parents=True)
        manifest = dict(version=demo_mod.DEMO_VERSION, seed=seed, config=dict(demo_mod.DEFAULTS, **overrides),
                        videos=[dict(file="walk_000.mp4", bytes=7)], labelled=dict(classes=[]),
                        generation_s=0.0, n=len(calls))
        (out_dir / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    return fake


def test_demo_cache_folder_is_per_seed_and_settings(tmp_path, monkeypatch):
    """Each seed and each setting value has its own cached set; asking again reuses it."""
    calls = []
    monkeypatch.setattr(demo_mod, "generate", _fake_generate(calls))
    kw = dict(verbose=False)
    a = demo_mod.ensure_demo_data(tmp_path, seed=1, **kw)
    b = demo_mod.ensure_demo_data(tmp_path, seed=2, **kw)
    c = demo_mod.ensure_demo_data(tmp_path, seed=1, n_videos=2, **kw)
    d = demo_mod.ensure_demo_data(tmp_path, seed=1, n_videos=3, **kw)
    assert len({a.root, b.root, c.root, d.root}) == 4 and len(calls) == 4
    assert (a.manifest["seed"], b.manifest["seed"]) == (1, 2)
    assert demo_mod.ensure_demo_data(tmp_path, seed=2, **kw).root == b.root and len(calls) == 4


@pytest.mark.parametrize("damage", ["old_version", "short_video", "no_val", "force"])
def test_an_unusable_or_forced_cache_is_generated_again(tmp_path, monkeypatch, damage):
    """A cached set of another version, with a video of the wrong size or without a val folder is made
    again, as is any set when forced."""
    calls = []
    monkeypatch.setattr(demo_mod, "generate", _fake_generate(calls))
    first = demo_mod.ensure_demo_data(tmp_path, seed=5, verbose=False)
    force = False
    if damage == "old_version":
        m = json.loads((first.root / "manifest.json").read_text())
        m["version"] = demo_mod.DEMO_VERSION - 1
        (first.root / "manifest.json").write_text(json.dumps(m))
    elif damage == "short_video":
        (first.videos / "walk_000.mp4").write_bytes(b"123")
    elif damage == "no_val":
        (first.labelled / "val").rmdir()
    else:
        force = True
    again = demo_mod.ensure_demo_data(tmp_path, seed=5, verbose=False, force=force)
    assert len(calls) == 2 and again.root == first.root and again.manifest["n"] == 2
    assert (again.labelled / "val").is_dir() and (again.videos / "walk_000.mp4").stat().st_size == 7


def test_unknown_demo_setting_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_work():
        raise AssertionError("started generating")

    monkeypatch.setattr(demo_mod, "pick_codec", no_work)
    with pytest.raises(TypeError, match="unknown demo settings: \\['n_vidoes'\\]"):
        demo_mod.generate(tmp_path / "out", n_vidoes=2)


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
