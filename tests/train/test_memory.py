"""Training-memory prediction: the storage tracker, the fake-tensor step estimate (against PyTorch's own
MemTracker on real tensors and against peaks measured on an H100), the batch search, partial gradient
checkpointing and the ``mae-fast memory`` command."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import mae_fast
from helpers.train import FSDP2_PEAKS_BELOW_UNSHARDED
from mae_fast.memory import GiB, StorageTracker, estimate_mae_step, estimate_train_step, fit_batch
from mae_fast.models import mae_forward_flops, mae_recompute_flops

ROOT = Path(__file__).resolve().parents[2]


def _round(n, to=512):
    return -(-n // to) * to


def test_tracker_counts_storages_once_rounds_and_frees():
    tr = StorageTracker()
    with tr:
        a = torch.randn(37, 11)                    # 1628 bytes -> 2048
        view = a[3:, 2:]                           # a view: no new storage
        b = a * 2
        assert tr.current == 2 * 2048 and view.untyped_storage() is not None
        peak_before = tr.peak
        del b
        assert tr.current == 2048 and tr.peak == peak_before == 4096
        c = torch.randn(1000, dtype=torch.float64)  # 8000 -> 8192
        assert tr.current == 2048 + 8192 == tr.peak
        assert tr.live_at_peak() == {tr.serial(a), tr.serial(c)}
        del c
        d = torch.randn(3)
        assert tr.peak == 2048 + 8192 and tr.current == 2048 + 512
        assert tr.serial(d) not in tr.live_at_peak()  # what made the peak is remembered after frees


def _mlp():
    return nn.Sequential(nn.Linear(37, 129), nn.GELU(), nn.LayerNorm(129), nn.Linear(129, 53))


def _memtracker_peak(build, make_inputs, loss_fn):
    """Peak of the second training step on real tensors, by torch.distributed's MemTracker."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            fused=True)
    mt = mem_tracker.MemTracker()
    mt.track_external(model, opt)
    with mt:
        for step in range(2):
            if step:
                mt.reset_mod_stats()
            inputs = make_inputs()
            loss = loss_fn(model, *inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, inputs
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_estimate_equals_pytorch_memtracker_on_real_tensors_mlp():
    make_inputs = lambda: (torch.randn(61, 37),)  # noqa: E731
    loss_fn = lambda m, x: m(x).pow(2).mean()  # noqa: E731
    est = estimate_train_step(_mlp, make_inputs, loss_fn, amp_dtype=None, round_to=1)
    assert est.peak == _memtracker_peak(_mlp, make_inputs, loss_fn)
    tensors = list(_mlp().parameters())
    params = sum(p.numel() * 4 for p in tensors)
    assert est.parameters == params
    # AdamW keeps two fp32 moments per parameter plus a scalar fp32 step per tensor
    assert est.optimizer_state == 2 * params + 4 * len(tensors)
    assert est.peak == est.parameters + est.optimizer_state + est.gradients + est.activations


@pytest.mark.parametrize("lean,ckpt", [(False, False), (True, False), (True, 2), (False, True)])
def test_estimate_equals_memtracker_for_the_mae_step(lean, ckpt):
    """The demo MAE (pos embeds made trainable: MemTracker cannot hook frozen parameters), plain, lean and
    with gradient checkpointing: the fake-tensor estimate equals MemTracker on real tensors, byte for byte."""
    def build():
        m = mae_fast.create_model("mae_vit_demo_patch8", img_size=40, depth=3, decoder_depth=2, norm_pix_loss=True)
        m.pos_embed.requires_grad_(True)
        m.decoder_pos_embed.requires_grad_(True)
        m.set_lean_activations(lean)
        m.set_grad_checkpointing(ckpt)
        return m

    g = torch.Generator().manual_seed(1)
    make_inputs = lambda: (torch.randn(3, 3, 40, 40, generator=g), torch.rand(3, 25, generator=g))  # noqa: E731
    loss_fn = lambda m, x, noise: m(x, 0.75, noise, masked_only=True).loss  # noqa: E731
    est = estimate_train_step(build, make_inputs, loss_fn, amp_dtype=None, round_to=1)
    assert est.peak == _memtracker_peak(build, make_inputs, loss_fn)


def test_savers_shrink_the_estimate_in_order():
    """At the same batch: plain > lean > lean with 2 checkpointed blocks > every block checkpointed, and the
    activations are affine in the batch (a fixed part: autocast's bf16 weight copies)."""
    kw = dict(img_size=112, depth=4, decoder_depth=3)
    peaks = [estimate_mae_step("mae_vit_small_patch16", batch=64, lean=lean, grad_checkpointing=ck, **kw).peak
             for lean, ck in [(False, False), (True, False), (True, 2), (True, True)]]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4, peaks
    a32, a64, a96 = (estimate_mae_step("mae_vit_small_patch16", batch=b, **kw).after_forward for b in (32, 64, 96))
    assert abs((a96 - a64) / (a64 - a32) - 1) < 0.01  # equal steps: activations are affine in the batch


def test_estimate_matches_the_h100_measurement():
    """Stop 8 measured the reference MAE's step on an H100 with ``max_memory_allocated`` while mae_fast's and
    HF's copies of the weights (fp32) were resident too. The estimate plus those weights must agree to 2%."""
    sys.path.insert(0, str(ROOT / "bench"))
    from reference_mae import ReferenceMAE

    measured = json.loads((ROOT / "bench/results/nvidia-h100-80gb-hbm3-2026-11-22-e2e.json").read_text())
    row = next(r for r in measured["rows"] if r["impl"] == "reference" and r["model"] == "mae_vit_base_patch16"
               and not r["compile"])
    cfg = mae_fast.models.model_config(row["model"], img_size=row["img_size"], norm_pix_loss=True)
    B, L = row["batch"], (row["img_size"] // cfg["patch_size"]) ** 2
    est = estimate_train_step(lambda: ReferenceMAE(**cfg),
                              lambda: (torch.randn(B, 3, row["img_size"], row["img_size"]), torch.rand(B, L)),
                              lambda m, x, noise: m(x, 0.75, noise)[0])
    others = 2 * est.parameters  # the two other implementations' fp32 weights
    assert abs((est.peak + others) / GiB / row["peak_mem_gib"] - 1) < 0.02, (est.gib(), row["peak_mem_gib"])


def test_fit_batch_finds_the_largest_fitting_batch():
    rng = random.Random(0)
    for _ in range(300):
        a, b, knee = rng.randint(0, 10**6), rng.randint(1, 5000), rng.randint(0, 40)
        limit, budget = rng.randint(1, 500), rng.randint(0, 4 * 10**6)

        def peak(n):  # affine with curvature, and a different slope at tiny batches (gradients set the peak)
            return a + b * n + n * n // 7 + max(0, knee - n) * 3 * b

        calls = []
        got = fit_batch(lambda n: calls.append(n) or peak(n), budget, limit)
        want = 0
        while want < limit and peak(want + 1) <= budget:
            want += 1
        assert got == want, (a, b, knee, limit, budget)
        assert len(set(calls)) <= 16


def test_partial_checkpointing_decoder_first_same_loss_and_grads():
    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=40, depth=3, decoder_depth=2).double()
    imgs, noise = torch.randn(2, 3, 40, 40, dtype=torch.float64), torch.rand(2, 25)
    params = [p for p in m.parameters() if p.requires_grad]

    def run():
        out = m(imgs, 0.75, noise, masked_only=True)
        return out.loss, torch.autograd.grad(out.loss, params)

    loss, grads = run()
    for n, (enc, dec) in [(1, (0, 1)), (2, (0, 2)), (4, (2, 2)), (99, (3, 2)), (True, (3, 2)), (False, (0, 0))]:
        m.set_grad_checkpointing(n)
        assert (m._checkpointed_encoder, m._checkpointed_decoder) == (enc, dec)
        loss_n, grads_n = run()
        assert torch.equal(loss_n, loss)
        for a, b in zip(grads_n, grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for bad in (-1, 1.5, "all", None):
        with pytest.raises(ValueError, match="number of blocks"):
            m.set_grad_checkpointing(bad)


def test_recompute_flops_are_the_checkpointed_blocks_forward():
    """Lean blocks rerun whole; plain blocks rerun up to their fc2 (torch's checkpoint stops once backward has
    every saved tensor, and fc2 saves only its input)."""
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=40, depth=3, decoder_depth=2)
    assert mae_recompute_flops(m) == 0
    L, keep, D, Dd = 25, 6, m.embed_dim, m.decoder_embed_dim

    def block(t, w, lean):  # qkv + proj + 2 MLP matmuls (ratio 4), q k^T and p v: 2 FLOPs per multiply-add
        return 2 * t * w * w * (3 + 1 + 4 + (4 if lean else 0)) + 2 * 2 * t * t * w

    for lean in (True, False):
        m.set_lean_activations(lean)
        m.set_grad_checkpointing(3)
        assert mae_recompute_flops(m) == 2 * block(L + 1, Dd, lean) + block(keep + 1, D, lean)
        m.set_grad_checkpointing(True)
        everything = 2 * block(L + 1, Dd, lean) + 3 * block(keep + 1, D, lean)
        assert mae_recompute_flops(m) == everything < mae_forward_flops(m)


def test_cli_table_budget_and_errors(capsys, tmp_path):
    from mae_fast.cli import main

    small = ["mae_vit_demo_patch8", "--img-size", "48"]
    assert main(["memory", *small, "--batch", "16", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "lean + checkpoint all blocks" in out
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["plan"] for r in rows] == ["plain", "lean", "lean + checkpoint all blocks"]
    assert rows[0]["peak_bytes"] > rows[1]["peak_bytes"] > rows[2]["peak_bytes"] > 0
    assert rows[2]["recompute_flops_pct"] > 20 and rows[1]["recompute_flops_pct"] == 0

    # a budget between the lean and the fully checkpointed peak: the fewest checkpointed blocks that fit
    budget = (rows[1]["peak_bytes"] + rows[2]["peak_bytes"]) / 2 / GiB
    assert main(["memory", *small, "--batch", "16", "--budget", str(budget), "--headroom", "0",
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    chosen = json.loads((tmp_path / "b.json").read_text())["chosen"]
    assert "fits: lean + checkpoint" in out and chosen["peak_bytes"] <= budget * GiB and "grad_checkpointing=" in out
    n = int(chosen["overrides"].split("grad_checkpointing=")[1])
    fewer = estimate_mae_step("mae_vit_demo_patch8", 48, 16, lean=True, grad_checkpointing=n - 1)
    assert fewer.peak / GiB > budget  # and one block fewer would not have fit

    assert main(["memory", *small, "--batch", "16", "--ddp", "--json", str(tmp_path / "d.json")]) == 0
    ddp_rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    n_params = sum(p.numel() for p in mae_fast.create_model("mae_vit_demo_patch8", img_size=48).parameters())
    assert [d["peak_bytes"] - r["peak_bytes"] for d, r in zip(ddp_rows, rows)] == [4 * n_params] * 3

    # the largest batch that fits (a search over batches, 7 estimates a plan: one block each side keeps it short)
    assert main(["memory", *small, "--set", "depth=1", "--set", "decoder_depth=1", "--budget", "0.05",
                 "--json", str(tmp_path / "c.json")]) == 0
    for r in json.loads((tmp_path / "c.json").read_text())["rows"]:
        assert r["batch"] >= 1 and r["peak_bytes"] <= 0.05 * 0.9 * GiB
    # create_model overrides: a narrower, shallower model is estimated as built
    assert main(["memory", *small, "--batch", "16", "--set", "embed_dim=64", "--set", "depth=2",
                 "--json", str(tmp_path / "s.json")]) == 0
    narrow = json.loads((tmp_path / "s.json").read_text())
    assert narrow["overrides"] == {"embed_dim": 64, "depth": 2}
    direct = estimate_mae_step("mae_vit_demo_patch8", 48, 16, embed_dim=64, depth=2)
    assert narrow["rows"][0]["peak_bytes"] == direct.peak < rows[0]["peak_bytes"]
    for bad in (["memory", "mae_vit_nope"], ["memory", *small], ["memory", *small, "--batch", "0"],
                ["memory", *small, "--batch", "2", "--set", "dept=2"], ["memory", *small, "--batch", "2", "--set", "x"]):
        with pytest.raises(SystemExit):
            main(bad)


def test_scale_memory_plans_every_model_and_resolution_of_a_grid(tmp_path, capsys):
    from mae_fast.scaling.cli import main as scale_main
    from mae_fast.scaling.cli import memory_plans
    from mae_fast.scaling.grid import load_grid

    # the demo grid with two models of depth 2 at two resolutions: 4 cells, the largest last
    raw = yaml.safe_load((ROOT / "train/grids/demo.yaml").read_text())
    raw["models"] = [{"name": f"demo_w{w}", "base": "mae_vit_demo_patch8", "embed_dim": w, "depth": 2, "num_heads": 2}
                     for w in (32, 64)]
    raw["img_sizes"] = [32, 48]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    grid = load_grid(tmp_path / "grid.yaml")
    roomy = memory_plans(grid, devices=2, budget_gib=100.0)
    assert [(r["arch"], r["img_size"]) for r in roomy] == [(a, s) for a in ("demo_w32", "demo_w64") for s in (32, 48)]
    batch = grid.runs[0].config["budget"]["batch_size"]
    for r in roomy:
        assert r["micro_batch"] == batch // 2 and r["plan"] == "plain" and r["planned_bytes"] == r["configured_bytes"]
    w = {"demo_w32": 32, "demo_w64": 64}
    kw = dict(embed_dim=w[roomy[3]["arch"]], depth=2, num_heads=2)
    direct = estimate_mae_step("mae_vit_demo_patch8", 48, batch // 2, amp_dtype=torch.bfloat16, norm_pix_loss=False,
                               **kw)
    n_params = sum(p.numel() for p in mae_fast.create_model("mae_vit_demo_patch8", img_size=48, **kw).parameters())
    assert direct.peak + 4 * n_params == roomy[3]["configured_bytes"]  # 2 devices: DDP's gradient buckets
    sharded = memory_plans(grid, devices=2, budget_gib=100.0, fsdp=True)
    assert all(s["configured_bytes"] < r["configured_bytes"] for s, r in zip(sharded, roomy))
    # a budget just under the largest cell's plain peak: that cell needs a saver, the smallest does not
    tight = roomy[3]["configured_bytes"] * 0.98
    planned = memory_plans(grid, devices=2, budget_gib=tight / GiB)
    assert planned[3]["plan"] != "plain" and planned[3]["planned_bytes"] <= tight
    assert planned[0]["plan"] == "plain" and roomy[0]["configured_bytes"] < tight
    assert scale_main(["memory", str(ROOT / "train/grids/demo.yaml"), "--devices", "2", "--budget", "0.001",
                       "--json", str(tmp_path / "g.json")]) == 1  # nothing fits: non-zero exit, said per row
    assert all("does not fit" in r["plan"] for r in json.loads((tmp_path / "g.json").read_text()))
    assert "does not fit" in capsys.readouterr().out


FSDP_CHECK = r"""
import json, sys, torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
import mae_fast
from mae_fast.memory import estimate_train_step, fake_process_group
from mae_fast.training.distributed import shard_model

def build():
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=40, depth=3, decoder_depth=2, norm_pix_loss=True)
    m.pos_embed.requires_grad_(True)  # FSDPMemTracker hooks every parameter's gradient
    m.decoder_pos_embed.requires_grad_(True)
    m.set_lean_activations(sys.argv[2] == "lean")
    return m

g = torch.Generator().manual_seed(1)
inputs = lambda: (torch.randn(3, 3, 40, 40, generator=g), torch.rand(3, 25, generator=g))
loss_fn = lambda m, x, noise: m(x, 0.75, noise, masked_only=True).loss
with fake_process_group(int(sys.argv[1])) as mesh:
    est = estimate_train_step(build, inputs, loss_fn, amp_dtype=None, round_to=1,
                              prepare=lambda m: shard_model(m, mesh=mesh))
    torch.manual_seed(0)
    model = shard_model(build(), mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), fused=True)
    mt = FSDPMemTracker(model, opt)
    mt.track_inputs(inputs())
    with mt:
        for step in range(2):
            if step:
                mt.reset_mod_stats()
            x = inputs(); loss = loss_fn(model, *x); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            del loss, x
    print(json.dumps(dict(estimate=est.peak, params=est.parameters, state=est.optimizer_state,
                          fsdp_mem_tracker=mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])))
"""


def _fsdp_check_command(workdir, world, lean) -> dict:
    script = workdir / "fsdp_check.py"
    script.write_text(FSDP_CHECK)
    return {"check": ([sys.executable, str(script), str(world), lean], None)}


@pytest.mark.parametrize("world,lean", [(4, "plain"), (3, "lean")])
@pytest.mark.background(commands=_fsdp_check_command)  # starts with the first test: tests/helpers/background.py
def test_fsdp_estimate_equals_pytorch_fsdp_mem_tracker(background, world, lean):
    """FSDP2 sharding simulated over a fake process group: the fake-tensor estimate equals torch's
    FSDPMemTracker on real tensors (an independent implementation), byte for byte. In a subprocess: the fake
    process group is global state."""
    pytest.importorskip("torch.distributed._tools.fsdp2_mem_tracker")
    rc, log = background.wait("check", timeout=300)
    assert rc == 0, log[-3000:]
    r = json.loads(background.stdout("check").strip().splitlines()[-1])
    assert r["estimate"] == r["fsdp_mem_tracker"]
    n = sum(p.numel() * 4 for p in mae_fast.create_model("mae_vit_demo_patch8", img_size=40, depth=3,
                                                          decoder_depth=2).parameters())
    assert r["params"] < n / world * 1.2  # each rank keeps about its shard


CLI_FSDP_ARGS = ["memory", "mae_vit_small_patch16", "--img-size", "112", "--batch", "16", "--set", "depth=4"]


def _cli_fsdp_command(workdir) -> dict:
    return {"sharded": ([sys.executable, "-m", "mae_fast.cli", *CLI_FSDP_ARGS, "--fsdp", "4", "--json",
                         str(workdir / "sharded.json")], None)}


@pytest.mark.background(commands=_cli_fsdp_command)  # starts with the first test: tests/helpers/background.py
def test_cli_fsdp_shards_weights_and_optimizer_state(tmp_path, background):
    """``mae-fast memory --fsdp N`` (in a subprocess: it sets up a fake process group) keeps about 1/N of the
    weights and optimizer state per device and less in all than one unsharded device."""
    from mae_fast.cli import main

    assert main([*CLI_FSDP_ARGS, "--json", str(tmp_path / "alone.json")]) == 0
    rc, log = background.wait("sharded", timeout=300)
    assert rc == 0, log[-3000:]
    alone, sharded = (json.loads(path.read_text())["rows"][0]
                      for path in (tmp_path / "alone.json", background.workdir / "sharded.json"))
    assert abs(sharded["parameters"] * 4 - alone["parameters"]) < 0.01
    assert abs(sharded["optimizer_state"] * 4 - alone["optimizer_state"]) < 0.01
    if FSDP2_PEAKS_BELOW_UNSHARDED:
        assert sharded["peak_bytes"] < alone["peak_bytes"]


@pytest.mark.parametrize("args, fragment", [
    (["--budget", "nan"], "--budget must be positive"),
    (["--budget", "inf"], "--budget must be positive"),
    (["--budget", "-1"], "--budget must be positive"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--batch", "2", "--img-size", "0"], "--img-size must be at least 1"),
    (["--batch", "2", "--mask-ratio", "1"], "--mask-ratio must be in [0, 1)"),
    (["--batch", "2", "--mask-ratio", "-0.5"], "--mask-ratio must be in [0, 1)"),
    (["--batch", "2", "--set", "depth=[2"], "--set depth: cannot parse the value '[2'"),
    (["--batch", "2", "--set", "dept=2"], "unknown override(s) ['dept']"),
    (["--batch", "2", "--fsdp", "0"], "--fsdp takes a number of devices >= 1"),
    (["--batch", "2", "--fsdp", "2", "--ddp"], "excludes --ddp"),
    (["--batch", "2", "--set", "depth=-1"], "depth=-1"),
    (["--batch", "2", "--set", "img_size=64"], "give the image size as --img-size"),
])
def test_cli_bad_arguments_are_one_line_usage_errors(capsys, args, fragment):
    """Not a traceback (nor, for --img-size 0, a silent fallback to the model's default resolution)."""
    from mae_fast.cli import main

    with pytest.raises(SystemExit) as info:
        main(["memory", "mae_vit_demo_patch8", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mae-fast memory: error: ") and fragment in err[-1] and "Traceback" not in "".join(err)


def test_fit_batch_is_exact_when_the_budget_equals_a_peak():
    for slope, base in ((1000, 0), (7, 3), (1, 0)):
        peak = lambda n: base + slope * n  # noqa: E731
        for n in (1, 2, 3, 17, 64, 4096):
            assert fit_batch(peak, peak(n), limit=4096) == n
            assert fit_batch(peak, peak(n) - 1, limit=4096) == n - 1
    assert fit_batch(lambda n: 10, 10, limit=4096) == 4096  # flat: everything fits, up to the limit


# ---- mutation audit: what the tests above did not pin down -------------------------------------------------------

def test_after_forward_is_the_saved_activations_by_hand():
    """The MLP step of the MemTracker test: once the forward returned, beyond the weights and the optimizer state,
    what is alive is the input, what backward saved (Linear: its input; GELU: its input; LayerNorm: its input,
    mean and rstd per row; the second Linear: its input; pow: its input) and the scalar loss; fp32, no rounding."""
    make_inputs = lambda: (torch.randn(61, 37),)  # noqa: E731
    est = estimate_train_step(_mlp, make_inputs, lambda m, x: m(x).pow(2).mean(), amp_dtype=None, round_to=1)
    rows = 61
    saved = rows * 37 + 3 * rows * 129 + 2 * rows + rows * 53  # x, fc1 out, GELU out, LN mean/rstd, LN out, fc2 out
    assert est.after_forward == 4 * (saved + 1)


def test_estimate_mae_step_is_the_masked_only_step_it_documents():
    """estimate_mae_step against estimate_train_step (checked byte for byte against MemTracker above) on the step
    written out here: the masked-only loss at the mask ratio given, the precision given, norm_pix_loss by default,
    the savers given; extra_bytes counted with the activations, so the parts still add up to the peak."""
    kw = dict(img_size=40, depth=3, decoder_depth=2)
    g = torch.Generator().manual_seed(0)
    for mask_ratio, amp, lean, ckpt in ((0.5, None, False, 0), (0.6, torch.bfloat16, True, 2)):
        def build():
            m = mae_fast.create_model("mae_vit_demo_patch8", norm_pix_loss=True, **kw)
            m.set_lean_activations(lean)
            m.set_grad_checkpointing(ckpt)
            return m

        want = estimate_train_step(build, lambda: (torch.randn(3, 3, 40, 40, generator=g), torch.rand(3, 25)),
                                   lambda m, x, noise: m(x, mask_ratio, noise, masked_only=True).loss, amp_dtype=amp)
        got = estimate_mae_step("mae_vit_demo_patch8", batch=3, mask_ratio=mask_ratio, amp_dtype=amp, lean=lean,
                                grad_checkpointing=ckpt, extra_bytes=4096, **kw)
        assert got.peak == want.peak + 4096 and got.activations == want.activations + 4096
        assert got.peak == got.parameters + got.optimizer_state + got.gradients + got.activations


def test_plan_for_budget_is_the_cheapest_plan_that_fits():
    """Against a brute-force search over every plan, with a made-up peak per plan (lean saves a fixed amount,
    each checkpointed block its own amount): the given plan if it fits, else lean, else the fewest checkpointed
    blocks that fit (a budget equal to a peak fits), else None."""
    from mae_fast.memory import Plan, plan_for_budget

    rng = random.Random(0)
    for _ in range(300):
        blocks = rng.randint(1, 12)
        plain, lean_saves = rng.randint(1000, 5000), rng.randint(0, 500)
        saves = [rng.randint(1, 300) for _ in range(blocks)]

        def peak(p):
            return plain - (lean_saves if p.lean else 0) - sum(saves[:p.checkpointed])

        lean0, ck0 = rng.random() < 0.3, rng.choice([0, 0, rng.randint(0, blocks)])
        options = [Plan(lean0, ck0, blocks), Plan(True, ck0, blocks)] + [Plan(True, n, blocks)
                                                                        for n in range(ck0, blocks + 1)]
        budget = peak(rng.choice(options)) + rng.choice([0, 0, -1, 1])
        want = next((p for p in options if peak(p) <= budget), None)
        got, tried = plan_for_budget(peak, budget, blocks, lean0, ck0)
        assert got == want, (blocks, budget, lean0, ck0)
        assert all(tried[p] == peak(p) for p in tried)


def test_a_teacher_is_counted_its_weights_and_forward_but_no_gradients():
    """A teacher target adds the teacher's weights (each storage rounded as the allocator rounds it) and its
    gradient-free forward, and no gradient or optimizer state; the trainer's planning job carries it."""
    from mae_fast import targets
    from mae_fast.memory import ALLOC_ROUND, mae_memory_job
    from mae_fast.training.config import PretrainConfig

    spec = {"kind": "vit", "layer": None, "in_size": (32, 32), "dtype": "float32",
            "kwargs": dict(img_size=32, patch_size=8, embed_dim=40, depth=2, num_heads=2, num_classes=0)}
    kw = dict(img_size=32, depth=2, decoder_depth=1, target_dim=40)

    def build():
        return mae_fast.create_model("mae_vit_demo_patch8", norm_pix_loss=True, **kw)

    g = torch.Generator().manual_seed(0)
    plain = estimate_train_step(build, lambda: (torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 16),
                                                torch.randn(4, 16, 40)),
                                lambda m, x, noise, t: m(x, 0.75, noise, masked_only=True, target=t).loss, amp_dtype=None)
    taught = estimate_mae_step("mae_vit_demo_patch8", batch=4, amp_dtype=None, teacher=spec, **kw)
    teacher = targets.build_teacher_encoder(spec)
    weights = sum(-(-p.numel() * 4 // ALLOC_ROUND) * ALLOC_ROUND for p in teacher.parameters())
    assert taught.parameters - plain.parameters == weights
    assert (taught.gradients, taught.optimizer_state) == (plain.gradients, plain.optimizer_state)
    assert taught.peak > plain.peak
    cfg = PretrainConfig.build(dict(img_size=32, model_kwargs=dict(depth=2, decoder_depth=1), target="teacher"))
    job = mae_memory_job(cfg, build(), 4, None, "none", 1, 2**30, targets.TeacherTarget(teacher, spec, (32, 32), "t"))
    assert job["teacher"]["kwargs"] == spec["kwargs"] and job["model_kwargs"]["target_dim"] == 40
