"""bench/profile_step.py: a profiled step of each implementation with its matmul time, the kernel categories, the
table, and unknown implementations refused."""
import pytest
import torch


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
    assert res["torch"] == torch.__version__ and len(res["date"]) == 10


@pytest.mark.parametrize("impls", ["mae_fast,nosuch", ","])
def test_profile_step_unknown_impls_is_a_usage_error(capsys, impls):
    import profile_step

    with pytest.raises(SystemExit) as info:
        profile_step.main(["--smoke", "--impls", impls])
    assert info.value.code == 2 and "--impls" in capsys.readouterr().err
