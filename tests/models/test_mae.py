"""The masked autoencoder's forward, loss and masking against the official formulas (facebookresearch/mae
``models_mae.py``): through bench/reference_mae.py's timm-based reference (losses, predictions and gradients) and
through an fp64 transcription written here on a non-square, 2-channel model; initialisation, gradient
checkpointing, autocast dtypes, compilation and input checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mae_fast


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
def test_matches_official_formulas(reference_pair, norm_pix, mask_ratio):
    ref, ours = reference_pair(norm_pix)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 48, 48, generator=g, dtype=torch.float64)
    noise = torch.rand(3, 36, generator=g, dtype=torch.float64)
    loss_r, pred_r, mask_r = ref(imgs, mask_ratio, noise)
    out = ours(imgs, mask_ratio, noise)
    assert torch.equal(out.mask, mask_r.float())
    torch.testing.assert_close(out.pred, pred_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, loss_r.float(), rtol=1e-6, atol=1e-7)  # loss is reduced in fp32
    # gradients flow to the same parameters with the same values
    out.loss.backward()
    loss_r.backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=n)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_ratio,decoder_depth", [(0.75, 2), (0.5, 1), (0.9, 0)])
def test_masked_only_matches_official_formulas(reference_pair, norm_pix, mask_ratio, decoder_depth):
    """The training path (shuffled decoder order, last block on mask-token rows only) computes the same
    loss, the same removed-patch predictions and the same gradients as the official formulation."""
    ref, ours = reference_pair(norm_pix, decoder_depth=decoder_depth)
    for p in ours.parameters():  # non-trivial norms, biases and mask token
        p.data.add_(0.05 * torch.randn_like(p))
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(2)
    imgs = torch.randn(3, 3, 48, 48, generator=g, dtype=torch.float64)
    noise = torch.rand(3, 36, generator=g, dtype=torch.float64)
    loss_r, pred_r, mask_r = ref(imgs, mask_ratio, noise)
    out = ours(imgs, mask_ratio, noise, masked_only=True)
    K = int(36 * (1 - mask_ratio))
    assert out.pred.shape == (3, 36 - K, 8 * 8 * 3) and out.ids_masked.shape == (3, 36 - K)
    assert torch.equal(out.mask, mask_r.float())
    # every removed patch exactly once, each pred row the reference's prediction for that patch
    assert torch.equal(out.ids_masked.sort(1).values, mask_r.nonzero()[:, 1].reshape(3, -1))
    want = torch.gather(pred_r, 1, out.ids_masked[..., None].expand(-1, -1, pred_r.shape[-1]))
    torch.testing.assert_close(out.pred, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss.double(), loss_r, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    loss_r.backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=n)


def test_masked_only_with_grad_checkpointing_matches(reference_pair):
    _, ours = reference_pair(True)
    imgs = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    noise = torch.rand(2, 36, dtype=torch.float64)
    plain = ours(imgs, 0.75, noise, masked_only=True)
    grads = torch.autograd.grad(plain.loss, [p for p in ours.parameters() if p.requires_grad])
    ours.set_grad_checkpointing(True)
    ckpt = ours(imgs, 0.75, noise, masked_only=True)
    grads_ckpt = torch.autograd.grad(ckpt.loss, [p for p in ours.parameters() if p.requires_grad])
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=0)
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_matches_official_fp32(reference_pair):
    ref, ours = reference_pair(True)
    ref, ours = ref.float(), ours.float()
    imgs = torch.randn(2, 3, 48, 48)
    noise = torch.rand(2, 36)
    loss_r, pred_r, _ = ref(imgs, 0.75, noise)
    out = ours(imgs, 0.75, noise)
    assert (out.loss - loss_r).abs().item() < 1e-5
    torch.testing.assert_close(out.pred, pred_r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("masked_only,lean", [(False, False), (True, False), (True, True)])
def test_residual_stream_dtype_under_autocast_is_the_officials(reference_pair, masked_only, lean, device):
    """Under bf16 autocast the official model's residual stream stays fp32 (bf16 patch embedding + fp32 pos
    embed); mae_fast must not run it in bf16, which would change the numbers of deep models."""
    ref, ours = reference_pair(True)
    ref, ours = ref.float().to(device), ours.float().to(device)
    ours.set_lean_activations(lean)
    seen = {}

    def hook(name):
        return lambda mod, args: seen.setdefault(name, []).append(args[0].dtype)

    for name, model in (("ref", ref), ("ours", ours)):
        model.blocks[0].register_forward_pre_hook(hook(f"{name}.enc"))
        model.decoder_blocks[-1].register_forward_pre_hook(hook(f"{name}.dec"))
    imgs, noise = torch.randn(2, 3, 48, 48, device=device), torch.rand(2, 36, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss_r = ref(imgs, 0.75, noise)[0]
        out = ours(imgs, 0.75, noise, masked_only=masked_only)
    assert seen["ref.enc"] == seen["ours.enc"] == [torch.float32]
    assert seen["ref.dec"] == seen["ours.dec"] == [torch.float32]
    assert abs(out.loss.item() - loss_r.item()) < 2e-2 * abs(loss_r.item())


def test_non_square_and_forward_features(small_mae):
    m = small_mae(img_size=(32, 56))
    x = torch.randn(2, 3, 32, 56)
    out = m(x, mask_ratio=0.6)
    assert out.pred.shape == (2, 28, 192) and out.mask.shape == (2, 28)
    assert int(out.mask.sum(1)[0]) == 28 - int(28 * 0.4)
    assert m.forward_features(x).shape == (2, 29, 64)


def test_noise_drives_masking_and_default_uses_generator(small_mae):
    m = small_mae()
    x = torch.randn(2, 3, 48, 48)
    torch.manual_seed(5)
    a = m(x).mask
    torch.manual_seed(5)
    b = m(x).mask
    assert torch.equal(a, b)
    noise = torch.rand(2, 36)
    expected = (torch.argsort(torch.argsort(noise, 1), 1) >= 9).float()
    assert torch.equal(m(x, 0.75, noise).mask, expected)


def test_bad_inputs_have_clear_errors(small_mae):
    m = small_mae()
    x = torch.randn(2, 3, 48, 48)
    with pytest.raises(ValueError, match="divisible"):
        mae_fast.create_model("mae_vit_small_patch16", img_size=100)
    with pytest.raises(ValueError, match="img_size"):
        mae_fast.create_model("mae_vit_small_patch16", img_size="big")
    with pytest.raises(TypeError, match="unknown override"):
        mae_fast.create_model("mae_vit_small_patch16", width=3)
    with pytest.raises(ValueError, match="unknown model"):
        mae_fast.create_model("vit_nope")
    with pytest.raises(ValueError, match=r"imgs must be \(B, 3, H, W\) with H and W multiples of the patch size 8"):
        m(torch.randn(2, 3, 44, 48))  # any size of whole patches is taken (40 x 48 is)
    with pytest.raises(ValueError, match=r"imgs must be \(B, 3, H, W\)"):
        m(torch.randn(2, 1, 48, 48))
    with pytest.raises(ValueError, match="imgs must be"):
        m(torch.randn(3, 48, 48))
    with pytest.raises(ValueError, match="noise must be"):
        m(x, noise=torch.rand(2, 35))
    with pytest.raises(ValueError, match="leaves no visible patch"):
        m(x, mask_ratio=0.99)
    with pytest.raises(ValueError, match="mask_ratio"):
        m(x, mask_ratio=1.5)
    with pytest.raises(TypeError, match="floating"):
        m(x.to(torch.int32))


@pytest.mark.parametrize("img_size", [-16, 0, (48, -8), (0, 48)])
def test_non_positive_img_size_is_rejected(small_mae, img_size):
    with pytest.raises(ValueError, match="must be positive"):
        small_mae(img_size=img_size)


@pytest.mark.parametrize("over", [dict(depth=-1), dict(depth=2.0), dict(decoder_depth=-2), dict(num_heads=0),
                                  dict(embed_dim=48.5), dict(decoder_embed_dim=True), dict(mlp_ratio=0.0),
                                  dict(in_chans=0)])
def test_non_positive_or_fractional_model_sizes_are_rejected(small_mae, over):
    """A depth of -1 built a model without blocks, with no error."""
    key = next(iter(over))
    with pytest.raises(ValueError, match=rf"model sizes must be whole numbers >= 1 \(depths >= 0\) and mlp_ratio > 0, "
                                         rf"got .*{key}="):
        small_mae(**over)


_ONE_GRAPH = """
import torch, mae_fast
m = mae_fast.create_model('mae_vit_demo_patch8', img_size=32, depth=1, decoder_depth=1)
imgs = torch.randn(2, 3, *m.img_size); noise = torch.rand(2, m.num_patches)
for lean in (False, True):
    m.set_lean_activations(lean)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend='aot_eager')(imgs, 0.75, noise, masked_only=True)
    out.loss.backward()
    ref = m(imgs, 0.75, noise, masked_only=True).loss
    assert abs(out.loss.item() - ref.item()) < 1e-5, (out.loss.item(), ref.item())
print('one graph')
"""


def _one_graph_command(workdir) -> dict:
    import sys

    return {"compile": ([sys.executable, "-c", _ONE_GRAPH], None)}


@pytest.mark.background(commands=_one_graph_command)  # starts with the first test: tests/helpers/background.py
def test_training_forward_compiles_as_one_graph_in_a_fresh_process(background):
    """torch.compile(fullgraph=True) of the training path, plain and lean, before any eager call: backend
    registration must not happen inside the trace."""
    rc, out = background.wait("compile")
    assert rc == 0 and "one graph" in out, out[-3000:]


# --- an fp64 transcription of the official forward, on a non-square image of 2 channels ----------------------------


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
    with pytest.raises(ValueError, match=r"imgs must be \(B, 2, H, W\)"):
        m(torch.randn(2, 3, 24, 40))
    with pytest.raises(ValueError, match="imgs on meta"):
        m(torch.randn(2, 2, 24, 40, device="meta"))
    with pytest.raises(ValueError, match=r"imgs must be \(B, 2, H, W\) with H and W multiples"):
        m.forward_features(torch.randn(2, 2, 41, 24))
