"""ops.attention: input checks, the torch (fp32 math reference) and sdpa backends against plain formulas, and
auto's choice on CPU and for fp64 on CUDA. The Triton kernel: test_kernels_flash_attention.py."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_fast import ops


def _qkv(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))


def _packed(seqlens, H=3, D=24, dtype=torch.float64, seed=0):
    q, k, v = _qkv(sum(seqlens), H, D, dtype=dtype, seed=seed)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_attention_refuses_bad_cu_seqlens():
    q, k, v, cu = _packed([3, 4])
    with pytest.raises(ValueError, match="must start at 0"):  # rows 0-1 would be left out of every sequence
        ops.attention(q, k, v, cu_seqlens=torch.tensor([2, 5, 7], dtype=torch.int32))
    for bad in (cu.float(), cu[None], torch.tensor([0], dtype=torch.int32)):
        with pytest.raises(ValueError, match="1-D int32/int64 tensor of batch\\+1 offsets"):
            ops.attention(q, k, v, cu_seqlens=bad)
    with pytest.raises(ValueError, match="cu_seqlens on meta but q on cpu"):
        ops.attention(q, k, v, cu_seqlens=cu.to("meta"))


def test_attention_refuses_batch_and_device_mismatches():
    q, k, v = _qkv(2, 5, 3, 8)
    with pytest.raises(ValueError, match="shapes do not match"):  # a batch-1 k/v would broadcast silently
        ops.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="shapes do not match"):  # head dims differ
        ops.attention(q[..., :4], k, v)
    with pytest.raises(ValueError, match="devices differ"):
        ops.attention(q, k.to("meta"), v.to("meta"))


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_packed_attention_with_empty_sequences(backend):
    """Zero-length sequences (an image with no tokens left, a padded batch) are allowed and take no rows."""
    q, k, v, cu = _packed([3, 0, 5, 0, 1], seed=1)
    out = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=5, backend=backend)
    scale = 1 / math.sqrt(q.shape[-1])
    for a, b in ((0, 3), (3, 8), (8, 9)):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
        torch.testing.assert_close(out[a:b], torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_computes_half_precision_in_fp32(dtype):
    """The torch backend is the fp32-math reference: on half inputs its only error is the final rounding."""
    q, k, v = (t * s for t, s in zip(_qkv(2, 37, 3, 24, seed=2), (2.0, 2.0, 1.0)))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(24)
    exact = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())
    out = ops.attention(q, k, v, backend="torch")
    assert out.dtype == dtype
    rounding = (exact.to(dtype).double() - exact).abs()
    ulp = torch.finfo(dtype).eps * exact.abs() + 1e-6  # a floor for fp16's subnormals
    assert ((out.double() - exact).abs() <= rounding + ulp).all()


def test_auto_attention_on_cpu_is_sdpa_and_fp64_on_cuda_goes_to_torch(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("mae_fast.ops.attention"), "_device_name", lambda i: "Unmeasured")
    q, k, v = _qkv(2, 5, 3, 8, dtype=torch.float32)
    assert ops.select_backend("attention", "auto", q, k, v, None, None, None).name == "sdpa"
    assert ops.select_backend("attention", "auto", q.double(), k.double(), v.double(), None, None, None).name == "sdpa"
    with FakeTensorMode():
        qc = torch.empty(2, 5, 3, 8, device="cuda:0", dtype=torch.float64)
        assert ops.describe("attention", qc, qc, qc, None, None, None)["sdpa"] == [
            "float64 on CUDA goes to the torch reference"]
        assert ops.describe("attention", qc.float(), qc.float(), qc.float(), None, None, None)["sdpa"] == []
        assert ops.select_backend("attention", "auto", qc, qc, qc, None, None, None).name == "torch"


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
    q, k, v, cu = _packed([5, 1, 12, 7], 2, 16, dtype=torch.float32)
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
    pq, pk, pv, cu = _packed([3, 4], 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="shapes do not match"):  # packed: no query subsets
        ops.attention(pq[:5], pk, pv, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, heads, head_dim\)"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        ops.attention(q, q.double(), q)
    with pytest.raises(TypeError, match="not supported"):
        ops.attention(q.int(), q.int(), q.int())
    pq, pk, pv, cu = _packed([3, 4], 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="never decrease"):
        ops.attention(pq, pk, pv, cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="ends at"):
        ops.attention(pq, pk, pv, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen"):
        ops.attention(pq, pk, pv, cu_seqlens=cu, max_seqlen=2)


def test_attention_odd_argument_types_are_named():
    q, k, v, cu = _packed([4, 1, 6], 3, 32, dtype=torch.float32, seed=5)
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
