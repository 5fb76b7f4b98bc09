"""ViT-MAE with the official parameter names (facebookresearch/mae ``models_mae.py``), on the op layer.

Same numbers as the official model, less work: only the visible patches are embedded
(``patchify_gather`` then a matmul with the conv weight), the decoder input is built in one
``unshuffle_with_mask_token`` pass, and the loss is taken over removed patches only.
"""
from __future__ import annotations

import numbers
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch.utils.checkpoint import checkpoint

from .. import ops
from .pos_embed import sincos_2d


class MAEOutput(NamedTuple):
    loss: torch.Tensor      # scalar, mean per-patch MSE over removed patches
    pred: torch.Tensor      # (B, L, p*p*C), official patchify order; (B, L-K, p*p*C) with masked_only=True
    mask: torch.Tensor      # (B, L), 1 = removed
    ids_restore: torch.Tensor  # (B, L)
    latent: torch.Tensor    # (B, 1+K, D) encoder output, cls first
    ids_masked: torch.Tensor | None = None  # (B, L-K) patch index of each ``pred`` row, with masked_only=True


class PackedOutput(NamedTuple):
    loss: torch.Tensor          # scalar, mean per-patch MSE over the removed patches of all images
    losses: torch.Tensor        # (n_images,), each image's own loss
    pred: torch.Tensor          # (sum_i removed_i, p*p*C), the removed patches of image 0, then 1, ...
    ids_masked: list            # per image (1, removed_i): the patch index of each of its ``pred`` rows
    grids: list                 # per image its (h, w) patch grid
    cu_seqlens_encoder: torch.Tensor  # (n_images + 1,) offsets of the packed encoder sequence
    cu_seqlens_decoder: torch.Tensor  # ... and of the decoder's


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, first_query: int = 0, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output for rows ``first_query:`` of ``x``; keys and values come from every row.
        With ``cu_seqlens``, ``x`` is (1, total, D) packed sequences that attend only within themselves."""
        B, N, D = x.shape
        H = self.num_heads
        if first_query == 0:
            return self.from_qkv(self.qkv(x), cu_seqlens)
        # project queries for the tail rows only: the q block of the fused weight, then k and v
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, first_query:], w[:D], None if b is None else b[:D])
        q = q.reshape(B, N - first_query, H, D // H)
        k, v = F.linear(x, w[D:], None if b is None else b[D:]).reshape(B, N, 2, H, D // H).unbind(2)
        return self.proj(ops.attention(q, k, v).reshape(B, q.shape[1], D))

    def from_qkv(self, qkv: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention and output projection from the fused (B, N, 3*D) qkv projection (B = 1 when packed)."""
        B, N, D3 = qkv.shape
        D, H = D3 // 3, self.num_heads
        if cu_seqlens is not None:
            q, k, v = qkv.reshape(B * N, 3, H, D // H).unbind(1)
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            return self.proj(ops.attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).reshape(B, N, D))
        q, k, v = qkv.reshape(B, N, 3, H, D // H).unbind(2)
        return self.proj(ops.attention(q, k, v).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm transformer block; submodule names match timm's ``Block`` (and so the checkpoints)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.lean = False  # see set_lean_activations

    def forward(self, x: torch.Tensor, first_query: int = 0, pending: torch.Tensor | None = None,
                defer: bool = False, cu_seqlens: torch.Tensor | None = None):
        """Block output; with ``first_query`` > 0 only rows ``first_query:`` (which still attend to all rows).

        ``pending``: the previous block's MLP branch, not yet added to ``x`` (the input is ``x + pending``).
        ``defer=True`` returns ``(stream, MLP branch)`` without this block's last add, so the next LayerNorm
        can fuse it (``ops.add_layer_norm``): one pass over the stream fewer per block each way.
        ``cu_seqlens``: ``x`` is (1, total, D) packed sequences (see :meth:`MaskedAutoencoderViT.forward_packed`).
        """
        if self.lean and first_query == 0:
            if pending is not None:
                x = x + pending
            a = self.attn.from_qkv(ops.layer_norm_linear(x, self.norm1, self.attn.qkv), cu_seqlens)
            out = ops.residual_layer_norm_mlp(x, a, self.norm2, self.mlp.fc1, self.mlp.fc2)
            return (out, None) if defer else out
        # norm outputs come in the next matmul's dtype (fused with the residual add where a backend can)
        if pending is None:
            h = ops.layer_norm(x, self.norm1)
        else:
            x, h = ops.add_layer_norm(x, pending, self.norm1)
        h = self.attn(h, first_query, cu_seqlens)
        x, y = ops.add_layer_norm(x[:, first_query:] if first_query else x, h, self.norm2)
        m = self.mlp(y)
        return (x, m) if defer else x + m


class PatchEmbed(nn.Module):
    def __init__(self, grid: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.grid_size = grid
        self.num_patches = grid[0] * grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)


def _pair(img_size) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be an int or an (H, W) pair of ints, got {img_size!r}")


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False, decoder_mlp_ratio=None,
                 target_dim=None):
        # decoder_mlp_ratio (not in the official constructor; None: mlp_ratio) keeps MAE's 4x decoder under an
        # encoder of another ratio, e.g. ViT-g/14's 48/11. target_dim (ours too; None: p*p*C pixels) is the width of
        # the prediction head for another reconstruction target (mae_fast.targets), passed to forward as ``target``
        super().__init__()
        H, W = _pair(img_size)
        if H <= 0 or W <= 0:
            raise ValueError(f"img_size must be positive, got {img_size!r}")
        if patch_size <= 0 or H % patch_size or W % patch_size:
            raise ValueError(f"img_size {H}x{W} must be divisible by patch_size {patch_size}")
        sizes = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                     decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, in_chans=in_chans)
        bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, numbers.Integral)
               or v < (0 if k.endswith("depth") else 1)}  # a decoder of no blocks is a tested variant
        decoder_mlp_ratio = mlp_ratio if decoder_mlp_ratio is None else decoder_mlp_ratio
        for name, ratio in (("mlp_ratio", mlp_ratio), ("decoder_mlp_ratio", decoder_mlp_ratio)):
            if not ratio > 0:
                bad[name] = ratio
        if bad:  # a depth of -1 built a model without blocks, and no error
            raise ValueError("model sizes must be whole numbers >= 1 (depths >= 0) and mlp_ratio > 0, got "
                             + ", ".join(f"{k}={v!r}" for k, v in bad.items()))
        self.img_size, self.patch_size, self.in_chans = (H, W), patch_size, in_chans
        self.grid_size = (H // patch_size, W // patch_size)
        self.norm_pix_loss = norm_pix_loss
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.mlp_ratio, self.decoder_mlp_ratio = mlp_ratio, decoder_mlp_ratio
        self.decoder_embed_dim, self.decoder_depth = decoder_embed_dim, decoder_depth
        self.grad_checkpointing: bool | int = False
        self._checkpointed_encoder = self._checkpointed_decoder = 0  # leading blocks run under checkpoint

        self.patch_embed = PatchEmbed(self.grid_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        if target_dim is not None and (isinstance(target_dim, bool) or not isinstance(target_dim, numbers.Integral)
                                       or target_dim < 1):
            raise ValueError(f"target_dim must be a whole number >= 1 (null: pixels), got {target_dim!r}")
        self.target_dim = int(target_dim) if target_dim is not None else patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.target_dim, bias=True)
        self._pos_cache: dict = {}  # position tables of other grids (a plain dict: not in the state dict)
        self.initialize_weights()

    # -- initialisation, as official ------------------------------------------------------------
    def initialize_weights(self):
        self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid_size)[None])
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_embed_dim, self.grid_size)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def set_grad_checkpointing(self, enable: bool | int = True):
        """Recompute block activations in backward instead of keeping them: ``True`` for every block, or a
        number of blocks, decoder blocks first. A block keeps about tokens x width bytes and recomputes about
        tokens x width x (24 width + 4 tokens) FLOPs, so the narrow decoder, which sees every token, frees the
        most memory per recomputed FLOP (``mae-fast memory`` finds the fewest blocks that fit a budget)."""
        total = len(self.blocks) + len(self.decoder_blocks)
        if isinstance(enable, bool):
            n = total if enable else 0
        elif isinstance(enable, int) and enable >= 0:
            n = min(enable, total)
        else:
            raise ValueError(f"grad checkpointing takes true/false or a number of blocks >= 0, got {enable!r}")
        self.grad_checkpointing = enable
        self._checkpointed_decoder = min(n, len(self.decoder_blocks))
        self._checkpointed_encoder = n - self._checkpointed_decoder

    def set_lean_activations(self, enable: bool = True):
        """Keep about a third less for backward: each block saves its LayerNorm inputs and fc1 outputs only,
        recomputing the normalised inputs and the GELU in backward (:mod:`mae_fast.ops.lean`). Same loss."""
        for blk in [*self.blocks, *self.decoder_blocks]:
            mlp = blk.mlp
            plain = isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none" and \
                isinstance(mlp.norm, nn.Identity) and mlp.drop1.p == 0 and mlp.drop2.p == 0
            if enable and not plain:
                raise ValueError("lean activations need the plain Linear-GELU-Linear MLP")
            blk.lean = enable

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    # -- helpers --------------------------------------------------------------------------------
    def patchify(self, imgs):
        return ops.patchify(imgs, self.patch_size)

    def unpatchify(self, x, grid: tuple[int, int] | None = None):
        return ops.unpatchify(x, self.patch_size, grid or self.grid_size, self.in_chans)

    def grid_of(self, imgs) -> tuple[int, int]:
        """The (h, w) patch grid of an image batch (B, C, H, W) or one image (C, H, W)."""
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def pos_tables(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos_embed, decoder_pos_embed) for a patch grid: the parameters at the model's own grid; elsewhere the
        sin-cos tables of that grid (built once per grid, device and dtype) or, for a table that is not the
        sin-cos one (learned or loaded), its bicubic resampling as ``load_pretrained`` does."""
        grid = (int(grid[0]), int(grid[1]))
        if grid == tuple(self.grid_size):
            return self.pos_embed, self.decoder_pos_embed
        return self._pos_at("pos_embed", grid), self._pos_at("decoder_pos_embed", grid)

    def _pos_at(self, name: str, grid: tuple[int, int]) -> torch.Tensor:
        from .pos_embed import resample_pos_embed

        table = getattr(self, name)
        if table.requires_grad:  # trained: resample on every call, so gradients reach the parameter
            return resample_pos_embed(table, grid, self.grid_size)
        key = (name, grid, table.device, table.dtype, table._version)  # _version: a load_state_dict copy_ bumps it
        out = self._pos_cache.get(key)
        if out is None:
            for k in [k for k in self._pos_cache if k[0] == name and k[4] != table._version]:
                del self._pos_cache[k]  # tables of weights since replaced
            own = sincos_2d(table.shape[-1], self.grid_size)
            atol = max(1e-5, 2 * torch.finfo(table.dtype).eps)
            if torch.allclose(table[0].detach().float().cpu(), own, atol=atol):
                out = sincos_2d(table.shape[-1], grid)[None].to(table.device, table.dtype)
            else:
                out = resample_pos_embed(table.detach(), grid, self.grid_size)
            self._pos_cache[key] = out
        return out

    def _check_imgs(self, imgs):
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            raise ValueError(f"imgs must be a (B, C, H, W) tensor, got {getattr(imgs, 'shape', type(imgs))}")
        H, W, p = imgs.shape[-2], imgs.shape[-1], self.patch_size
        if imgs.shape[1] != self.in_chans or H < p or W < p or H % p or W % p:
            raise ValueError(f"imgs must be (B, {self.in_chans}, H, W) with H and W multiples of the patch size {p} "
                             f"(the model's own size: {self.img_size[0]}x{self.img_size[1]}), got {tuple(imgs.shape)}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be floating point, got {imgs.dtype}")
        if imgs.device != self.cls_token.device:
            raise ValueError(f"imgs on {imgs.device} but the model on {self.cls_token.device}")

    def random_masking_ids(self, batch: int, mask_ratio: float, noise=None, device=None):
        """The official ``argsort(noise)`` masking: returns ids_keep (B, K), ids_restore (B, L), mask (B, L)."""
        if device is None and isinstance(noise, torch.Tensor):
            device = noise.device  # given noise and no device: the noise's (None failed the device check)
        return self._masking(batch, mask_ratio, noise, device)[1:]

    def num_visible(self, mask_ratio: float, num_patches: int | None = None) -> int:
        """Patches the encoder sees at ``mask_ratio``: ``int(L * (1 - mask_ratio))``, as the official code
        (``L``: ``num_patches``, default the model's own)."""
        return int((self.num_patches if num_patches is None else num_patches) * (1 - mask_ratio))

    def _masking(self, batch, mask_ratio, noise, device, num_patches: int | None = None):
        """(ids_shuffle, ids_keep, ids_restore, mask); ids_shuffle[:, K:] are the removed patches."""
        L = self.num_patches if num_patches is None else num_patches
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = self.num_visible(mask_ratio, L)
        if len_keep < 1:
            raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {L}")
        if noise is None:
            noise = torch.rand(batch, L, device=device)
        elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (batch, L):
            raise ValueError(f"noise must be ({batch}, {L}), got {tuple(getattr(noise, 'shape', ()))}")
        elif noise.device != device:
            raise ValueError(f"noise on {noise.device} but imgs on {device}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = (ids_restore >= len_keep).to(torch.float32)
        return ids_shuffle, ids_keep, ids_restore, mask

    def _run_blocks(self, blocks, x, norm, last_first_query: int = 0, cu_seqlens=None):
        """``norm`` of the output of ``blocks``; the last block returns only rows ``last_first_query:``.

        Each block hands its last residual add to the next LayerNorm (the next block's, or ``norm``), which
        fuses it where the ``add_layer_norm`` backend can. Blocks are called as modules, so hooks (FSDP2,
        regional compilation) still run."""
        checkpointed = self._checkpointed_decoder if blocks is self.decoder_blocks else self._checkpointed_encoder
        pending = None
        for i, blk in enumerate(blocks):
            fq = last_first_query if i == len(blocks) - 1 else 0
            if i < checkpointed and x.requires_grad:
                x, pending = checkpoint(blk, x, fq, pending, True, cu_seqlens, use_reentrant=False)
            else:
                x, pending = blk(x, fq, pending, True, cu_seqlens)
        if pending is None:
            return norm(x)
        # the dtype eager LayerNorm gives (fp32 under autocast): this is the model's output, not a matmul input
        out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        return ops.add_layer_norm(x, pending, norm, out_dtype=out_dtype)[1]

    def _with_cls(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    # -- forward paths ------------------------------------------------------------------------------
    def _embed_visible(self, imgs, ids_keep):
        """Patch embeddings of the visible patches plus their position rows, (B, K, D), at the images' grid."""
        pixels = ops.patchify_gather(imgs, ids_keep, self.patch_size, check_ids=False)
        w = self.patch_embed.proj.weight
        x = F.linear(pixels, w.reshape(w.shape[0], -1), self.patch_embed.proj.bias)
        # adding the parameter-dtype pos embed keeps the residual stream in fp32 under autocast, as official
        return x + F.embedding(ids_keep, self.pos_tables(self.grid_of(imgs))[0][0, 1:])

    def forward_encoder(self, imgs, ids_keep):
        return self._run_blocks(self.blocks, self._with_cls(self._embed_visible(imgs, ids_keep)), self.norm)

    def forward_decoder(self, latent, ids_restore, grid: tuple[int, int] | None = None):
        x = self.decoder_embed(latent).to(self.mask_token.dtype)  # fp32 stream under autocast, as official
        x = ops.unshuffle_with_mask_token(x, ids_restore, self.mask_token, self.pos_tables(grid or self.grid_size)[1],
                                          cls_token=True, check_ids=False)
        x = self._run_blocks(self.decoder_blocks, x, self.decoder_norm)
        return self.decoder_pred(x)[:, 1:]

    def forward_decoder_masked(self, latent, ids_keep, ids_masked, grid: tuple[int, int] | None = None):
        """Predictions for the removed patches only: (B, L-K, p*p*C), row j for patch ``ids_masked[:, j]``.

        The decoder is permutation-equivariant (bidirectional attention, a position embedding per token),
        so it runs on [cls, visible tokens, mask tokens] in shuffled order with no unshuffle, and its last
        block updates only the mask-token rows, the only ones the loss reads. Same loss, less work.
        """
        x = self.decoder_embed(latent)
        Kc = x.shape[1]
        pos = self.pos_tables(grid or self.grid_size)[1][0]  # parameter dtype: an fp32 stream under autocast, as official
        visible = x + F.embedding(F.pad(ids_keep + 1, (1, 0)), pos)  # index 0: the cls row
        masked = self.mask_token + F.embedding(ids_masked + 1, pos)
        x = torch.cat([visible, masked], dim=1)
        if len(self.decoder_blocks):
            x = self._run_blocks(self.decoder_blocks, x, self.decoder_norm, last_first_query=Kc)
        else:
            x = self.decoder_norm(x[:, Kc:])
        return self.decoder_pred(x)

    def forward_loss(self, imgs, pred, mask):
        return ops.masked_patch_mse(pred, imgs, mask, self.patch_size, self.norm_pix_loss)

    def forward_loss_masked(self, imgs, pred_masked, ids_masked, target=None):
        """The MAE loss from :meth:`forward_decoder_masked`'s rows: equal to :meth:`forward_loss`."""
        B, M, _ = pred_masked.shape
        if target is not None:  # a given (B, L, target_dim) target: its rows of the removed patches
            rows = torch.gather(target, 1, ids_masked[..., None].expand(-1, -1, target.shape[-1]))
            return (pred_masked.float() - rows.float()).pow(2).mean()
        p, C = self.patch_size, self.in_chans
        target = ops.patchify_gather(imgs, ids_masked, p, check_ids=False)  # (channel, row, col) inside a patch
        target = target.reshape(B, M, C, p, p).permute(0, 1, 3, 4, 2).reshape(B, M, p * p * C).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return (pred_masked.float() - target).pow(2).mean()  # every image removes the same number of patches

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None, *, masked_only: bool = False,
                target=None) -> MAEOutput:
        """Loss, predictions and mask of the official MAE.

        ``masked_only=True`` (what training uses) returns predictions for the removed patches only, in the
        order of ``ids_masked``, and skips the decoder work on visible rows that the loss never reads.
        ``target``: a (B, L, target_dim) tensor to reconstruct instead of the pixels (HOG, teacher features; see
        :mod:`mae_fast.targets`); the loss is the mean squared error over the removed patches' rows.
        """
        self._check_imgs(imgs)
        grid = self.grid_of(imgs)
        self._check_target(imgs, target, grid[0] * grid[1])
        ids_shuffle, ids_keep, ids_restore, mask = self._masking(imgs.shape[0], mask_ratio, noise, imgs.device,
                                                                 grid[0] * grid[1])
        latent = self.forward_encoder(imgs, ids_keep)
        if masked_only:
            ids_masked = ids_shuffle[:, ids_keep.shape[1]:]
            pred = self.forward_decoder_masked(latent, ids_keep, ids_masked, grid)
            loss = self.forward_loss_masked(imgs, pred, ids_masked, target)
            return MAEOutput(loss, pred, mask, ids_restore, latent, ids_masked)
        pred = self.forward_decoder(latent, ids_restore, grid)
        if target is not None:
            per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
            loss = (per_patch * mask).sum() / mask.sum()
        else:
            loss = self.forward_loss(imgs, pred, mask)
        return MAEOutput(loss, pred, mask, ids_restore, latent)

    def _check_target(self, imgs, target, num_patches: int):
        pixels = self.patch_size**2 * self.in_chans
        if target is None:
            if self.target_dim != pixels:
                raise ValueError(f"this model predicts {self.target_dim} features per patch, not pixels: pass "
                                 f"target=(B, L, {self.target_dim})")
            return
        want = (imgs.shape[0], num_patches, self.target_dim)
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != want:
            raise ValueError(f"target must be a {want} tensor, got {tuple(getattr(target, 'shape', ()))}")
        if target.device != imgs.device:
            raise ValueError(f"target on {target.device} but imgs on {imgs.device}")

    def forward_packed(self, imgs, mask_ratio: float = 0.75, noise=None) -> PackedOutput:
        """The MAE loss of images of different sizes in one packed pass.

        ``imgs``: a list of (C, H, W) images (H, W multiples of the patch size); ``noise``: None or a list of
        (1, L_i) masking noises. Each image is masked as :meth:`forward` masks it alone; the visible tokens of all
        images (each with its cls token) run through the encoder as one sequence of ``cu_seqlens``-delimited
        segments, and [cls, visible, mask tokens] of every image through the decoder alike (attention never
        crosses images). ``loss`` is the mean over all removed patches of all images,
        ``sum_i loss_i * removed_i / sum_i removed_i`` of the per-image losses (``losses``).
        """
        if not isinstance(imgs, (list, tuple)) or not imgs:
            raise ValueError("forward_packed takes a non-empty list of (C, H, W) images")
        if self.target_dim != self.patch_size**2 * self.in_chans:
            raise ValueError("forward_packed reconstructs pixels; this model predicts another target's features")
        if noise is not None and (not isinstance(noise, (list, tuple)) or len(noise) != len(imgs)):
            raise ValueError(f"noise must be None or a list of {len(imgs)} (1, L_i) tensors")
        p, C = self.patch_size, self.in_chans
        device = self.cls_token.device
        cls = self.cls_token + self.pos_embed[:, :1]
        enc, dec_pos, masked_ids, grids, seg_enc, seg_dec = [], [], [], [], [0], [0]
        for i, img in enumerate(imgs):
            if not isinstance(img, torch.Tensor) or img.dim() != 3:
                raise ValueError(f"image {i} must be a (C, H, W) tensor, got {getattr(img, 'shape', type(img))}")
            self._check_imgs(img[None])
            grid = self.grid_of(img)
            L = grid[0] * grid[1]
            ids_shuffle, ids_keep, _, _ = self._masking(1, mask_ratio, None if noise is None else noise[i], device, L)
            K = ids_keep.shape[1]
            enc.append(torch.cat([cls[0], self._embed_visible(img[None], ids_keep)[0]], 0))
            dec_pos.append((self.pos_tables(grid)[1][0], ids_keep[0], ids_shuffle[0, K:]))
            masked_ids.append(ids_shuffle[:, K:])
            grids.append(grid)
            seg_enc.append(seg_enc[-1] + 1 + K)
            seg_dec.append(seg_dec[-1] + 1 + L)
        cu_enc = torch.tensor(seg_enc, dtype=torch.int32, device=device)
        cu_dec = torch.tensor(seg_dec, dtype=torch.int32, device=device)
        latent = self._run_blocks(self.blocks, torch.cat(enc, 0)[None], self.norm, cu_seqlens=cu_enc)
        x = self.decoder_embed(latent)[0]
        parts, rows = [], []
        for i, (pos, keep, removed) in enumerate(dec_pos):
            parts.append(x[seg_enc[i]:seg_enc[i + 1]] + F.embedding(F.pad(keep + 1, (1, 0)), pos))
            parts.append(self.mask_token[0] + F.embedding(removed + 1, pos))
            rows.append(torch.arange(seg_dec[i] + 1 + keep.shape[0], seg_dec[i + 1], device=device))
        x = torch.cat(parts, 0)[None]
        if len(self.decoder_blocks):
            x = self._run_blocks(self.decoder_blocks, x, self.decoder_norm, cu_seqlens=cu_dec)
        else:
            x = self.decoder_norm(x)
        pred = self.decoder_pred(x[0, torch.cat(rows)])
        # per removed patch: its squared error, averaged over its pixels
        err, start = [], 0
        dtype = torch.promote_types(pred.dtype, torch.float32)  # fp32 as official, fp64 for a fp64 model
        for img, ids in zip(imgs, masked_ids):
            M = ids.shape[1]
            target = ops.patchify_gather(img[None], ids, p, check_ids=False)[0]
            target = target.reshape(M, C, p, p).permute(0, 2, 3, 1).reshape(M, p * p * C).to(dtype)
            if self.norm_pix_loss:
                target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
            err.append((pred[start:start + M].to(dtype) - target).pow(2).mean(-1))
            start += M
        per_patch = torch.cat(err)
        losses = torch.stack([e.mean() for e in err])
        return PackedOutput(per_patch.mean(), losses, pred, masked_ids, grids, cu_enc, cu_dec)

    def forward_features(self, imgs):
        """Encoder on every patch, no masking: (B, 1+L, D), cls first (timm's ``forward_features``)."""
        self._check_imgs(imgs)
        x = self.patch_embed(imgs) + self.pos_tables(self.grid_of(imgs))[0][:, 1:]
        return self._run_blocks(self.blocks, self._with_cls(x), self.norm)
