"""Loading official MAE checkpoints (with position-embedding resampling) and exporting to timm."""
from __future__ import annotations

import math
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
    if isinstance(state, torch.nn.Module):  # torch.save(model) rather than its state dict
        state = state.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    for key in ("model", "state_dict", "model_state"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    # saved from a DDP-wrapped ("module.") or torch.compile'd ("_orig_mod.") model
    for prefix in ("module.", "_orig_mod.", "module."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _sincos_grid(table: torch.Tensor, first: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) grid whose official sin-cos table (cls row first) ``table`` is, else None (a learned one)."""
    n, dim = table.shape[1] - 1, table.shape[-1]
    if table.dim() != 3 or n < 1 or dim % 4 or not table.is_floating_point():
        return None
    atol = max(1e-5, 2 * torch.finfo(table.dtype).eps)
    side = math.isqrt(n)
    grids = [g for g in (first, (side, side)) if g[0] * g[1] == n] + [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    for g in dict.fromkeys(grids):
        if torch.allclose(table[0].float(), sincos_2d(dim, g), atol=atol):
            return g
    return None


def _fit_pos(state: dict, key: str, target: torch.Tensor, grid: tuple[int, int]) -> None:
    if key not in state:
        return
    old = state[key]
    if old.dim() == 3 and old.shape[-1] == target.shape[-1]:
        # MAE's tables are fixed sin-cos: regenerate exactly when the checkpoint's is one (of any grid, also one
        # with the model's number of patches but another shape), else resample a square learned one
        old_grid = _sincos_grid(old, grid)
        if old_grid is not None:
            if old_grid != tuple(grid):
                state[key] = sincos_2d(target.shape[-1], grid)[None].to(target.dtype)  # exact, in the model's dtype
            return
        if old.shape == target.shape:
            return
        n_old = old.shape[1] - 1
        side = math.isqrt(n_old)
        if side * side == n_old:
            state[key] = resample_pos_embed(old, grid, (side, side))
            return
    raise ValueError(f"{key}: cannot map checkpoint shape {tuple(old.shape)} to {tuple(target.shape)}"
                     + (" (a learned table of a non-square grid)" if old.shape[-1] == target.shape[-1] else ""))


def _shape_mismatches(state: dict, own: dict) -> list[str]:
    """Tensors whose shapes differ from the model's (position tables: in width only, grids are resampled)."""
    bad = []
    for k, v in state.items():
        if k in own and isinstance(v, torch.Tensor):
            pos = k in ("pos_embed", "decoder_pos_embed")
            if (v.dim() != 3 or v.shape[-1] != own[k].shape[-1]) if pos else v.shape != own[k].shape:
                bad.append(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    return bad


def load_pretrained(model: MaskedAutoencoderViT, checkpoint, strict: bool = True, encoder_only: bool = False):
    """Load an official MAE (or mae_fast) checkpoint, resampling position embeddings to the model's grid.

    ``checkpoint`` is a path (``.pth`` with a ``"model"`` entry, or ``.safetensors``) or a state dict.
    With ``encoder_only`` the decoder keys are ignored (e.g. a timm export or a finetuned encoder).
    """
    state = dict(_read(checkpoint))
    own = model.state_dict()
    if encoder_only:  # before anything looks at the decoder's tensors
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    bad = _shape_mismatches(state, own)
    if bad:
        raise CheckpointError(f"checkpoint made for another architecture: {len(bad)} tensor(s) of another shape: "
                              + "; ".join(bad[:12]) + (f"; and {len(bad) - 12} more" if len(bad) > 12 else ""))
    _fit_pos(state, "pos_embed", own["pos_embed"], model.grid_size)
    _fit_pos(state, "decoder_pos_embed", own["decoder_pos_embed"], model.grid_size)
    if encoder_only:
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
