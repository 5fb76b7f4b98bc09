"""precision: fp8 (mae_fast.precision: torchao float8 training for the encoder's wide linears, emulated on the CPU)
and compile: auto (mae_fast.training.compiling), with the rule that LayerNorm goes to plain torch inside compiled
graphs (dispatch.INDUCTOR_FUSES)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.train import TINY_MODEL, tiny
from mae_fast import create_model, ops
from mae_fast.ops import dispatch
from mae_fast.precision import check_min_width, convert_fp8, fp8_linear_names, fp8_summary, fp8_unavailable
from mae_fast.training import compiling
from mae_fast.training import config as config_mod
from mae_fast.training.config import ConfigError
from mae_fast.training.pretrain import pretrain

needs_torchao = pytest.mark.skipif(fp8_unavailable() is not None, reason=str(fp8_unavailable()))
ENCODER_LINEARS = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def _tiny_model(**kw):
    return create_model("mae_vit_demo_patch8", img_size=32, **dict(TINY_MODEL, **kw))


def test_fp8_filter_takes_only_the_wide_encoder_linears():
    m = _tiny_model(decoder_embed_dim=64)  # encoder 48 wide, decoder 64: width alone would pick the decoder
    assert fp8_linear_names(m, 32) == ENCODER_LINEARS
    assert fp8_linear_names(m, 64) == []   # no encoder linear has 64 features on its narrower side
    wide = _tiny_model(embed_dim=40)       # 40 is no multiple of 16: _scaled_mm would refuse it
    assert fp8_linear_names(wide, 32) == []
    assert check_min_width(8) and check_min_width(True) and check_min_width(1024) is None


@needs_torchao
def test_converted_model_matches_bf16_within_fp8_rounding():
    """Same weights, same masking: the emulated FP8 model's loss is within 1e-3 (relative) of the bf16 model's,
    its predictions within 5% and every gradient within 35% (e5m2 output gradients keep 2 mantissa bits); and it
    differs, so the FP8 casts really ran."""
    torch.manual_seed(0)
    bf16 = _tiny_model()
    fp8 = copy.deepcopy(bf16)
    fp8.fp8_linears = convert_fp8(fp8, 32, emulate=True)
    assert fp8.fp8_linears == ENCODER_LINEARS
    assert fp8_summary(fp8, "cpu").startswith("fp8 (emulated): 8 encoder linears as Float8Linear; no FP8 peak known")
    assert type(fp8.blocks[0].mlp.fc1).__name__ == "Float8Linear" and type(fp8.decoder_pred) is torch.nn.Linear
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, bf16.num_patches, generator=g)

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, 0.75, noise)
        out.loss.backward()
        return (out.loss.detach().float(), out.pred.detach().float(),
                {n: p.grad for n, p in model.named_parameters() if p.grad is not None})

    (l0, p0, g0), (l1, p1, g1) = run(bf16), run(fp8)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert abs(float(l1 - l0)) <= 1e-3 * float(l0)
    assert 1e-4 < rel(p1, p0) < 0.05
    assert g0.keys() == g1.keys()
    assert max(rel(g1[n], g0[n]) for n in g0) < 0.35


@pytest.fixture(scope="module")
def fp8_and_bf16_runs(tmp_path_factory):
    if fp8_unavailable():
        pytest.skip(fp8_unavailable())
    tmp = tmp_path_factory.mktemp("fp8")
    base = dict(precision="bf16", steps=4, checkpoint_every=4)
    return (pretrain(tiny(tmp, name="bf16", **base)),
            pretrain(tiny(tmp, name="fp8", **dict(base, precision="fp8", fp8_min_width=32))))


def test_fp8_run_trains_like_bf16(fp8_and_bf16_runs):
    """A short demo-sized run: FP8's final loss within 2% of bf16's, same checkpoint keys (Float8Linear keeps the
    Linear's parameters, so checkpoints load either way)."""
    bf16, fp8 = fp8_and_bf16_runs
    assert abs(fp8["final_loss"] - bf16["final_loss"]) <= 0.02 * bf16["final_loss"]
    assert fp8["final_loss"] != bf16["final_loss"]  # the FP8 casts ran
    a = torch.load(bf16["checkpoint"], map_location="cpu", weights_only=False)["model"]
    b = torch.load(fp8["checkpoint"], map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys()
    assert bf16["compile_cold_start_s"] is None  # compile: auto stays eager on the CPU


def test_bad_fp8_settings_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="fp8_min_width must be an integer >= 16"):
        pretrain(tiny(tmp_path, precision="fp8", fp8_min_width=4))
    import mae_fast.precision as precision

    monkeypatch.setattr(precision, "fp8_unavailable", lambda: "precision fp8 needs torchao")
    with pytest.raises(ConfigError, match="needs torchao"):
        pretrain(tiny(tmp_path, precision="fp8"))


# ---- compile: auto ----------------------------------------------------------------------------------------

def test_compile_setting_parses_and_resolves():
    assert config_mod.config_from_argv(["compile=auto"])["compile"] == "auto"
    assert config_mod.config_from_argv(["compile=false"])["compile"] is False
    with pytest.raises(ConfigError, match="compile must be auto, true or false"):
        config_mod.config_from_argv(["compile=sometimes"])
    assert config_mod.PretrainConfig.keys()["compile"][0] == "auto"
    assert compiling.resolve_compile("auto", torch.device("cuda", 0)) is True
    assert compiling.resolve_compile("auto", torch.device("cpu")) is False
    assert compiling.resolve_compile(True, torch.device("cpu")) is True


def test_layer_norm_goes_to_torch_inside_compiled_graphs(monkeypatch):
    """Where auto would take the Triton LayerNorm (here: CPU tensors treated as CUDA ones, a stand-in kernel),
    a graph torch.compile traces gets plain torch instead, which Inductor fuses; attention is left as it is."""
    assert {"layer_norm", "add_layer_norm"} <= dispatch.INDUCTOR_FUSES and "attention" not in dispatch.INDUCTOR_FUSES
    monkeypatch.setattr(dispatch, "_on_cuda", lambda args: True)
    tri = dispatch.backends_for("layer_norm")["triton"]
    monkeypatch.setattr(tri, "available", lambda: None)
    monkeypatch.setattr(tri, "reasons", lambda *a: [])
    monkeypatch.setattr(tri, "fn", lambda x, w, b, eps, dt: torch.full_like(x, 7.0, dtype=dt))
    ln = torch.nn.LayerNorm(24)
    x = torch.randn(3, 5, 24)
    f = lambda t: ops.layer_norm(t, ln)  # noqa: E731
    assert torch.equal(f(x), torch.full_like(x, 7.0))
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, F.layer_norm(x, (24,), ln.weight, ln.bias, ln.eps))


def test_compiled_run_reports_its_cold_start(tmp_path, monkeypatch, capsys):
    """compile=true: the first step's time (the compilation) is printed and kept in result.json. Dynamo traces the
    model for real; the graphs run eagerly (backend='eager') to keep a CPU test short."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="eager"))
    torch._dynamo.reset()
    res = pretrain(tiny(tmp_path, steps=2, compile=True, checkpoint_every=2))
    assert res["compile_cold_start_s"] > 0
    assert "compile: the first step (compiling the whole model) took" in capsys.readouterr().out
