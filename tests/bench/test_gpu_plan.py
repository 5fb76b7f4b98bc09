"""bench/gpu_plan.py: the prepared GPU run, as its --dry-run runs it on the CPU (one tiny attention shape, the demo
model), its hard phase deadlines, and filing a fetched run into bench/results."""
import importlib
import json
import time

import pytest

import gpu_plan  # noqa: E402  (bench/, on sys.path from tests/conftest.py)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    import os

    from mae_fast.ops.attention import attention_prefs

    out = tmp_path_factory.mktemp("plan")
    before = os.environ.get("MAE_FAST_ATTENTION_PREFS")
    try:
        assert gpu_plan.main(["--dry-run", "--out", str(out), "--wheelhouse", str(out / "none")]) == 0
    finally:  # the plan points auto at its own table for the rest of its process: not for the other tests
        if before is None:
            os.environ.pop("MAE_FAST_ATTENTION_PREFS", None)
        else:
            os.environ["MAE_FAST_ATTENTION_PREFS"] = before
        attention_prefs.cache_clear()
    return out


def test_dry_run_runs_every_phase_and_writes_its_files(dry):
    from mae_fast.kernels import flash_attention as fa

    record = json.loads((dry / "plan.json").read_text())
    phases = record["phases"]
    assert list(phases) == ["install", "autotune", "backends", "e2e_32", "profile"]
    tunable = hasattr(fa, "candidate_configs") and hasattr(fa, "save_tuned")
    assert phases["autotune"]["status"] == ("ok" if tunable else "skipped")
    assert (dry / "flash_attention_tuned.json").exists() == tunable
    assert all(phases[p]["status"] == "ok" for p in ("install", "backends", "e2e_32", "profile"))
    assert all(p["seconds"] <= p["limit_s"] + 1 for p in phases.values())
    assert "absent or empty" in phases["install"]["wheelhouse"]
    assert record["total_s"] < record["budget_s"]
    for name in ("plan.md", "attention.json", "attention_prefs.json", "profile.txt"):
        assert (dry / name).stat().st_size > 0
    assert "| backends | ok |" in (dry / "plan.md").read_text()


def test_dry_run_attention_rows_are_checked_and_become_the_preference_table(dry):
    from mae_fast.ops.attention import lookup_pref_row

    (row,) = json.loads((dry / "attention.json").read_text())["results"]
    assert {"triton", "sdpa:math"} <= set(row["fwd_ms"]) == set(row["checks"])
    for name, errs in row["checks"].items():  # against fp64: fp32 math is far inside the bound
        assert all(a < 1e-4 for a, _ in errs.values()), name
    prefs = json.loads((dry / "attention_prefs.json").read_text())
    entry = lookup_pref_row(prefs, "cpu", "dense", 40, 17)
    assert entry["seqlen"] == 17 and set(entry["train_ms"]) == set(row["fwd_ms"])
    assert entry["train_ms"]["triton"] == pytest.approx(row["fwd_ms"]["triton"] + row["bwd_ms"]["triton"], rel=1e-4)


def test_dry_run_e2e_rows(dry):
    record = json.loads((dry / "plan.json").read_text())
    rows = {r["impl"]: r for r in record["results"]["e2e"]["rows"]}
    assert list(rows) == [k[0] for k in gpu_plan.E2E_KINDS]
    assert rows["mae_fast+compile"]["attention"] == "sdpa" and rows["mae_fast+compile+auto_attention"]["attention"] \
        == "auto"
    assert rows["reference"]["speedup_vs_reference"] == 1.0
    for r in rows.values():
        assert r["step_ms_median"] > 0 and len(r["step_ms_all"]) >= 2 and r["first_step_s"] > 0
    log = record["phases"]["e2e_32"]["configs"]["mae_vit_demo_patch8:32"]
    assert log["loss_diff_reference"] < 1e-4 and log["fp8_linears"] == 16  # 4 blocks x qkv/proj/fc1/fc2
    assert 0 < log["loss_diff_fp8"] < 2e-3  # FP8 rounding: not the same computation, nearly the same loss


def test_a_phase_is_cut_at_its_deadline_and_a_spent_plan_skips_the_rest(tmp_path):
    plan = gpu_plan.Plan(tmp_path, budget_s=9.0, dry=True)
    plan.min_phase_s = 0.5
    t = time.monotonic()
    with plan.phase("spin", 0.8) as rec:
        while True:
            time.sleep(0.02)
    assert rec["status"] == "cut at its deadline" and time.monotonic() - t < 2
    with plan.phase("broken", 60) as rec:  # at most what is left of the plan (minus a margin)
        raise KeyError("x")
    assert rec["status"] == "failed: KeyError: 'x'" and rec["limit_s"] < 9.0 - 0.8
    plan.end = time.monotonic()
    with plan.phase("after", 60) as rec:
        assert rec is None
    saved = json.loads((tmp_path / "plan.json").read_text())["phases"]
    assert saved["after"]["status"] == "skipped" and saved["spin"]["status"] == "cut at its deadline"


def test_commit_files_a_fetched_run_and_refuses_a_dry_one(dry, tmp_path, monkeypatch):
    attn = importlib.import_module("mae_fast.ops.attention")  # the module (ops.attention is the function)
    with pytest.raises(SystemExit) as exc:
        gpu_plan.main(["--commit-to", str(tmp_path / "results"), "--from", str(dry)])
    assert exc.value.code == 2
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for f in dry.iterdir():
        fetched.joinpath(f.name).write_bytes(f.read_bytes())
    record = json.loads((fetched / "plan.json").read_text())
    record.update(dry_run=False, environment=dict(record["environment"], device="Test GPU 80GB"))
    (fetched / "plan.json").write_text(json.dumps(record))
    prefs = tmp_path / "attention_prefs.json"
    prefs.write_text(json.dumps({"sources": [], "devices": {}}))
    monkeypatch.setattr(attn, "PREFS_PATH", prefs)
    from mae_fast.kernels import flash_attention as fa

    monkeypatch.setattr(fa, "TUNED_PATH", tmp_path / "tuned.json", raising=False)
    written = gpu_plan.commit(fetched, tmp_path / "results")
    stem = f"test-gpu-80gb-{record['date'][:10]}-gpu-plan"
    assert {p.name for p in written} >= {f"{stem}.json", f"{stem}.md", f"{stem}-attention.json",
                                         f"{stem}-profile.txt", "attention_prefs.json"}
    table = json.loads(prefs.read_text())
    assert table["sources"][-1].endswith(f"{stem}-attention.json") and "cpu" in table["devices"]
