"""The Triton attention kernels, compiled for an H100 (sm_90) on this GPU-less machine (bench/compile_report.py).

Register spills, shared-memory overflows and unpipelined loads are decided at compile time, so they are
checked here with the launch configs the library uses on an H100. Split mode (``MAE_FAST_FA_SINGLE_TILE=0``):
every kernel must compile, stay within the SM's shared memory, spill no registers, use Hopper tensor-core
instructions (wgmma) for its dots, and stage its inner-loop loads through shared memory (cp.async) - including
head dims such as 88 whose tail tile and strides are not 16-element aligned. The default single tile (the mode
that passed the H100's tests) compiles, but is not yet spill-free and pipelined: a strict xfail says so.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ptxas() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


pytestmark = pytest.mark.skipif(_ptxas() is None, reason="triton's NVIDIA backend (ptxas) is not installed")


def _compile(tmp_path, *args, env_extra=None) -> list[dict]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("MAE_FAST_FA_")}
    env.update(env_extra or {})
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier run's cache
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--json", str(out), *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.exists(), f"compile_report failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(out.read_text())["rows"]


def _check(rows, expected_kernels, fast=True):
    """Every kernel compiles within the H100's shared memory with its dots on wgmma; ``fast``: also no spills and
    its inner-loop loads staged through shared memory (cp.async)."""
    from compile_report import MAX_SHARED_BYTES  # bench/ is on sys.path (conftest)

    assert len(rows) == expected_kernels
    for r in rows:
        where = f"{r['kernel']} hd {r['head_dim']} {r['dtype']} packed={r['packed']} config {r['config']}"
        assert r["registers"] > 0, where
        assert r["shared_bytes"] <= MAX_SHARED_BYTES[90], f"shared memory over the H100 limit: {where}"
        if r["kernel"] != "_bwd_delta_kernel":
            assert r["wgmma"] > 0 or not fast, f"dots not on Hopper tensor cores (wgmma): {where}"
        if fast:
            assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"register spills: {where}"
            if r["kernel"] != "_bwd_delta_kernel":
                assert r["async_copies"] > 0, f"loads not staged through shared memory (no cp.async): {where}"


SPLIT = {"MAE_FAST_FA_SINGLE_TILE": "0"}  # 80 = 64 + 32: faulted on an H100, so opt-in; compiles fast


def test_split_mode_unaligned_tail_head_dims_compile_spill_free_and_pipelined(tmp_path):
    # 40: two overlapping 32-column tiles; 88: 64 + 32 overlapping, 176-byte strides (not 16-element multiples)
    rows = _compile(tmp_path, "--head-dims", "40", "88", "--dense-only", env_extra=SPLIT)
    _check(rows, expected_kernels=2 * 4)


def test_equal_tiles_compile_spill_free_and_pipelined(tmp_path):
    # MAE_FAST_FA_EQUAL_TILES=1: 80 as three 32-column tiles (the last overlapping the middle one); 72: 144-byte
    # strides. The alternative to split mode's 64 + 32, which faulted on an H100 (bench/README, item 5).
    rows = _compile(tmp_path, "--head-dims", "72", "80", "--dense-only", env_extra={"MAE_FAST_FA_EQUAL_TILES": "1"})
    _check(rows, expected_kernels=2 * 4)


def test_default_single_tile_compiles(tmp_path):
    """The GPU-verified default (one 128 tile for 88): compiles within shared memory. Not yet fast: see below."""
    rows = _compile(tmp_path, "--head-dims", "88", "--dense-only")
    _check(rows, expected_kernels=4, fast=False)


@pytest.mark.xfail(strict=True, reason="single tile: clamped column loads are not pipelined (0 cp.async in the "
                                       "forward) and dK/dV spills; bench/README's next-GPU list, item 2")
def test_default_single_tile_is_spill_free_and_pipelined(tmp_path):
    _check(_compile(tmp_path, "--head-dims", "88", "--dense-only"), expected_kernels=4)


@pytest.mark.slow
def test_every_mae_head_dim_dense_and_packed(tmp_path):
    rows = _compile(tmp_path, "--head-dims", "32", "40", "64", "72", "80", "88", "96", "128", env_extra=SPLIT)  # bf16
    _check(rows, expected_kernels=8 * 2 * 4)
