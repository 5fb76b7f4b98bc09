"""Bookkeeping of the benchmark harness (bench/e2e.py, bench/run_all.py), from a mutation audit.

The existing smoke tests check that a row exists and its numbers are positive; these check that the numbers are
the right ones: the training step each implementation is timed on (forward on the masked-only path, backward,
one AdamW update, gradients cleared), the order of the interleaved rounds, the median / IQR / images/s / MFU
arithmetic, the paired ratios against the reference, peak-memory and saved-activation accounting, the matmul
rate, the equal-loss gate's tolerance, the markdown table, the command line's choices and run_all's summary.
Timers, steppers, CUDA's memory counters and child processes are stubbed; every expectation is computed by hand
or by a few lines written here. No timing is asserted.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import e2e  # noqa: E402
import run_all  # noqa: E402
from mae_fast.models import mae_train_flops  # noqa: E402

CPU = torch.device("cpu")
DEMO = ("mae_vit_demo_patch8", 32)  # 16 patches: the smallest real model


# ---------------------------------------------------------------------------------------------------------------
# the timed step
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# rows, ratios, table
# ---------------------------------------------------------------------------------------------------------------

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
    assert compiled["speedup_vs_eager_reference"] == pytest.approx(2.5)
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


# ---------------------------------------------------------------------------------------------------------------
# equal-loss gate, plans, matmul rate, helpers
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# run_all.py
# ---------------------------------------------------------------------------------------------------------------

def _fake_suites(monkeypatch, fail=("attention",)):
    cmds = {}

    def fake_run(cmd, **kwargs):
        name = {"bench_masking.py": "masking", "bench_attention.py": "attention", "e2e.py": "e2e"}[
            os.path.basename(cmd[1])]
        cmds[name] = cmd
        out = cmd[cmd.index("--out") + 1]
        if name == "e2e":
            row = dict(model="m", img_size=64, batch=2, impl="mae_fast", compile=False, step_ms_median=10.0,
                       images_per_s=200.0, mfu=0.25, peak_mem_gib=None)
            data = dict(rows=[row])
        else:
            data = dict(markdown=f"{name.upper()} TABLE")
        with open(out, "w") as fh:  # a failing suite may still leave a part behind
            json.dump(data, fh)
        return types.SimpleNamespace(returncode=1 if name in fail else 0)

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    return cmds


def test_run_all_smoke_runs_each_suite_without_compile_and_summarises_failures(tmp_path, monkeypatch):
    """--smoke passes --smoke to every suite and drops e2e's --compile; a suite that exits non-zero is a failure
    even if it wrote a part; the JSON and markdown hold what succeeded, the failures listed, exit code 1."""
    cmds = _fake_suites(monkeypatch)
    assert run_all.main(["--smoke", "--out-dir", str(tmp_path)]) == 1
    assert set(cmds) == {"masking", "attention", "e2e"}
    assert all("--smoke" in c for c in cmds.values()) and "--compile" not in cmds["e2e"]
    (summary_path,) = [p for p in tmp_path.glob("*.json") if p.stem.count("-") == 3]  # cpu-YYYY-MM-DD.json
    summary = json.loads(summary_path.read_text())
    assert set(summary["results"]) == {"masking", "e2e"} and summary["failures"] == {"attention": "exit code 1"}
    assert summary["smoke"] is True
    md = summary_path.with_suffix(".md").read_text()
    assert "| m | 64 | 2 | False | mae_fast | 10.0 | 200.0 | 25.0% |" in md and "MASKING TABLE" in md
    assert "ATTENTION TABLE" not in md and "## Failed suites" in md and "- attention: exit code 1" in md


def test_run_all_full_keeps_compile_and_only_selects_suites(tmp_path, monkeypatch):
    cmds = _fake_suites(monkeypatch, fail=())
    assert run_all.main(["--only", "e2e", "--out-dir", str(tmp_path)]) == 0
    assert set(cmds) == {"e2e"} and "--compile" in cmds["e2e"] and "--smoke" not in cmds["e2e"]
    cmds.clear()
    assert run_all.main(["--only", "e2e,masking", "--no-compile", "--out-dir", str(tmp_path)]) == 0
    assert set(cmds) == {"e2e", "masking"} and "--compile" not in cmds["e2e"]


def test_device_slug_is_lowercase_words_joined_by_dashes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3 (PCIe)")
    assert run_all.device_slug() == "nvidia-h100-80gb-hbm3-pcie"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_all.device_slug() == "cpu"
