"""Named MAE models (timm-style registry) built from the official constructor arguments."""
from __future__ import annotations

import inspect

from .mae import MaskedAutoencoderViT

# width, depth, heads of the encoder (and its MLP ratio where not 4, as timm's vit_* of that size)
_ENCODERS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant": (1408, 40, 16, 48 / 11),  # ViT-g/14 (Zhai et al., "Scaling Vision Transformers"): MLP 6144 wide
}
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

_MODELS: dict[str, dict] = {}
for _size, (_w, _d, _h, *_ratio) in _ENCODERS.items():
    for _p in (14, 16):
        _MODELS[f"mae_vit_{_size}_patch{_p}"] = dict(patch_size=_p, embed_dim=_w, depth=_d, num_heads=_h, **_DECODER,
                                                     **({"mlp_ratio": _ratio[0], "decoder_mlp_ratio": 4.0} if _ratio
                                                        else {}))  # MAE's 4x decoder MLP (2048 wide) all the same
# about 2.4B encoder parameters: the size a human-level projection calls for
_MODELS["mae_vit_2b_patch14"] = dict(patch_size=14, embed_dim=2048, depth=48, num_heads=16, **_DECODER)
# a model small enough to pretrain on a 2-core CPU in minutes (the built-in demo)
_MODELS["mae_vit_demo_patch8"] = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)

OVERRIDES = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads", "mlp_ratio", "decoder_mlp_ratio", "norm_pix_loss", "target_dim")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a shell-style pattern."""
    import fnmatch

    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_config(name: str, **overrides) -> dict:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    bad = sorted(set(overrides) - set(OVERRIDES))
    if bad:
        raise TypeError(f"unknown override(s) {bad} for {name}; allowed: {', '.join(OVERRIDES)}")
    return {**_MODELS[name], **overrides}


def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """Build a registered MAE, e.g. ``create_model("mae_vit_huge_patch14", img_size=476, norm_pix_loss=True)``."""
    return MaskedAutoencoderViT(**model_config(name, **overrides))


assert set(OVERRIDES) <= set(inspect.signature(MaskedAutoencoderViT).parameters)
