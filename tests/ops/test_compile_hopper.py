"""The Triton attention kernels, compiled for an H100 (sm_90) on this GPU-less machine (bench/compile_report.py).

Register spills, shared-memory overflows and unpipelined or element-wise loads are decided at compile time, so
they are checked here with the launch configs the library picks on an H100. ``compile_report.py --check`` fails
unless every kernel spills no register, stays within the SM's shared memory, puts its dots on Hopper tensor-core
instructions (wgmma) and stages its loop loads through shared memory (cp.async) as 16-byte vectors. CI compiles
the encoder's head dims at ViT-H/14's 290 tokens, dense and packed: 80 (64 + 32 columns, the last tile overlapping)
and 88 (176-byte strides, not 16-element multiples); the committed reports
(bench/results/compile-report-sm90-*) hold every MAE head dim and both sequence lengths.
"""
import json
import os
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


needs_ptxas = pytest.mark.skipif(_ptxas() is None, reason="triton's NVIDIA backend (ptxas) is not installed")


def _report_command(workdir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(workdir / "triton-cache")  # compile for real, not from an earlier run's cache
    return {"report": ([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--check", "--json",
                        str(workdir / "report.json"), "--head-dims", "80", "88", "--seqlens", "290"], env)}


@needs_ptxas
@pytest.mark.background(commands=_report_command)  # starts with the session's first test: tests/helpers/background.py
def test_launched_kernels_compile_clean_for_sm90(background):
    rc, log = background.wait("report", timeout=900)
    out = background.workdir / "report.json"
    assert out.exists(), f"compile_report failed:\n{log[-6000:]}"
    assert rc == 0, f"not clean:\n{log[-4000:]}"
    rows = json.loads(out.read_text())["rows"]
    from mae_fast.kernels import flash_attention as fa

    assert len(rows) == 2 * 2 * 4  # head dims x layouts x (fwd, delta, dkdv, dq)
    for r in rows:
        where = f"{r['kernel']} hd {r['head_dim']} packed={r['packed']} config {r['config']}"
        assert r["registers"] > 0 and r["spill_store_bytes"] == r["spill_load_bytes"] == 0, where
        assert r["narrow_loads"] == 0 and r["vector_loads"] > 0, where
        if r["kernel"] != "_bwd_delta_kernel":
            kind = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}[
                r["kernel"]]
            assert r["tiles"] == [64, 0, 32] and r["tiling"] == "split", where  # 96 columns computed, not 128
            assert r["wgmma"] > 0 and r["async_copies"] > 0, where
            picked = fa.pick_config(kind, r["head_dim"], 290, fa.torch.bfloat16, fa.torch.device("cuda"),
                                    packed=r["packed"])
            assert r["config"] == {k: picked[k] for k in r["config"]}, where  # what the launcher picks


def test_check_flags_what_is_not_fast():
    """compile_report's verdict per row, on rows shaped like its JSON: each defect alone fails the row."""
    sys.path.insert(0, str(ROOT / "bench"))
    from compile_report import load_widths, problems

    clean = dict(kernel="_attn_fwd_kernel", spill_store_bytes=0, spill_load_bytes=0, narrow_loads=0,
                 shared_bytes=100_000, async_copies=36, wgmma=24)
    assert problems(clean) == []
    for change, words in ((dict(spill_store_bytes=8), "spills"), (dict(narrow_loads=192), "not vectorised"),
                          (dict(async_copies=0), "not pipelined"), (dict(wgmma=0), "no wgmma"),
                          (dict(shared_bytes=300_000), "shared memory")):
        assert any(words in p for p in problems({**clean, **change})), change
    # the row-sum kernel has no loop and no dot: plain vector loads are right for it
    assert problems({**clean, "kernel": "_bwd_delta_kernel", "async_copies": 0, "wgmma": 0}) == []
    ptx = """
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
        @%p2 ld.global.L1::evict_last.b16 { %rs2 }, [ %rd3 + 0 ];
        ld.global.b32 { %r5 }, [ %rd4 + 0 ];
        cp.async.cg.shared.global [ %r6 + 0 ], [ %rd5 + 0 ], 0x10, %r7;
        @%p3 cp.async.ca.shared.global [ %r8 + 0 ], [ %rd6 + 0 ], 0x4, %r9;
    """
    assert load_widths(ptx) == {16: 2, 2: 2, 4: 2}
