"""Smoke of the fused LayerNorm benchmark, and pytest-benchmark rows:
``pytest bench/test_bench_layer_norm.py --benchmark-enable``.

On a GPU: the ViT-H/14 476 px encoder shape, eager vs fused (the Triton kernels run with
MAE_FAST_TRITON_UNVERIFIED=1 until verified). Without one: a tiny shape under the Triton interpreter, so the
file stays cheap in CI (the numbers to quote come from bench_layer_norm.py on a GPU).
"""
import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import bench_layer_norm as bln  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


@pytest.fixture(autouse=True)
def _unverified_ok(monkeypatch):
    monkeypatch.setenv("MAE_FAST_TRITON_UNVERIFIED", "1")


def test_smoke_writes_correct_rows_without_speed_claims(tmp_path):
    out = tmp_path / "ln.json"
    assert bln.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] and "correctness only" in data["meta"]["device"]
    rows = data["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in bln.OPS for impl in bln.IMPLS}
    for r in rows:
        assert "error" not in r and not any(k.endswith("_ms") or k.endswith("GBps") for k in r), r
        assert r["max_rel_err_fwd"] <= bln.SMOKE_TOLERANCE["fwd"]
        assert r["max_rel_err_grad"] <= bln.SMOKE_TOLERANCE["grad"]
        if r["impl"] == "fused":
            assert r["fwd_bytes"] < r["eager_fwd_bytes"] and r["bwd_bytes"] < r["eager_bwd_bytes"]


def test_traffic_counts():
    rows, D = 6960, 1280
    n = rows * D
    # forward: 24 -> 12 bytes per element with the residual, 14 -> 6 without; stats and params on top
    assert bln.traffic("add_layer_norm", "fwd", "eager", rows, D) == 24 * n + 8 * rows + 8 * D
    assert bln.traffic("add_layer_norm", "fwd", "fused", rows, D) == 12 * n + 8 * rows + 8 * D
    assert bln.traffic("layer_norm", "bwd", "fused", rows, D, partial_rows=10) == 10 * n + 8 * rows + 16 * D + 160 * D
    assert bln.traffic("layer_norm", "bwd", "eager", rows, D, partial_rows=10) == 18 * n + 8 * rows + 16 * D


@pytest.fixture(scope="module")
def case():
    rows, D = bln.SHAPES["ViT-H/14 476px enc"] if GPU else (2 * 9, 40)
    return bln.make_inputs(rows, D, DEVICE, torch.Generator(device=DEVICE).manual_seed(0))


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(bln.IMPLS))
@pytest.mark.parametrize("op", bln.OPS)
def test_forward(benchmark, case, op, impl):
    benchmark.group = f"{op} forward"

    def run():
        out = bln.forward(op, bln.IMPLS[impl], case)
        _sync()
        return out

    outs = benchmark(run)
    assert all(torch.isfinite(t).all() for t in outs)


@pytest.mark.parametrize("impl", list(bln.IMPLS))
@pytest.mark.parametrize("op", bln.OPS)
def test_forward_backward(benchmark, case, op, impl):
    benchmark.group = f"{op} forward+backward"

    def run():
        grads = bln.forward_backward(op, bln.IMPLS[impl], case)
        _sync()
        return grads

    grads = benchmark(run)
    assert all(torch.isfinite(g).all() for g in grads)


def test_device_time_counts_gpu_events_only():
    """The GPU-time column sums device events (kernels, memsets) per iteration and ignores host events,
    which also carry device totals (their kernels'), so counting them would double the time."""
    from types import SimpleNamespace as E

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [E(device_type=cuda, device_time=30.0), E(device_type=cpu, device_time=30.0),
              E(device_type=cuda, device_time=12.5), E(device_type=cpu, device_time=999.0), E(device_time=7.0)]
    assert bln.device_time_ms(events, iters=5) == pytest.approx((30.0 + 12.5) / 5 / 1e3)
