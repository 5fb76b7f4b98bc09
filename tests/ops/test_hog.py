"""ops.hog (MaskFeat's HOG target) against a plain-numpy HOG written from the definition, both backends."""
import math

import numpy as np
import pytest
import torch

from mae_fast import ops
from mae_fast.kernels import hog as triton_hog
from mae_fast.ops.hog import hog_reference, hog_width


def numpy_hog(img: np.ndarray, patch: int, bins: int = 9, cell: int = 8, window: int = 0) -> np.ndarray:
    """(B, C, H, W) -> (B, L, C * bins * r * r), loops over pixels and cells, fp64."""
    B, C, H, W = img.shape
    pad = np.pad(img.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    gx = np.zeros((B, C, H, W))
    gy = np.zeros((B, C, H, W))
    weights = {(-1, -1): 1, (0, -1): 2, (1, -1): 1}
    for (dy, dx), w in weights.items():  # Sobel: (right - left) weighted 1 2 1 down the rows, and transposed
        gx += w * (pad[:, :, 1 + dy:1 + dy + H, 2:2 + W] - pad[:, :, 1 + dy:1 + dy + H, 0:W])
        gy += w * (pad[:, :, 2:2 + H, 1 + dy:1 + dy + W] - pad[:, :, 0:H, 1 + dy:1 + dy + W])
    mag = np.hypot(gx, gy)
    if window:
        n = np.arange(window) - (window - 1) / 2
        g = np.exp(-0.5 * (n / (window // 2)) ** 2)
        g /= g.sum()
        mag = mag * g[np.arange(H) % window][:, None] * g[np.arange(W) % window][None, :]
    angle = np.mod(np.arctan2(gy, gx), math.pi)
    idx = np.minimum((angle / (math.pi / bins)).astype(int), bins - 1)
    r, gh, gw = patch // cell, H // patch, W // patch
    out = np.zeros((B, gh * gw, C * bins * r * r))
    for b in range(B):
        for c in range(C):
            for i in range(H // cell):
                for j in range(W // cell):
                    hist = np.zeros(bins)
                    sl = (b, c, slice(i * cell, (i + 1) * cell), slice(j * cell, (j + 1) * cell))
                    np.add.at(hist, idx[sl].ravel(), mag[sl].ravel())
                    hist /= max(np.linalg.norm(hist), 1e-12)
                    patch_idx = (i // r) * gw + j // r
                    for k in range(bins):
                        out[b, patch_idx, ((c * bins + k) * r + i % r) * r + j % r] = hist[k]
    return out


CASES = [  # (B, C, H, W, patch, bins, cell, window): odd sizes, one cell per patch and several, a window
    (2, 3, 12, 18, 6, 9, 3, 0),
    (1, 3, 16, 8, 8, 9, 4, 8),
    (2, 1, 10, 15, 5, 7, 5, 0),
    (1, 2, 8, 12, 4, 8, 4, 0),  # an even number of bins: the border columns' pi / 2 is a bin boundary
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_hog_matches_numpy(case, backend, monkeypatch):
    B, C, H, W, p, bins, cell, window = case
    imgs = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(sum(case)))
    monkeypatch.setattr(triton_hog, "_alloc", lambda *a, **k: torch.full(*a, float("nan"), **k))  # unwritten show
    got = ops.hog(imgs, p, bins=bins, cell=cell, window=window, backend=backend)
    want = numpy_hog(imgs.numpy(), p, bins, cell, window)
    assert got.shape == want.shape == (B, (H // p) * (W // p), C * bins * (p // cell) ** 2)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    # every cell's histogram has unit length (or is all zero)
    norms = np.linalg.norm(want.reshape(B, -1, C, bins, (p // cell) ** 2), axis=3)
    assert np.allclose(norms, 1.0)


def test_hog_of_a_known_edge_and_bf16_inputs():
    """A vertical step edge: every gradient is horizontal (angle 0), so only bin 0 of the cells on the edge fills."""
    img = torch.zeros(1, 3, 8, 16)
    img[..., 8:] = 1.0
    for backend in ("torch", "triton"):
        out = ops.hog(img, 8, cell=8, backend=backend).view(1, 2, 3, 9)
        assert torch.allclose(out[..., 0], torch.ones(1, 2, 3)) and out[..., 1:].abs().max() == 0, backend
    x = torch.randn(2, 3, 16, 16)
    got = ops.hog(x.bfloat16(), 8, backend="triton")
    assert torch.allclose(got, hog_reference(x.bfloat16(), 8), atol=1e-5)


def test_hog_rejects_bad_input_in_one_line():
    x = torch.randn(1, 3, 16, 16)
    for kwargs, match in [(dict(patch_size=6), "multiple of the cell"), (dict(patch_size=8, cell=3), "multiple"),
                          (dict(patch_size=8, window=5), "Gaussian window"), (dict(patch_size=0), "positive")]:
        with pytest.raises(ValueError, match=match):
            ops.hog(x, **kwargs)
    with pytest.raises(ValueError, match="floating"):
        ops.hog(x.long(), 8)
    assert hog_width(16) == 108 and hog_width(8) == 27  # MaskFeat's 16-px patch: 3 x 9 x 2 x 2
