"""Fidelity of mae_fast's ViT-MAE to the official formulas, to timm, and its error messages."""
import pytest
import torch

import mae_fast
from mae_fast.models import mae_train_flops, model_config
from reference_mae import ReferenceMAE

SMALL = dict(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def _pair(norm_pix, **kw):
    cfg = {**SMALL, **kw, "norm_pix_loss": norm_pix}
    torch.manual_seed(0)
    ref = ReferenceMAE(**cfg).double()
    ours = mae_fast.MaskedAutoencoderViT(**cfg).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
def test_matches_official_formulas(norm_pix, mask_ratio):
    ref, ours = _pair(norm_pix)
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
def test_masked_only_matches_official_formulas(norm_pix, mask_ratio, decoder_depth):
    """The training path (shuffled decoder order, last block on mask-token rows only) computes the same
    loss, the same removed-patch predictions and the same gradients as the official formulation."""
    ref, ours = _pair(norm_pix, decoder_depth=decoder_depth)
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


def test_masked_only_with_grad_checkpointing_matches():
    _, ours = _pair(True)
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


def test_matches_official_fp32():
    ref, ours = _pair(True)
    ref, ours = ref.float(), ours.float()
    imgs = torch.randn(2, 3, 48, 48)
    noise = torch.rand(2, 36)
    loss_r, pred_r, _ = ref(imgs, 0.75, noise)
    out = ours(imgs, 0.75, noise)
    assert (out.loss - loss_r).abs().item() < 1e-5
    torch.testing.assert_close(out.pred, pred_r, rtol=1e-4, atol=1e-5)


def test_official_checkpoint_keys_load_strictly():
    ref = ReferenceMAE(**{**SMALL, "depth": 1, "decoder_depth": 1})
    ours = mae_fast.MaskedAutoencoderViT(**{**SMALL, "depth": 1, "decoder_depth": 1})
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    mae_fast.load_pretrained(ours, {"model": ref.state_dict()})
    assert not ours.pos_embed.requires_grad and not ours.decoder_pos_embed.requires_grad


def test_pos_embed_is_official_sincos():
    from reference_mae import sincos_2d_np

    m = mae_fast.create_model("mae_vit_small_patch16", img_size=64)
    ref = torch.from_numpy(sincos_2d_np(384, 4, True)).float()
    torch.testing.assert_close(m.pos_embed[0], ref)


def test_load_resamples_pos_embed(tmp_path):
    src = mae_fast.MaskedAutoencoderViT(**SMALL)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (64, 40)})
    mae_fast.load_pretrained(dst, path)
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert dst.pos_embed.shape == (1, 1 + 8 * 5, 64)
    # a learned (not sin-cos) table is resampled bicubically instead
    state = src.state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    mae_fast.load_pretrained(dst, state)
    assert dst.pos_embed.shape == (1, 41, 64) and torch.isfinite(dst.pos_embed).all()


def test_corrupt_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    m = mae_fast.MaskedAutoencoderViT(**SMALL)
    with pytest.raises(RuntimeError, match="could not read"):
        mae_fast.load_pretrained(m, bad)
    with pytest.raises(FileNotFoundError):
        mae_fast.load_pretrained(m, tmp_path / "missing.pth")


@pytest.mark.parametrize("timm_name,ours_name", [("vit_small_patch16_224", "mae_vit_small_patch16"),
                                                 ("vit_base_patch16_224", "mae_vit_base_patch16")])
def test_export_timm_matches_features(timm_name, ours_name):
    import timm

    torch.manual_seed(0)
    ours = mae_fast.create_model(ours_name, img_size=48, depth=2)
    for p in ours.parameters():  # non-trivial LayerNorm weights and biases too
        p.data.add_(0.05 * torch.randn_like(p))
    vit = timm.create_model(timm_name, pretrained=False, img_size=48, depth=2, num_classes=0)
    vit.load_state_dict(mae_fast.export_timm(ours), strict=True)
    imgs = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        a, b = ours.forward_features(imgs), vit.forward_features(imgs)
    assert (a - b).abs().max().item() < 1e-4
    twin = mae_fast.create_timm_encoder(ours)
    with torch.no_grad():
        torch.testing.assert_close(twin.forward_features(imgs), a, rtol=1e-4, atol=1e-4)


def test_registry_sizes():
    widths = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16),
              "giant": (1408, 40, 16)}
    for size, (w, d, h) in widths.items():
        for p in (14, 16):
            cfg = model_config(f"mae_vit_{size}_patch{p}")
            assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"]) == (w, d, h, p)
            assert (cfg["decoder_embed_dim"], cfg["decoder_depth"], cfg["decoder_num_heads"]) == (512, 8, 16)
    with torch.device("meta"):
        big = mae_fast.create_model("mae_vit_2b_patch14")
    enc = sum(p.numel() for n, p in big.named_parameters() if not n.startswith(("decoder", "mask_token")))
    assert 2.3e9 < enc < 2.5e9
    assert "mae_vit_huge_patch14" in mae_fast.list_models("*huge*")


def test_flops_count_against_profiler(monkeypatch):
    monkeypatch.setenv("MAE_FAST_BACKEND", "torch")  # plain matmuls, which the counter sees
    m = mae_fast.create_model("mae_vit_demo_patch8")
    from torch.utils.flop_counter import FlopCounterMode

    imgs = torch.randn(2, 3, 64, 64)
    with FlopCounterMode(display=False) as fc:
        m(imgs).loss.backward()
    counted = fc.get_total_flops() / 2
    assert abs(counted - mae_train_flops(m, 0.75)) / counted < 0.05


# An MAE whose every size is odd or unusual, so each term of the FLOP count shows: 2 input channels, 5-pixel patches on
# a 7 x 9 grid (63 patches; 25 visible at mask 0.6), mlp_ratio 2.5, encoder and decoder of other widths and depths.
ODD = dict(img_size=(35, 45), patch_size=5, in_chans=2, embed_dim=36, depth=3, num_heads=3, decoder_embed_dim=20,
           decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.5, decoder_mlp_ratio=3.5)


def _counted_step(m, imgs, mask_ratio):
    """(forward, backward) FLOPs per image that torch's FlopCounterMode counts in a real step (every matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        out = m(imgs, mask_ratio)
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    return fwd.get_total_flops() / len(imgs), bwd.get_total_flops() / len(imgs)


def test_flop_count_equals_the_matmuls_torch_counts_in_an_odd_sized_step(monkeypatch):
    """FLOPs per image, exactly, against FlopCounterMode on a real forward and backward (the 5% check above lets a
    whole term go missing: the patch embedding, decoder_embed or the prediction head is under 4% of the demo's).
    The forward counted alone is mae_forward_flops; forward + backward is mae_train_flops less one patch-embedding
    forward, which has no input gradient (images need none): 2 FLOPs per multiply-add of the 25 visible patches."""
    from mae_fast.models import mae_forward_flops

    monkeypatch.setenv("MAE_FAST_BACKEND", "torch")  # plain matmuls, which the counter sees
    torch.manual_seed(0)
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    assert (m.num_patches, m.num_visible(0.6)) == (63, 25)
    for mask_ratio, keep in ((0.6, 25), (0.75, 15)):
        forward, backward = _counted_step(m, torch.randn(3, 2, 35, 45), mask_ratio)
        embed = 2 * keep * (5 * 5 * 2) * 36
        assert mae_forward_flops(m, mask_ratio) == pytest.approx(forward, rel=1e-12)
        assert mae_train_flops(m, mask_ratio) == pytest.approx(forward + backward + embed, rel=1e-12)


@pytest.mark.parametrize("lean", [True, False])
def test_recompute_flops_are_what_checkpointing_adds_to_a_counted_step(monkeypatch, lean):
    """Gradient checkpointing's extra FLOPs (and their share of the step) against FlopCounterMode: a step with
    n blocks checkpointed (decoder first) counts exactly mae_recompute_flops more than one without, at mask 0.6.
    Lean blocks (every checkpointing plan of ``mae-fast memory``) rerun whole, their fused LayerNorm-MLP op
    included; plain blocks stop before fc2, as torch's checkpoint stops once backward's saved tensors are back."""
    from mae_fast.models import mae_recompute_flops, mae_recompute_pct

    monkeypatch.setenv("MAE_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    m.set_lean_activations(lean)
    imgs, r = torch.randn(2, 2, 35, 45), 0.6
    torch.manual_seed(1)
    forward, backward = _counted_step(m, imgs, r)
    for n in (1, 3, True):
        m.set_grad_checkpointing(n)
        torch.manual_seed(1)
        extra = sum(_counted_step(m, imgs, r)) - forward - backward
        assert extra > 0
        assert mae_recompute_flops(m, r) == pytest.approx(extra, rel=1e-12)
        assert mae_recompute_pct(m, r) == pytest.approx(100 * extra / (3 * forward), rel=1e-12)
    m.set_grad_checkpointing(False)
    assert mae_recompute_flops(m, r) == 0


def test_one_mlp_ratio_sizes_both_stacks_unless_the_decoder_has_its_own():
    """As the official constructor, mlp_ratio sizes the encoder's and the decoder's MLPs; decoder_mlp_ratio (ours)
    sizes the decoder's alone, and the registry's ViT-g/14 uses it to keep MAE's 2048-wide decoder MLP."""
    with torch.device("meta"):
        both = mae_fast.create_model("mae_vit_small_patch16", mlp_ratio=2.0)
        split = mae_fast.create_model("mae_vit_small_patch16", mlp_ratio=2.0, decoder_mlp_ratio=3.0)
        giant = mae_fast.create_model("mae_vit_giant_patch14")
    assert both.blocks[0].mlp.fc1.out_features == 768 and both.decoder_blocks[0].mlp.fc1.out_features == 1024
    assert split.blocks[0].mlp.fc1.out_features == 768 and split.decoder_blocks[0].mlp.fc1.out_features == 1536
    assert giant.blocks[0].mlp.fc1.out_features == 6144 and giant.decoder_blocks[0].mlp.fc1.out_features == 2048
    with pytest.raises(ValueError, match="decoder_mlp_ratio=0"):
        mae_fast.MaskedAutoencoderViT(**dict(ODD, decoder_mlp_ratio=0))


def test_non_square_and_forward_features():
    m = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (32, 56)})
    x = torch.randn(2, 3, 32, 56)
    out = m(x, mask_ratio=0.6)
    assert out.pred.shape == (2, 28, 192) and out.mask.shape == (2, 28)
    assert int(out.mask.sum(1)[0]) == 28 - int(28 * 0.4)
    assert m.forward_features(x).shape == (2, 29, 64)


def test_noise_drives_masking_and_default_uses_generator():
    m = mae_fast.MaskedAutoencoderViT(**SMALL)
    x = torch.randn(2, 3, 48, 48)
    torch.manual_seed(5)
    a = m(x).mask
    torch.manual_seed(5)
    b = m(x).mask
    assert torch.equal(a, b)
    noise = torch.rand(2, 36)
    expected = (torch.argsort(torch.argsort(noise, 1), 1) >= 9).float()
    assert torch.equal(m(x, 0.75, noise).mask, expected)


def test_bad_inputs_have_clear_errors():
    m = mae_fast.MaskedAutoencoderViT(**SMALL)
    x = torch.randn(2, 3, 48, 48)
    with pytest.raises(ValueError, match="divisible"):
        mae_fast.create_model("mae_vit_small_patch16", img_size=100)
    with pytest.raises(ValueError, match="img_size"):
        mae_fast.create_model("mae_vit_small_patch16", img_size="big")
    with pytest.raises(TypeError, match="unknown override"):
        mae_fast.create_model("mae_vit_small_patch16", width=3)
    with pytest.raises(ValueError, match="unknown model"):
        mae_fast.create_model("vit_nope")
    with pytest.raises(ValueError, match=r"imgs must be \(B, 3, 48, 48\)"):
        m(torch.randn(2, 3, 40, 48))
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


def test_training_forward_compiles_as_one_graph_in_a_fresh_process():
    """torch.compile(fullgraph=True) of the training path, plain and lean, before any eager call: backend
    registration must not happen inside the trace."""
    import subprocess
    import sys

    code = """
import torch, mae_fast
m = mae_fast.create_model('mae_vit_demo_patch8')
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
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "one graph" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("masked_only,lean", [(False, False), (True, False), (True, True)])
def test_residual_stream_dtype_under_autocast_is_the_officials(masked_only, lean, device):
    """Under bf16 autocast the official model's residual stream stays fp32 (bf16 patch embedding + fp32 pos
    embed); mae_fast must not run it in bf16, which would change the numbers of deep models."""
    ref, ours = _pair(True)
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


def _sincos_np(dim, h, w):
    """Official MAE 2-D sin-cos table (cls row first) for an h x w grid, in fp64 numpy."""
    import numpy as np

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    emb = np.concatenate([one(dim // 2, cols), one(dim // 2, rows)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), emb], axis=0)).float()


def _randomised(**kw):
    m = mae_fast.MaskedAutoencoderViT(**{**SMALL, **kw})
    for n, p in m.named_parameters():
        if "pos_embed" not in n:
            p.data.add_(0.05 * torch.randn_like(p))
    return m


def _assert_same_weights(dst, src, skip=("pos_embed", "decoder_pos_embed")):
    s = src.state_dict()
    for k, v in dst.state_dict().items():
        if k not in skip:
            torch.testing.assert_close(v, s[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_load_strips_ddp_and_compile_prefixes(tmp_path, prefix):
    src = _randomised(img_size=(40, 56), depth=1, decoder_depth=1)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {prefix + k: v for k, v in src.state_dict().items()}, "epoch": 1}, path)
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (40, 56), "depth": 1, "decoder_depth": 1})
    mae_fast.load_pretrained(dst, path)
    _assert_same_weights(dst, src, skip=())


@pytest.mark.parametrize("src_size,dst_size", [((40, 56), 48), ((40, 56), (56, 40)), ((24, 72), (72, 24)),
                                               (40, (24, 88))])
def test_load_non_square_sincos_checkpoint_into_another_grid(src_size, dst_size):
    """An official (sin-cos) table is regenerated for the model's grid, whatever the checkpoint's grid was,
    also when both grids have the same number of patches (a transposed image)."""
    src = _randomised(img_size=src_size)
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": dst_size})
    dst.pos_embed.data.zero_()
    dst.decoder_pos_embed.data.zero_()
    mae_fast.load_pretrained(dst, src.state_dict())
    h, w = dst.grid_size
    torch.testing.assert_close(dst.pos_embed[0], _sincos_np(64, h, w), rtol=0, atol=1e-6)
    torch.testing.assert_close(dst.decoder_pos_embed[0], _sincos_np(32, h, w), rtol=0, atol=1e-6)
    _assert_same_weights(dst, src)


def test_load_learned_non_square_table_into_another_grid_errors_clearly():
    state = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (40, 56)}).state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    dst = mae_fast.MaskedAutoencoderViT(**SMALL)
    with pytest.raises(ValueError, match=r"pos_embed: cannot map checkpoint shape \(1, 36, 64\)"):
        mae_fast.load_pretrained(dst, state)


def test_learned_square_table_resamples_as_timm():
    from timm.layers import resample_abs_pos_embed

    state = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": 56}).state_dict()  # 7 x 7
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (40, 72)})
    mae_fast.load_pretrained(dst, state)
    torch.testing.assert_close(dst.pos_embed, resample_abs_pos_embed(state["pos_embed"], [5, 9], [7, 7]))


def test_encoder_only_ignores_the_checkpoints_decoder():
    src = _randomised(img_size=(40, 56), decoder_embed_dim=48, decoder_depth=3)
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (56, 40)})
    mae_fast.load_pretrained(dst, {"model": src.state_dict()}, encoder_only=True)
    s = src.state_dict()
    for k, v in dst.state_dict().items():
        if k.startswith(("blocks.", "patch_embed.", "norm.", "cls_token")):
            torch.testing.assert_close(v, s[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(dst.pos_embed[0], _sincos_np(64, 7, 5), rtol=0, atol=1e-6)


def test_checkpoint_of_another_architecture_lists_the_mismatches():
    dst = mae_fast.MaskedAutoencoderViT(**SMALL)
    wide = mae_fast.MaskedAutoencoderViT(**{**SMALL, "embed_dim": 96, "num_heads": 4}).state_dict()
    with pytest.raises(mae_fast.models.CheckpointError,
                       match=r"another architecture.*blocks\.0\.attn\.qkv\.weight: checkpoint \(288, 96\), model \(192, 64\)"):
        mae_fast.load_pretrained(dst, wide)
    with pytest.raises(mae_fast.models.CheckpointError, match=r"pos_embed: checkpoint \(1, 37, 96\), model \(1, 37, 64\)"):
        mae_fast.load_pretrained(dst, wide, encoder_only=True)
    p16 = mae_fast.MaskedAutoencoderViT(**{**SMALL, "patch_size": 16}).state_dict()
    with pytest.raises(mae_fast.models.CheckpointError, match=r"patch_embed\.proj\.weight: checkpoint \(64, 3, 16, 16\)"):
        mae_fast.load_pretrained(dst, p16)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    src = _randomised()
    torch.save(src, tmp_path / "whole.pth")  # a pickled module
    dst = mae_fast.MaskedAutoencoderViT(**SMALL)
    mae_fast.load_pretrained(dst, tmp_path / "whole.pth")
    _assert_same_weights(dst, src, skip=())
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(mae_fast.models.CheckpointError, match="not a state dict"):
        mae_fast.load_pretrained(dst, tmp_path / "list.pth")


@pytest.mark.parametrize("img_size", [-16, 0, (48, -8), (0, 48)])
def test_non_positive_img_size_is_rejected(img_size):
    with pytest.raises(ValueError, match="must be positive"):
        mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": img_size})


@pytest.mark.parametrize("over", [dict(depth=-1), dict(depth=2.0), dict(decoder_depth=-2), dict(num_heads=0),
                                  dict(embed_dim=48.5), dict(decoder_embed_dim=True), dict(mlp_ratio=0.0),
                                  dict(in_chans=0)])
def test_non_positive_or_fractional_model_sizes_are_rejected(over):
    """A depth of -1 built a model without blocks, with no error."""
    key = next(iter(over))
    with pytest.raises(ValueError, match=rf"model sizes must be whole numbers >= 1 \(depths >= 0\) and mlp_ratio > 0, "
                                         rf"got .*{key}="):
        mae_fast.MaskedAutoencoderViT(**{**SMALL, **over})


@pytest.mark.parametrize("img_size", [(40, 56), 72, (24, 88)])
def test_export_timm_round_trip_at_odd_resolutions(img_size):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    ours = _randomised(img_size=img_size, embed_dim=48, num_heads=3, mlp_ratio=3.0)
    vit = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=3.0,
                            num_classes=0)
    vit.load_state_dict(mae_fast.export_timm(ours), strict=True)
    imgs = torch.randn(2, 3, *ours.img_size)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), ours.forward_features(imgs), rtol=1e-5, atol=1e-5)


# --- checkpoint loading, sin-cos tables, timm export and the registry, against independent expectations ---

def _sincos_official(embed_dim, grid_h, grid_w):
    """facebookresearch/mae util/pos_embed.py, written out: get_2d_sincos_pos_embed(cls_token=True) for an
    h x w grid (its grid = meshgrid(grid_w, grid_h); the first half of each row encodes grid[0], the column)."""
    import numpy as np

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)).float()


@pytest.mark.parametrize("dim,grid", [(64, (3, 7)), (32, (7, 3)), (48, (5, 1)), (16, (1, 1)), (128, (11, 6))])
def test_sincos_2d_is_the_official_table_on_odd_non_square_grids(dim, grid):
    torch.testing.assert_close(mae_fast.models.sincos_2d(dim, grid), _sincos_official(dim, *grid), rtol=0, atol=1e-6)
    torch.testing.assert_close(mae_fast.models.sincos_2d(dim, grid, cls_token=False), _sincos_official(dim, *grid)[1:],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("old,new,prefix", [((7, 7), (5, 9), 1), ((6, 6), (11, 3), 1), ((5, 5), (8, 8), 0),
                                            ((4, 6), (7, 5), 1)])
def test_resample_pos_embed_is_timms(old, new, prefix):
    from timm.layers import resample_abs_pos_embed

    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, prefix + old[0] * old[1], 24, generator=g)
    got = mae_fast.models.resample_pos_embed(table, new, old, num_prefix_tokens=prefix)
    torch.testing.assert_close(got, resample_abs_pos_embed(table, list(new), list(old), num_prefix_tokens=prefix),
                               rtol=0, atol=0)
    assert torch.equal(got[:, :prefix], table[:, :prefix])  # the cls row is carried, not interpolated


@pytest.mark.parametrize("prefix", ["_orig_mod.module.", "module.module."])
def test_load_strips_compiled_ddp_prefixes_in_either_order(prefix):
    """torch.compile(DDP(model)) saves "_orig_mod.module." keys (DDP(torch.compile(model)): "module._orig_mod.")."""
    src = _randomised(img_size=(40, 56), depth=1, decoder_depth=1)
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (40, 56), "depth": 1, "decoder_depth": 1})
    mae_fast.load_pretrained(dst, {"model": {prefix + k: v for k, v in src.state_dict().items()}})
    _assert_same_weights(dst, src, skip=())


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_state", None])
def test_load_unwraps_the_usual_checkpoint_entries(tmp_path, wrapper):
    src = _randomised(depth=1, decoder_depth=1)
    state = src.state_dict()
    torch.save({wrapper: state, "epoch": 7, "args": {}} if wrapper else state, tmp_path / "c.pth")
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "depth": 1, "decoder_depth": 1})
    mae_fast.load_pretrained(dst, tmp_path / "c.pth")
    _assert_same_weights(dst, src, skip=())


def test_load_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    src = _randomised(img_size=(40, 56), depth=1, decoder_depth=1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "m.safetensors")
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (56, 40), "depth": 1, "decoder_depth": 1})
    mae_fast.load_pretrained(dst, tmp_path / "m.safetensors")
    _assert_same_weights(dst, src)
    torch.testing.assert_close(dst.pos_embed[0], _sincos_official(64, 7, 5), rtol=0, atol=1e-6)


def test_load_is_strict_by_default_and_encoder_only_wants_every_encoder_key():
    src = _randomised(depth=1, decoder_depth=1)
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "depth": 1, "decoder_depth": 1})
    partial = {k: v for k, v in src.state_dict().items() if k != "decoder_norm.weight"}
    with pytest.raises(RuntimeError, match="Missing key.*decoder_norm.weight"):
        mae_fast.load_pretrained(dst, partial)
    extra = {**src.state_dict(), "head.weight": torch.randn(3, 64)}
    with pytest.raises(RuntimeError, match="Unexpected key.*head.weight"):
        mae_fast.load_pretrained(dst, extra)
    mae_fast.load_pretrained(dst, partial, strict=False)  # told so: the rest loads
    torch.testing.assert_close(dst.decoder_blocks[0].mlp.fc2.weight, src.decoder_blocks[0].mlp.fc2.weight)
    # encoder_only: the decoder may be absent, an encoder tensor may not (unless strict=False)
    enc = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    del enc["blocks.0.norm2.bias"]
    with pytest.raises(KeyError, match="blocks.0.norm2.bias"):
        mae_fast.load_pretrained(dst, enc, encoder_only=True)
    mae_fast.load_pretrained(dst, enc, encoder_only=True, strict=False)
    torch.testing.assert_close(dst.blocks[0].attn.proj.weight, src.blocks[0].attn.proj.weight)


def test_a_learned_table_of_the_models_grid_is_kept_as_it_is():
    src = _randomised(img_size=(40, 56))
    state = src.state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    state["decoder_pos_embed"] = torch.randn_like(state["decoder_pos_embed"])
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (40, 56)})
    mae_fast.load_pretrained(dst, state)
    assert torch.equal(dst.pos_embed, state["pos_embed"]) and torch.equal(dst.decoder_pos_embed,
                                                                          state["decoder_pos_embed"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sincos_checkpoint_is_regenerated_exactly_for_another_grid(dtype):
    """A half-precision official checkpoint's table is still recognised as sin-cos (its rounding is within the
    dtype's eps), and the table regenerated for the model's grid is the exact fp32 one, not one rounded to bf16."""
    src = _randomised(img_size=(40, 56))
    state = {k: v.to(dtype) for k, v in src.state_dict().items()}
    dst = mae_fast.MaskedAutoencoderViT(**{**SMALL, "img_size": (56, 40)})
    dst.pos_embed.data.zero_()
    mae_fast.load_pretrained(dst, state)
    torch.testing.assert_close(dst.pos_embed[0], _sincos_official(64, 7, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(dst.decoder_pos_embed[0], _sincos_official(32, 7, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"].float())


def test_mismatch_message_counts_what_it_leaves_out():
    dst = mae_fast.MaskedAutoencoderViT(**SMALL)
    wide = mae_fast.MaskedAutoencoderViT(**{**SMALL, "embed_dim": 96, "num_heads": 4}).state_dict()
    own = dst.state_dict()
    n_bad = sum(1 for k, v in wide.items() if v.shape != own[k].shape)  # pos tables differ in width: counted too
    assert n_bad > 12
    with pytest.raises(mae_fast.models.CheckpointError, match=rf"{n_bad} tensor\(s\) of another shape: .*; and "
                                                              rf"{n_bad - 12} more$"):
        mae_fast.load_pretrained(dst, wide)


def test_export_timm_is_a_copy():
    m = _randomised(depth=1, decoder_depth=1)
    before = m.blocks[0].attn.qkv.weight.detach().clone()
    exported = mae_fast.export_timm(m)
    assert not any(v.requires_grad for v in exported.values())
    exported["blocks.0.attn.qkv.weight"].add_(1.0)
    assert torch.equal(m.blocks[0].attn.qkv.weight, before)


def test_create_timm_encoder_of_an_odd_model_is_timms_vit_with_the_same_features():
    """in_chans 2, 5-pixel patches on a 7 x 9 grid, mlp_ratio 2.5: the timm twin is the VisionTransformer built
    with those arguments (strict load) and computes the same features."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    ours = mae_fast.MaskedAutoencoderViT(**ODD)
    for p in ours.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    twin = mae_fast.create_timm_encoder(ours)
    vit = VisionTransformer(img_size=(35, 45), patch_size=5, in_chans=2, embed_dim=36, depth=3, num_heads=3,
                            mlp_ratio=2.5, num_classes=0)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in vit.state_dict().items()}
    vit.load_state_dict(mae_fast.export_timm(ours), strict=True)
    imgs = torch.randn(2, 2, 35, 45)
    with torch.no_grad():
        want = ours.forward_features(imgs)
        torch.testing.assert_close(vit.forward_features(imgs), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(twin.forward_features(imgs), want, rtol=1e-5, atol=1e-5)
    assert not mae_fast.create_timm_encoder(ours, load=False).blocks[0].mlp.fc1.weight.equal(
        ours.blocks[0].mlp.fc1.weight)


# timm's own model of each registry size (built on the meta device: only its architecture is compared)
_TIMM_OF_SIZE = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224", "base": "vit_base_patch16_224",
                 "large": "vit_large_patch14_224", "huge": "vit_huge_patch14_224", "giant": "vit_giant_patch14_224"}


@pytest.mark.parametrize("size", list(_TIMM_OF_SIZE))
def test_registry_encoders_are_timms_vits_and_decoders_maes(size):
    """Each mae_vit_{size}_patch{14,16}'s encoder has exactly the tensors of timm's ViT of that size (width, depth,
    heads and MLP width, e.g. ViT-g/14's 6144), and its decoder is MAE's: 512 wide, 8 blocks of 16 heads."""
    import timm

    for p in (14, 16):
        with torch.device("meta"):
            ours = mae_fast.create_model(f"mae_vit_{size}_patch{p}", img_size=224 // p * p)
            vit = timm.create_model(_TIMM_OF_SIZE[size], pretrained=False, num_classes=0, patch_size=p,
                                    img_size=224 // p * p)
        want = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in mae_fast.export_timm(ours).items()} == want
        assert vit.blocks[0].attn.num_heads == ours.blocks[0].attn.num_heads
        with torch.device("meta"):
            twin = mae_fast.create_timm_encoder(ours, load=False)
        assert {k: tuple(v.shape) for k, v in twin.state_dict().items()} == want
        d = ours.decoder_embed.weight.shape[0]
        assert (d, len(ours.decoder_blocks), ours.decoder_blocks[0].attn.num_heads) == (512, 8, 16)
        # MAE's decoder MLP, 2048 wide (ratio 4), under every encoder, ViT-g/14's 48/11 included
        assert ours.decoder_blocks[0].mlp.fc1.weight.shape == (2048, 512)
        assert ours.decoder_pred.weight.shape == (p * p * 3, 512)
