"""bench/memory_estimate.py and bench/memory_capacity.py: the estimate table (reference 1.00x, mae_fast less, lean
less again, the fewest checkpointed blocks within the target), validation against measured e2e JSONs, the largest
fitting batch, and bad command lines refused."""
import json
import types

import pytest
import torch

import e2e  # bench/, on sys.path from tests/conftest.py
import mae_fast


def test_memory_estimate_table_and_validation(tmp_path):
    """bench/memory_estimate.py on a small shape: the reference is 1.00x, mae_fast keeps less, lean less again,
    and the checkpointed plan (when lean is not enough) is the fewest blocks within the target. Validation
    reads an e2e JSON in either peak definition and reports the relative error."""
    import memory_estimate as me

    rows = {r["impl"]: r for r in me.table_rows([("mae_vit_demo_patch8", 64, 64)], target=0.6)}  # lean: 0.68x
    assert rows["reference"]["mem_vs_reference"] == 1.0
    assert rows["mae_fast_lean"]["peak"] < rows["mae_fast"]["peak"] < rows["reference"]["peak"]
    ck = rows["mae_fast_lean_ckpt"]
    assert ck["mem_vs_reference"] <= 0.6 and ck["checkpointed_blocks"] >= 1 and ck["recompute_flops_pct"] > 0
    fewer = me.estimate_peak("mae_fast", "mae_vit_demo_patch8", 64, 64, lean=True,
                             checkpointed=ck["checkpointed_blocks"] - 1)
    assert fewer.peak > 0.6 * rows["reference"]["peak"] * 2**30 * 0.999

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


def test_memory_capacity_is_the_largest_fitting_batch(tmp_path, monkeypatch):
    """bench/memory_capacity.py: for each model, size and plan (plain; lean; lean with every block checkpointed),
    the largest batch whose estimate fits the budget, each plan estimated with its own settings; and the plot. The
    estimate is a stand-in with estimate_mae_step's signature whose peak grows linearly with the batch (the real
    estimates are checked in the table test above and in tests/train/test_memory.py)."""
    import inspect

    import memory_capacity as mc
    from mae_fast.memory import estimate_mae_step

    with torch.device("meta"):
        demo = mae_fast.create_model("mae_vit_demo_patch8")
    blocks = len(demo.blocks) + len(demo.decoder_blocks)
    calls = set()

    def per_image(img, lean, ckpt):
        return img * img * (30 - 10 * lean) // (1 + ckpt)

    def fake_estimate(*args, **kwargs):
        bound = inspect.signature(estimate_mae_step).bind(*args, **kwargs)  # the real one's arguments, or TypeError
        bound.apply_defaults()
        a = bound.arguments
        calls.add((a["img_size"], a["lean"], a["grad_checkpointing"]))
        return types.SimpleNamespace(peak=1000 + per_image(a["img_size"], a["lean"], a["grad_checkpointing"]) * a["batch"])

    monkeypatch.setattr(mc, "estimate_mae_step", fake_estimate)
    budget = 3_000_000
    rows = mc.capacity(["mae_vit_demo_patch8"], [32, 64], budget, limit=512)
    plans = {"plain": (False, 0), "lean": (True, 0), "lean + checkpoint all blocks": (True, blocks)}
    assert calls == {(img, *p) for img in (32, 64) for p in plans.values()}
    want = {(img, name): min(512, (budget - 1000) // per_image(img, *p)) for img in (32, 64) for name, p in plans.items()}
    assert {(r["img_size"], r["plan"]): r["largest_batch"] for r in rows} == want
    assert all(r["model"] == "mae_vit_demo_patch8" for r in rows) and 0 < want[64, "plain"] < want[32, "lean"] < 512
    out = tmp_path / "cap.json"
    mc.plot(dict(budget_gib=budget / 2**30, img_sizes=[32, 64], rows=rows), out.with_suffix(".png"))
    assert out.with_suffix(".png").stat().st_size > 1000
    json.dumps(rows)


def test_memory_estimate_rejects_unknown_only_and_a_measured_json_from_another_script(tmp_path, capsys):
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
