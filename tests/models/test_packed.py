"""Any-size forward and the packed mixed-resolution forward of the MAE, against per-image and fixed-size models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mae_fast
from mae_fast import ops
from mae_fast.models.checkpoint import load_pretrained

SIZES = [(48, 48), (32, 56), (64, 40), (16, 24)]  # the model's own grid and three others


def _images_and_noise(sizes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randn(3, h, w, generator=g, dtype=dtype) for h, w in sizes]
    noise = [torch.rand(1, (h // 8) * (w // 8), generator=g, dtype=dtype) for h, w in sizes]
    return imgs, noise


@pytest.mark.parametrize("norm_pix", [False, True])
def test_packed_equals_per_image_in_fp64(small_mae, norm_pix):
    torch.manual_seed(1)
    model = small_mae(randomise=True, norm_pix_loss=norm_pix).double()
    imgs, noise = _images_and_noise(SIZES)
    with ops.use_backend("torch"):
        out = model.forward_packed(imgs, mask_ratio=0.6, noise=noise)
        out.loss.backward()
        packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        losses, removed = [], []
        for img, nz in zip(imgs, noise):
            ref = model(img[None], mask_ratio=0.6, noise=nz)  # the full official path, each image alone
            # its loss in fp64 (the model's own loss op computes in fp32): MSE per removed patch, averaged
            target = ops.patchify(img[None], 8)
            if norm_pix:
                target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            per_patch = (ref.pred - target).pow(2).mean(-1)
            losses.append((per_patch * ref.mask).sum() / ref.mask.sum())
            torch.testing.assert_close(losses[-1].float(), ref.loss.float())
            removed.append(ref.mask.sum())
        total = sum(l * m for l, m in zip(losses, removed)) / sum(removed)
        total.backward()
    torch.testing.assert_close(out.losses, torch.stack(losses).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, total.detach(), rtol=1e-12, atol=1e-12)
    assert [m.shape[1] for m in out.ids_masked] == [int(r) for r in removed]
    assert out.cu_seqlens_encoder.tolist()[-1] == sum(1 + (h // 8) * (w // 8) - int(r)
                                                       for (h, w), r in zip(SIZES, removed))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(packed_grads) == set(names)
    for n in names:
        torch.testing.assert_close(packed_grads[n], model.get_parameter(n).grad, rtol=1e-10, atol=1e-12, msg=n)


def test_packed_with_triton_attention_matches_sdpa(small_mae):
    """The packed sequences through the Triton flash-attention kernel (interpreter on the CPU) in fp32."""
    torch.manual_seed(2)
    model = small_mae(randomise=True, decoder_depth=1, num_heads=2, decoder_num_heads=1)  # head dims of 32
    imgs, noise = _images_and_noise(SIZES[1:3], seed=3, dtype=torch.float32)
    with torch.no_grad():
        with ops.use_backend(attention="triton"):
            a = model.forward_packed(imgs, 0.75, noise)
        with ops.use_backend(attention="sdpa"):
            b = model.forward_packed(imgs, 0.75, noise)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-4, atol=1e-5)


def _old_forward(model, imgs, mask_ratio, noise, masked_only):
    """The fixed-size forward as it was before any-size inputs: the model's own position parameters throughout."""
    L = model.num_patches
    K = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K]
    mask = (ids_restore >= K).float()
    pixels = ops.patchify_gather(imgs, ids_keep, model.patch_size, check_ids=False)
    w = model.patch_embed.proj.weight
    x = F.linear(pixels, w.reshape(w.shape[0], -1), model.patch_embed.proj.bias)
    x = x + F.embedding(ids_keep, model.pos_embed[0, 1:])
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    latent = model._run_blocks(model.blocks, torch.cat([cls, x], 1), model.norm)
    if masked_only:
        ids_masked = ids_shuffle[:, K:]
        y = model.decoder_embed(latent)
        pos = model.decoder_pos_embed[0]
        y = torch.cat([y + F.embedding(F.pad(ids_keep + 1, (1, 0)), pos),
                       model.mask_token + F.embedding(ids_masked + 1, pos)], 1)
        y = model._run_blocks(model.decoder_blocks, y, model.decoder_norm, last_first_query=K + 1)
        pred = model.decoder_pred(y)
        return model.forward_loss_masked(imgs, pred, ids_masked), pred
    y = model.decoder_embed(latent)
    y = ops.unshuffle_with_mask_token(y, ids_restore, model.mask_token, model.decoder_pos_embed, cls_token=True,
                                      check_ids=False)
    pred = model.decoder_pred(model._run_blocks(model.decoder_blocks, y, model.decoder_norm))[:, 1:]
    return model.forward_loss(imgs, pred, mask), pred


@pytest.mark.parametrize("masked_only", [False, True])
def test_own_size_is_bit_identical_to_the_fixed_size_forward(small_mae, masked_only):
    torch.manual_seed(4)
    model = small_mae(randomise=True)
    imgs, noise = torch.randn(2, 3, 48, 48), torch.rand(2, 36)
    with torch.no_grad():
        out = model(imgs, 0.75, noise, masked_only=masked_only)
        loss, pred = _old_forward(model, imgs, 0.75, noise, masked_only)
    assert torch.equal(out.loss, loss) and torch.equal(out.pred, pred)


@pytest.mark.parametrize("learned", [False, True])
def test_other_size_equals_a_model_built_at_that_size(small_mae, learned):
    """At 32 x 56 the 48 px model equals one built for 32 x 56 with the same weights: its own sin-cos tables, or a
    learned (non-sin-cos) table resampled as ``load_pretrained`` resamples it."""
    torch.manual_seed(5)
    model = small_mae(randomise=True)
    if learned:
        model.pos_embed.data.add_(0.1 * torch.randn_like(model.pos_embed))
    other = small_mae(img_size=(32, 56))
    load_pretrained(other, model.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 56), torch.rand(2, 28)
    keys = set(model.state_dict())
    with torch.no_grad():
        a = model(imgs, 0.75, noise)
        b = other(imgs, 0.75, noise)
        feats = model.forward_features(imgs), other.forward_features(imgs)
    torch.testing.assert_close(a.pred, b.pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*feats, rtol=1e-5, atol=1e-6)
    assert set(model.state_dict()) == keys  # the tables of other grids are not saved
    assert (model.unpatchify(a.pred, (4, 7)).shape == imgs.shape)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 3, 30, 56))


def test_packed_input_errors(small_mae):
    model = small_mae()
    with pytest.raises(ValueError, match="non-empty list"):
        model.forward_packed(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model.forward_packed([torch.randn(3, 48, 44)])
    with pytest.raises(ValueError, match="noise must be"):
        model.forward_packed([torch.randn(3, 48, 48)], noise=[torch.rand(1, 20)])
