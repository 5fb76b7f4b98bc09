"""Position tables: the 2-D sin-cos table against an fp64 transcription of the official formula (tests/models/
conftest.py) on odd, non-square grids, and the resampling of learned tables against timm's."""
import pytest
import torch

import mae_fast


@pytest.mark.parametrize("dim,grid", [(64, (3, 7)), (32, (7, 3)), (48, (5, 1)), (16, (1, 1)), (128, (11, 6))])
def test_sincos_2d_is_the_official_table_on_odd_non_square_grids(official_sincos, dim, grid):
    torch.testing.assert_close(mae_fast.models.sincos_2d(dim, grid), official_sincos(dim, *grid), rtol=0, atol=1e-6)
    torch.testing.assert_close(mae_fast.models.sincos_2d(dim, grid, cls_token=False), official_sincos(dim, *grid)[1:],
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


def test_fresh_position_tables_are_the_official_sincos_on_the_rows_by_cols_grid(official_sincos):
    """A fresh model's encoder and decoder tables are the official sin-cos of the (rows, cols) = (3, 5)
    grid with an all-zero cls row (not the (5, 3) grid, whose table differs)."""
    m = mae_fast.MaskedAutoencoderViT(img_size=(24, 40), patch_size=8, in_chans=2, embed_dim=32, depth=1, num_heads=4,
                                      decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=3)
    assert m.grid_size == (3, 5) and m.num_patches == 15
    torch.testing.assert_close(m.pos_embed[0], official_sincos(32, 3, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(m.decoder_pos_embed[0], official_sincos(24, 3, 5), rtol=0, atol=1e-6)
    assert not torch.allclose(official_sincos(32, 3, 5)[1:], official_sincos(32, 5, 3)[1:])
