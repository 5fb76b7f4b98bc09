"""Reconstruction pictures (training/visualize.py): the visible-only statistics a norm-pix prediction is
un-normalised with, against loops written here; the picture's rows pixel by pixel; the grid PNG's layout."""
from __future__ import annotations


import torch

from mae_fast.training import visualize
import mae_fast


def test_norm_pix_unnormalisation_uses_visible_statistics_only():

    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32) * 0.7 + 0.3
    target = m.patchify(imgs)
    mask = (torch.rand(2, m.num_patches) < 0.6).float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normed = (target - mean) / (var + 1e-6) ** 0.5
    rec = visualize.reconstruct(m, imgs, normed, mask)
    # a perfect prediction comes back exactly on visible patches
    vis = (mask == 0)
    torch.testing.assert_close(m.patchify(rec)[vis], target[vis], rtol=1e-4, atol=1e-4)
    # removed patches' statistics do not depend on their own (hidden) pixels
    imgs2 = imgs.clone()
    hidden = m.unpatchify(mask[..., None].expand_as(target)).bool()
    imgs2[hidden] = imgs2[hidden] * 3.0 + 1.0
    est1 = visualize.visible_stats(m.patchify(imgs), mask, m.grid_size)
    est2 = visualize.visible_stats(m.patchify(imgs2), mask, m.grid_size)
    torch.testing.assert_close(est1[0], est2[0]) and torch.testing.assert_close(est1[1], est2[1])


def _visible_stats_by_loops(patches, mask, grid, window=5):
    """Each patch's mean and unbiased variance; a removed patch gets the average of the visible ones within
    window // 2 rows and columns, else the image's visible average, else 0."""
    B, L, _ = patches.shape
    h, w = grid
    r = window // 2
    mean, var = patches.double().mean(-1), patches.double().var(-1)
    out = torch.zeros(B, L, 2, dtype=torch.float64)
    for b in range(B):
        vis = [i for i in range(L) if mask[b, i] == 0]
        for i in range(L):
            if mask[b, i] == 0:
                out[b, i] = torch.stack([mean[b, i], var[b, i]])
                continue
            near = [j for j in vis if abs(j // w - i // w) <= r and abs(j % w - i % w) <= r] or vis
            if near:
                out[b, i] = torch.stack([mean[b, near].mean(), var[b, near].mean()])
    return out[..., :1], out[..., 1:]


def test_visible_stats_are_5x5_neighbourhood_averages_then_the_images_average():
    g = torch.Generator().manual_seed(4)
    grid = (3, 8)
    patches = torch.randn(3, 24, 7, generator=g) * torch.rand(3, 24, 1, generator=g) + torch.randn(3, 24, 1,
                                                                                                   generator=g)
    mask = torch.ones(3, 24)
    mask[0].view(3, 8)[:, :2] = 0  # columns 4-7 have no visible patch within two columns: the image's average
    mask[1] = (torch.rand(24, generator=g) < 0.5).float()
    mask[1, 5] = 1  # image 2 keeps everything removed: zeros
    mean, var = visualize.visible_stats(patches, mask, grid)
    want_mean, want_var = _visible_stats_by_loops(patches, mask, grid)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(want_mean[0].view(3, 8)[:, 3], want_mean[0].view(3, 8)[:, 5])  # both rules were used


def test_norm_pix_reconstruction_of_flat_patches_keeps_the_epsilon():
    """A perfect norm-pix prediction comes back exactly, even for nearly flat patches where the 1e-6 added to
    the variance (as in the loss) dominates."""
    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, norm_pix_loss=True)
    imgs = 0.3 + 1e-4 * torch.randn(2, 3, 32, 32)
    target = m.patchify(imgs)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    assert var.max() < 1e-7
    normed = (target - mean) / (var + 1e-6) ** 0.5
    rec = visualize.reconstruct(m, imgs, normed, torch.zeros(2, m.num_patches))
    torch.testing.assert_close(rec, imgs, rtol=0, atol=2e-7)


def test_norm_pix_reconstruction_of_removed_patches_uses_their_neighbours_statistics_only():
    """Removed patches are un-normalised with the visible neighbours' statistics: changing the hidden pixels
    changes nothing in the picture, and a removed patch gets exactly visible_stats' mean and variance."""
    torch.manual_seed(2)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=(40, 24), norm_pix_loss=True)  # 5 x 3 patches
    imgs = torch.randn(2, 3, 40, 24) * 0.5 + 0.2
    mask = (torch.rand(2, 15) < 0.5).float()
    mask[:, 7] = 1  # the centre patch is removed in both images
    pred = torch.randn(2, 15, 192)
    hidden = m.unpatchify(mask[..., None].expand(-1, -1, 192)).bool()
    other = imgs.clone()
    other[hidden] = other[hidden] * 4.0 - 1.0
    rec = visualize.reconstruct(m, imgs, pred, mask)
    torch.testing.assert_close(visualize.reconstruct(m, other, pred, mask), rec, rtol=0, atol=0)
    mean, var = _visible_stats_by_loops(m.patchify(imgs), mask, m.grid_size)
    want = pred[:, 7] * (var[:, 7] + 1e-6).sqrt().float() + mean[:, 7].float()
    torch.testing.assert_close(m.patchify(rec)[:, 7], want, rtol=1e-5, atol=1e-5)


def test_unnormalize_is_x_std_plus_mean_clamped():
    x = torch.tensor([-4.0, -0.5, 0.0, 0.5, 4.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    got = visualize.unnormalize(x, mean=(0.5, 0.25, 0.1), std=(0.2, 0.5, 1.0))
    want = torch.tensor([[0.0, 0.4, 0.5, 0.6, 1.0], [0.0, 0.0, 0.25, 0.5, 1.0], [0.0, 0.0, 0.1, 0.6, 1.0]])
    torch.testing.assert_close(got[0, :, 0], want)


def test_reconstruction_rows_pixel_by_pixel_on_a_non_square_image():
    """Masking noise from the seed, the mask ratio passed on; row 2 grey exactly on removed patches, row 3
    the prediction there and the original elsewhere; on a 4 x 6 patch grid so rows and columns cannot swap."""
    torch.manual_seed(1)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=(32, 48))
    imgs = torch.randn(2, 3, 32, 48)
    rows = visualize.reconstruction_rows(m, imgs, mask_ratio=0.5, seed=3)
    noise = torch.rand(2, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = m(imgs, mask_ratio=0.5, noise=noise)
    removed = out.mask.bool().view(2, 4, 6).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]  # (2,1,32,48)
    assert removed.float().mean() == 0.5
    mean = torch.tensor(visualize.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(visualize.IMAGENET_STD).view(1, 3, 1, 1)
    orig = (imgs * std + mean).clamp(0, 1)
    recon = (m.unpatchify(out.pred) * std + mean).clamp(0, 1)
    torch.testing.assert_close(rows[0], orig)
    torch.testing.assert_close(rows[1], torch.where(removed, torch.full_like(orig, 0.5), orig))
    torch.testing.assert_close(rows[2], recon)
    torch.testing.assert_close(rows[3], torch.where(removed, recon, orig))


def test_grid_png_layout_scale_and_pixel_rounding(tmp_path):
    """Tiles are scaled up by ceil(min_tile / side), laid out after a 120-pixel label column with 4-pixel gaps;
    a value v becomes round(255 v)."""
    from PIL import Image

    R, N, S = 2, 3, 48
    rows = torch.empty(R, N, 3, S, S)
    for r in range(R):
        for c in range(N):
            rows[r, c, 0], rows[r, c, 1], rows[r, c, 2] = 0.1 * (r * N + c) + 0.1, 0.5, 1.0
    path = visualize.save_grid(rows, tmp_path / "sub" / "g.png", min_tile=128)
    img = Image.open(path).convert("RGB")
    tile = 3 * S  # ceil(128 / 48) = 3
    assert img.size == (120 + N * (tile + 4) + 4, R * (tile + 4) + 4)
    for r in range(R):
        for c in range(N):
            x, y = 120 + 4 + c * (tile + 4), 4 + r * (tile + 4)
            want = (int(255 * (0.1 * (r * N + c) + 0.1) + 0.5), 128, 255)
            assert img.getpixel((x, y)) == want and img.getpixel((x + tile - 1, y + tile - 1)) == want
            assert img.getpixel((x - 1, y)) == (255, 255, 255)  # the gap
    assert sorted(p.name for p in path.parent.iterdir()) == ["g.png"]
