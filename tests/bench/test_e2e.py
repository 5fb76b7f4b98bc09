"""The end-to-end benchmark (bench/e2e.py): a smoke run where every implementation gives mae_fast's loss and a
complete row; the timed step (masked-only loss, backward, one AdamW update with the trainer's betas, gradients
cleared, the clock bracketing it), interleaved rounds, each row's numbers from scripted step times (median, IQR,
images/s, MFU, memory, paired ratios), the equal-loss gate, the markdown table and the command line. Timers,
CUDA's memory counters and child processes are stubbed where numbers are checked; no timing is asserted."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import e2e  # bench/, on sys.path from tests/conftest.py
from mae_fast.models import mae_train_flops

BENCH = Path(__file__).resolve().parents[2] / "bench"
CPU = torch.device("cpu")
DEMO = ("mae_vit_demo_patch8", 32)  # 16 patches: the smallest real model


def test_e2e_smoke_rows_and_same_loss(tmp_path, monkeypatch):
    """A real run of every implementation (the matmul rate stubbed: its arithmetic is checked below)."""
    monkeypatch.setattr(e2e, "measured_matmul_flops", lambda device: 1e10)
    out = tmp_path / "e2e.json"
    result = e2e.run([("mae_vit_demo_patch8", 32, 2)], torch.device("cpu"), steps=2, warmup=1,
                     compile_modes=[False], out=out, plans={("mae_vit_demo_patch8", 32): 2})
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


def test_loss_of_every_mae_fast_row_runs_the_masked_only_training_path():
    """mae_fast's rows are timed on the training path (``masked_only=True``, decoder head on removed patches
    only), at the official 0.75 mask ratio; the full-prediction path gives the same loss, so only a spy tells."""
    calls = []

    def model(*args, **kwargs):
        calls.append((args[1:], kwargs))
        return types.SimpleNamespace(loss=torch.tensor(1.0))

    imgs, noise = torch.zeros(1), torch.zeros(1)
    for kind in ("mae_fast", "mae_fast_lean", "mae_fast_lean_ckpt"):
        e2e._loss(kind, model, imgs, noise)
    assert calls == [((0.75, noise), {"masked_only": True})] * 3


def _adamw_first_step(p, g, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, wd=1e-2):
    """AdamW's first update written out: bias-corrected moments are g and g*g."""
    m, v = (1 - beta1) * g, (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1), v / (1 - beta2)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)


def test_stepper_step_is_forward_backward_and_one_adamw_update_with_the_trainers_betas(monkeypatch):
    """One Stepper call = the loss on fresh noise, its backward, AdamW(lr 1e-4, betas (0.9, 0.95)) as
    train/pretrain.py, and the gradients cleared (else the next timed step would accumulate); it returns the
    time between two clock reads, each after a device sync, that bracket the whole step."""
    ours, _ = e2e.build_pair(*DEMO, CPU)
    before = copy.deepcopy(ours)
    st = e2e.Stepper("mae_fast", ours, 3, CPU, compile_=False)
    log, ticks = [], iter([5.0, 7.25])
    monkeypatch.setattr(e2e, "time", types.SimpleNamespace(perf_counter=lambda: log.append("clock") or next(ticks)))
    monkeypatch.setattr(e2e, "_sync", lambda device: log.append("sync"))
    real_step = st.opt.step
    monkeypatch.setattr(st.opt, "step", lambda: log.append("adamw") or real_step())
    torch.manual_seed(11)
    assert st() == 2.25
    assert log == ["sync", "clock", "adamw", "sync", "clock"]
    torch.manual_seed(11)
    noise = torch.rand(3, 16)
    loss = before(st.imgs, 0.75, noise, masked_only=True).loss
    loss.backward()
    n_trainable = 0
    for (name, p0), p1 in zip(before.named_parameters(), ours.parameters()):
        assert p1.grad is None, name
        if not p0.requires_grad:
            torch.testing.assert_close(p1, p0, rtol=0, atol=0)
            continue
        n_trainable += 1
        torch.testing.assert_close(p1, _adamw_first_step(p0.detach(), p0.grad), rtol=1e-5, atol=1e-7, msg=name)
    assert n_trainable > 10
    # the first update does not depend on the betas (bias correction): the trainer's are read off the optimizer
    group = st.opt.param_groups[0]
    assert isinstance(st.opt, torch.optim.AdamW) and (group["lr"], group["betas"]) == (1e-4, (0.9, 0.95))


class _CpuAsCuda(e2e.Stepper):
    """A Stepper that takes the CUDA branch of the memory accounting while its step runs on the CPU."""

    def __call__(self):
        dev, self.device = self.device, CPU
        try:
            return super().__call__()
        finally:
            self.device = dev


def test_peak_memory_is_the_steps_growth_plus_own_weights_and_optimizer_state(monkeypatch):
    """peak_mem_gib = (peak allocated during the step - allocated before) + own parameters (all of them, the
    frozen position tables too) + own AdamW state (two moments and a step counter per trainable tensor), in
    GiB; CUDA's counters stubbed."""
    ours, _ = e2e.build_pair(*DEMO, CPU)
    st = _CpuAsCuda("mae_fast", ours, 2, CPU, compile_=False)
    st.device = types.SimpleNamespace(type="cuda")
    resident, growth = 7_000_000, 3 * 2**20 + 12_345
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: resident)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: resident + growth)
    got = st.peak_memory_gib()
    all_params = sum(4 * p.numel() for p in ours.parameters())  # fp32
    trainable = [p for p in ours.parameters() if p.requires_grad]
    adam_state = sum(2 * 4 * p.numel() + 4 for p in trainable)  # exp_avg, exp_avg_sq, fp32 step scalar
    assert all_params > sum(4 * p.numel() for p in trainable)  # the frozen tables count as own weights
    assert got == pytest.approx((growth + all_params + adam_state) / 2**30, rel=1e-12)
    assert e2e.Stepper("mae_fast", copy.deepcopy(ours), 2, CPU, compile_=False).peak_memory_gib() is None


def test_saved_activations_count_unique_non_parameter_storages_of_the_eager_model():
    """saved_act_gib: bytes of the storages one forward keeps for backward, each storage once, the model's
    parameters left out, in GiB; counted here with a hook of its own."""
    ours, _ = e2e.build_pair(*DEMO, CPU)
    st = e2e.Stepper("mae_fast", ours, 3, CPU, compile_=False)
    st.fwd = None  # the eager model is measured, whatever the timed callable is
    params = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    sizes = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            sizes[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        e2e._loss("mae_fast", ours, st.imgs, torch.rand(3, 16))
    assert sum(sizes.values()) > 0
    assert st.saved_activation_gib() == pytest.approx(sum(sizes.values()) / 2**30, rel=1e-12)


def test_interleaved_rounds_warm_up_each_then_rotate_the_order():
    """Warm-up steps first (untimed), then ``steps`` rounds, round i starting at the i-th implementation; each
    implementation's times are its own timed calls, in order."""
    log = []

    class Fake:
        def __init__(self, name):
            self.name, self.n = name, 0

        def __call__(self):
            self.n += 1
            log.append(self.name)
            return self.n / 100

    steppers = {k: Fake(k) for k in "abc"}
    times = e2e.time_interleaved(steppers, steps=4, warmup=2)
    assert log == list("aabbcc" + "abc" + "bca" + "cab" + "abc")
    assert times == {k: [0.03, 0.04, 0.05, 0.06] for k in "abc"}


SCRIPT = {  # seconds per timed step
    "reference": [0.10, 0.12, 0.11, 0.30, 0.13],
    "mae_fast": [0.05, 0.06, 0.04, 0.10, 0.065],
    "mae_fast_lean": [0.07] * 5,
}


PEAK = {"reference": 2.0, "mae_fast": 1.5, "mae_fast_lean": 1.0}
ACT = {"reference": 0.8, "mae_fast": 0.4, "mae_fast_lean": 0.2}


class FakeStepper:
    made = []

    def __init__(self, kind, model, batch, device, compile_, compile_scope="model"):
        self.kind, self.compile_ = kind, compile_
        self.times = iter(SCRIPT[kind])
        FakeStepper.made.append((kind, compile_))

    def __call__(self):
        return next(self.times)

    def peak_memory_gib(self):
        return PEAK[self.kind]

    def saved_activation_gib(self):
        return ACT[self.kind]


@pytest.fixture
def stubbed_run(monkeypatch):
    FakeStepper.made = []
    monkeypatch.setattr(e2e, "Stepper", FakeStepper)
    monkeypatch.setattr(e2e, "measured_matmul_flops", lambda device: 2.5e11)
    return FakeStepper


def test_rows_hold_medians_iqr_throughput_mfu_and_paired_ratios(stubbed_run, tmp_path):
    """Every number of a row from scripted step times: ms median and IQR (statistics' exclusive quartiles, by
    hand), images/s = batch / median, MFU = model FLOPs of the batch at 0.75 / median / matmul rate, peak and
    saved-activation memory and their ratios, and the paired speedup's median and IQR."""
    batch = 3
    out = tmp_path / "r.json"
    res = e2e.run([(*DEMO, batch)], CPU, steps=5, warmup=0, compile_modes=[False], with_hf=False, out=out)
    rows = {r["impl"]: r for r in res["rows"]}
    assert set(rows) == set(SCRIPT) and res["matmul_flops"] == 2.5e11
    assert json.loads(out.read_text())["rows"] == res["rows"]
    model = e2e.build_pair(*DEMO, CPU)[0]
    model_flops = mae_train_flops(model, 0.75) * batch
    for kind, med, iqr in (("reference", 0.12, 0.215 - 0.105), ("mae_fast", 0.06, 0.0825 - 0.045),
                           ("mae_fast_lean", 0.07, 0.0)):
        r = rows[kind]
        assert r["step_ms_all"] == pytest.approx([1e3 * t for t in SCRIPT[kind]])
        assert r["step_ms_median"] == pytest.approx(1e3 * med)
        assert r["step_ms_iqr"] == pytest.approx(1e3 * iqr, abs=1e-9)
        assert r["images_per_s"] == pytest.approx(batch / med)
        assert r["mfu"] == pytest.approx(model_flops / med / 2.5e11)
        assert r["peak_mem_gib"] == PEAK[kind] and r["saved_act_gib"] == ACT[kind]
        assert r["mem_vs_reference"] == pytest.approx(PEAK[kind] / 2.0)
        assert r["act_vs_reference"] == pytest.approx(ACT[kind] / 0.8)
        assert r["speedup_vs_reference"] == pytest.approx(0.12 / med)
        assert r["compile"] is False and r["compile_scope"] is None and r["checkpointed_blocks"] == 0
        assert 0 <= r["loss_diff_vs_mae_fast"] < 1e-4
    # reference / mae_fast per round: 2, 2, 2.75, 3, 2 -> median 2, quartiles 2 and 2.875
    assert rows["mae_fast"]["speedup_vs_reference_paired"] == pytest.approx(2.0)
    assert rows["mae_fast"]["speedup_vs_reference_paired_iqr"] == pytest.approx([2.0, 2.875])
    assert rows["reference"]["speedup_vs_reference_paired"] == pytest.approx(1.0)


def test_compile_modes_filters_and_impls_choose_what_is_timed(stubbed_run, monkeypatch):
    """Compiled rows carry no saved-activation figure (compiled graphs save differently); --compile-only skips
    the compiled pass of other configurations; the fused-LayerNorm row is eager only; --impls times only the
    named implementations while mae_fast stays for the loss check."""
    real_build = e2e.build_models

    def with_fused(*args, **kwargs):
        models = real_build(*args, **kwargs)
        models["mae_fast_fused_ln"] = copy.deepcopy(models["mae_fast"])
        return models

    monkeypatch.setattr(e2e, "FORCED_ENV", {})
    monkeypatch.setattr(e2e, "build_models", with_fused)
    SCRIPT["mae_fast_fused_ln"], PEAK["mae_fast_fused_ln"], ACT["mae_fast_fused_ln"] = [0.05] * 5, 1.0, 0.1
    try:
        res = e2e.run([(*DEMO, 2)], CPU, 5, 0, [False, True], with_hf=False)
        got = {(r["impl"], r["compile"]): r for r in res["rows"]}
        assert set(got) == {(k, False) for k in SCRIPT} | {(k, True) for k in SCRIPT if k != "mae_fast_fused_ln"}
        assert all(r["saved_act_gib"] is None and r["compile_scope"] == "model" for (_, c), r in got.items() if c)
        assert all(r["saved_act_gib"] == ACT[k] for (k, c), r in got.items() if not c)

        res = e2e.run([(*DEMO, 2)], CPU, 5, 0, [False, True], with_hf=False, compile_only={"mae_vit_other:64"})
        assert {r["compile"] for r in res["rows"]} == {False}

        stubbed_run.made = []
        res = e2e.run([(*DEMO, 2)], CPU, 5, 0, [False], with_hf=False, impls={"reference"})
        assert [r["impl"] for r in res["rows"]] == ["reference"] and stubbed_run.made == [("reference", False)]
    finally:
        for d in (SCRIPT, PEAK, ACT):
            d.pop("mae_fast_fused_ln", None)


def test_add_ratios_pairs_rounds_with_four_steps_and_matches_compile_mode_and_skips_oom():
    """Paired ratios need four rounds (the minimum for quartiles) and pair a row with the reference of the same
    compile mode; an out-of-memory row, and ratios against an out-of-memory reference, are left out."""
    base = dict(model="m", img_size=64, batch=2, images_per_s=1.0, mfu=0.1)
    rows = [dict(base, impl="reference", compile=False, step_ms_median=10.0, step_ms_all=[10.0, 12.0, 9.0, 11.0],
                 peak_mem_gib=4.0, saved_act_gib=2.0),
            dict(base, impl="mae_fast", compile=False, step_ms_median=5.0, step_ms_all=[5.0, 4.0, 6.0, 5.5],
                 peak_mem_gib=3.0, saved_act_gib=0.5),
            dict(base, impl="reference", compile=True, step_ms_median=8.0, step_ms_all=[8.0] * 4, peak_mem_gib=1.0,
                 saved_act_gib=None),
            dict(base, impl="mae_fast", compile=True, step_ms_median=4.0, step_ms_all=[4.0, 2.0, 8.0, 4.0],
                 peak_mem_gib=0.5, saved_act_gib=None),
            dict(base, impl="mae_fast_lean", compile=False, oom=True),
            dict(base, model="n", impl="reference", compile=False, oom=True),
            dict(base, model="n", impl="mae_fast", compile=False, step_ms_median=5.0, step_ms_all=[5.0] * 4,
                 peak_mem_gib=1.0, saved_act_gib=1.0)]
    e2e.add_ratios(rows)
    eager, compiled = rows[1], rows[3]
    # eager pairs 10/5, 12/4, 9/6, 11/5.5 = 2, 3, 1.5, 2: median 2, exclusive quartiles 1.625 and 2.75
    assert eager["speedup_vs_reference_paired"] == pytest.approx(2.0)
    assert eager["speedup_vs_reference_paired_iqr"] == pytest.approx([1.625, 2.75])
    assert eager["mem_vs_reference"] == pytest.approx(0.75) and eager["act_vs_reference"] == pytest.approx(0.25)
    # compiled pairs 8/4, 8/2, 8/8, 8/4 = 2, 4, 1, 2 against the compiled reference
    assert compiled["speedup_vs_reference"] == pytest.approx(2.0)
    assert compiled["speedup_vs_reference_paired"] == pytest.approx(2.0)
    assert compiled["speedup_vs_reference_paired_iqr"] == pytest.approx([1.25, 3.5])
    assert compiled["mem_vs_reference"] == pytest.approx(0.5) and "act_vs_reference" not in compiled
    assert compiled["speedup_vs_eager_reference"] == pytest.approx(2.5) and "speedup_vs_eager_reference" not in eager
    assert rows[2]["speedup_vs_eager_reference"] == pytest.approx(1.25)  # the compiled reference against the eager one
    assert "2.50x eager reference" in e2e.table({"rows": rows})
    assert set(rows[4]) == set(base) | {"impl", "compile", "oom"}
    assert "speedup_vs_reference" not in rows[6] and "mem_vs_reference" not in rows[6]


def test_markdown_row_shows_ms_iqr_throughput_mfu_percent_memory_and_paired_ratio():
    rows = [dict(model="m", img_size=64, batch=2, impl="mae_fast", compile=False, step_ms_median=12.34,
                 step_ms_iqr=0.56, images_per_s=162.1, mfu=0.4237, peak_mem_gib=3.21, saved_act_gib=0.1234,
                 speedup_vs_reference=1.9, speedup_vs_reference_paired=1.8765, speedup_vs_reference_paired_iqr=[1.7, 2.05],
                 mem_vs_reference=0.5, act_vs_reference=0.25),
            dict(model="m", img_size=64, batch=2, impl="reference", compile=False, oom=True)]
    lines = e2e.table({"rows": rows}).splitlines()
    assert lines[2] == ("| m | 64 | 2 | False | mae_fast | 12.3 (0.6) | 162.1 | 42.4% | 3.2 | 0.123 | "
                        "1.90x (paired 1.877x, IQR 1.70-2.05) | 0.50 | 0.25 |")
    assert lines[3].startswith("| m | 64 | 2 | False | reference | OOM |")


class _Shifted(torch.nn.Module):
    """The reference with a constant added to its loss."""

    def __init__(self, ref, delta):
        super().__init__()
        self.ref, self.delta = ref, delta

    def forward(self, imgs, mask_ratio, noise):
        loss, pred, mask = self.ref(imgs, mask_ratio, noise)
        return loss + self.delta, pred, mask


def test_equal_loss_gate_allows_two_thousandths_of_the_loss_and_reports_the_difference():
    ours, ref = e2e.build_pair(*DEMO, CPU)
    g = torch.Generator().manual_seed(0)
    imgs, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g)
    with torch.no_grad():
        base = e2e._loss("mae_fast", ours, imgs, noise).item()
    allowed = 2e-3 * max(1.0, abs(base))
    diffs = e2e.check_same_loss({"mae_fast": ours, "reference": _Shifted(ref, 0.6 * allowed)}, CPU)
    assert diffs["reference"] == pytest.approx(0.6 * allowed, rel=0.05)
    with pytest.raises(RuntimeError, match="not the same computation"):
        e2e.check_same_loss({"mae_fast": ours, "reference": _Shifted(ref, 1.6 * allowed)}, CPU)


def test_an_experimental_row_with_a_wrong_loss_is_dropped_not_fatal(monkeypatch, capsys):
    monkeypatch.setattr(e2e, "measured_matmul_flops", lambda device: 1e10)
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
""" % str(BENCH)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MAE_FAST_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fused" in res.stdout


def test_load_plans_keeps_only_the_checkpointed_rows(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(dict(target=0.6, rows=[
        dict(model="a", img_size=224, impl="reference", checkpointed_blocks=0),
        dict(model="a", img_size=224, impl="mae_fast_lean", checkpointed_blocks=0),
        dict(model="a", img_size=224, impl="mae_fast_lean_ckpt", checkpointed_blocks=5),
        dict(model="b", img_size=476, impl="mae_fast_lean_ckpt", checkpointed_blocks=12),
        dict(model="c", img_size=224, impl="mae_fast", checkpointed_blocks=3)])))
    assert e2e.load_plans(path) == {("a", 224): 5, ("b", 476): 12}


class _SmallTorch:
    """torch with randn shrunk (the rate's arithmetic is checked, not the machine's speed)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def randn(*shape, device=None, dtype=None):
        return torch.randn(4, 4, dtype=dtype)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_matmul_rate_is_2n3_over_the_best_cpu_or_median_gpu_timed_run_after_three_warmups(monkeypatch, device_type):
    """The rate is 2 n^3 FLOPs over the fastest (CPU) or median (GPU) of ten timed products, after three untimed
    ones; the clock is scripted (a warm-up reads it once, a timed product twice)."""
    durations = [0.5, 0.2, 0.3, 0.4, 0.25, 0.9, 0.35, 0.45, 0.6, 0.7]
    clock = [1.0, 2.0, 3.0]  # each warm-up reads the clock once
    for d in durations:
        clock += [10.0, 10.0 + d]
    ticks = iter(clock)
    monkeypatch.setattr(e2e, "torch", _SmallTorch())
    monkeypatch.setattr(e2e, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setattr(e2e, "_sync", lambda device: None)
    rate = e2e.measured_matmul_flops(types.SimpleNamespace(type=device_type))
    if device_type == "cpu":
        assert rate == pytest.approx(2 * 2048**3 / 0.2)
    else:  # median of the ten timed runs: (0.4 + 0.45) / 2
        assert rate == pytest.approx(2 * 8192**3 / 0.425)
    assert next(ticks, None) is None


def test_image_size_and_patch_count_of_a_hugging_face_style_model():
    hf = types.SimpleNamespace(config=types.SimpleNamespace(image_size=56, patch_size=8))
    assert e2e.model_img_size(hf) == (56, 56) and e2e.model_num_patches(hf) == 49
    ours, ref = e2e.build_pair("mae_vit_demo_patch8", 40, CPU)
    assert e2e.model_img_size(ours) == (40, 40) and e2e.model_num_patches(ref) == 25


def test_result_json_carries_device_torch_version_and_date():
    res = e2e._result(torch.device("cpu"), 1.0, [])
    assert res["device"] == "cpu" and res["torch"] == torch.__version__ and len(res["date"]) == 10


def test_isolated_run_gives_each_configuration_a_child_and_merges_in_order(tmp_path, monkeypatch):
    """GPU default: one child per configuration with the caller's options (``--only`` and ``--out`` its own);
    rows merged in order, the merged JSON rewritten after each child, a child without a result skipped."""
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


@pytest.fixture
def recorded_main(monkeypatch):
    calls = {}

    def fake_run(configs, device, steps, warmup, compile_modes, **kw):
        calls["run"] = dict(configs=configs, device=device, steps=steps, warmup=warmup, compile_modes=compile_modes,
                            **kw)
        return dict(rows=[])

    def fake_isolated(configs, argv, out):
        calls["isolated"] = dict(configs=configs, argv=argv, out=out)
        return dict(rows=[])

    monkeypatch.setattr(e2e, "run", fake_run)
    monkeypatch.setattr(e2e, "run_isolated", fake_isolated)
    return calls


def test_cli_smoke_defaults_order_of_only_and_options_reach_run(recorded_main, monkeypatch):
    """--smoke runs on the CPU even where CUDA is present; --only keeps the order given; CPU defaults are 5 steps
    and 2 warm-ups; --compile times eager then compiled; --no-hf, --impls and --compile-only are passed on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    e2e.main(["--smoke", "--only", "mae_vit_small_patch16:224,mae_vit_small_patch16:112", "--compile", "--no-hf",
              "--impls", "mae_fast,reference", "--compile-only", "mae_vit_small_patch16:112"])
    assert "isolated" not in recorded_main
    got = recorded_main["run"]
    assert got["device"] == CPU and got["configs"] == [("mae_vit_small_patch16", 224, 4), ("mae_vit_small_patch16", 112, 8)]
    assert (got["steps"], got["warmup"], got["compile_modes"]) == (5, 2, [False, True])
    assert got["with_hf"] is False and got["impls"] == {"mae_fast", "reference"}
    assert got["compile_only"] == {"mae_vit_small_patch16:112"}
    e2e.main(["--smoke", "--steps", "7", "--warmup", "1"])
    got = recorded_main["run"]
    assert (got["steps"], got["warmup"], got["compile_modes"], got["with_hf"]) == (7, 1, [False], True)


def test_cli_on_a_gpu_runs_a_child_per_configuration_unless_in_process(recorded_main, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    e2e.main(["--steps", "3"])
    assert recorded_main.pop("isolated")["configs"] == e2e.GPU_CONFIGS and "run" not in recorded_main
    e2e.main(["--in-process"])
    got = recorded_main["run"]
    assert got["device"].type == "cuda" and got["configs"] == e2e.GPU_CONFIGS and (got["steps"], got["warmup"]) == (10, 3)


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
