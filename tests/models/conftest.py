import pytest
import torch


def sincos_official(embed_dim, grid_h, grid_w):
    """facebookresearch/mae util/pos_embed.py, written out in fp64: get_2d_sincos_pos_embed(cls_token=True) for an
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


@pytest.fixture
def official_sincos():
    """The official 2-D sin-cos table (cls row first) of an h x w grid: ``official_sincos(dim, h, w)``."""
    return sincos_official
