"""Analytic FLOP counts for MFU: matmuls and attention only (2 FLOPs per multiply-add)."""
from __future__ import annotations


def _block_flops(tokens: int, width: int, mlp_ratio: float, layers: int) -> float:
    linear = 2 * tokens * width * width * (4 + 2 * mlp_ratio)  # qkv (3), proj (1), mlp (2 * ratio)
    attn = 2 * 2 * tokens * tokens * width                     # q k^T and p v
    return layers * (linear + attn)


def mae_forward_flops(model, mask_ratio: float = 0.75, num_patches: int | None = None) -> float:
    """FLOPs of one image's MAE forward pass: the encoder on the visible patches, the decoder and its prediction
    head on every token. Training's masked-only path skips the last decoder block's and the head's visible rows
    (a few % of the decoder); MFU counts the full work, so that implementations compare at equal work.
    ``num_patches``: an image of another grid than the model's own (a packed image counts its own tokens)."""
    L = model.num_patches if num_patches is None else num_patches
    keep = int(L * (1 - mask_ratio))
    p2c = model.patch_size**2 * model.in_chans
    D, Dd = model.embed_dim, model.decoder_embed_dim
    f = 2 * keep * p2c * D                                          # patch embedding
    f += _block_flops(keep + 1, D, model.mlp_ratio, model.depth)    # encoder
    f += 2 * (keep + 1) * D * Dd                                    # decoder_embed
    f += _block_flops(L + 1, Dd, model.decoder_mlp_ratio, model.decoder_depth)
    f += 2 * (L + 1) * Dd * p2c                                     # decoder_pred
    return float(f)


def mae_train_flops(model, mask_ratio: float = 0.75, num_patches: int | None = None) -> float:
    """Forward + backward (backward = 2x forward)."""
    return 3.0 * mae_forward_flops(model, mask_ratio, num_patches)


def _recomputed_flops(blocks, checkpointed: int, tokens: int, width: int, mlp_ratio: float) -> float:
    # torch's checkpoint (non-reentrant, stopping early) reruns a block only until backward has every tensor the
    # block saved: a plain block's fc2 does not run again (only its input is saved), while a lean block's fused
    # LayerNorm-MLP op reruns whole inside its own backward
    fc2 = 2 * tokens * width * width * mlp_ratio
    return sum(_block_flops(tokens, width, mlp_ratio, 1) - (0 if getattr(blk, "lean", False) else fc2)
               for blk in list(blocks)[:checkpointed])


def mae_recompute_flops(model, mask_ratio: float = 0.75) -> float:
    """Extra forward FLOPs per image that gradient checkpointing adds: the checkpointed (leading) blocks run
    again in backward, a plain block up to its fc2, a lean one whole."""
    L = model.num_patches
    keep = model.num_visible(mask_ratio)
    return float(_recomputed_flops(model.blocks, model._checkpointed_encoder, keep + 1, model.embed_dim,
                                   model.mlp_ratio)
                 + _recomputed_flops(model.decoder_blocks, model._checkpointed_decoder, L + 1,
                                     model.decoder_embed_dim, model.decoder_mlp_ratio))


def mae_recompute_pct(model, mask_ratio: float = 0.75) -> float:
    """Gradient checkpointing's extra FLOPs as a percentage of the training step's."""
    return 100 * mae_recompute_flops(model, mask_ratio) / mae_train_flops(model, mask_ratio)
