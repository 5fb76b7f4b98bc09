"""Checkpoint loading and export (mae_fast/models/checkpoint.py): official and wrapped checkpoints, strictness,
position tables regenerated (sin-cos) or resampled as timm does (learned) for another grid, clear errors for
another architecture, and ``export_timm`` / ``create_timm_encoder`` against timm's VisionTransformer."""
import pytest
import torch

import mae_fast


def _assert_same_weights(dst, src, skip=("pos_embed", "decoder_pos_embed")):
    s = src.state_dict()
    for k, v in dst.state_dict().items():
        if k not in skip:
            torch.testing.assert_close(v, s[k], rtol=0, atol=0, msg=k)


def test_official_checkpoint_keys_load_strictly(small_mae):
    from reference_mae import ReferenceMAE

    ref = ReferenceMAE(**{**small_mae.cfg, "depth": 1, "decoder_depth": 1})
    ours = small_mae(depth=1, decoder_depth=1)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    mae_fast.load_pretrained(ours, {"model": ref.state_dict()})
    assert not ours.pos_embed.requires_grad and not ours.decoder_pos_embed.requires_grad


# DDP, torch.compile, and both in either order (torch.compile(DDP(model)) saves "_orig_mod.module.")
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module."])
def test_load_strips_ddp_and_compile_prefixes(small_mae, tmp_path, prefix):
    src = small_mae(randomise=True, img_size=(40, 56), depth=1, decoder_depth=1)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {prefix + k: v for k, v in src.state_dict().items()}, "epoch": 1}, path)
    dst = small_mae(img_size=(40, 56), depth=1, decoder_depth=1)
    mae_fast.load_pretrained(dst, path)
    _assert_same_weights(dst, src, skip=())


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_state", None])
def test_load_unwraps_the_usual_checkpoint_entries(small_mae, tmp_path, wrapper):
    src = small_mae(randomise=True, depth=1, decoder_depth=1)
    state = src.state_dict()
    torch.save({wrapper: state, "epoch": 7, "args": {}} if wrapper else state, tmp_path / "c.pth")
    dst = small_mae(depth=1, decoder_depth=1)
    mae_fast.load_pretrained(dst, tmp_path / "c.pth")
    _assert_same_weights(dst, src, skip=())


def test_load_safetensors_file(small_mae, official_sincos, tmp_path):
    from safetensors.torch import save_file

    src = small_mae(randomise=True, img_size=(40, 56), depth=1, decoder_depth=1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "m.safetensors")
    dst = small_mae(img_size=(56, 40), depth=1, decoder_depth=1)
    mae_fast.load_pretrained(dst, tmp_path / "m.safetensors")
    _assert_same_weights(dst, src)
    torch.testing.assert_close(dst.pos_embed[0], official_sincos(64, 7, 5), rtol=0, atol=1e-6)


def test_load_is_strict_by_default_and_encoder_only_wants_every_encoder_key(small_mae):
    src = small_mae(randomise=True, depth=1, decoder_depth=1)
    dst = small_mae(depth=1, decoder_depth=1)
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


def test_corrupt_checkpoint_errors(small_mae, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    m = small_mae()
    with pytest.raises(RuntimeError, match="could not read"):
        mae_fast.load_pretrained(m, bad)
    with pytest.raises(FileNotFoundError):
        mae_fast.load_pretrained(m, tmp_path / "missing.pth")


def test_checkpoint_that_is_not_a_state_dict(small_mae, tmp_path):
    src = small_mae(randomise=True)
    torch.save(src, tmp_path / "whole.pth")  # a pickled module
    dst = small_mae()
    mae_fast.load_pretrained(dst, tmp_path / "whole.pth")
    _assert_same_weights(dst, src, skip=())
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(mae_fast.models.CheckpointError, match="not a state dict"):
        mae_fast.load_pretrained(dst, tmp_path / "list.pth")


def test_checkpoint_of_another_architecture_lists_the_mismatches(small_mae):
    dst = small_mae()
    wide = small_mae(embed_dim=96, num_heads=4).state_dict()
    with pytest.raises(mae_fast.models.CheckpointError,
                       match=r"another architecture.*blocks\.0\.attn\.qkv\.weight: checkpoint \(288, 96\), model \(192, 64\)"):
        mae_fast.load_pretrained(dst, wide)
    with pytest.raises(mae_fast.models.CheckpointError, match=r"pos_embed: checkpoint \(1, 37, 96\), model \(1, 37, 64\)"):
        mae_fast.load_pretrained(dst, wide, encoder_only=True)
    p16 = small_mae(patch_size=16).state_dict()
    with pytest.raises(mae_fast.models.CheckpointError, match=r"patch_embed\.proj\.weight: checkpoint \(64, 3, 16, 16\)"):
        mae_fast.load_pretrained(dst, p16)


def test_mismatch_message_counts_what_it_leaves_out(small_mae):
    dst = small_mae()
    wide = small_mae(embed_dim=96, num_heads=4).state_dict()
    own = dst.state_dict()
    n_bad = sum(1 for k, v in wide.items() if v.shape != own[k].shape)  # pos tables differ in width: counted too
    assert n_bad > 12
    with pytest.raises(mae_fast.models.CheckpointError, match=rf"{n_bad} tensor\(s\) of another shape: .*; and "
                                                              rf"{n_bad - 12} more$"):
        mae_fast.load_pretrained(dst, wide)


@pytest.mark.parametrize("src_size,dst_size", [((40, 56), 48), ((40, 56), (56, 40)), ((24, 72), (72, 24)),
                                               (40, (24, 88))])
def test_load_non_square_sincos_checkpoint_into_another_grid(small_mae, official_sincos, src_size, dst_size):
    """An official (sin-cos) table is regenerated for the model's grid, whatever the checkpoint's grid was,
    also when both grids have the same number of patches (a transposed image)."""
    src = small_mae(randomise=True, img_size=src_size)
    dst = small_mae(img_size=dst_size)
    dst.pos_embed.data.zero_()
    dst.decoder_pos_embed.data.zero_()
    mae_fast.load_pretrained(dst, src.state_dict())
    h, w = dst.grid_size
    torch.testing.assert_close(dst.pos_embed[0], official_sincos(64, h, w), rtol=0, atol=1e-6)
    torch.testing.assert_close(dst.decoder_pos_embed[0], official_sincos(32, h, w), rtol=0, atol=1e-6)
    _assert_same_weights(dst, src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sincos_checkpoint_is_regenerated_exactly_for_another_grid(small_mae, official_sincos, dtype):
    """A half-precision official checkpoint's table is still recognised as sin-cos (its rounding is within the
    dtype's eps), and the table regenerated for the model's grid is the exact fp32 one, not one rounded to bf16."""
    src = small_mae(randomise=True, img_size=(40, 56))
    state = {k: v.to(dtype) for k, v in src.state_dict().items()}
    dst = small_mae(img_size=(56, 40))
    dst.pos_embed.data.zero_()
    mae_fast.load_pretrained(dst, state)
    torch.testing.assert_close(dst.pos_embed[0], official_sincos(64, 7, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(dst.decoder_pos_embed[0], official_sincos(32, 7, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"].float())


def test_a_learned_table_of_the_models_grid_is_kept_as_it_is(small_mae):
    src = small_mae(randomise=True, img_size=(40, 56))
    state = src.state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    state["decoder_pos_embed"] = torch.randn_like(state["decoder_pos_embed"])
    dst = small_mae(img_size=(40, 56))
    mae_fast.load_pretrained(dst, state)
    assert torch.equal(dst.pos_embed, state["pos_embed"]) and torch.equal(dst.decoder_pos_embed,
                                                                          state["decoder_pos_embed"])


def test_learned_square_table_resamples_as_timm(small_mae):
    from timm.layers import resample_abs_pos_embed

    state = small_mae(img_size=56).state_dict()  # 7 x 7
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    dst = small_mae(img_size=(40, 72))
    mae_fast.load_pretrained(dst, state)
    torch.testing.assert_close(dst.pos_embed, resample_abs_pos_embed(state["pos_embed"], [5, 9], [7, 7]))


def test_load_learned_non_square_table_into_another_grid_errors_clearly(small_mae):
    state = small_mae(img_size=(40, 56)).state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    dst = small_mae()
    with pytest.raises(ValueError, match=r"pos_embed: cannot map checkpoint shape \(1, 36, 64\)"):
        mae_fast.load_pretrained(dst, state)


def test_encoder_only_ignores_the_checkpoints_decoder(small_mae, official_sincos):
    src = small_mae(randomise=True, img_size=(40, 56), decoder_embed_dim=48, decoder_depth=3)
    dst = small_mae(img_size=(56, 40))
    mae_fast.load_pretrained(dst, {"model": src.state_dict()}, encoder_only=True)
    s = src.state_dict()
    for k, v in dst.state_dict().items():
        if k.startswith(("blocks.", "patch_embed.", "norm.", "cls_token")):
            torch.testing.assert_close(v, s[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(dst.pos_embed[0], official_sincos(64, 7, 5), rtol=0, atol=1e-6)


def test_export_timm_matches_features():
    """A registry model's export loads strictly into timm's own model of that name, with the same features (the
    other sizes' tensor shapes are compared with timm's in test_registry.py)."""
    import timm

    timm_name, ours_name = "vit_small_patch16_224", "mae_vit_small_patch16"
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


@pytest.mark.parametrize("img_size", [(40, 56), 72, (24, 88)])
def test_export_timm_round_trip_at_odd_resolutions(small_mae, img_size):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    ours = small_mae(randomise=True, img_size=img_size, embed_dim=48, num_heads=3, mlp_ratio=3.0)
    vit = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=3.0,
                            num_classes=0)
    vit.load_state_dict(mae_fast.export_timm(ours), strict=True)
    imgs = torch.randn(2, 3, *ours.img_size)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), ours.forward_features(imgs), rtol=1e-5, atol=1e-5)


def test_export_timm_is_a_copy(small_mae):
    m = small_mae(randomise=True, depth=1, decoder_depth=1)
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
    ours = mae_fast.MaskedAutoencoderViT(img_size=(35, 45), patch_size=5, in_chans=2, embed_dim=36, depth=3, num_heads=3,
                                         decoder_embed_dim=20, decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.5)
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
