"""Launch configs of the Triton attention (mae_fast.kernels.flash_attention): candidates by head dim and sequence
length, the ``config=`` override of the entry point, and the tuned table the launcher consults first."""
import json
import warnings

import pytest
import torch

from mae_fast.kernels import flash_attention as fa

CUDA = torch.device("cuda")  # pick_config is pure Python: CUDA configs are asked for without a GPU
BF16 = torch.bfloat16


def test_candidates_interface_and_seqlen_rule():
    for hd in (32, 40, 64, 80, 88, 96, 128):
        for n in (65, 290, 1157):
            c = fa.candidate_configs(hd, n)
            assert set(c) == set(fa.CONFIG_KERNELS) == {"fwd", "dkdv", "dq"}
            for kernel, cfgs in c.items():
                assert cfgs and len(cfgs) <= 8
                assert len({json.dumps(x, sort_keys=True) for x in cfgs}) == len(cfgs)  # no duplicates
                for cfg in cfgs:
                    assert set(cfg) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "tiling"}
                    assert fa.validate_config(kernel, cfg) == cfg
            assert c == fa.candidate_configs(hd, n, packed=False)
    # the same candidates in another order: the pick minimises padded rows over tile efficiency
    short, long = fa.candidate_configs(80, 290), fa.candidate_configs(80, 1157)
    for kernel in fa.CONFIG_KERNELS:
        key = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
        assert sorted(map(key, short[kernel])) == sorted(map(key, long[kernel]))
    assert short["fwd"][0]["BLOCK_M"] == 64 and long["fwd"][0]["BLOCK_M"] == 128
    # 290 rows: 5 x 64 pad 10%, 3 x 128 pad 32%; the cost function says so
    cost = fa._shape_cost
    assert cost("fwd", dict(BLOCK_M=64, BLOCK_N=64), 290, False) < cost("fwd", dict(BLOCK_M=128, BLOCK_N=64), 290,
                                                                         False)


@pytest.mark.parametrize("kernel,cfg,match", [
    ("fwd", dict(BLOCK_M=96, BLOCK_N=64), "BLOCK_M 96 must be a power of two"),
    ("fwd", dict(BLOCK_M=64), r"missing \['BLOCK_N'\]"),
    ("dq", dict(BLOCK_M=64, BLOCK_N=64, num_warps=3), "num_warps 3"),
    ("dkdv", dict(BLOCK_M=64, BLOCK_N=64, tiling="diagonal"), "tiling 'diagonal' unknown"),
    ("dkdv", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), r"unknown keys \['BLOCK_K'\]"),
    ("bwd", dict(BLOCK_M=64, BLOCK_N=64), "attention kernel 'bwd' unknown"),
    ("fwd", [64, 64], "must be a dict"),
])
def test_bad_config_is_a_clear_error(kernel, cfg, match):
    q = torch.randn(1, 8, 1, 32)
    with pytest.raises(ValueError, match=match):
        fa.flash_attention(q, q, q, config={kernel: cfg})


def test_config_override_reaches_each_named_kernel(monkeypatch):
    """config={kernel: cfg} replaces the chosen config of the kernels it names (its tiling included), and the
    results stay those of the fp64 reference."""
    seen = {}
    real = fa._launch_config

    def spy(kind, config, *args):
        cfg, tiling = real(kind, config, *args)
        seen[kind] = (dict(cfg), tiling)
        return cfg, tiling

    monkeypatch.setattr(fa, "_launch_config", spy)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 19, 1, 80).requires_grad_() for _ in range(3))
    dq_cfg = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, tiling="equal")
    out = fa.flash_attention(q, k, v, config={"dq": dq_cfg, "fwd": dict(BLOCK_M=32, BLOCK_N=16)})
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert seen["dq"] == ({k_: v_ for k_, v_ in dq_cfg.items() if k_ != "tiling"}, "equal")
    assert seen["fwd"] == (dict(BLOCK_M=32, BLOCK_N=16), "split")
    assert seen["dkdv"][1] == "split" and seen["dkdv"][0]["BLOCK_M"] == 32  # not named: the interpreter's pick
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = fa.attention_reference_lse(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert (got.double() - want).abs().max().item() < 1e-5


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setattr(fa, "TUNED_PATH", path)
    return path


def _not_the_rule(kernel, hd, n):
    cands = fa.candidate_configs(hd, n)[kernel]
    assert len(cands) > 1
    return cands[-1]


def test_tuned_table_round_trip_and_launcher_consults_it_first(table):
    assert fa.tuned_table() == {} and fa.tuned_config("fwd", 80, 290) is None  # absent: the rule
    rule = fa.pick_config("fwd", 80, 290, BF16, CUDA)
    tuned = _not_the_rule("fwd", 80, 290)
    assert tuned != rule
    fa.save_tuned([dict(kernel="fwd", head_dim=80, seqlen=290, config=tuned, ms=0.25)], table)
    assert fa.pick_config("fwd", 80, 300, BF16, CUDA) == tuned  # same bucket (512)
    assert fa.pick_config("fwd", 80, 1157, BF16, CUDA) == fa.candidate_configs(80, 1157)["fwd"][0]  # other bucket
    assert fa.pick_config("fwd", 88, 290, BF16, CUDA) == fa.candidate_configs(88, 290)["fwd"][0]  # other head dim
    assert fa.pick_config("fwd", 80, 290, BF16, CUDA, "split") == rule  # an explicit tiling: the rule
    # a second save merges: new keys are added, the same key is replaced
    dq = _not_the_rule("dq", 32, 1157)
    fa.save_tuned([dict(kernel="dq", head_dim=32, seqlen_bucket=2048, config=dq),
                   dict(kernel="fwd", head_dim=80, seqlen=400, config=rule)], table)
    rows = json.loads(table.read_text())["rows"]
    assert [(r["kernel"], r["head_dim"], r["seqlen_bucket"]) for r in rows] == [("dq", 32, 2048), ("fwd", 80, 512)]
    assert fa.tuned_table() == {("dq", 32, 2048): dq, ("fwd", 80, 512): rule}
    assert fa.pick_config("dq", 32, 1157, BF16, CUDA) == dq


@pytest.mark.parametrize("row,match", [
    (dict(kernel="fwd", head_dim=80, seqlen=290, config=dict(BLOCK_M=256, BLOCK_N=256, num_warps=8, num_stages=4)),
     "not a pre-pruned candidate"),
    (dict(kernel="fwd", head_dim=80, seqlen=290, config=dict(BLOCK_M=100, BLOCK_N=64)), "power of two"),
    (dict(kernel="fwd", head_dim=36, seqlen=290, config=dict(BLOCK_M=64, BLOCK_N=64)), "head dim 36 unsupported"),
    (dict(kernel="delta", head_dim=80, seqlen=290, config=dict(BLOCK_M=64)), "kernel 'delta' unknown"),
    (dict(kernel="fwd", head_dim=80, config=dict(BLOCK_M=64, BLOCK_N=64)), "needs kernel, head_dim, seqlen"),
])
def test_poisoned_tuned_rows(table, row, match):
    """save_tuned refuses an invalid row (nothing written); a table holding one (edited by hand, or an older
    candidate list) has that row ignored with a warning, and the valid rows still apply."""
    with pytest.raises(ValueError, match=match):
        fa.save_tuned([row], table)
    assert not table.exists()
    good = _not_the_rule("dkdv", 80, 290)
    table.write_text(json.dumps(dict(rows=[row, dict(kernel="dkdv", head_dim=80, seqlen=290, config=good)])))
    with pytest.warns(RuntimeWarning, match=f"row 0 ignored: .*{match}"):
        assert fa.pick_config("dkdv", 80, 290, BF16, CUDA) == good
    assert fa.pick_config("fwd", 80, 290, BF16, CUDA) == fa.candidate_configs(80, 290)["fwd"][0]


def test_unreadable_tuned_table_warns_and_uses_the_rule(table):
    table.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="tuned table .* is unreadable"):
        assert fa.pick_config("fwd", 80, 290, BF16, CUDA) == fa.candidate_configs(80, 290)["fwd"][0]


def test_shipped_tuned_table_is_valid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = fa.tuned_table()
    assert fa.TUNED_PATH.name == "flash_attention_tuned.json" and fa.TUNED_PATH.exists()
    for (kernel, hd, bucket), cfg in table.items():
        assert cfg in fa.candidate_configs(hd, bucket, tiling=cfg["tiling"])[kernel]
