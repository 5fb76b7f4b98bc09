"""The flash_attn_4 attention backend (flash-attn-4's CuTe-DSL kernels) without the package or a GPU: its reasons,
``auto``'s choice from the measured table, and the arguments it hands the library (a stand-in module computing
the fp32 reference records them)."""
import importlib
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_fast import ops
from mae_fast.ops import dispatch

attn = importlib.import_module("mae_fast.ops.attention")  # the module (ops.attention is the function)


@pytest.fixture
def fa4(monkeypatch):
    """The backend, reported installed; ``capability`` sets the fake GPU's compute capability."""
    backend = dispatch.backends_for("attention")["flash_attn_4"]
    monkeypatch.setattr(backend, "available", lambda: None)
    state = {"cc": (9, 0)}
    monkeypatch.setattr(attn, "_capability", lambda index: state["cc"])

    def capability(cc):
        state["cc"] = cc
    backend.capability = capability
    yield backend
    del backend.capability


def _qkv(D, dtype=torch.bfloat16, device="cuda:0", N=290):
    return tuple(torch.empty(2, N, 3, D, device=device, dtype=dtype) for _ in range(3))


def test_missing_package_is_the_reason(monkeypatch):
    monkeypatch.setattr(attn.importlib.util, "find_spec", lambda name: None)
    q = torch.randn(1, 8, 2, 32)
    reasons = ops.describe("attention", q, q, q, None, None, None)
    assert reasons["flash_attn_4"] == ["flash-attn-4 not installed"]
    assert reasons["flash_attn"] == ["flash_attn not installed"]


def test_flash_attn_4_alone_does_not_make_flash_attn_2_available(monkeypatch):
    # flash-attn-4 installs flash_attn.cute into the flash_attn namespace; FA2's API module is what FA2 needs
    monkeypatch.setattr(attn.importlib.util, "find_spec",
                        lambda name: object() if name in ("flash_attn", "flash_attn.cute") else None)
    backends = dispatch.backends_for("attention")
    assert backends["flash_attn_4"].available() is None
    assert backends["flash_attn"].available() == "flash_attn not installed"


def test_reasons_on_cpu_arch_dtype_and_head_dim(fa4):
    q = torch.randn(1, 8, 2, 80, dtype=torch.bfloat16)
    assert fa4.why_not(q, q, q, None, None, None) == [
        "needs a CUDA tensor (compute capability 9.x or 10.x: Hopper or Blackwell)"]
    with FakeTensorMode():
        assert fa4.why_not(*_qkv(80), None, None, None) == []          # ViT-H: 80 runs as 80 on sm_90
        assert fa4.why_not(*_qkv(32), None, None, None) == []          # decoder
        assert fa4.why_not(*_qkv(192), None, None, None) == []         # up to 256 on sm_90
        assert fa4.why_not(*_qkv(84), None, None, None) == ["head dim 84 unsupported (a multiple of 8 from 8 to 256 "
                                                            "on sm_9x)"]
        assert fa4.why_not(*_qkv(80, torch.float32), None, None, None) == [
            "dtype torch.float32 not supported (float16, bfloat16)"]
        fa4.capability((10, 0))
        assert fa4.why_not(*_qkv(192), None, None, None) == ["head dim 192 unsupported (a multiple of 8 from 8 to "
                                                             "128 on sm_10x)"]
        fa4.capability((8, 0))
        (why,) = fa4.why_not(*_qkv(64), None, None, None)
        assert why.startswith("compute capability 8.0 unsupported")
        with pytest.raises(ops.NoBackendError, match="flash_attn_4.*compute capability 8.0"):
            ops.select_backend("attention", "flash_attn_4", *_qkv(64), None, None, None)


def _row(seqlen, fa4_ms, sdpa_ms):
    times = {"sdpa:cudnn": sdpa_ms, "flash_attn_4": fa4_ms, "triton": 9.0}
    return {"seqlen": seqlen, "fwd_ms": dict(times), "train_ms": dict(times)}


def test_auto_picks_flash_attn_4_per_shape_from_the_measured_table(fa4, monkeypatch):
    monkeypatch.setattr(attn, "_device_name", lambda index: "Test GPU")
    # faster than cuDNN at the masked encoder's 290 tokens, slower at the decoder's 1157
    prefs = {"devices": {"Test GPU": {"dense": {"80": [_row(290, 0.5, 1.0), _row(1157, 2.0, 1.0)]}}}}
    monkeypatch.setattr(attn, "attention_prefs", lambda path=None: prefs)
    with FakeTensorMode():
        assert ops.select_backend("attention", "auto", *_qkv(80, N=290), None, None, None).name == "flash_attn_4"
        assert ops.select_backend("attention", "auto", *_qkv(80, N=1157), None, None, None).name == "sdpa"
        assert ops.select_backend("attention", "auto", *_qkv(64, N=290), None, None, None).name == "sdpa"  # unmeasured
        fa4.capability((8, 0))  # measured faster, but this GPU cannot run it: auto falls through to sdpa
        assert ops.select_backend("attention", "auto", *_qkv(80, N=290), None, None, None).name == "sdpa"


def test_calls_the_library_with_int32_offsets_and_returns_the_output(monkeypatch):
    calls = []

    def dense(q, k, v, softmax_scale=None, causal=False):
        calls.append(("dense", softmax_scale, causal))
        return attn.attention_reference(q, k, v, softmax_scale), None

    def varlen(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
               softmax_scale=None, causal=False):
        calls.append(("varlen", cu_seqlens_q.dtype, cu_seqlens_q.tolist(), max_seqlen_q, max_seqlen_k, causal))
        return attn.attention_reference(q, k, v, softmax_scale, cu_seqlens_q), None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func, cute.flash_attn_varlen_func = dense, varlen
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 7, 3, 24, generator=g, dtype=torch.float64) for _ in range(3))
    out = attn._flash_attn_4_fn(q, k, v, 0.3, None, None)
    torch.testing.assert_close(out, attn.attention_reference(q, k, v, 0.3))
    assert calls[-1] == ("dense", 0.3, False)
    qp, kp, vp = (torch.randn(9, 3, 24, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4, 9])
    out = attn._flash_attn_4_fn(qp, kp, vp, None, cu, None)
    torch.testing.assert_close(out, attn.attention_reference(qp, kp, vp, None, cu))
    assert calls[-1] == ("varlen", torch.int32, [0, 4, 9], 5, 5, False)
