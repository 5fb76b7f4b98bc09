"""pytest-benchmark rows for the masked-token ops: ``pytest bench/test_bench_masking.py --benchmark-enable``.

On a GPU: ViT-L/14 at 476 px, batch 64, bf16, every backend. Without one only the torch backend runs,
on a tiny config, so the file stays cheap in CI (the numbers to quote come from bench_masking.py).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from bench_masking import OPS, ROW_OPS, call, fwd_bwd, make_case, make_inputs  # noqa: E402

GPU = torch.cuda.is_available()
BACKENDS = ["torch", "triton", "cuda"] if GPU else ["torch"]


@pytest.fixture(scope="module")
def case():
    if GPU:
        return make_case("ViT-L/14", 476, 64, torch.bfloat16, torch.device("cuda"))
    c = make_case("ViT-B/16", 32, 2, torch.float32, torch.device("cpu"))
    c.update(D_enc=64, D_dec=32)
    return c


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_forward(benchmark, case, op, backend):
    if backend == "cuda" and op not in ROW_OPS:
        pytest.skip("no CUDA kernel for this op")
    inp = make_inputs(case, op, torch.Generator(device=case["device"]).manual_seed(0))
    benchmark.group = f"{op} forward"

    def run():
        out = call(op, backend, inp)
        _sync()
        return out

    out = benchmark(run)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [o for o in OPS if o != "patchify_gather"])
def test_forward_backward(benchmark, case, op, backend):
    if backend == "cuda" and op not in ROW_OPS:
        pytest.skip("no CUDA kernel for this op")
    inp = make_inputs(case, op, torch.Generator(device=case["device"]).manual_seed(0))
    ref = call(op, "torch", inp)
    grad = torch.randn_like(ref.float()).to(ref.dtype)
    benchmark.group = f"{op} forward+backward"

    def run():
        grads = fwd_bwd(op, backend, inp, grad)
        _sync()
        return grads

    grads = benchmark(run)
    assert all(not torch.isnan(g).any() for g in grads)
