"""Smoke of the end-to-end benchmark (CI runs it): every implementation gives mae_fast's loss on the same
weights and noise, and the timing harness produces a complete row for each. Numbers come from e2e.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402


def test_e2e_smoke_rows_and_same_loss(tmp_path):
    out = tmp_path / "e2e.json"
    result = e2e.run([("mae_vit_demo_patch8", 64, 2)], torch.device("cpu"), steps=2, warmup=1,
                     compile_modes=[False], out=out)
    import json

    assert json.loads(out.read_text())["rows"] == result["rows"]  # written as each configuration finishes
    rows = {r["impl"]: r for r in result["rows"]}
    assert {"mae_fast", "mae_fast_lean", "reference"} <= set(rows)
    for impl, row in rows.items():
        assert row["step_ms_median"] > 0 and row["images_per_s"] > 0 and 0 < row["mfu"]
        assert row["loss_diff_vs_mae_fast"] < 1e-4, impl
        assert len(row["step_ms_all"]) == 2 and row["saved_act_gib"] > 0
    assert rows["mae_fast"]["speedup_vs_reference"] > 0 and rows["reference"]["speedup_vs_reference"] == 1
    # mae_fast keeps less for backward (no full-size patch embedding, decoder tail or loss), lean less again
    assert 0 < rows["mae_fast_lean"]["act_vs_reference"] < rows["mae_fast"]["act_vs_reference"] < 1
    assert "| mae_vit_demo_patch8 |" in e2e.table(result)


def test_baseline_with_a_different_computation_is_refused():
    ours, ref = e2e.build_pair("mae_vit_demo_patch8", 64, torch.device("cpu"))
    with torch.no_grad():
        ref.decoder_pred.bias.add_(0.5)  # a baseline that no longer computes the same function
    with pytest.raises(RuntimeError, match="not the same computation"):
        e2e.check_same_loss({"mae_fast": ours, "reference": ref}, torch.device("cpu"))


def test_profile_step_smoke():
    import profile_step

    res = profile_step.run("mae_vit_demo_patch8", 64, 2, torch.device("cpu"), 1, ["mae_fast", "reference"])
    for impl in ("mae_fast", "reference"):
        r = res["results"][impl]
        assert r["total_ms"] > 0 and r["ms_per_step"].get("matmul", 0) > 0, r
    assert profile_step.categorize("aten::addmm") == "matmul"
    assert profile_step.categorize("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernel>") == "elementwise"
    assert profile_step.categorize("flash_fwd_kernel") == "attention"
    assert "| total |" in profile_step.table(res)
