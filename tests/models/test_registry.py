"""The model registry: every size's encoder has the tensors of timm's ViT of that size, its decoder is MAE's, and
the MLP ratios size the stacks as the official constructor does."""
import pytest
import torch

import mae_fast
from mae_fast.models import model_config


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
        mae_fast.create_model("mae_vit_demo_patch8", decoder_mlp_ratio=0)
