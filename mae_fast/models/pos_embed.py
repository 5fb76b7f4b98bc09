"""Fixed 2-D sin-cos position embeddings (the official MAE formulas) and resampling for checkpoints."""
from __future__ import annotations

import torch


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """(1 + h*w, dim) float32 table; as official MAE, the first half encodes the column index."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="xy")
    emb = torch.cat([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resample a (1, prefix + h*w, D) table to a new grid (prefix rows kept)."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid) if old_grid else None,
                                  num_prefix_tokens=num_prefix_tokens)
