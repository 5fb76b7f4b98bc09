"""Bounds-check the Triton kernels under the CPU interpreter (tests/triton_memcheck.py).

The interpreter reads raw host memory, so out-of-bounds pointers normally go unnoticed on CPU. Here every
masked-in load/store of the attention, masking and LayerNorm kernels must stay inside its argument's own view, with
the CPU test configs and with the exact launch configs used on CUDA (``pick_config(..., cuda)``), and the
outputs must match an fp64 reference (NaN-poisoned buffers, so unwritten elements fail).
"""
import sys
from pathlib import Path

import pytest
import torch

from mae_fast.ops import platform

if not platform.interpreter():
    pytest.skip("the memory checker hooks the Triton CPU interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_memcheck import OutOfBoundsAccess, triton_memcheck  # noqa: E402

from mae_fast.kernels import flash_attention as fa  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
ATTN_KERNELS = {"_attn_fwd_kernel", "_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


# ---- the checker itself must be able to fail ------------------------------------------------------

@triton.jit
def _copy_kernel(X, Y, n, MASK_EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n + MASK_EXTRA, other=0.0)  # MASK_EXTRA=1: off-by-one read
    tl.store(Y + offs, x, mask=offs < n)


@triton.jit
def _copy_store_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, x, mask=offs <= n)  # off-by-one write


@triton.jit
def _scalar_load_kernel(X, Y, idx):
    tl.store(Y, tl.load(X + idx))  # unmasked scalar load


def test_checker_passes_a_correct_kernel():
    x = torch.randn(37)
    y = torch.full((37,), float("nan"))
    with triton_memcheck(span=True) as stats:
        _copy_kernel[(3,)](x, y, 37, MASK_EXTRA=0, BLOCK=16)
    assert torch.equal(x, y)
    assert stats.kernels == {"_copy_kernel": 1} and stats.elements_checked == 2 * 37


def test_checker_catches_off_by_one_load():
    x, y = torch.randn(37), torch.empty(37)
    with pytest.raises(OutOfBoundsAccess, match=r"_copy_kernel: out-of-bounds load .* program \(2, 0, 0\).*"
                                                r"byte offset 148 \(\+37\.0 elements\) from argument 'X'"):
        with triton_memcheck():
            _copy_kernel[(3,)](x, y, 37, MASK_EXTRA=1, BLOCK=16)


def test_checker_catches_off_by_one_store_and_unmasked_load():
    x, y = torch.randn(37), torch.empty(37)
    with pytest.raises(OutOfBoundsAccess, match="_copy_store_kernel: out-of-bounds store .* argument 'Y'"):
        with triton_memcheck():
            _copy_store_kernel[(3,)](x, y, 37, BLOCK=16)
    with triton_memcheck():
        _scalar_load_kernel[(1,)](x, y, 36)
    with pytest.raises(OutOfBoundsAccess, match="_scalar_load_kernel: out-of-bounds load .*offset -4 \\(-1\\.0 elements\\)"):
        with triton_memcheck():
            _scalar_load_kernel[(1,)](x, y, -1)


def test_span_mode_catches_reads_past_a_view_within_its_storage():
    whole = torch.randn(2, 37)
    x, y = whole[0], torch.empty(37)  # x's storage continues into whole[1]
    with triton_memcheck():  # storage mode: inside the storage, allowed
        _copy_kernel[(3,)](x, y, 37, MASK_EXTRA=1, BLOCK=16)
    with pytest.raises(OutOfBoundsAccess, match="argument 'X'"):
        with triton_memcheck(span=True):
            _copy_kernel[(3,)](x, y, 37, MASK_EXTRA=1, BLOCK=16)


@triton.jit
def _clamped_copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + tl.minimum(offs, n - 1), mask=offs < n, other=0.0)  # masked-out lanes point in bounds
    tl.store(Y + offs, x, mask=offs < n)


def test_masked_out_loads_mode_wants_addresses_in_bounds_at_every_lane():
    x, y = torch.randn(37), torch.empty(37)
    with pytest.raises(OutOfBoundsAccess, match=r"_copy_kernel: out-of-bounds load \(any lane\) of 11 element"):
        with triton_memcheck(masked_out_loads=True):  # correct mask, but the tail lanes point past X
            _copy_kernel[(3,)](x, y, 37, MASK_EXTRA=0, BLOCK=16)
    y.fill_(float("nan"))
    with triton_memcheck(span=True, masked_out_loads=True):
        _clamped_copy_kernel[(3,)](x, y, 37, BLOCK=16)
    assert torch.equal(x, y)


def test_checker_restores_the_interpreter():
    from triton.runtime import interpreter as interp

    before = interp.InterpreterBuilder.create_masked_load
    with triton_memcheck():
        assert interp.InterpreterBuilder.create_masked_load is not before
    assert interp.InterpreterBuilder.create_masked_load is before
    x, y = torch.randn(37), torch.empty(37)
    _copy_kernel[(3,)](x, y, 37, MASK_EXTRA=1, BLOCK=16)  # unchecked again (reads one element past x)


# ---- attention kernels ----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _poison_outputs(poison_flash_attention_outputs):
    """NaN-filled output buffers (conftest), so unwritten elements fail the comparisons."""


def _configs(head_dim, max_seqlen, dtype, device, tiling):
    return {kind: fa.pick_config(kind, head_dim, max_seqlen, dtype, device, tiling)
            for kind in ("fwd", "delta", "dkdv", "dq")}


def _inputs(head_dim, lengths, batch, heads, dtype, packed):
    """q, k, v (non-contiguous views of one qkv projection when dense), cu_seqlens or None, max_seqlen."""
    gen = torch.Generator().manual_seed(head_dim * 1000 + sum(lengths) + batch)
    if packed:
        total = sum(lengths)
        qkv = torch.randn(total, 3, heads, head_dim, generator=gen).to(dtype)
        q, k, v = qkv.unbind(1)
        cu = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
        return q, k, v, cu, max(lengths)
    (seqlen,) = lengths
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv.unbind(2)
    return q, k, v, None, seqlen


def _reference(q, k, v, do, dlse, cu, dtype):
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = fa.attention_reference_lse(*ins, None, cu)
    loss = (out * do.to(dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.to(dtype)).sum()
    loss.backward()
    return [out.detach(), lse.detach()] + [t.grad for t in ins]


def _check_attention(head_dim, lengths, batch, heads, dtype, packed, device_configs, with_dlse=False,
                     tiling=None):
    q, k, v, cu, max_seqlen = _inputs(head_dim, lengths, batch, heads, dtype, packed)
    assert not q.is_contiguous()
    cfg = _configs(head_dim, max_seqlen, dtype, device_configs, tiling)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(q.shape, generator=gen).to(dtype)
    lse_shape = (heads, q.shape[0]) if packed else (batch, heads, max_seqlen)
    dlse = torch.randn(lse_shape, generator=gen) if with_dlse else None
    with triton_memcheck(span=True) as stats:
        out, lse = fa.flash_attn_forward(q, k, v, None, cu, max_seqlen, config=cfg["fwd"], tiling=tiling)
        dq, dk, dv = fa.flash_attn_backward(do, q, k, v, out, lse, None, cu, max_seqlen, dlse=dlse, configs=cfg,
                                            tiling=tiling)
    assert set(stats.kernels) == ATTN_KERNELS, stats.kernels
    assert stats.elements_checked > 0

    ref = _reference(q, k, v, do, dlse, cu, torch.float64)
    low = _reference(q, k, v, do, dlse, cu, dtype)  # PyTorch doing the same math in the input dtype
    for name, t, lo, r, mult in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), low, ref,
                                    (2, 2, 3, 3, 3)):
        assert t.shape == r.shape, name
        assert torch.isfinite(t).all(), f"{name}: non-finite values (unwritten or overflow)"
        # floor in ulps at unit scale (inputs are N(0,1)): fp32 gets more, since the kernel's exp2 of scores up
        # to ~30 in magnitude loses ~|x| ulps, which torch's fp32 error (sometimes ~0, e.g. one key) can't cover
        ulps = 32 if t.dtype == torch.float32 else 4
        floor = ulps * torch.finfo(t.dtype).eps * max(r.abs().max().item(), 1.0)
        err = (t.double() - r).abs().max().item()
        err_torch = (lo.double() - r).abs().max().item()
        assert err <= mult * err_torch + floor, f"{name}: triton err {err:.3g} > {mult}x torch err {err_torch:.3g}"


# (head_dim, lengths, batch, heads, dtype, packed): every head-dim tiling (D1 = 0, 32 with 8/16/24/32 used),
# sequence tails against every block size, an empty sequence and a length-1 one when packed.
DENSE_CASES = [
    (32, (17,), 2, 2, BF16), (40, (67,), 2, 2, BF16), (64, (1,), 2, 2, FP32), (80, (130,), 1, 2, BF16),
    (88, (17,), 2, 2, FP32), (96, (67,), 2, 2, BF16), (128, (67,), 1, 2, BF16), (128, (197,), 1, 1, BF16),
    (64, (197,), 1, 1, BF16),
]
PACKED_CASES = [
    (40, (17, 0, 67, 1), 4, 2, BF16), (96, (130, 0, 5), 3, 2, BF16), (128, (1, 67, 0), 3, 2, FP32),
]


@pytest.mark.parametrize("device_configs", [CPU, CUDA], ids=["cpu_configs", "cuda_configs"])
@pytest.mark.parametrize("head_dim,lengths,batch,heads,dtype", DENSE_CASES,
                         ids=[f"d{c[0]}-n{c[1][0]}-{str(c[4])[6:]}" for c in DENSE_CASES])
def test_attention_in_bounds_dense(head_dim, lengths, batch, heads, dtype, device_configs):
    _check_attention(head_dim, lengths, batch, heads, dtype, False, device_configs)


@pytest.mark.parametrize("device_configs", [CPU, CUDA], ids=["cpu_configs", "cuda_configs"])
@pytest.mark.parametrize("head_dim,lengths,batch,heads,dtype", PACKED_CASES,
                         ids=[f"d{c[0]}-{'_'.join(map(str, c[1]))}-{str(c[4])[6:]}" for c in PACKED_CASES])
def test_attention_in_bounds_packed(head_dim, lengths, batch, heads, dtype, device_configs):
    _check_attention(head_dim, lengths, batch, heads, dtype, True, device_configs, with_dlse=True)


def test_single_tile_in_bounds(device_configs=CUDA):
    """tiling="single" (head dim in one power-of-two tile, columns past it clamped and zeroed): every masked-in
    access in bounds with the CUDA launch configs, same results. (The default, split, is the cases above.)"""
    assert fa.head_dim_tiles(40, "single") == (64, 0, 0) and fa.head_dim_tiles(96, "single") == (128, 0, 0)
    _check_attention(40, (17, 0, 67, 1), 4, 2, BF16, True, device_configs, with_dlse=True, tiling="single")
    _check_attention(96, (67,), 2, 2, FP32, False, device_configs, tiling="single")


@pytest.mark.parametrize("device_configs", [CPU, CUDA], ids=["cpu_configs", "cuda_configs"])
def test_wrapped_tail_columns(device_configs):
    """tiling="wrap" (single tile; columns past the head dim read real columns further left, zeroed only in the
    operands loaded once per program): in bounds and as accurate."""
    _check_attention(40, (17, 0, 67, 1), 4, 2, BF16, True, device_configs, with_dlse=True, tiling="wrap")
    _check_attention(80, (130,), 1, 2, BF16, False, device_configs, tiling="wrap")
    _check_attention(72, (33,), 2, 2, FP32, False, device_configs, tiling="wrap")


@pytest.mark.parametrize("device_configs", [CPU, CUDA], ids=["cpu_configs", "cuda_configs"])
def test_equal_tiles_in_bounds(device_configs):
    """tiling="equal" (32-column tiles: 80 as 32 + 32 + a last 32 overlapping the middle one): every access in
    bounds with the launch configs, same accuracy."""
    assert fa.head_dim_tiles(80, "equal") == (32, 32, 32)
    _check_attention(88, (17, 0, 67, 1), 4, 2, BF16, True, device_configs, with_dlse=True, tiling="equal")
    _check_attention(80, (130,), 1, 2, BF16, False, device_configs, tiling="equal")
    _check_attention(72, (33,), 2, 2, FP32, False, device_configs, tiling="equal")


def test_cases_cover_every_picked_cuda_config():
    """The fast cases above launch every distinct CUDA config the launcher picks for a head-dim class at MAE
    sequence lengths (224 px and 476 px encoder and decoder), bf16 and fp32, at least once."""
    wanted, covered = set(), set()
    for head_dim in (32, 40, 64, 80, 128):
        for seqlen in (65, 197, 290, 1157):
            for dtype in (BF16, FP32):
                for kind in ("fwd", "dkdv", "dq"):
                    wanted.add((kind, str(fa.pick_config(kind, head_dim, seqlen, dtype, CUDA))))
    for head_dim, lengths, _, _, dtype in DENSE_CASES + PACKED_CASES:
        for kind in ("fwd", "dkdv", "dq"):
            covered.add((kind, str(fa.pick_config(kind, head_dim, max(lengths), dtype, CUDA))))
    assert wanted <= covered, sorted(wanted - covered)


# The launch configs a GPU runs (the CPU ones only ever run in this interpreter; the cases above cover them), at
# every MAE head dim: 67 rows (a full 64-row block and a partial one, a partial 128-row block; packed: with an
# empty and a one-row sequence). The dtype alternates: fp32 halves the blocks (both configs are covered above).
SWEEP = [(d, 67, BF16 if i % 2 else FP32) for i, d in enumerate((32, 40, 64, 80, 88, 96, 128))]


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,seqlen,dtype", SWEEP)
def test_attention_in_bounds_sweep(head_dim, seqlen, dtype):
    if (head_dim, (seqlen,), 2, 2, dtype) not in DENSE_CASES:  # else test_attention_in_bounds_dense ran this call
        _check_attention(head_dim, (seqlen,), 2, 2, dtype, False, CUDA)
    _check_attention(head_dim, (seqlen, 0, max(1, seqlen // 3), 1), 4, 2, dtype, True, CUDA, with_dlse=True)


# The head dims a model may use besides those above, in the default tiling.
@pytest.mark.slow
@pytest.mark.parametrize("head_dim,dtype", [(48, FP32), (72, BF16), (104, FP32)])
def test_single_tile_sweep(head_dim, dtype):
    _check_attention(head_dim, (67,), 2, 2, dtype, False, CUDA)
    _check_attention(head_dim, (67, 0, 22, 1), 4, 2, dtype, True, CUDA, with_dlse=True)


# ---- masking kernels ------------------------------------------------------------------------------

def test_masking_kernels_in_bounds():
    """All masking kernels, forward and backward, including out-of-range ids (which must give NaN rows
    without reading out of bounds) and the masked-row-sum gradient of the mask token."""
    from mae_fast.ops.masking import gather_visible, masked_patch_mse, patchify_gather, unshuffle_with_mask_token

    gen = torch.Generator().manual_seed(3)
    B, L, K, D, p = 2, 12, 5, 40, 4
    x = torch.randn(B, L, D, generator=gen).requires_grad_(True)
    pos = torch.randn(1, L, D, generator=gen)
    ids_shuffle = torch.stack([torch.randperm(L, generator=gen) for _ in range(B)])
    ids_keep, ids_restore = ids_shuffle[:, :K], ids_shuffle.argsort(1)
    x_vis = torch.randn(B, 1 + K, D, generator=gen).requires_grad_(True)
    token = torch.randn(1, 1, D, generator=gen).requires_grad_(True)
    dec_pos = torch.randn(1, 1 + L, D, generator=gen)
    imgs = torch.randn(B, 3, 3 * p, 4 * p, generator=gen)
    pred = torch.randn(B, L, p * p * 3, generator=gen).requires_grad_(True)
    mask = torch.zeros(B, L)
    mask.scatter_(1, ids_shuffle[:, K:], 1.0)

    def run(backend):
        outs = [gather_visible(x, ids_keep, pos, backend=backend),
                unshuffle_with_mask_token(x_vis, ids_restore, token, dec_pos, backend=backend),
                patchify_gather(imgs, ids_keep, p, backend=backend),
                masked_patch_mse(pred, imgs, mask, p, backend=backend)]
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(loss, (x, x_vis, token, pred))
        return [o.detach() for o in outs] + list(grads)

    with triton_memcheck(span=True) as stats:
        got = run("triton")
        bad_ids = ids_keep.clone()
        bad_ids[0, 0], bad_ids[1, -1] = -1, L + 5  # out of range: NaN rows, never an out-of-bounds read
        bad_rows = gather_visible(x.detach(), bad_ids, pos, backend="triton", check_ids=False)
        bad_patches = patchify_gather(imgs, bad_ids, p, backend="triton", check_ids=False)
    assert set(stats.kernels) >= {"gather_or_fill_rows_kernel", "masked_row_sum_kernel", "patchify_gather_kernel",
                                  "masked_patch_mse_fwd_kernel", "masked_patch_mse_bwd_kernel"}, stats.kernels
    for g, r in zip(got, run("torch")):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    for t in (bad_rows, bad_patches):
        assert torch.isnan(t[0, 0]).all() and torch.isnan(t[1, -1]).all()
        assert torch.isfinite(t[0, 1:]).all()


# ---- fused add + LayerNorm kernels ----------------------------------------------------------------

def test_layer_norm_kernels_in_bounds():
    """Forward and backward with rows that are not a multiple of the row block, a width that is not a power of two,
    an x view with uneven row strides and several partial dweight rows. An off-by-one row mask writes past y, mean
    and rstd while every in-bounds value stays right, which only a bounds check (or luck, a crash) shows."""
    import torch.nn.functional as F

    from mae_fast.kernels import layer_norm as k

    gen = torch.Generator().manual_seed(4)
    B, N, D, eps = 3, 7, 99, 1e-6  # 3 x 5 = 15 rows: blocks of 16 (forward) and 8 (backward) both end part full
    full = torch.randn(B, N, D, generator=gen) * 1.5 + 0.3
    x = full[:, 2:]
    branch = torch.randn(B, N - 2, D, generator=gen).to(BF16)
    w, b = 1 + 0.5 * torch.randn(D, generator=gen), 0.3 * torch.randn(D, generator=gen)
    dy, d_mid = torch.randn(B, N - 2, D, generator=gen).to(BF16), torch.randn(B, N - 2, D, generator=gen)
    with triton_memcheck(span=True) as stats:
        y, x_mid, mean, rstd = k.add_layer_norm_forward(x, branch, w, b, eps, BF16)
        dx, dbranch, dw, db = k.add_layer_norm_backward(dy, x_mid, mean, rstd, w, b, d_x_mid=d_mid,
                                                        branch_dtype=BF16, programs=3)
    assert set(stats.kernels) >= {"_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel"}, stats.kernels
    xr = (x + branch.float()).double().requires_grad_(True)
    wr, br = w.double().requires_grad_(True), b.double().requires_grad_(True)
    yr = F.layer_norm(xr, (D,), wr, br, eps)
    gx, gw, gb = torch.autograd.grad(yr, (xr, wr, br), dy.double())
    torch.testing.assert_close(x_mid, x + branch.float(), rtol=0, atol=0)
    torch.testing.assert_close(y.double(), yr.detach(), rtol=1e-2, atol=1e-2)  # bf16 output
    torch.testing.assert_close(dx.double(), gx + d_mid.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbranch.double(), gx + d_mid.double(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dw.double(), gw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), gb, rtol=1e-4, atol=1e-4)
