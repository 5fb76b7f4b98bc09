"""The step-floor counter (bench/step_floor.py): FLOPs and bytes per op against hand counts, and the traced
reference step against an independent analytic FLOP count of the MAE."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import step_floor  # noqa: E402  (bench/, on sys.path from tests/conftest.py)

import mae_fast  # noqa: E402


def _records(fn):
    counter = step_floor.OpCounter()
    with counter:
        fn()
    return counter.records


def test_linear_add_and_copy_are_counted_by_hand():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 13, generator=g), torch.randn(5, 13, generator=g), torch.randn(5, generator=g)
    (rec,) = _records(lambda: F.linear(x, w, b))
    assert (rec.category, rec.flops) == ("matmul", 2 * 7 * 5 * 13)
    # t() is a view (not recorded); addmm reads bias, x and w and writes the output
    assert rec.bytes_read == 4 * (5 + 7 * 13 + 5 * 13) and rec.bytes_written == 4 * 7 * 5

    y = torch.randn(7, 13, generator=g)
    (rec,) = _records(lambda: x + y)
    assert (rec.category, rec.flops, rec.bytes_read, rec.bytes_written) == ("elementwise", 0, 8 * 91, 4 * 91)

    half = torch.empty(7, 13, dtype=torch.bfloat16)
    (rec,) = _records(lambda: half.copy_(x))  # reads the fp32 source only, writes bf16
    assert (rec.category, rec.bytes_read, rec.bytes_written) == ("copy/cast", 4 * 91, 2 * 91)


def test_views_are_free_and_broadcasts_read_their_storage_once():
    x = torch.randn(6, 8)
    assert _records(lambda: x.t().reshape(8, 6)[1:].unsqueeze(0)) == []
    row = torch.randn(1, 8)
    (rec,) = _records(lambda: x * row.expand(6, 8))
    assert rec.bytes_read == 4 * (48 + 8) and rec.bytes_written == 4 * 48


def test_attention_flops_forward_and_backward_with_fewer_queries():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 11, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 11, 16, generator=g, requires_grad=True)
    recs = _records(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    attn = [r for r in recs if r.category == "attention"]
    fwd = 4 * 2 * 3 * 5 * 11 * 16
    assert sorted(r.flops for r in attn) == [fwd, 2.5 * fwd]


def _analytic_reference_train_flops(name, img_size, batch, mask_ratio=0.75):
    """The reference step's matmul + attention FLOPs written out from the architecture: every patch embedded (its
    backward computes the weight gradient only: images need no gradient), encoder on the visible tokens + cls,
    decoder and prediction head on every token + cls; attention backward counted 2.5x its forward."""
    cfg = mae_fast.models.model_config(name, img_size=img_size)
    p, D, Dd = cfg["patch_size"], cfg["embed_dim"], cfg["decoder_embed_dim"]
    L = (img_size // p) ** 2
    keep = int(L * (1 - mask_ratio))
    p2c, r = p * p * 3, cfg.get("mlp_ratio", 4.0)

    def blocks(tokens, width, depth):
        return depth * 2 * tokens * width * width * (4 + 2 * r), depth * 4 * tokens * tokens * width

    enc_lin, enc_attn = blocks(keep + 1, D, cfg["depth"])
    dec_lin, dec_attn = blocks(L + 1, Dd, cfg["decoder_depth"])
    linear = enc_lin + dec_lin + 2 * (keep + 1) * D * Dd + 2 * (L + 1) * Dd * p2c
    embed = 2 * L * p2c * D
    return batch * (3 * linear + 2 * embed + 3.5 * (enc_attn + dec_attn))


def test_traced_reference_step_matches_the_analytic_flop_count():
    name, img_size, batch = "mae_vit_demo_patch8", 64, 3
    records = step_floor.trace_step("reference", name, img_size, batch)
    traced = sum(r.flops for r in records)
    assert traced == pytest.approx(_analytic_reference_train_flops(name, img_size, batch), rel=1e-9)
    phases = {r.phase for r in records}
    assert phases == {"forward", "backward", "optimizer"}
    # one fused AdamW over every parameter: reads param, grad, both moments (and steps), writes three
    (adam,) = [r for r in records if r.name == "_fused_adamw_"]
    with torch.device("meta"):
        n = sum(q.numel() for q in mae_fast.create_model(name, img_size=img_size).parameters() if q.requires_grad)
    assert adam.bytes_written >= 12 * n and adam.bytes_read >= 16 * n
    assert adam.bytes_written < 12 * n + 4096 and adam.bytes_read < 16 * n + 4096  # + the step counters


def test_summary_floors_and_smoke_cli(tmp_path):
    out, md = tmp_path / "floor.json", tmp_path / "floor.md"
    assert step_floor.main(["--smoke", "--impls", "reference", "mae_fast", "mae_fast_fused_ln", "--out", str(out),
                            "--md", str(md)]) == 0
    saved = json.loads(out.read_text())
    assert saved["torch"] == torch.__version__ and len(saved["date"]) == 10
    rows = {r["impl"]: r for r in saved["rows"]}
    assert set(rows) == {"reference", "mae_fast", "mae_fast_fused_ln"}
    assert "MAE_FAST_BACKEND" not in os.environ  # the forced backend does not leak
    for r in rows.values():
        cats = r["categories"]
        assert sum(c["floor_ms"] for c in cats.values()) == pytest.approx(r["eager_floor_ms"], rel=1e-3)
        assert 0 < r["fused_floor_ms"] < r["eager_floor_ms"]
        assert 0 < r["eager_mfu_ceiling"] < r["fused_mfu_ceiling"]
    # mae_fast embeds only visible patches and skips unread decoder rows: fewer FLOPs than the reference
    assert rows["mae_fast"]["traced_tflops"] < rows["reference"]["traced_tflops"]
    assert "| small_patch16 | 112 |" in md.read_text()
    # the fused LayerNorm moves fewer bytes for the same FLOPs
    fused, plain = rows["mae_fast_fused_ln"], rows["mae_fast"]
    assert fused["traced_tflops"] == pytest.approx(plain["traced_tflops"]) and fused["gbytes"] < plain["gbytes"]
    for absorbed in ("elementwise", "copy/cast"):  # the residual adds and the casts to bf16
        assert fused["categories"][absorbed]["ops"] < plain["categories"][absorbed]["ops"]


def test_cli_errors_and_out_into_a_new_folder(tmp_path, monkeypatch, capsys):
    """Bad --only / --measured are argparse errors (exit 2) before any tracing; --out and --md may name a folder
    that does not exist yet (created, not a FileNotFoundError after the whole run)."""
    for args, fragment in (
            (["--smoke", "--only", "mae_vit_small_patch16:112", "mae_vit_small_patch16:999"],
             "--only mae_vit_small_patch16:999: not in ['mae_vit_small_patch16:112']"),
            (["--smoke", "--measured", str(tmp_path / "missing.json")], "No such file"),
            (["--smoke", "--measured", str(tmp_path / "bad.json")], "not a bench/e2e.py JSON")):
        (tmp_path / "bad.json").write_text(json.dumps({"date": "2026-01-01"}))
        with pytest.raises(SystemExit) as exc:
            step_floor.main(args)
        assert exc.value.code == 2 and fragment in capsys.readouterr().err
    monkeypatch.setattr(step_floor, "run", lambda *a, **k: {"rows": []})
    out, md = tmp_path / "new" / "floor.json", tmp_path / "other" / "floor.md"
    assert step_floor.main(["--smoke", "--out", str(out), "--md", str(md)]) == 0
    assert json.loads(out.read_text()) == {"rows": []} and md.read_text().startswith("| model |")


def _prefs_table(tmp_path):
    """A synthetic table: head dim 16 measured at 10 and 100 tokens; flash_attn_4 fastest at 10, sdpa:cudnn at
    100; ``torch`` (the fp32 reference) fastest of all but never what auto picks."""
    rows = [{"seqlen": 10, "batch": 3, "fwd_ms": {"sdpa:cudnn": 1.0, "flash_attn_4": 0.5, "torch": 0.01},
             "train_ms": {"sdpa:cudnn": 3.0, "flash_attn_4": 1.5, "torch": 0.02}},
            {"seqlen": 100, "batch": 2, "fwd_ms": {"sdpa:cudnn": 2.0, "flash_attn_4": 4.0},
             "train_ms": {"sdpa:cudnn": 6.0, "flash_attn_4": 9.0}}]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps({"devices": {"Test GPU": {"dense": {"16": rows}}}}))
    return path


def test_attention_is_priced_at_the_measured_rate_of_autos_backend(tmp_path):
    from bench_attention import HEADS

    rates = step_floor.AttentionRates.load(_prefs_table(tmp_path), "Test GPU")
    flops10, flops100 = 4.0 * 3 * HEADS * 10 ** 2 * 16, 4.0 * 2 * HEADS * 100 ** 2 * 16
    assert rates.entry(16, 12)["backend"] == "flash_attn_4" and rates.entry(16, 80)["backend"] == "sdpa:cudnn"
    F = 1e9
    rec = lambda phase, hd, n: step_floor.OpRecord("_scaled_dot_product_flash_attention", "attention", phase, F,  # noqa
                                                   0, 0, hd, n)
    # forward at 12 tokens: flash_attn_4's forward rate; backward at 80: cuDNN's backward (train - fwd, 2.5x FLOPs)
    assert rec("forward", 16, 12).floor_s(1e15, 1e12, rates.rate(rec("forward", 16, 12))) == \
        pytest.approx(F / (flops10 / 0.5e-3))
    assert rates.rate(rec("backward", 16, 80)) == pytest.approx(2.5 * flops100 / 4.0e-3)
    assert rates.rate(rec("forward", 24, 12)) is None  # an unmeasured head dim: matmul peak
    s = step_floor.summarize([rec("forward", 16, 12), rec("forward", 24, 12)], 1e12, 1e15, 1e12, rates)
    assert s["attention_priced"] == {"measured": 1, "matmul peak": 1}
    assert s["categories"]["attention"]["floor_ms"] == pytest.approx(1e3 * (F / (flops10 / 0.5e-3) + F / 1e15),
                                                                     rel=1e-3)


def test_attention_rates_from_a_bench_attention_json_and_cli_errors(tmp_path, capsys):
    res = {"results": [{"head_dim": 32, "seqlen": 50, "fwd_flops": 2e9, "fwd_ms": {"sdpa:flash": 1.0, "triton": 2.0},
                        "bwd_ms": {"sdpa:flash": 4.0, "triton": 1.0}},
                       {"head_dim": 32, "seqlen": 50, "packed": True, "fwd_flops": 1.0, "fwd_ms": {"triton": 1.0},
                        "bwd_ms": {"triton": 1.0}}]}
    path = tmp_path / "attention.json"
    path.write_text(json.dumps(res))
    rates = step_floor.AttentionRates.load(path)
    (e,) = rates.rows[32]  # the packed row is no dense rate
    assert e["backend"] == "triton" and e["fwd"] == pytest.approx(2e9 / 2e-3) and e["bwd"] == pytest.approx(5e9 / 1e-3)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        step_floor.main(["--smoke", "--attention-rates", str(tmp_path / "bad.json")])
    assert exc.value.code == 2 and "not an attention table" in capsys.readouterr().err
    assert step_floor.default_attention_rates().rows[80]  # the packaged H100 table prices ViT-H's head dim


def test_fp8_step_runs_its_wide_linears_at_the_fp8_rate(monkeypatch):
    from mae_fast.precision import fp8_unavailable

    if fp8_unavailable():
        pytest.skip(fp8_unavailable())
    monkeypatch.setattr(step_floor, "FP8_MIN_WIDTH", 128)  # the demo model's encoder width
    records = step_floor.trace_step("mae_fast_fp8", "mae_vit_demo_patch8", 32, 1)
    fp8 = [r for r in records if r.fp8]
    assert len(fp8) == 4 * 4 * 3  # 4 blocks x qkv/proj/fc1/fc2 x (forward, grad input, grad weight)
    assert {r.phase for r in fp8} == {"forward", "backward"}
    slow, fast = (step_floor.summarize(records, 1e12, 1e9, 1e20, None, rate) for rate in (1e9, 1e12))
    assert slow["attention_priced"]["fp8 matmuls"] == 48
    assert fast["categories"]["matmul"]["floor_ms"] < slow["categories"]["matmul"]["floor_ms"]
