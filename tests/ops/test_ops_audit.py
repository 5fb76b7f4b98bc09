"""Tests from a mutation audit of the op layer's pure-PyTorch parts (dispatch, attention's checks, torch and sdpa
backends and preference-table lookup, masking validation, LayerNorm, the lean block pieces).

Each test pins behaviour that a small change to the code left unobserved by the older tests. Preference-table
logic runs on synthetic tables and fake CUDA tensors (FakeTensorMode: no GPU, no kernel runs), with the device
name monkeypatched.
"""
import importlib
import json
import math
import sys

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_fast import ops
from mae_fast.ops import dispatch

attn = importlib.import_module("mae_fast.ops.attention")  # the module (the package exports a function of that name)


# ---- dispatch -----------------------------------------------------------------------------------

@pytest.fixture
def audit_op(monkeypatch):
    """A made-up op ``audit_op`` with three backends: ``fast`` (rank 0, its library missing), ``mid`` (rank = the
    input, refuses negative inputs) and ``slow`` (rank 10, takes anything)."""
    monkeypatch.delenv("MAE_FAST_BACKEND", raising=False)

    def fast_reasons(x):
        raise AssertionError("reasons of an unavailable backend must not be asked (its library may be missing)")

    table = {
        "fast": dispatch.Backend(op="audit_op", name="fast", fn=lambda x: "fast", reasons=fast_reasons, priority=0.0,
                                 available=lambda: "fastlib not installed"),
        "mid": dispatch.Backend(op="audit_op", name="mid", fn=lambda x: "mid",
                                reasons=lambda x: ["negative input"] if x < 0 else [], priority=lambda x: float(x)),
        "slow": dispatch.Backend(op="audit_op", name="slow", fn=lambda x: "slow", reasons=lambda x: [], priority=10.0),
    }
    for b in table.values():
        dispatch.register_backend(b)
    yield table
    del dispatch._REGISTRY["audit_op"]


def _pick(x, backend="auto"):
    return dispatch.select_backend("audit_op", backend, x).name


def test_auto_takes_the_lowest_rank_that_can_run_and_skips_unavailable_backends(audit_op):
    assert _pick(3) == "mid"  # rank 3 < 10; "fast" (rank 0) is not installed
    assert _pick(11) == "slow"  # the rank is a function of the inputs
    assert _pick(-1) == "slow"  # mid refuses
    assert dispatch.describe("audit_op", 3) == {"fast": ["fastlib not installed"], "mid": [], "slow": []}
    with pytest.raises(dispatch.NoBackendError, match="backend 'fast' cannot run these inputs: fastlib not installed"):
        _pick(3, "fast")
    assert _pick(3, "slow") == "slow"  # a named backend is used even where auto would pick another


def test_no_backend_error_lists_every_backend_and_unknown_names_list_every_choice(audit_op, monkeypatch):
    monkeypatch.setattr(audit_op["slow"], "reasons", lambda x: ["too slow today"])
    with pytest.raises(dispatch.NoBackendError) as err:
        _pick(-1)
    lines = str(err.value).splitlines()
    assert lines[0] == "audit_op: no backend can run these inputs:"
    assert sorted(lines[1:]) == ["  fast: fastlib not installed", "  mid: negative input", "  slow: too slow today"]
    with pytest.raises(ValueError, match=r"audit_op: unknown backend 'nope'; choose from \['auto', 'fast', 'mid', "
                                         r"'slow'\]"):
        _pick(3, "nope")
    monkeypatch.setenv("MAE_FAST_BACKEND", "audit_op=nope")
    with pytest.raises(ValueError, match=r"audit_op: unknown backend 'nope' \(MAE_FAST_BACKEND\); choose from "
                                         r"\['auto', 'fast', 'mid', 'slow'\]"):
        _pick(3)


@pytest.mark.parametrize("spec,want", [
    ("slow", "slow"),  # one name for every op that has it
    ("auto", "mid"),
    ("gather_visible=torch", "mid"),  # pairs for other ops leave this one on auto
    ("audit_op=slow", "slow"),
    ("attention=sdpa,audit_op=slow", "slow"),
    ("audit_op=auto,attention=sdpa", "mid"),
])
def test_mae_fast_backend_forces_a_backend_per_op(audit_op, monkeypatch, spec, want):
    monkeypatch.setenv("MAE_FAST_BACKEND", spec)
    assert _pick(3) == want
    assert _pick(3, "mid") == "mid"  # an explicit backend argument wins over the environment


@pytest.mark.parametrize("spec", [" attention = sdpa , audit_op = slow ", "attention=sdpa, audit_op=slow",
                                  "audit_op =slow", "audit_op= slow"])
def test_mae_fast_backend_pairs_may_have_spaces(audit_op, monkeypatch, spec):
    """Spaces after the commas (as people type lists) or around '=' named no op: the pair was silently ignored."""
    monkeypatch.setenv("MAE_FAST_BACKEND", spec)
    assert dispatch.forced_backend("audit_op") == "slow"
    assert _pick(3) == "slow"
    monkeypatch.setenv("MAE_FAST_BACKEND", spec.replace("slow", "slo"))
    with pytest.raises(ValueError, match="audit_op: unknown backend 'slo'"):
        _pick(3)


@pytest.mark.parametrize("spec", ["atention=sdpa", "audit_op=slow, audit_opp=slow"])
def test_mae_fast_backend_pair_naming_no_op_is_an_error(audit_op, monkeypatch, spec):
    """A misspelt op name forced nothing, silently; every op refuses such a spec and lists the ops there are."""
    monkeypatch.setenv("MAE_FAST_BACKEND", spec)
    with pytest.raises(ValueError, match=r"names unknown op\(s\) \['at?tention'\]|names unknown op\(s\) \['audit_opp'\]") \
            as err:
        _pick(3)
    assert "'audit_op'" in str(err.value) and "'attention'" in str(err.value)  # the known ops are listed


def test_forced_backend_that_cannot_run_says_why(audit_op, monkeypatch):
    monkeypatch.setenv("MAE_FAST_BACKEND", "audit_op=mid")
    with pytest.raises(dispatch.NoBackendError, match="backend 'mid' cannot run these inputs: negative input"):
        _pick(-1)


def test_optional_backend_modules_missing_are_skipped_broken_ones_raise(monkeypatch, tmp_path):
    """A backend module that is not there is skipped; one whose own imports fail must not be skipped silently."""
    pkg = tmp_path / "audit_backends"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import audit_no_such_dependency  # noqa\n")
    (pkg / "fine.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dispatch, "_OPTIONAL_LOADED", False)
    monkeypatch.setattr(dispatch, "OPTIONAL_BACKEND_MODULES", ("audit_backends.not_written_yet", "audit_backends.fine"))
    try:
        dispatch.load_optional_backends()
        assert sys.modules["audit_backends.fine"].LOADED
        monkeypatch.setattr(dispatch, "_OPTIONAL_LOADED", False)
        monkeypatch.setattr(dispatch, "OPTIONAL_BACKEND_MODULES", ("audit_backends.broken",))
        with pytest.raises(ModuleNotFoundError, match="audit_no_such_dependency"):
            dispatch.load_optional_backends()
    finally:
        for name in [m for m in sys.modules if m.startswith("audit_backends")]:
            del sys.modules[name]


# ---- attention: input checks ----------------------------------------------------------------------

def _qkv(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))


def _packed(seqlens, H=3, D=24, dtype=torch.float64, seed=0):
    q, k, v = _qkv(sum(seqlens), H, D, dtype=dtype, seed=seed)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_attention_refuses_bad_cu_seqlens():
    q, k, v, cu = _packed([3, 4])
    with pytest.raises(ValueError, match="must start at 0"):  # rows 0-1 would be left out of every sequence
        ops.attention(q, k, v, cu_seqlens=torch.tensor([2, 5, 7], dtype=torch.int32))
    for bad in (cu.float(), cu[None], torch.tensor([0], dtype=torch.int32)):
        with pytest.raises(ValueError, match="1-D int32/int64 tensor of batch\\+1 offsets"):
            ops.attention(q, k, v, cu_seqlens=bad)
    with pytest.raises(ValueError, match="cu_seqlens on meta but q on cpu"):
        ops.attention(q, k, v, cu_seqlens=cu.to("meta"))


def test_attention_refuses_batch_and_device_mismatches():
    q, k, v = _qkv(2, 5, 3, 8)
    with pytest.raises(ValueError, match="shapes do not match"):  # a batch-1 k/v would broadcast silently
        ops.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="shapes do not match"):  # head dims differ
        ops.attention(q[..., :4], k, v)
    with pytest.raises(ValueError, match="devices differ"):
        ops.attention(q, k.to("meta"), v.to("meta"))


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_packed_attention_with_empty_sequences(backend):
    """Zero-length sequences (an image with no tokens left, a padded batch) are allowed and take no rows."""
    q, k, v, cu = _packed([3, 0, 5, 0, 1], seed=1)
    out = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=5, backend=backend)
    scale = 1 / math.sqrt(q.shape[-1])
    for a, b in ((0, 3), (3, 8), (8, 9)):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
        torch.testing.assert_close(out[a:b], torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_computes_half_precision_in_fp32(dtype):
    """The torch backend is the fp32-math reference: on half inputs its only error is the final rounding."""
    q, k, v = (t * s for t, s in zip(_qkv(2, 37, 3, 24, seed=2), (2.0, 2.0, 1.0)))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(24)
    exact = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())
    out = ops.attention(q, k, v, backend="torch")
    assert out.dtype == dtype
    rounding = (exact.to(dtype).double() - exact).abs()
    ulp = torch.finfo(dtype).eps * exact.abs() + 1e-6  # a floor for fp16's subnormals
    assert ((out.double() - exact).abs() <= rounding + ulp).all()


def test_auto_attention_on_cpu_is_sdpa_and_fp64_on_cuda_goes_to_torch():
    q, k, v = _qkv(2, 5, 3, 8, dtype=torch.float32)
    assert ops.select_backend("attention", "auto", q, k, v, None, None, None).name == "sdpa"
    assert ops.select_backend("attention", "auto", q.double(), k.double(), v.double(), None, None, None).name == "sdpa"
    with FakeTensorMode():
        qc = torch.empty(2, 5, 3, 8, device="cuda:0", dtype=torch.float64)
        assert ops.describe("attention", qc, qc, qc, None, None, None)["sdpa"] == [
            "float64 on CUDA goes to the torch reference"]
        assert ops.describe("attention", qc.float(), qc.float(), qc.float(), None, None, None)["sdpa"] == []


# ---- attention: the preference table ----------------------------------------------------------------

def _row(seqlen, fwd, train):
    return {"seqlen": seqlen, "fwd_ms": dict(fwd), "train_ms": dict(train)}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a synthetic table for the device name "Audit GPU" (returned by the patched device query)."""
    monkeypatch.setattr(attn, "_device_name", lambda index: "Audit GPU")

    def install(table):
        prefs = {"devices": {"Audit GPU": table}}
        monkeypatch.setattr(attn, "attention_prefs", lambda path=None: prefs)
        return prefs
    return install


def _fake_qkv(B, N, H, D, requires_grad=False):
    q, k, v = (torch.empty(B, N, H, D, device="cuda:0", dtype=torch.bfloat16) for _ in range(3))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def test_rank_from_row_needs_strictly_faster_than_every_sdpa_kernel():
    fast, slow = attn.FASTER_THAN_SDPA_RANK, attn.SLOWER_THAN_SDPA_RANK
    row = _row(100, {"sdpa:flash": 1.0, "sdpa:efficient": 0.6, "triton": 0.6, "xformers": 0.59},
               {"sdpa:flash": 2.0, "sdpa:cudnn": None, "triton": 1.9, "xformers": None})
    assert attn.rank_from_row(row, "triton", train=False) == slow  # a tie is not faster
    assert attn.rank_from_row(row, "xformers", train=False) == fast
    assert attn.rank_from_row(row, "triton", train=True) == fast  # an SDPA kernel that did not run (None) is skipped
    assert attn.rank_from_row(row, "xformers", train=True) == slow  # not measured
    assert attn.rank_from_row(row, "flash_attn", train=False) == slow  # absent
    no_sdpa = _row(100, {"triton": 0.1, "sdpa:math": None}, {"triton": 0.1})
    assert attn.rank_from_row(no_sdpa, "triton", train=False) == slow  # nothing to be faster than
    assert attn.rank_from_row(None, "triton", train=False) == slow


def test_rank_steps_follow_the_nearest_row_even_when_the_table_is_unsorted(fake_gpu):
    """A hand-written table (MAE_FAST_ATTENTION_PREFS) need not list rows by length."""
    fast, slow = attn.FASTER_THAN_SDPA_RANK, attn.SLOWER_THAN_SDPA_RANK
    t = {"sdpa:flash": 1.0}
    rows = [_row(1000, {**t, "triton": 0.5}, {**t, "triton": 0.5}), _row(60, {**t, "triton": 2.0}, {**t, "triton": 2.0}),
            _row(5000, {**t, "triton": 3.0}, {**t, "triton": 3.0}), _row(200, {**t, "triton": 0.5}, {**t, "triton": 0.5})]
    prefs = fake_gpu({"dense": {"40": rows}})

    def nearest(n):  # by hand: the row whose length is nearest on a log scale
        return min(rows, key=lambda r: abs(math.log(r["seqlen"]) - math.log(n)))

    # the boundaries are the geometric means of neighbouring lengths: 109.5, 447.2, 2236.1
    for n in (1, 60, 109, 110, 199, 200, 447, 448, 1000, 2236, 2237, 5000, 10 ** 5):
        want = fast if nearest(n)["fwd_ms"]["triton"] < 1.0 else slow
        assert attn.lookup_pref_row(prefs, "Audit GPU", "dense", 40, n) is nearest(n)
        assert attn.rank_on_device(0, False, 40, n, "triton", False) == want, n
    # no length given: the middle row by length (of 60, 200, 1000, 5000: the 1000 one), from both lookups
    middle = sorted(rows, key=lambda r: r["seqlen"])[2]
    assert attn.lookup_pref_row(prefs, "Audit GPU", "dense", 40, None) is middle
    assert attn.rank_on_device(0, False, 40, None, "triton", False) == fast


def test_rank_reads_the_rows_of_the_query_head_dim(fake_gpu):
    fast, slow = attn.FASTER_THAN_SDPA_RANK, attn.SLOWER_THAN_SDPA_RANK
    slower, faster = {"sdpa:flash": 1.0, "triton": 2.0}, {"sdpa:flash": 1.0, "triton": 0.5}
    fake_gpu({"dense": {"32": [_row(100, slower, slower)], "64": [_row(100, faster, faster)],
                        "128": [_row(100, slower, slower)]}})
    for head_dim, want in ((32, slow), (64, fast), (128, slow), (80, slow)):
        assert attn.rank_on_device(0, False, head_dim, 100, "triton", True) == want, head_dim
        assert attn.rank_on_device(0, False, head_dim, None, "triton", False) == want, head_dim


def test_auto_rank_uses_train_times_only_when_gradients_are_needed(fake_gpu):
    fast, slow = attn.FASTER_THAN_SDPA_RANK, attn.SLOWER_THAN_SDPA_RANK
    # triton: faster than SDPA in forward only; xformers: in fwd+bwd only
    fake_gpu({"dense": {"32": [_row(64, {"sdpa:flash": 1.0, "triton": 0.5, "xformers": 1.5},
                                     {"sdpa:flash": 3.0, "triton": 3.5, "xformers": 2.5})]}})
    with FakeTensorMode():
        q, k, v = _fake_qkv(2, 64, 3, 32)
        assert attn.preferred_backend_rank("triton", q, k, v) == fast
        assert attn.preferred_backend_rank("xformers", q, k, v) == slow
        q, k, v = _fake_qkv(2, 64, 3, 32, requires_grad=True)
        assert attn.preferred_backend_rank("triton", q, k, v) == slow
        assert attn.preferred_backend_rank("xformers", q, k, v) == fast
        with torch.no_grad():  # inference on parameters that require grad: the forward time counts
            assert attn.preferred_backend_rank("triton", q, k, v) == fast
        assert attn.preferred_backend_rank("triton", q.cpu(), k.cpu(), v.cpu()) == slow  # no table off the GPU


def test_packed_rank_and_sdpa_order_use_max_seqlen_and_the_varlen_rows(fake_gpu):
    """Packed q is (tokens, heads, head_dim): its shape[1] is the head count, not a length."""
    fast, slow = attn.FASTER_THAN_SDPA_RANK, attn.SLOWER_THAN_SDPA_RANK
    short = {"sdpa:flash": 1.0, "sdpa:efficient": 2.0, "triton": 3.0}  # flash first, triton slower
    long = {"sdpa:flash": 2.0, "sdpa:efficient": 1.0, "triton": 0.5}  # efficient first, triton faster
    dense_only = {"sdpa:cudnn": 0.1, "sdpa:flash": 0.2, "triton": 9.0}
    fake_gpu({"varlen": {"16": [_row(4, short, short), _row(1000, long, long)]},
              "dense": {"16": [_row(4, dense_only, dense_only), _row(1000, dense_only, dense_only)]}})
    from torch.nn.attention import SDPBackend as S
    with FakeTensorMode():
        q = torch.empty(3000, 4, 16, device="cuda:0", dtype=torch.bfloat16)  # 4 heads
        cu = torch.tensor([0, 1000, 2000, 3000], device="cuda:0", dtype=torch.int32)
        assert attn.preferred_backend_rank("triton", q, q, q, cu, 1000) == fast
        assert attn.preferred_backend_rank("triton", q, q, q, cu, 4) == slow
        assert attn._preferred_sdpa_order(q, q, q, cu, 1000)[:2] == [S.EFFICIENT_ATTENTION, S.FLASH_ATTENTION]
        assert attn._preferred_sdpa_order(q, q, q, cu, 4)[:2] == [S.FLASH_ATTENTION, S.EFFICIENT_ATTENTION]


def test_preferred_sdpa_order_is_fastest_first_and_keeps_every_kernel(fake_gpu):
    from torch.nn.attention import SDPBackend as S
    fwd = {"sdpa:flash": 0.3, "sdpa:cudnn": 0.1, "sdpa:efficient": None, "sdpa:math": 0.9, "triton": 0.01}
    train = {"sdpa:flash": 0.5, "sdpa:efficient": 0.4}
    fake_gpu({"dense": {"32": [_row(100, fwd, train)]}})
    with FakeTensorMode():
        q, k, v = _fake_qkv(2, 100, 3, 32)
        # measured kernels fastest first, then those not measured (None: it did not run), none dropped
        assert attn._preferred_sdpa_order(q, k, v, None, None) == [S.CUDNN_ATTENTION, S.FLASH_ATTENTION, S.MATH,
                                                                    S.EFFICIENT_ATTENTION]
        q, k, v = _fake_qkv(2, 100, 3, 32, requires_grad=True)
        assert attn._preferred_sdpa_order(q, k, v, None, None) == [S.EFFICIENT_ATTENTION, S.FLASH_ATTENTION,
                                                                    S.CUDNN_ATTENTION, S.MATH]
        q, k, v = _fake_qkv(2, 100, 3, 64)  # head dim not measured: PyTorch chooses
        assert attn._preferred_sdpa_order(q, k, v, None, None) is None


def test_a_swapped_preference_table_is_used(monkeypatch, tmp_path):
    """Ranks are cached per table; a table read anew (another MAE_FAST_ATTENTION_PREFS, cache cleared) must be
    used, even though the old table's dict is freed and the new one may get its id."""
    monkeypatch.setattr(attn, "_device_name", lambda index: "Audit GPU")
    paths = []
    for i, triton_ms in enumerate((0.5, 2.0, 0.5, 2.0)):
        times = {"sdpa:flash": 1.0, "triton": triton_ms}
        paths.append(tmp_path / f"prefs{i}.json")
        paths[-1].write_text(json.dumps({"devices": {"Audit GPU": {"dense": {"32": [_row(100, times, times)]}}}}))
    try:
        for path, triton_ms in zip(paths, (0.5, 2.0, 0.5, 2.0)):
            monkeypatch.setenv("MAE_FAST_ATTENTION_PREFS", str(path))
            attn.attention_prefs.cache_clear()
            want = attn.FASTER_THAN_SDPA_RANK if triton_ms < 1.0 else attn.SLOWER_THAN_SDPA_RANK
            assert attn.rank_on_device(0, False, 32, 100, "triton", True) == want, path.name
    finally:
        monkeypatch.delenv("MAE_FAST_ATTENTION_PREFS")
        attn.attention_prefs.cache_clear()


# ---- masking: validation ----------------------------------------------------------------------------

def _perm_ids(B, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return shuffle[:, :K], torch.argsort(shuffle, 1)


def test_masking_refuses_tensors_on_another_device():
    x = torch.randn(2, 9, 5)
    keep, restore = _perm_ids(2, 9, 4)
    with pytest.raises(ValueError, match="gather_visible: ids on meta but input on cpu"):
        ops.gather_visible(x, keep.to("meta"), backend="torch")
    with pytest.raises(ValueError, match="gather_visible: pos_embed on meta but input on cpu"):
        ops.gather_visible(x, keep, torch.randn(9, 5, device="meta"), backend="torch")
    x_vis = torch.randn(2, 5, 5)
    with pytest.raises(ValueError, match="mask_token on meta but x_vis on cpu"):
        ops.unshuffle_with_mask_token(x_vis, restore, torch.randn(5, device="meta"), backend="torch")
    imgs, pred = torch.randn(2, 3, 6, 9), torch.randn(2, 6, 27)
    with pytest.raises(ValueError, match="pred, imgs and mask must share a device"):
        ops.masked_patch_mse(pred, imgs, torch.ones(2, 6, device="meta"), 3, backend="torch")
    with pytest.raises(ValueError, match="pred, imgs and mask must share a device"):
        ops.masked_patch_mse(pred, imgs.to("meta"), torch.ones(2, 6), 3, backend="torch")


def test_masking_refuses_bad_shapes():
    x = torch.randn(2, 9, 5)
    keep, restore = _perm_ids(2, 9, 4)
    with pytest.raises(ValueError, match=r"pos_embed must be \(1, N, D\) or \(N, D\)"):  # not one table per image
        ops.gather_visible(x, keep, torch.randn(2, 9, 5), backend="torch")
    token = torch.randn(5)
    with pytest.raises(ValueError, match="10 visible tokens but only 9 positions"):
        ops.unshuffle_with_mask_token(torch.randn(2, 11, 5), restore, token, backend="torch")
    with pytest.raises(ValueError, match="x_vis has no rows but cls_token=True"):
        ops.unshuffle_with_mask_token(torch.randn(2, 0, 5), restore, token, backend="torch")
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        ops.patchify_gather(torch.randn(2, 3, 6, 9), keep, 0)
    with pytest.raises(ValueError, match="image size 6x10 is not divisible by patch size 3"):
        ops.patchify_gather(torch.randn(2, 3, 6, 10), keep, 3)
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 6\)"):
        ops.masked_patch_mse(torch.randn(2, 6, 27), torch.randn(2, 3, 6, 9), torch.ones(2, 5), 3, backend="torch")
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 6\)"):  # would broadcast over the batch
        ops.masked_patch_mse(torch.randn(2, 6, 27), torch.randn(2, 3, 6, 9), torch.ones(1, 6), 3, backend="torch")


def test_check_ids_false_skips_the_range_check():
    """check_ids=False is the no-host-sync path: no range check in Python (a bad id fails inside the op)."""
    x = torch.randn(2, 9, 5)
    bad = torch.tensor([[0, 9], [1, 2]])
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 9\)"):
        ops.gather_visible(x, bad, backend="torch")
    with pytest.raises(RuntimeError, match="out of bounds"):
        ops.gather_visible(x, bad, backend="torch", check_ids=False)
    keep = torch.tensor([[8, 0], [3, 2]])
    torch.testing.assert_close(ops.gather_visible(x, keep, backend="torch", check_ids=False),
                               torch.stack([x[0, [8, 0]], x[1, [3, 2]]]))


@pytest.mark.parametrize("cls_token", [True, False])
def test_unshuffle_cls_row_and_pos_rows(cls_token):
    B, L, K, D = 2, 11, 4, 7
    keep, restore = _perm_ids(B, L, K, seed=4)
    x_vis = torch.randn(B, K + cls_token, D, dtype=torch.float64)
    token = torch.randn(1, 1, D, dtype=torch.float64)
    pos = torch.randn(L + cls_token, D, dtype=torch.float64)
    out = ops.unshuffle_with_mask_token(x_vis, restore, token, pos[None], cls_token=cls_token, backend="torch")
    want = token[0].expand(B, L, D).clone()
    for b in range(B):
        want[b, keep[b]] = x_vis[b, cls_token:]
    if cls_token:
        want = torch.cat([x_vis[:, :1], want], 1)
    torch.testing.assert_close(out, want + pos)


def test_masked_patch_mse_norm_pix_eps_is_the_official_1e6():
    """On nearly flat patches the eps decides the loss: target = (t - mean) / sqrt(var_unbiased + 1e-6)."""
    B, C, p = 2, 3, 3
    g = torch.Generator().manual_seed(6)
    imgs = (0.5 + 1e-3 * torch.randn(B, C, 6, 9, generator=g, dtype=torch.float64))
    pred = torch.randn(B, 6, p * p * C, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, 6, generator=g) < 0.6).double()
    mask[0, 0] = 1
    total = 0.0
    for b in range(B):
        for i in range(6):
            r, c = divmod(i, 3)
            t = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
            t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
            total += mask[b, i].item() * ((pred[b, i] - t) ** 2).mean().item()
    got = ops.masked_patch_mse(pred, imgs, mask, p, True, backend="torch")
    assert abs(got.item() - total / mask.sum().item()) < 1e-5 * abs(total / mask.sum().item())


# ---- LayerNorm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_layer_norm_ops_use_the_norms_eps(eps):
    """(x - mean) / sqrt(biased var + eps) * weight + bias, with the norm's own eps (1e-6 in ViTs, not 1e-5)."""
    g = torch.Generator().manual_seed(7)
    D = 19
    norm = nn.LayerNorm(D, eps=eps).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(D, generator=g))
        norm.bias.copy_(0.3 * torch.randn(D, generator=g))
    x = 1.0 + 0.05 * torch.randn(4, 5, D, generator=g, dtype=torch.float64)  # low variance: eps matters
    branch = 0.05 * torch.randn(4, 5, D, generator=g, dtype=torch.float64)

    def by_hand(t):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias

    torch.testing.assert_close(ops.layer_norm(x, norm, backend="torch"), by_hand(x))
    x_mid, y = ops.add_layer_norm(x, branch, norm, backend="torch")
    torch.testing.assert_close(x_mid, x + branch)
    torch.testing.assert_close(y, by_hand(x + branch))
    y32 = ops.layer_norm(x, norm, torch.float32, backend="torch")
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, by_hand(x).float())


# ---- the lean block pieces: gradients equal plain autograd's --------------------------------------

def _mods(D, hidden, norm_kind, bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    norm = nn.LayerNorm(D, eps=1e-5, elementwise_affine=norm_kind != "none", bias=norm_kind == "both")
    fc1, fc2 = nn.Linear(D, hidden, bias=bias), nn.Linear(hidden, D, bias=bias)
    for p in [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]:
        p.data.normal_(0, 0.5)
    return norm.to(dtype), fc1.to(dtype), fc2.to(dtype)


@pytest.mark.parametrize("norm_kind,bias,shape", [("both", False, (3, 5, 13)), ("weight", True, (7, 13)),
                                                  ("none", True, (2, 3, 2, 13)), ("none", False, (4, 13))])
def test_lean_gradients_equal_autograd_for_every_norm_and_linear_variant(norm_kind, bias, shape):
    """LayerNorm with weight and bias, weight only or neither; Linear with and without bias; 2-D to 4-D x."""
    norm, fc1, fc2 = _mods(13, 19, norm_kind, bias)
    params = [p for m in (norm, fc1, fc2) for p in m.parameters()]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    cases = {
        "linear": (lambda: ops.layer_norm_linear(x, norm, fc1), lambda: fc1(norm(x))),
        "mlp": (lambda: ops.layer_norm_mlp(x, norm, fc1, fc2), lambda: fc2(nn.functional.gelu(fc1(norm(x))))),
        "residual": (lambda: ops.residual_layer_norm_mlp(x, branch, norm, fc1, fc2),
                     lambda: (x + branch) + fc2(nn.functional.gelu(fc1(norm(x + branch))))),
    }
    for name, (lean, eager) in cases.items():
        wrt = [x, *params] + ([branch] if name == "residual" else [])
        y_lean, y_eager = lean(), eager()
        torch.testing.assert_close(y_lean, y_eager, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y_eager)
        for a, b, t in zip(torch.autograd.grad(y_lean, wrt, g, allow_unused=True),
                           torch.autograd.grad(y_eager, wrt, g, allow_unused=True), wrt):
            if b is None:  # fc2 in the linear case
                assert a is None
                continue
            assert a.dtype == t.dtype and a.shape == t.shape
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("which", ["linear", "mlp", "residual"])
def test_lean_on_a_bf16_model_under_autocast_matches_eager(which):
    """Parameters and stream in bf16 (a model cast with .to(bfloat16)) under bf16 autocast: eager autocast runs the
    LayerNorm in fp32; the lean ops must too (forward bit-identical), and return grads in each input's dtype."""
    norm, fc1, fc2 = _mods(24, 40, "both", True, dtype=torch.bfloat16, seed=3)
    params = [p for m in (norm, fc1, fc2) for p in m.parameters()]
    x = torch.randn(3, 7, 24).to(torch.bfloat16).requires_grad_()
    branch = torch.randn(3, 7, 24).to(torch.bfloat16).requires_grad_()
    mlp = lambda t: fc2(nn.functional.gelu(fc1(norm(t))))  # noqa: E731
    lean, eager = {
        "linear": (lambda: ops.layer_norm_linear(x, norm, fc1), lambda: fc1(norm(x))),
        "mlp": (lambda: ops.layer_norm_mlp(x, norm, fc1, fc2), lambda: mlp(x)),
        "residual": (lambda: ops.residual_layer_norm_mlp(x, branch, norm, fc1, fc2),
                     lambda: (x + branch) + mlp(x + branch)),
    }[which]
    wrt = [x, branch, *params] if which == "residual" else [x, *params[:4]] if which == "linear" else [x, *params]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_lean, y_eager = lean(), eager()
    assert y_lean.dtype == y_eager.dtype == torch.bfloat16
    assert torch.equal(y_lean, y_eager)
    g = torch.randn(y_eager.shape).to(torch.bfloat16)
    # the fp32 math reference: the same bf16 values, everything in fp32
    ref = [t.detach().float().requires_grad_() for t in wrt]
    if which == "residual":
        xr, br, *p = ref
        mid = xr + br
    else:
        mid, *p = ref
    y_ref = nn.functional.linear(nn.functional.layer_norm(mid, (24,), p[0], p[1], 1e-5), p[2], p[3])
    if which != "linear":
        y_ref = nn.functional.linear(nn.functional.gelu(y_ref), p[4], p[5])
    if which == "residual":
        y_ref = mid + y_ref
    g_ref = torch.autograd.grad(y_ref, ref, g.float())
    for a, b, r, t in zip(torch.autograd.grad(y_lean, wrt, g), torch.autograd.grad(y_eager, wrt, g), g_ref, wrt):
        assert a.dtype == t.dtype
        err, err_eager = (a.float() - r).abs().max().item(), (b.float() - r).abs().max().item()
        assert err <= 2 * err_eager + 1e-2 * r.abs().max().item(), (err, err_eager)
