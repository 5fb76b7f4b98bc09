"""Smoke of the end-to-end benchmark (CI runs it): every implementation gives mae_fast's loss on the same
weights and noise, and the timing harness produces a complete row for each. Numbers come from e2e.py."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import e2e  # noqa: E402


def test_e2e_smoke_rows_and_same_loss(tmp_path):
    out = tmp_path / "e2e.json"
    result = e2e.run([("mae_vit_demo_patch8", 64, 2)], torch.device("cpu"), steps=2, warmup=1,
                     compile_modes=[False], out=out, plans={("mae_vit_demo_patch8", 64): 2})
    import json

    assert json.loads(out.read_text())["rows"] == result["rows"]  # written as each configuration finishes
    rows = {r["impl"]: r for r in result["rows"]}
    assert {"mae_fast", "mae_fast_lean", "mae_fast_lean_ckpt", "reference"} <= set(rows)
    assert rows["mae_fast_lean_ckpt"]["checkpointed_blocks"] == 2 and rows["mae_fast_lean"]["checkpointed_blocks"] == 0
    # checkpointed blocks keep only their inputs for backward
    assert rows["mae_fast_lean_ckpt"]["saved_act_gib"] < rows["mae_fast_lean"]["saved_act_gib"]
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
    assert res["torch"] == torch.__version__ and len(res["date"]) == 10


@pytest.mark.parametrize("impls", ["mae_fast,nosuch", ","])
def test_profile_step_unknown_impls_is_a_usage_error(capsys, impls):
    import profile_step

    with pytest.raises(SystemExit) as info:
        profile_step.main(["--smoke", "--impls", impls])
    assert info.value.code == 2 and "--impls" in capsys.readouterr().err


def test_memory_estimate_table_and_validation(tmp_path):
    """bench/memory_estimate.py on a small shape: the reference is 1.00x, mae_fast keeps less, lean less again,
    and the checkpointed plan (when lean is not enough) is the fewest blocks within the target. Validation
    reads an e2e JSON in either peak definition and reports the relative error."""
    import json

    import memory_estimate as me

    rows = {r["impl"]: r for r in me.table_rows([("mae_vit_small_patch16", 112, 256)], target=0.55)}
    assert rows["reference"]["mem_vs_reference"] == 1.0
    assert rows["mae_fast_lean"]["peak"] < rows["mae_fast"]["peak"] < rows["reference"]["peak"]
    ck = rows["mae_fast_lean_ckpt"]
    assert ck["mem_vs_reference"] <= 0.55 and ck["checkpointed_blocks"] >= 1 and ck["recompute_flops_pct"] > 0
    fewer = me.estimate_peak("mae_fast", "mae_vit_small_patch16", 112, 256, lean=True,
                             checkpointed=ck["checkpointed_blocks"] - 1)
    assert fewer.peak > 0.55 * rows["reference"]["peak"] * 2**30 * 0.999

    est = me.estimate_peak("reference", "mae_vit_demo_patch8", 64, 8)
    own = {"peak_mem_definition": e2e.PEAK_MEM_DEFINITION, "rows": [
        dict(model="mae_vit_demo_patch8", img_size=64, batch=8, impl="reference", compile=False,
             peak_mem_gib=1.1 * est.peak / 2**30)]}
    legacy = {"rows": [dict(own["rows"][0], peak_mem_gib=(est.peak + 2 * est.parameters) / 2**30, source="a"),
                       dict(own["rows"][0], impl="mae_fast", source="a"),
                       dict(own["rows"][0], impl="hf_vitmae", source="a")]}
    for data, resident, error in ((own, 0, 1 / 1.1 - 1), (legacy, 2, 0.0)):
        path = tmp_path / "measured.json"
        path.write_text(json.dumps(data))
        (v,) = me.validation_rows(path)
        assert v["other_models_resident"] == resident and abs(v["error"] - error) < 2e-3, v
    # a checkpointed row is estimated with its blocks checkpointed
    ck = me.estimate_peak("mae_fast", "mae_vit_demo_patch8", 64, 8, lean=True, checkpointed=1)
    own["rows"] = [dict(own["rows"][0], impl="mae_fast_lean_ckpt", checkpointed_blocks=1, peak_mem_gib=ck.peak / 2**30)]
    path.write_text(json.dumps(own))
    (v,) = me.validation_rows(path)
    assert v["impl"] == "mae_fast_lean_ckpt" and abs(v["error"]) < 1e-4


def test_memory_capacity_is_the_largest_fitting_batch(tmp_path):
    """bench/memory_capacity.py: each point is the largest batch whose estimate fits (one more does not), the
    savers fit more, and the plot is written."""
    import json

    import memory_capacity as mc
    from mae_fast.memory import estimate_mae_step

    budget = 40 * 2**20
    rows = mc.capacity(["mae_vit_demo_patch8"], [32, 64], budget, limit=512)
    by = {(r["img_size"], r["plan"]): r["largest_batch"] for r in rows}
    for img in (32, 64):
        plain, lean, ckpt = (by[img, p] for p in ("plain", "lean", "lean + checkpoint all blocks"))
        assert 0 < plain <= lean <= ckpt < 512
        assert estimate_mae_step("mae_vit_demo_patch8", img, plain).peak <= budget
        assert estimate_mae_step("mae_vit_demo_patch8", img, plain + 1).peak > budget
    assert by[64, "plain"] < by[32, "plain"]
    out = tmp_path / "cap.json"
    mc.plot(dict(budget_gib=budget / 2**30, img_sizes=[32, 64], rows=rows), out.with_suffix(".png"))
    assert out.with_suffix(".png").stat().st_size > 1000
    json.dumps(rows)


def test_compiled_rows_are_also_compared_with_the_eager_reference():
    base = dict(model="m", img_size=64, batch=2, peak_mem_gib=None, images_per_s=1.0, mfu=0.1)
    rows = [dict(base, impl="reference", compile=False, step_ms_median=120.0),
            dict(base, impl="mae_fast", compile=False, step_ms_median=100.0),
            dict(base, impl="reference", compile=True, step_ms_median=90.0),
            dict(base, impl="mae_fast", compile=True, step_ms_median=80.0)]
    e2e.add_ratios(rows)
    eager_fast, compiled_ref, compiled_fast = rows[1], rows[2], rows[3]
    assert eager_fast["speedup_vs_reference"] == 1.2 and "speedup_vs_eager_reference" not in eager_fast
    assert compiled_fast["speedup_vs_reference"] == 90 / 80 and compiled_fast["speedup_vs_eager_reference"] == 1.5
    assert compiled_ref["speedup_vs_eager_reference"] == 120 / 90
    assert "1.50x eager reference" in e2e.table({"rows": rows})


def test_forced_env_is_set_for_its_implementation_only_and_restored(monkeypatch):
    monkeypatch.delenv("MAE_FAST_BACKEND", raising=False)
    monkeypatch.setenv("MAE_FAST_TRITON_UNVERIFIED", "0")
    with e2e.forced_env("mae_fast_fused_ln"):
        assert os.environ["MAE_FAST_BACKEND"] == "layer_norm=triton,add_layer_norm=triton"
        assert os.environ["MAE_FAST_TRITON_UNVERIFIED"] == "1"
    assert "MAE_FAST_BACKEND" not in os.environ and os.environ["MAE_FAST_TRITON_UNVERIFIED"] == "0"
    with e2e.forced_env("mae_fast"):
        assert "MAE_FAST_BACKEND" not in os.environ
    assert "mae_fast_fused_ln" not in e2e.build_models("mae_vit_demo_patch8", 64, torch.device("cpu"), with_hf=False)


def test_fused_ln_implementation_runs_the_triton_layer_norm_with_mae_fasts_loss():
    """The wiring of the GPU-only row, checked on the CPU through the Triton interpreter (in a fresh process, so
    the interpreter is on before triton is imported): its forward really dispatches to the fused kernels and
    gives mae_fast's loss."""
    import subprocess

    code = """
import sys, torch
sys.path.insert(0, %r)
import e2e
from torch.utils._python_dispatch import TorchDispatchMode

class Ops(TorchDispatchMode):
    names = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))

ours, _ = e2e.build_pair("mae_vit_demo_patch8", 32, torch.device("cpu"))
g = torch.Generator().manual_seed(3)
imgs, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, ours.num_patches, generator=g)
with torch.no_grad():
    plain = e2e._loss("mae_fast", ours, imgs, noise)
    seen = Ops()
    with seen:
        fused = e2e._loss("mae_fast_fused_ln", ours, imgs, noise)
assert any("add_layer_norm_fwd" in n for n in seen.names), sorted(set(seen.names))
torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
print("fused", fused.item(), "plain", plain.item())
""" % os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MAE_FAST_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fused" in res.stdout


def test_an_experimental_row_with_a_wrong_loss_is_dropped_not_fatal(monkeypatch, capsys):
    real_build = e2e.build_models

    def with_a_broken_row(*args, **kwargs):
        models = real_build(*args, **kwargs)
        broken = copy.deepcopy(models["mae_fast"])
        with torch.no_grad():
            broken.decoder_pred.bias.add_(0.5)
        models["mae_fast_fused_ln"] = broken  # an experimental row that computes something else
        return models

    monkeypatch.setattr(e2e, "build_models", with_a_broken_row)
    result = e2e.run([("mae_vit_demo_patch8", 32, 2)], torch.device("cpu"), steps=1, warmup=0, compile_modes=[False],
                     with_hf=False)
    impls = {r["impl"] for r in result["rows"]}
    assert "mae_fast_fused_ln" not in impls and {"mae_fast", "reference"} <= impls
    assert "mae_fast_fused_ln dropped" in capsys.readouterr().out


def test_isolated_run_gives_each_configuration_a_child_and_merges_in_order(tmp_path, monkeypatch):
    """GPU default: one child per configuration with the caller's options (``--only`` and ``--out`` its own);
    rows merged in order, the merged JSON rewritten after each child, a child without a result skipped."""
    import json
    import subprocess

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        only, out = cmd[cmd.index("--only") + 1], cmd[cmd.index("--out") + 1]
        name, px = only.split(":")
        if px != "999":  # the third configuration's child dies before writing
            rows = [dict(model=name, img_size=int(px), batch=2, impl=impl, compile=False, step_ms_median=ms,
                         step_ms_all=[ms] * 4, peak_mem_gib=1.0, saved_act_gib=0.5) for impl, ms in (("mae_fast", 5.0), ("reference", 10.0))]
            Path(out).write_text(json.dumps(dict(device="fake", matmul_flops=1.0, rows=rows)))
        return subprocess.CompletedProcess(cmd, 0 if px != "999" else 1)

    from pathlib import Path

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "merged.json"
    configs = [("m_a", 112, 2), ("m_b", 224, 2), ("m_c", 999, 2)]
    result = e2e.run_isolated(configs, ["--steps", "3", "--only", "x:1", "--out=old.json", "--compile"], str(out))
    assert len(calls) == 3
    for cmd, (name, px, _) in zip(calls, configs):
        assert "--in-process" in cmd and "--compile" in cmd and cmd[cmd.index("--steps") + 1] == "3"
        assert cmd.count("--only") == 1 and cmd[cmd.index("--only") + 1] == f"{name}:{px}"
        assert cmd.count("--out") == 1 and "--out=old.json" not in cmd and "x:1" not in cmd
    assert [(r["model"], r["impl"]) for r in result["rows"]] == [
        ("m_a", "mae_fast"), ("m_a", "reference"), ("m_b", "mae_fast"), ("m_b", "reference")]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert all(r["speedup_vs_reference"] == (2.0 if r["impl"] == "mae_fast" else 1.0) for r in result["rows"])
    assert e2e._drop_option(["--a", "1", "--out", "f", "--out=g", "--b"], "--out") == ["--a", "1", "--b"]


@pytest.mark.parametrize("args, fragment", [
    (["--only", "mae_vit_nosuch_patch16:224"], "--only mae_vit_nosuch_patch16:224: not in the cpu table"),
    (["--only", "mae_vit_small_patch16"], "--only mae_vit_small_patch16: not in the cpu table"),
    (["--only", "mae_vit_small_patch16:112,mae_vit_small_patch16:999"], "--only mae_vit_small_patch16:999: not in"),
    (["--impls", "mae_fast,nosuch"], "--impls nosuch: unknown"),
])
def test_cli_rejects_what_would_run_nothing(args, fragment, capsys):
    """An --only entry or --impls name that matches nothing is an argparse error (exit 2), not an empty table."""
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--smoke", *args])
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_cli_plans_missing_or_from_another_script_is_an_argparse_error(tmp_path, capsys):
    import json

    other = tmp_path / "e2e.json"  # an e2e.py result, not a memory_estimate.py one
    other.write_text(json.dumps(dict(device="cpu", rows=[dict(model="m", img_size=64, impl="mae_fast_lean_ckpt",
                                                             checkpointed_blocks=1)])))
    for path, fragment in ((tmp_path / "missing.json", "No such file"), (other, "not a memory_estimate.py JSON")):
        with pytest.raises(SystemExit) as exc:
            e2e.main(["--smoke", "--plans", str(path)])
        assert exc.value.code == 2
        assert f"--plans {path}: " in (err := capsys.readouterr().err) and fragment in err
    good = tmp_path / "plans.json"
    good.write_text(json.dumps(dict(target=0.7, rows=[dict(model="m", img_size=64, impl="mae_fast_lean_ckpt",
                                                           checkpointed_blocks=1)])))
    assert e2e.load_plans(good) == {("m", 64): 1}


def test_result_json_carries_device_torch_version_and_date():
    res = e2e._result(torch.device("cpu"), 1.0, [])
    assert res["device"] == "cpu" and res["torch"] == torch.__version__ and len(res["date"]) == 10


def test_run_all_unknown_suite_is_an_argparse_error(tmp_path, capsys):
    """run_all.py --only with a suite it does not have ran nothing and exited 0; now exit 2."""
    import run_all

    with pytest.raises(SystemExit) as exc:
        run_all.main(["--smoke", "--only", "e2e,nosuch", "--out-dir", str(tmp_path)])
    assert exc.value.code == 2 and "--only nosuch: unknown suite" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_memory_estimate_rejects_unknown_only_and_a_measured_json_from_another_script(tmp_path, capsys):
    import json

    import memory_estimate as me

    with pytest.raises(SystemExit) as exc:
        me.main(["--only", "mae_vit_huge_patch14:475", "--measured", ""])
    assert exc.value.code == 2 and "--only mae_vit_huge_patch14:475: not in the table" in capsys.readouterr().err
    other = tmp_path / "plans.json"  # memory_estimate.py's own output, not an e2e.py measurement
    other.write_text(json.dumps(dict(target=0.7, rows=[dict(model="m", img_size=64, impl="reference")])))
    for content in (None, "[1, 2]"):
        if content:
            other.write_text(content)
        with pytest.raises(SystemExit) as exc:
            me.main(["--only", "mae_vit_huge_patch14:476", "--measured", str(other)])
        assert exc.value.code == 2
        assert f"--measured {other}: not a bench/e2e.py JSON" in capsys.readouterr().err
