"""Reconstruction grids: original / masked / reconstruction / reconstruction with the visible patches.

Pixels are un-normalised with the dataset's mean/std (ImageNet's by default). A model trained with
``norm_pix_loss`` predicts each patch normalised by its own mean and variance, which are unknown
for removed patches; those are estimated from the visible patches around them (a normalised 5x5
window average over the patch grid, falling back to the image's visible average), so the picture
uses nothing the model could not see.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROW_LABELS = ("original", "masked", "reconstruction", "recon + visible")


def _patch_stats(patches: torch.Tensor):
    """Per-patch mean and variance as the loss uses them (unbiased variance, as official)."""
    return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)


def visible_stats(patches: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int], window: int = 5):
    """Mean/var for every patch from visible patches only: (B, L, 1) each.

    Visible patches keep their own statistics; a removed patch gets the average over the visible
    patches in a ``window`` x ``window`` neighbourhood (the image's visible average if there are none).
    """
    B, L, _ = patches.shape
    mean, var = _patch_stats(patches)
    vis = (1.0 - mask.float()).view(B, 1, *grid)
    stats = torch.cat([mean, var], dim=-1).transpose(1, 2).reshape(B, 2, *grid) * vis
    kernel = torch.ones(1, 1, window, window, dtype=stats.dtype, device=stats.device)
    pad = window // 2
    num = F.conv2d(stats.reshape(B * 2, 1, *grid), kernel, padding=pad).view(B, 2, *grid)
    den = F.conv2d(vis, kernel, padding=pad)
    global_avg = stats.sum(dim=(2, 3), keepdim=True) / vis.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    local = torch.where(den > 0, num / den.clamp_min(1e-6), global_avg)
    est = torch.where(vis > 0, stats, local)  # visible: own stats (stats is unmasked there)
    est = est.reshape(B, 2, L).transpose(1, 2)
    return est[..., :1], est[..., 1:]


def reconstruct(model, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Predicted images in the input's (normalised) space, undoing norm-pix from visible statistics."""
    pred = pred.float()
    if getattr(model, "norm_pix_loss", False):
        target = model.patchify(imgs.float())
        mean, var = visible_stats(target, mask, model.grid_size)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    return model.unpatchify(pred)


def _pixel_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) patch mask -> (B, 1, H, W) pixel mask (1 = removed)."""
    p = model.patch_size
    m = mask.float().unsqueeze(-1).expand(-1, -1, p * p * 1)
    return ops_unpatchify(m, p, model.grid_size, 1)


def ops_unpatchify(x, p, grid, c):
    h, w = grid
    B = x.shape[0]
    return x.reshape(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, h * p, w * p)


def unnormalize(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN if mean is None else mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD if std is None else std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_rows(model, imgs: torch.Tensor, mask_ratio: float = 0.75, mean=None, std=None, seed: int = 0,
                        forward=None) -> torch.Tensor:
    """(4, B, 3, H, W) in [0, 1]: original, masked (grey), reconstruction, reconstruction + visible."""
    forward = forward or model
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=g).to(imgs.device)
    out = forward(imgs, mask_ratio=mask_ratio, noise=noise)
    rec = reconstruct(model, imgs, out.pred, out.mask)
    pm = _pixel_mask(model, out.mask)
    orig = unnormalize(imgs, mean, std)
    recon = unnormalize(rec, mean, std)
    masked = orig * (1 - pm) + 0.5 * pm
    pasted = orig * (1 - pm) + recon * pm
    return torch.stack([orig, masked, recon, pasted]).cpu()


def save_grid(rows: torch.Tensor, path, labels=ROW_LABELS, min_tile: int = 128) -> Path:
    """Write (R, N, 3, H, W) in [0, 1] as a PNG grid with a label column."""
    from PIL import Image, ImageDraw

    R, N, _, H, W = rows.shape
    scale = max(1, -(-min_tile // max(H, W)))
    th, tw, gap, label_w = H * scale, W * scale, 4, 120
    canvas = Image.new("RGB", (label_w + N * (tw + gap) + gap, R * (th + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(R):
        y = gap + r * (th + gap)
        draw.text((6, y + th // 2 - 6), labels[r] if r < len(labels) else "", fill=(0, 0, 0))
        for c in range(N):
            arr = (rows[r, c].permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype("uint8")
            tile = Image.fromarray(arr).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (label_w + gap + c * (tw + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_reconstruction_grid(model, imgs: torch.Tensor, path, mask_ratio: float = 0.75, mean=None, std=None,
                             seed: int = 0, forward=None):
    """Run the model on ``imgs`` with fixed masking noise and write the grid to ``path`` (None: don't
    write, e.g. on ranks other than 0 that must still join a sharded forward). Returns the rows."""
    rows = reconstruction_rows(model, imgs, mask_ratio, mean, std, seed, forward)
    if path is not None:
        save_grid(rows, path)
    return rows
