"""The one-call GPU suite must fit its device-time budget: checked on its dry run (no GPU, nothing run)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.parametrize("suite_s", [None, 520])
def test_gpu_suite_plan_fits_its_budget(tmp_path, suite_s):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_SUITE_DRY_RUN": "1"}
    if suite_s:
        env["GPU_SUITE_S"] = str(suite_s)
    proc = subprocess.run(["bash", "bench/run_gpu_suite.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["meta"]["suite_s"] == (suite_s or 570)
    steps = {s["step"]: s for s in suite["steps"]}
    # the attention and end-to-end steps are planned first and always get time
    for name in ("install", "attention_tests", "attention_bench", "attention_bench_wrap", "e2e"):
        assert steps[name]["rc"] == "dry" and steps[name]["limit_s"] >= 20, (name, steps[name])
    # the three correctness steps run side by side; everything else in turn, and all of it within the budget
    side_by_side = ("attention_tests", "layer_norm_tests", "gpu_tests")
    planned = [s["limit_s"] for n, s in steps.items() if s["rc"] == "dry" and n not in side_by_side]
    assert sum(planned) + max(steps[n]["limit_s"] for n in side_by_side) <= suite["meta"]["suite_s"]
    assert all(s["rc"] in ("dry", "skipped") for s in steps.values())
    assert sorted(os.listdir(tmp_path)) == ["logs.tar.gz", "suite.json"]
