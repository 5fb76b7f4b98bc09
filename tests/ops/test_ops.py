"""The op layer's torch/sdpa backends against plain formulas, and the dispatch rules."""
import math

import pytest
import torch

from mae_fast import ops
from mae_fast.ops import dispatch


def _perm_ids(B, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return shuffle[:, :K], torch.argsort(shuffle, 1)


@pytest.mark.parametrize("B,L,K,D", [(1, 7, 1, 5), (3, 37, 9, 24), (2, 50, 50, 3)])
def test_gather_visible(B, L, K, D):
    x = torch.randn(B, L, D, dtype=torch.float64)
    pos = torch.randn(L, D, dtype=torch.float64)
    ids, _ = _perm_ids(B, L, K)
    out = ops.gather_visible(x, ids, pos)
    for b in range(B):
        for j in range(K):
            torch.testing.assert_close(out[b, j], x[b, ids[b, j]] + pos[ids[b, j]])
    torch.testing.assert_close(ops.gather_visible(x, ids.int(), pos[None]), out)
    assert torch.equal(ops.gather_visible(x, ids), torch.stack([x[b, ids[b]] for b in range(B)]))


@pytest.mark.parametrize("B,L,K,D", [(1, 7, 1, 5), (3, 37, 9, 24), (2, 16, 15, 8)])
def test_unshuffle_with_mask_token(B, L, K, D):
    x_vis = torch.randn(B, 1 + K, D, dtype=torch.float64)
    token = torch.randn(1, 1, D, dtype=torch.float64)
    pos = torch.randn(1 + L, D, dtype=torch.float64)
    ids_keep, ids_restore = _perm_ids(B, L, K, seed=1)
    out = ops.unshuffle_with_mask_token(x_vis, ids_restore, token, pos)
    assert out.shape == (B, 1 + L, D)
    for b in range(B):
        torch.testing.assert_close(out[b, 0], x_vis[b, 0] + pos[0])
        for i in range(L):
            r = int(ids_restore[b, i])
            src = x_vis[b, 1 + r] if r < K else token[0, 0]
            torch.testing.assert_close(out[b, 1 + i], src + pos[1 + i])
    # the visible rows land where ids_keep says
    no_cls = ops.unshuffle_with_mask_token(x_vis[:, 1:], ids_restore, token, cls_token=False)
    for b in range(B):
        torch.testing.assert_close(no_cls[b, ids_keep[b]], x_vis[b, 1:])


def test_unshuffle_gradients():
    B, L, K, D = 2, 11, 4, 6
    x_vis = torch.randn(B, 1 + K, D, dtype=torch.float64, requires_grad=True)
    token = torch.randn(D, dtype=torch.float64, requires_grad=True)
    _, ids_restore = _perm_ids(B, L, K)
    assert torch.autograd.gradcheck(lambda a, t: ops.unshuffle_with_mask_token(a, ids_restore, t), (x_vis, token))
    out = ops.unshuffle_with_mask_token(x_vis, ids_restore, token)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    masked = (ids_restore >= K)
    expected = (w[:, 1:][masked]).sum(0)
    torch.testing.assert_close(token.grad, expected)


@pytest.mark.parametrize("C,H,W,p", [(3, 24, 40, 8), (1, 14, 14, 7), (3, 32, 32, 16)])
def test_patchify_gather_equals_conv(C, H, W, p):
    B = 2
    imgs = torch.randn(B, C, H, W, dtype=torch.float64)
    L = (H // p) * (W // p)
    K = max(1, L // 3)
    ids, _ = _perm_ids(B, L, K)
    conv = torch.nn.Conv2d(C, 10, p, p).double()
    full = conv(imgs).flatten(2).transpose(1, 2)
    pix = ops.patchify_gather(imgs, ids, p)
    assert pix.shape == (B, K, C * p * p)
    emb = pix @ conv.weight.reshape(10, -1).T + conv.bias
    torch.testing.assert_close(emb, torch.stack([full[b, ids[b]] for b in range(B)]))


def test_patchify_roundtrip():
    imgs = torch.randn(2, 3, 24, 40)
    x = ops.patchify(imgs, 8)
    assert x.shape == (2, 15, 192)
    torch.testing.assert_close(x[0, 6].reshape(8, 8, 3).permute(2, 0, 1), imgs[0, :, 8:16, 8:16])
    torch.testing.assert_close(ops.unpatchify(x, 8, (3, 5)), imgs)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_mse(norm_pix):
    B, C, H, W, p = 2, 3, 16, 24, 8
    imgs = torch.randn(B, C, H, W, dtype=torch.float64)
    L = 6
    pred = torch.randn(B, L, p * p * C, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.float64)
    total, n = 0.0, 0
    for b in range(B):
        for i in range(L):
            if mask[b, i]:
                r, c = divmod(i, W // p)
                t = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    t = (t - t.mean()) / math.sqrt(t.var(unbiased=True).item() + 1e-6)
                total += ((pred[b, i] - t) ** 2).mean().item()
                n += 1
    got = ops.masked_patch_mse(pred, imgs, mask, p, norm_pix)
    assert got.dtype == torch.float32
    assert abs(got.item() - total / n) < 1e-5


def _packed(seqlens, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(seqlens)
    q, k, v = (torch.randn(total, H, D, generator=g).to(dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_attention_dense_matches_formula(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 19, 3, 40, generator=g, dtype=torch.float64) for _ in range(3))
    scale = 0.3
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    torch.testing.assert_close(ops.attention(q, k, v, softmax_scale=scale, backend=backend), ref)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_attention_packed_equals_each_sequence(backend):
    q, k, v, cu = _packed([5, 1, 12, 7], 2, 16)
    out = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=12, backend=backend)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        alone = ops.attention(q[None, a:b], k[None, a:b], v[None, a:b], backend="torch")[0]
        torch.testing.assert_close(out[a:b], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_attention_fewer_queries_equals_tail_rows(backend):
    # queries for the last rows only (MAE's last decoder block): rows of full self-attention, fwd and bwd
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 13, 3, 24, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    do = torch.randn(2, 4, 3, 24, generator=g, dtype=torch.float64)
    full = ops.attention(q, k, v, backend="torch")[:, 9:]
    want = torch.autograd.grad(full, (q, k, v), do)
    tail = ops.attention(q[:, 9:].float(), k.float(), v.float(), backend=backend)
    got = torch.autograd.grad(tail, (q, k, v), do.float())
    assert tail.shape == (2, 4, 3, 24)
    torch.testing.assert_close(tail.double(), full, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[0][:, :9].abs().max() == 0  # rows without a query get no gradient


def test_attention_bad_inputs():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="shapes do not match"):
        ops.attention(q, q[:, :3], q)
    with pytest.raises(ValueError, match="shapes do not match"):
        ops.attention(q, q[:, :, :1], q[:, :, :1])  # heads differ
    pq, pk, pv, cu = _packed([3, 4], 2, 8)
    with pytest.raises(ValueError, match="shapes do not match"):  # packed: no query subsets
        ops.attention(pq[:5], pk, pv, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, heads, head_dim\)"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        ops.attention(q, q.double(), q)
    with pytest.raises(TypeError, match="not supported"):
        ops.attention(q.int(), q.int(), q.int())
    pq, pk, pv, cu = _packed([3, 4], 2, 8)
    with pytest.raises(ValueError, match="never decrease"):
        ops.attention(pq, pk, pv, cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="ends at"):
        ops.attention(pq, pk, pv, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen"):
        ops.attention(pq, pk, pv, cu_seqlens=cu, max_seqlen=2)


def test_masking_bad_inputs():
    x = torch.randn(2, 10, 4)
    ids = torch.tensor([[0, 3], [9, 1]])
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        ops.gather_visible(x, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(IndexError):
        ops.gather_visible(x, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(TypeError, match="dtype"):
        ops.gather_visible(x, ids.float())
    with pytest.raises(ValueError, match="batch"):
        ops.gather_visible(x, ids[:1])
    with pytest.raises(ValueError, match="3 dims"):
        ops.gather_visible(x[0], ids)
    with pytest.raises(ValueError, match="pos_embed"):
        ops.gather_visible(x, ids, torch.randn(9, 4))
    with pytest.raises(TypeError, match="dtype"):
        ops.gather_visible(x.long(), ids)
    with pytest.raises(ValueError, match="not divisible"):
        ops.patchify_gather(torch.randn(1, 3, 20, 16), ids[:1], 8)
    with pytest.raises(ValueError, match="mask_token"):
        ops.unshuffle_with_mask_token(x, torch.argsort(torch.rand(2, 12), 1), torch.randn(5))
    with pytest.raises(ValueError, match="pred must be"):
        ops.masked_patch_mse(torch.randn(1, 3, 10), torch.randn(1, 3, 16, 16), torch.ones(1, 4), 8)


def test_attention_odd_argument_types_are_named():
    q, k, v, cu = _packed([4, 1, 6], 3, 32, seed=5)
    with pytest.raises(TypeError, match="cu_seqlens must be a tensor"):
        ops.attention(q, k, v, cu_seqlens=cu.tolist())
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        ops.attention(q, k, v, cu_seqlens=cu, max_seqlen="6")
    for backend in ("torch", "sdpa", "triton"):
        with pytest.raises(TypeError, match="softmax_scale must be a number"):
            ops.attention(q, k, v, cu_seqlens=cu, softmax_scale="0.5", backend=backend)
    with pytest.raises(ValueError, match="softmax_scale must hold one value"):
        ops.attention(q, k, v, cu_seqlens=cu, softmax_scale=torch.rand(2) + 0.1)
    # numbers of other types, and one-element tensors, still work and agree with the formula
    want = ops.attention_reference(q.double(), k.double(), v.double(), 0.25, cu)
    for scale in (0.25, torch.tensor(0.25), torch.tensor([0.25], dtype=torch.float64)):
        got = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=6, softmax_scale=scale, backend="sdpa")
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_masking_odd_argument_types_are_named():
    x = torch.randn(2, 9, 5)
    keep = _perm_ids(2, 9, 4, seed=3)[0]
    with pytest.raises(TypeError, match="gather_visible: ids must be a tensor"):
        ops.gather_visible(x, keep.tolist())
    with pytest.raises(TypeError, match="patchify_gather: ids must be a tensor"):
        ops.patchify_gather(torch.randn(2, 3, 9, 6), keep[:, :2].tolist(), 3)
    with pytest.raises(TypeError, match="pos_embed must be a tensor"):
        ops.gather_visible(x, keep, x[0].tolist())
    with pytest.raises(TypeError, match="pos_embed must be a tensor"):
        ops.unshuffle_with_mask_token(x[:, :5], _perm_ids(2, 9, 4)[1], torch.randn(5), 0.5)
    # True is an int, but not a patch size (it silently patchified with p=1)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ops.patchify_gather(torch.randn(2, 3, 9, 6), keep[:, :2], True)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ops.masked_patch_mse(torch.randn(2, 54, 3), torch.randn(2, 3, 9, 6), torch.ones(2, 54), True)


def test_dispatch_reasons_and_forcing(monkeypatch):
    # another module may have turned the Triton interpreter on for the process; with it on, the
    # triton masking backend (rightly) takes CPU tensors and "every backend refuses" would not hold
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 10, 4)
    ids = torch.tensor([[0, 3], [9, 1]])
    with pytest.raises(ValueError, match="unknown backend"):
        ops.gather_visible(x, ids, backend="nope")
    calls = []
    fake = dispatch.Backend(op="gather_visible", name="fake_gpu_only",
                            fn=lambda *a: calls.append(1) or torch.zeros(2, 2, 4),
                            reasons=lambda x, *a: [] if x.is_cuda else ["needs a CUDA tensor"], priority=0.0)
    dispatch.register_backend(fake)
    try:
        # auto skips the backend that gives reasons; forcing it reports them
        assert ops.select_backend("gather_visible", "auto", x, ids, None).name == "torch"
        with pytest.raises(ops.NoBackendError, match="needs a CUDA tensor"):
            ops.gather_visible(x, ids, backend="fake_gpu_only")
        assert ops.describe("gather_visible", x, ids, None)["fake_gpu_only"] == ["needs a CUDA tensor"]
        monkeypatch.setenv("MAE_FAST_BACKEND", "fake_gpu_only")
        with pytest.raises(ops.NoBackendError, match="fake_gpu_only"):
            ops.gather_visible(x, ids)
        monkeypatch.setenv("MAE_FAST_BACKEND", "torch")
        assert ops.select_backend("gather_visible", "auto", x, ids, None).name == "torch"
        assert not calls
        # with every backend refusing, the error lists each one with its reasons
        monkeypatch.delenv("MAE_FAST_BACKEND")
        for name, b in dispatch.backends_for("gather_visible").items():
            if name != "fake_gpu_only":
                monkeypatch.setattr(b, "reasons", lambda *a: ["refuses in this test"])
        with pytest.raises(ops.NoBackendError) as err:
            ops.gather_visible(x, ids)
        assert "torch: refuses in this test" in str(err.value) and "fake_gpu_only: needs a CUDA" in str(err.value)
    finally:
        del dispatch._REGISTRY["gather_visible"]["fake_gpu_only"]


def test_forcing_an_unknown_backend_for_one_op_is_an_error(monkeypatch):
    # MAE_FAST_BACKEND=op=name names the op: a misspelt backend must not silently fall back to auto
    q, k, v = (torch.randn(2, 7, 3, 24, dtype=torch.float64) for _ in range(3))
    monkeypatch.setenv("MAE_FAST_BACKEND", "attention=spda,layer_norm=torch")
    with pytest.raises(ValueError, match=r"attention: unknown backend 'spda' \(MAE_FAST_BACKEND\)"):
        ops.attention(q, k, v)
    monkeypatch.setenv("MAE_FAST_BACKEND", "attention=sdpa,layer_norm=torch")
    torch.testing.assert_close(ops.attention(q, k, v), ops.attention_reference(q, k, v))
    # one name for every op stays a preference: ops without a backend of that name keep auto
    monkeypatch.setenv("MAE_FAST_BACKEND", "sdpa")
    x = torch.randn(2, 9, 5)
    keep = _perm_ids(2, 9, 3)[0]
    torch.testing.assert_close(ops.gather_visible(x, keep), x[torch.arange(2)[:, None], keep])


def test_info_runs():
    from mae_fast.info import report

    text = report()
    assert "attention" in text and "auto ->" in text and "torch" in text
    for op in ops.OPS:  # every op of the layer is probed, the fused LayerNorm included
        assert f"  {op} " in text, op
    from mae_fast.data.video import resolve_backend

    video = next(line for line in text.splitlines() if line.startswith("video "))
    assert f"auto -> {'PyAV' if resolve_backend('auto') == 'pyav' else 'torchcodec'}" in video


def test_info_and_auto_say_when_the_attention_preference_table_is_missing(monkeypatch, tmp_path):
    """An install without the measured table once ranked backends silently; now auto warns and info says so."""
    from mae_fast.info import report
    from mae_fast.ops.attention import attention_prefs

    line = next(x for x in report().splitlines() if x.startswith("attn prefs "))
    assert "measured on NVIDIA H100" in line  # the table the repository ships
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("MAE_FAST_ATTENTION_PREFS", str(missing))
    attention_prefs.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="attention preference table .*nope.json is unreadable"):
            assert attention_prefs() == {}
        line = next(x for x in report().splitlines() if x.startswith("attn prefs "))
        assert line.endswith(f"none measured in {missing}: auto ranks attention backends in their default order")
    finally:
        monkeypatch.delenv("MAE_FAST_ATTENTION_PREFS")
        attention_prefs.cache_clear()


def test_info_names_the_attention_tiling(monkeypatch):
    from mae_fast.info import report
    from mae_fast.ops._triton_attention import _kernels

    def tiling_line():
        return next(line for line in report().splitlines() if line.startswith("fa tiling "))

    fa = _kernels()
    monkeypatch.setattr(fa, "SINGLE_TILE", True)
    monkeypatch.setattr(fa, "EQUAL_TILES", False)
    assert tiling_line().endswith("one power-of-two tile (default), GPU-verified; head dim 80 -> 128 columns")
    monkeypatch.setattr(fa, "EQUAL_TILES", True)
    line = tiling_line()
    assert "MAE_FAST_FA_EQUAL_TILES=1" in line and "not GPU-verified" in line and "80 -> 32 + 32 + 32" in line
    monkeypatch.setattr(fa, "EQUAL_TILES", False)
    monkeypatch.setattr(fa, "SINGLE_TILE", False)
    assert "64 + 32 split" in tiling_line() and "80 -> 64 + 32 columns" in tiling_line()


@pytest.mark.parametrize("img_size,mask_ratio", [(None, 0.75), (40, 0.6)])
def test_info_model_shapes_are_the_ones_a_training_step_runs(monkeypatch, img_size, mask_ratio):
    """``mae-fast info --model`` reports the attention shapes of a step from the config alone: the same
    (tokens of keys, heads, head dim) the model's attention calls get."""
    import importlib

    import mae_fast
    from mae_fast.info import attention_shapes, main

    attn_mod = importlib.import_module("mae_fast.ops.attention")
    seen = set()
    real = attn_mod.attention

    def spy(q, k, v, **kw):
        seen.add(tuple(k.shape[1:]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mae_fast.models.mae.ops, "attention", spy)
    kw = {"img_size": img_size} if img_size else {}
    m = mae_fast.create_model("mae_vit_demo_patch8", **kw)
    side = img_size or m.patch_embed.grid_size[0] * 8
    m(torch.randn(2, 3, side, side), mask_ratio, masked_only=True)
    want = attention_shapes("mae_vit_demo_patch8", img_size, mask_ratio)
    assert seen == set(want.values())
    assert main(["--model", "mae_vit_demo_patch8", "--mask-ratio", str(mask_ratio)]
                + (["--img-size", str(img_size)] if img_size else [])) == 0
    assert main(["--model", "no_such_model"]) == 2
