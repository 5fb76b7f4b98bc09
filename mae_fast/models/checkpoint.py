"""Loading official MAE checkpoints (with position-embedding resampling) and exporting to timm."""
from __future__ import annotations

import os

import torch

from .mae import MaskedAutoencoderViT
from .pos_embed import resample_pos_embed, sincos_2d

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, damaged (digest mismatch) or missing entries."""


def _read(path_or_state) -> dict:
    if isinstance(path_or_state, dict):
        state = path_or_state
    else:
        path = os.fspath(path_or_state)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # corrupt or truncated file
            raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    for key in ("model", "state_dict", "model_state"):
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def _fit_pos(state: dict, key: str, target: torch.Tensor, grid: tuple[int, int]) -> None:
    if key not in state or state[key].shape == target.shape:
        return
    old = state[key]
    n_old = old.shape[1] - 1
    side = int(round(n_old**0.5))
    if side * side == n_old and old.shape[-1] == target.shape[-1]:
        # MAE's tables are fixed sin-cos: regenerate exactly when the checkpoint's is one, else resample
        if torch.allclose(old[0].float(), sincos_2d(old.shape[-1], (side, side)), atol=1e-5):
            state[key] = sincos_2d(target.shape[-1], grid)[None].to(old.dtype)
        else:
            state[key] = resample_pos_embed(old, grid, (side, side))
    else:
        raise ValueError(f"{key}: cannot map checkpoint shape {tuple(old.shape)} to {tuple(target.shape)}")


def load_pretrained(model: MaskedAutoencoderViT, checkpoint, strict: bool = True, encoder_only: bool = False):
    """Load an official MAE (or mae_fast) checkpoint, resampling position embeddings to the model's grid.

    ``checkpoint`` is a path (``.pth`` with a ``"model"`` entry, or ``.safetensors``) or a state dict.
    With ``encoder_only`` the decoder keys are ignored (e.g. a timm export or a finetuned encoder).
    """
    state = dict(_read(checkpoint))
    own = model.state_dict()
    _fit_pos(state, "pos_embed", own["pos_embed"], model.grid_size)
    _fit_pos(state, "decoder_pos_embed", own["decoder_pos_embed"], model.grid_size)
    if encoder_only:
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
        missing = [k for k in own if k.startswith(ENCODER_PREFIXES) and k not in state]
        if strict and missing:
            raise KeyError(f"encoder keys missing from checkpoint: {missing[:8]}")
        return model.load_state_dict(state, strict=False)
    return model.load_state_dict(state, strict=strict)


def export_timm(model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """Encoder weights as a state dict for timm's ``VisionTransformer`` (``num_classes=0``)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def timm_model_kwargs(model: MaskedAutoencoderViT) -> dict:
    """Arguments that build the matching timm ``VisionTransformer`` for :func:`export_timm`'s weights."""
    return dict(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
                embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                mlp_ratio=model.mlp_ratio, qkv_bias=True, num_classes=0)


def create_timm_encoder(model: MaskedAutoencoderViT, load: bool = True):
    """A timm ``VisionTransformer`` with this MAE's encoder (weights copied when ``load``)."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**timm_model_kwargs(model))
    if load:
        vit.load_state_dict(export_timm(model), strict=True)
    return vit
