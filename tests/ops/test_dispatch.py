"""Dispatch: the priority lists, auto's order and its two adjustments (the measured attention table, the loaded
CUDA extension), forcing backends (``use_backend``, ``MAE_FAST_BACKEND``), ``mae-fast info``'s backend report,
and the shape of the op layer itself.

Preference-table logic runs on synthetic tables and fake CUDA tensors (FakeTensorMode: no GPU, no kernel runs),
with the device name monkeypatched.
"""
import ast
import importlib
import json
import math
import re
import threading
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_fast import ops
from mae_fast.ops import dispatch

attn = importlib.import_module("mae_fast.ops.attention")  # the module (the package exports a function of that name)
REPO = Path(__file__).resolve().parents[2]


def _perm_ids(B, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return shuffle[:, :K], torch.argsort(shuffle, 1)


# ---- a made-up op: auto's walk, named backends, errors ------------------------------------------------

@pytest.fixture
def toy_op(monkeypatch):
    """A made-up op ``toy_op``, priority ``fast, mid, slow``: ``fast`` a GPU kernel whose library is missing,
    ``mid`` refuses negative inputs, ``slow`` takes anything. Inputs are one-element tensors."""
    monkeypatch.delenv("MAE_FAST_BACKEND", raising=False)
    monkeypatch.setitem(dispatch.PRIORITY, "toy_op", ["fast", "mid", "slow"])

    def fast_reasons(x):
        raise AssertionError("reasons of an unavailable backend must not be asked (its library may be missing)")

    table = {
        "fast": dispatch.Backend(op="toy_op", name="fast", fn=lambda x: "fast", reasons=fast_reasons,
                                 available=lambda: "fastlib not installed", gpu=True),
        "mid": dispatch.Backend(op="toy_op", name="mid", fn=lambda x: "mid",
                                reasons=lambda x: ["negative input"] if x < 0 else []),
        "slow": dispatch.Backend(op="toy_op", name="slow", fn=lambda x: "slow", reasons=lambda x: []),
    }
    for b in table.values():
        dispatch.register_backend(b)
    yield table
    del dispatch._REGISTRY["toy_op"]


def _pick(x, backend="auto"):
    return dispatch.select_backend("toy_op", backend, torch.tensor(float(x))).name


def test_auto_takes_the_first_that_can_run_and_skips_unavailable_backends(toy_op):
    assert _pick(3) == "mid"  # "fast" is not installed
    assert _pick(-1) == "slow"  # mid refuses
    assert dispatch.describe("toy_op", 3) == {"fast": ["fastlib not installed"], "mid": [], "slow": []}
    with pytest.raises(dispatch.NoBackendError, match="backend 'fast' cannot run these inputs: fastlib not installed"):
        _pick(3, "fast")
    assert _pick(3, "slow") == "slow"  # a named backend is used even where auto would pick another


def test_no_backend_error_lists_every_backend_and_unknown_names_list_every_choice(toy_op, monkeypatch):
    monkeypatch.setattr(toy_op["slow"], "reasons", lambda x: ["too slow today"])
    with pytest.raises(dispatch.NoBackendError) as err:
        _pick(-1)
    lines = str(err.value).splitlines()
    assert lines[0] == "toy_op: no backend can run these inputs:"
    assert sorted(lines[1:]) == ["  fast: fastlib not installed", "  mid: negative input", "  slow: too slow today"]
    with pytest.raises(ValueError, match=r"toy_op: unknown backend 'nope'; choose from \['auto', 'fast', 'mid', "
                                         r"'slow'\]"):
        _pick(3, "nope")


def test_auto_order_gpu_kernels_last_on_cpu_preferred_first_on_cuda(toy_op, monkeypatch):
    cpu = torch.tensor(1.0)
    assert [b.name for b in dispatch.auto_order("toy_op", cpu)] == ["mid", "slow", "fast"]
    monkeypatch.setattr(toy_op["slow"], "preferred", lambda x: True)
    assert [b.name for b in dispatch.auto_order("toy_op", cpu)] == ["mid", "slow", "fast"]  # CPU: ignored
    with FakeTensorMode():
        gpu = torch.empty((), device="cuda:0")
        assert [b.name for b in dispatch.auto_order("toy_op", gpu)] == ["slow", "fast", "mid"]
        monkeypatch.setattr(toy_op["mid"], "preferred", lambda x: True)  # several: in priority order
        assert [b.name for b in dispatch.auto_order("toy_op", gpu)] == ["mid", "slow", "fast"]


def test_a_backend_outside_the_priority_list_cannot_register():
    with pytest.raises(KeyError, match=r"attention: backend 'mine' is not in dispatch.PRIORITY\['attention'\]"):
        dispatch.register_backend(dispatch.Backend(op="attention", name="mine", fn=None, reasons=lambda *a: []))


def test_a_backend_that_refuses_is_skipped_and_forcing_it_says_why():
    x = torch.randn(2, 10, 4)
    ids = torch.tensor([[0, 3], [9, 1]])
    with pytest.raises(ValueError, match="unknown backend"):
        ops.gather_visible(x, ids, backend="nope")
    with pytest.raises(ops.NoBackendError, match="backend 'cuda' cannot run these inputs: "):
        ops.gather_visible(x, ids, backend="cuda")
    with ops.use_backend(gather_visible="cuda"), pytest.raises(ops.NoBackendError, match="backend 'cuda'"):
        ops.gather_visible(x, ids)


# ---- every public op's auto order is its priority list ---------------------------------------------

def _probe_args(op, device):
    """Inputs of each op's select_backend call, on ``device`` (fake CUDA tensors need FakeTensorMode)."""
    t = lambda *s, dtype=torch.bfloat16: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
    ids = torch.zeros(2, 4, device=device, dtype=torch.int64)
    w = t(32)
    return {
        "attention": (t(2, 9, 2, 40), t(2, 9, 2, 40), t(2, 9, 2, 40), None, None, None),
        "gather_visible": (t(2, 9, 32), ids, None),
        "unshuffle_with_mask_token": (t(2, 5, 32), ids, w, None, True),
        "patchify_gather": (t(2, 3, 8, 8), ids, 4),
        "masked_patch_mse": (t(2, 4, 48), t(2, 3, 8, 8), t(2, 4), 4, True),
        "layer_norm": (t(2, 9, 32), w, w, 1e-6, torch.bfloat16),
        "add_layer_norm": (t(2, 9, 32), t(2, 9, 32), w, w, 1e-6, torch.bfloat16),
        "hog": (t(2, 3, 16, 16), 8, 9, 8, 0),
    }[op]


@pytest.mark.parametrize("op", ops.OPS)
def test_each_ops_auto_order_is_its_priority_list(op, monkeypatch):
    """On CUDA tensors with nothing measured and no extension loaded, auto tries exactly ``PRIORITY[op]``; on CPU
    tensors the GPU kernels come after the rest, in the same order."""
    monkeypatch.setattr(attn, "_device_name", lambda index: "Unmeasured GPU")
    assert list(ops.backends_for(op)) == dispatch.PRIORITY[op]
    with FakeTensorMode():
        assert [b.name for b in ops.auto_order(op, *_probe_args(op, "cuda:0"))] == dispatch.PRIORITY[op]
    gpu = {n for n, b in ops.backends_for(op).items() if b.gpu}
    cpu_order = [n for n in dispatch.PRIORITY[op] if n not in gpu] + [n for n in dispatch.PRIORITY[op] if n in gpu]
    assert [b.name for b in ops.auto_order(op, *_probe_args(op, "cpu"))] == cpu_order
    assert ops.select_backend(op, "auto", *_probe_args(op, "cpu")).name == cpu_order[0]


def test_a_loaded_cuda_extension_goes_ahead_of_triton(monkeypatch):
    from mae_fast.csrc import masking as cuda_masking

    with FakeTensorMode():
        args = _probe_args("unshuffle_with_mask_token", "cuda:0")
        monkeypatch.setattr(cuda_masking, "_module", None)
        assert [b.name for b in ops.auto_order("unshuffle_with_mask_token", *args)] == ["triton", "cuda", "torch"]
        monkeypatch.setattr(cuda_masking, "_module", object())
        assert [b.name for b in ops.auto_order("unshuffle_with_mask_token", *args)] == ["cuda", "triton", "torch"]
        assert [b.name for b in ops.auto_order("patchify_gather", *_probe_args("patchify_gather", "cuda:0"))] == [
            "triton", "torch"]


def test_measured_attention_backends_move_ahead_of_sdpa_and_nothing_else_moves(fake_gpu):
    faster = {"sdpa:flash": 1.0, "triton": 0.5, "xformers": 0.7, "flash_attn": 2.0}
    fake_gpu({"dense": {"40": [_row(9, faster, faster)]}})
    with FakeTensorMode():
        args = _probe_args("attention", "cuda:0")
        assert [b.name for b in ops.auto_order("attention", *args)] == ["triton", "xformers", "sdpa", "flash_attn",
                                                                        "flash_attn_4", "torch"]


# ---- forcing: use_backend and MAE_FAST_BACKEND -------------------------------------------------------

def test_use_backend_forces_nests_and_restores(monkeypatch):
    monkeypatch.delenv("MAE_FAST_BACKEND", raising=False)
    q = torch.randn(1, 5, 2, 32)
    x = torch.randn(2, 9, 32)
    ln = (x, None, None, 1e-6, torch.float32)

    def picks():
        return (ops.select_backend("attention", "auto", q, q, q, None, None, None).name,
                ops.select_backend("layer_norm", "auto", *ln).name)

    assert picks() == ("sdpa", "torch")
    with ops.use_backend("torch"):
        assert picks() == ("torch", "torch")
        with ops.use_backend(attention="sdpa"):
            assert picks() == ("sdpa", "torch")
            assert ops.select_backend("attention", "torch", q, q, q, None, None, None).name == "torch"  # argument wins
        assert picks() == ("torch", "torch")
    assert picks() == ("sdpa", "torch")
    with ops.use_backend("triton", layer_norm="auto"):  # per-op names win over the one name
        assert ops.select_backend("layer_norm", "auto", *ln).name == "torch"
        with pytest.raises(ops.NoBackendError, match="attention: backend 'triton' cannot run these inputs"):
            with ops.use_backend(attention="triton", masked_patch_mse="torch"):
                monkeypatch.setenv("TRITON_INTERPRET", "0")
                ops.attention(q, q, q)
    assert picks() == ("sdpa", "torch")  # restored after an exception too
    monkeypatch.setenv("MAE_FAST_BACKEND", "attention=torch")
    assert picks() == ("torch", "torch")
    with ops.use_backend(attention="sdpa"):  # the context manager overrides the environment
        assert picks() == ("sdpa", "torch")


def test_use_backend_refuses_unknown_names_in_one_line():
    for kwargs, msg in (({"atention": "sdpa"}, "use_backend: unknown op 'atention'; known ops: "),
                        ({"attention": "spda"}, "use_backend: attention has no backend 'spda'; choose from "),):
        with pytest.raises(ValueError, match=re.escape(msg)) as err:
            with ops.use_backend(**kwargs):
                pass
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="use_backend: no op has a backend 'nope'"):
        with ops.use_backend("nope"):
            pass


def test_use_backend_in_threads_restores_in_any_order():
    """Blocks entered and left by different threads in interleaved order each remove their own entry."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with ops.use_backend(attention="torch"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with ops.use_backend(attention="sdpa"):
            b_in.set()
            a_out.wait(5)  # the outer block, entered first, leaves first
            assert dispatch.forced_backend("attention") == "sdpa"

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert dispatch._FORCED == [] and dispatch.forced_backend("attention") in (None, "")


@pytest.mark.parametrize("spec,want", [
    ("slow", "slow"),  # one name for every op that has it
    ("auto", "mid"),
    ("gather_visible=torch", "mid"),  # pairs for other ops leave this one on auto
    ("toy_op=slow", "slow"),
    ("attention=sdpa,toy_op=slow", "slow"),
    ("toy_op=auto,attention=sdpa", "mid"),
    (" attention = sdpa , toy_op = slow ", "slow"),  # spaces after commas or around '=' name the op all the same
    ("toy_op =slow", "slow"),
    ("toy_op= slow", "slow"),
])
def test_mae_fast_backend_forces_a_backend_per_op(toy_op, monkeypatch, spec, want):
    monkeypatch.setenv("MAE_FAST_BACKEND", spec)
    assert _pick(3) == want
    assert _pick(3, "mid") == "mid"  # an explicit backend argument wins over the environment


def test_mae_fast_backend_errors(toy_op, monkeypatch):
    """A name for one op that it lacks, or a pair naming no op, would force nothing silently: both are errors.
    One name for every op stays a preference: ops without a backend of that name keep auto."""
    monkeypatch.setenv("MAE_FAST_BACKEND", "toy_op=nope")
    with pytest.raises(ValueError, match=r"toy_op: unknown backend 'nope' \(MAE_FAST_BACKEND\); choose from "
                                         r"\['auto', 'fast', 'mid', 'slow'\]"):
        _pick(3)
    monkeypatch.setenv("MAE_FAST_BACKEND", "toy_op= slo")
    with pytest.raises(ValueError, match="toy_op: unknown backend 'slo'"):
        _pick(3)
    for spec in ("atention=sdpa", "toy_op=slow, toy_opp=slow"):
        monkeypatch.setenv("MAE_FAST_BACKEND", spec)
        with pytest.raises(ValueError, match=r"names unknown op\(s\) \['(atention|toy_opp)'\]") as err:
            _pick(3)
        assert "'toy_op'" in str(err.value) and "'attention'" in str(err.value)  # the known ops are listed
    monkeypatch.setenv("MAE_FAST_BACKEND", "toy_op=mid")
    with pytest.raises(dispatch.NoBackendError, match="backend 'mid' cannot run these inputs: negative input"):
        _pick(-1)
    monkeypatch.setenv("MAE_FAST_BACKEND", "sdpa")  # toy_op has no sdpa: auto
    assert _pick(3) == "mid"
    x = torch.randn(2, 9, 5)
    keep = _perm_ids(2, 9, 3)[0]
    torch.testing.assert_close(ops.gather_visible(x, keep), x[torch.arange(2)[:, None], keep])


# ---- attention: the preference table ------------------------------------------------------------------

def _row(seqlen, fwd, train):
    return {"seqlen": seqlen, "fwd_ms": dict(fwd), "train_ms": dict(train)}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a synthetic table for the device name "Test GPU" (returned by the patched device query)."""
    monkeypatch.setattr(attn, "_device_name", lambda index: "Test GPU")

    def install(table):
        prefs = {"devices": {"Test GPU": table}}
        monkeypatch.setattr(attn, "attention_prefs", lambda path=None: prefs)
        return prefs
    return install


def _fake_qkv(B, N, H, D, requires_grad=False):
    q, k, v = (torch.empty(B, N, H, D, device="cuda:0", dtype=torch.bfloat16) for _ in range(3))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def test_faster_than_sdpa_needs_strictly_faster_than_every_sdpa_kernel():
    fast, slow = True, False
    row = _row(100, {"sdpa:flash": 1.0, "sdpa:efficient": 0.6, "triton": 0.6, "xformers": 0.59},
               {"sdpa:flash": 2.0, "sdpa:cudnn": None, "triton": 1.9, "xformers": None})
    assert attn.faster_than_sdpa(row, "triton", train=False) == slow  # a tie is not faster
    assert attn.faster_than_sdpa(row, "xformers", train=False) == fast
    assert attn.faster_than_sdpa(row, "triton", train=True) == fast  # an SDPA kernel that did not run (None) is skipped
    assert attn.faster_than_sdpa(row, "xformers", train=True) == slow  # not measured
    assert attn.faster_than_sdpa(row, "flash_attn", train=False) == slow  # absent
    no_sdpa = _row(100, {"triton": 0.1, "sdpa:math": None}, {"triton": 0.1})
    assert attn.faster_than_sdpa(no_sdpa, "triton", train=False) == slow  # nothing to be faster than
    assert attn.faster_than_sdpa(None, "triton", train=False) == slow


def test_preference_steps_follow_the_nearest_row_even_when_the_table_is_unsorted(fake_gpu):
    """A hand-written table (MAE_FAST_ATTENTION_PREFS) need not list rows by length."""
    fast, slow = True, False
    t = {"sdpa:flash": 1.0}
    rows = [_row(1000, {**t, "triton": 0.5}, {**t, "triton": 0.5}), _row(60, {**t, "triton": 2.0}, {**t, "triton": 2.0}),
            _row(5000, {**t, "triton": 3.0}, {**t, "triton": 3.0}), _row(200, {**t, "triton": 0.5}, {**t, "triton": 0.5})]
    prefs = fake_gpu({"dense": {"40": rows}})

    def nearest(n):  # by hand: the row whose length is nearest on a log scale
        return min(rows, key=lambda r: abs(math.log(r["seqlen"]) - math.log(n)))

    # the boundaries are the geometric means of neighbouring lengths: 109.5, 447.2, 2236.1
    for n in (1, 60, 109, 110, 199, 200, 447, 448, 1000, 2236, 2237, 5000, 10 ** 5):
        want = fast if nearest(n)["fwd_ms"]["triton"] < 1.0 else slow
        assert attn.lookup_pref_row(prefs, "Test GPU", "dense", 40, n) is nearest(n)
        assert attn.faster_on_device(0, False, 40, n, "triton", False) == want, n
    # no length given: the middle row by length (of 60, 200, 1000, 5000: the 1000 one), from both lookups
    middle = sorted(rows, key=lambda r: r["seqlen"])[2]
    assert attn.lookup_pref_row(prefs, "Test GPU", "dense", 40, None) is middle
    assert attn.faster_on_device(0, False, 40, None, "triton", False) == fast


def test_preference_reads_the_rows_of_the_query_head_dim(fake_gpu):
    fast, slow = True, False
    slower, faster = {"sdpa:flash": 1.0, "triton": 2.0}, {"sdpa:flash": 1.0, "triton": 0.5}
    fake_gpu({"dense": {"32": [_row(100, slower, slower)], "64": [_row(100, faster, faster)],
                        "128": [_row(100, slower, slower)]}})
    for head_dim, want in ((32, slow), (64, fast), (128, slow), (80, slow)):
        assert attn.faster_on_device(0, False, head_dim, 100, "triton", True) == want, head_dim
        assert attn.faster_on_device(0, False, head_dim, None, "triton", False) == want, head_dim


def test_preference_uses_train_times_only_when_gradients_are_needed(fake_gpu):
    fast, slow = True, False
    # triton: faster than SDPA in forward only; xformers: in fwd+bwd only
    fake_gpu({"dense": {"32": [_row(64, {"sdpa:flash": 1.0, "triton": 0.5, "xformers": 1.5},
                                     {"sdpa:flash": 3.0, "triton": 3.5, "xformers": 2.5})]}})
    with FakeTensorMode():
        q, k, v = _fake_qkv(2, 64, 3, 32)
        assert attn.measured_faster("triton", q, k, v) == fast
        assert attn.measured_faster("xformers", q, k, v) == slow
        q, k, v = _fake_qkv(2, 64, 3, 32, requires_grad=True)
        assert attn.measured_faster("triton", q, k, v) == slow
        assert attn.measured_faster("xformers", q, k, v) == fast
        with torch.no_grad():  # inference on parameters that require grad: the forward time counts
            assert attn.measured_faster("triton", q, k, v) == fast
        assert attn.measured_faster("triton", q.cpu(), k.cpu(), v.cpu()) == slow  # no table off the GPU


def test_packed_preference_and_sdpa_order_use_max_seqlen_and_the_varlen_rows(fake_gpu):
    """Packed q is (tokens, heads, head_dim): its shape[1] is the head count, not a length."""
    fast, slow = True, False
    short = {"sdpa:flash": 1.0, "sdpa:efficient": 2.0, "triton": 3.0}  # flash first, triton slower
    long = {"sdpa:flash": 2.0, "sdpa:efficient": 1.0, "triton": 0.5}  # efficient first, triton faster
    dense_only = {"sdpa:cudnn": 0.1, "sdpa:flash": 0.2, "triton": 9.0}
    fake_gpu({"varlen": {"16": [_row(4, short, short), _row(1000, long, long)]},
              "dense": {"16": [_row(4, dense_only, dense_only), _row(1000, dense_only, dense_only)]}})
    from torch.nn.attention import SDPBackend as S
    with FakeTensorMode():
        q = torch.empty(3000, 4, 16, device="cuda:0", dtype=torch.bfloat16)  # 4 heads
        cu = torch.tensor([0, 1000, 2000, 3000], device="cuda:0", dtype=torch.int32)
        assert attn.measured_faster("triton", q, q, q, cu, 1000) == fast
        assert attn.measured_faster("triton", q, q, q, cu, 4) == slow
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
    """Preferences are cached per table; a table read anew (another MAE_FAST_ATTENTION_PREFS, cache cleared) must be
    used, even though the old table's dict is freed and the new one may get its id."""
    monkeypatch.setattr(attn, "_device_name", lambda index: "Test GPU")
    paths = []
    for i, triton_ms in enumerate((0.5, 2.0, 0.5, 2.0)):
        times = {"sdpa:flash": 1.0, "triton": triton_ms}
        paths.append(tmp_path / f"prefs{i}.json")
        paths[-1].write_text(json.dumps({"devices": {"Test GPU": {"dense": {"32": [_row(100, times, times)]}}}}))
    try:
        for path, triton_ms in zip(paths, (0.5, 2.0, 0.5, 2.0)):
            monkeypatch.setenv("MAE_FAST_ATTENTION_PREFS", str(path))
            attn.attention_prefs.cache_clear()
            want = triton_ms < 1.0
            assert attn.faster_on_device(0, False, 32, 100, "triton", True) == want, path.name
    finally:
        monkeypatch.delenv("MAE_FAST_ATTENTION_PREFS")
        attn.attention_prefs.cache_clear()


def test_shipped_preference_table_prefers_triton_only_where_measured_faster():
    prefs = attn.attention_prefs()
    if not prefs.get("devices"):
        pytest.skip("no preference table committed")
    for device_name, layouts in prefs["devices"].items():
        for layout, by_dim in layouts.items():
            for head_dim, rows in by_dim.items():
                for row in rows:
                    for train in (False, True):
                        times = row["train_ms" if train else "fwd_ms"]
                        best_sdpa = min(t for b, t in times.items() if b.startswith("sdpa"))
                        want = times.get("triton", math.inf) < best_sdpa
                        found = attn.lookup_pref_row(prefs, device_name, layout, int(head_dim), row["seqlen"])
                        assert attn.faster_than_sdpa(found, "triton", train) == want
    assert attn.lookup_pref_row(prefs, "Some Other GPU", "dense", 64, 100) is None
    assert attn.faster_than_sdpa(None, "triton", True) is False


def _fake_table(monkeypatch):
    """A preference table for a made-up GPU (index 0): triton faster than SDPA at 1000 tokens only."""
    def row(seqlen, triton_ms):
        times = {"sdpa:flash": 1.0, "sdpa:efficient": 1.5, "triton": triton_ms}
        return {"seqlen": seqlen, "fwd_ms": dict(times), "train_ms": dict(times)}

    prefs = {"devices": {"Fake GPU": {"dense": {"32": [row(100, 2.0), row(1000, 0.5), row(4000, 3.0)]},
                                      "varlen": {"32": [row(300, 0.5), row(900, 2.0), row(2000, 0.5)]}}}}
    monkeypatch.setattr(attn, "attention_prefs", lambda path=None: prefs)
    monkeypatch.setattr(attn, "_device_name", lambda index: "Fake GPU")
    return attn, prefs


def test_preference_steps_match_the_nearest_row(monkeypatch):
    """The steps ``auto`` uses (eager and compiled) pick what ``lookup_pref_row`` picks, at every length."""
    attn, prefs = _fake_table(monkeypatch)
    for varlen, layout in ((False, "dense"), (True, "varlen")):
        for seqlen in [1, 2, 99, 100, 101, 315, 316, 317, 999, 1000, 1999, 2000, 2001, 3999, 4000, 10 ** 6, None]:
            for train in (False, True):
                want = attn.faster_than_sdpa(attn.lookup_pref_row(prefs, "Fake GPU", layout, 32, seqlen), "triton", train)
                assert attn.faster_on_device(0, varlen, 32, seqlen, "triton", train) == want, (layout, seqlen)
        assert attn.faster_on_device(0, varlen, 64, 1000, "triton", True) is False  # no row
    # the boundary between the 100- and 1000-token rows is their geometric mean (316.2)
    assert attn.faster_on_device(0, False, 32, 316, "triton", True) is False
    assert attn.faster_on_device(0, False, 32, 317, "triton", True) is True


def test_preference_traces_with_symbolic_lengths(monkeypatch):
    """Under torch.compile(fullgraph=True) the table lookup traces, sequence lengths that vary between calls
    (symbolic after the first recompile) included, and answers as eager does."""
    attn, _ = _fake_table(monkeypatch)

    def f(x):
        faster = attn.faster_on_device(0, False, x.shape[-1], x.shape[1], "triton", True)
        return x * 2 if faster else x * 3

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, backend="eager")
    for n in (100, 1000, 700, 250, 3000, 5000, 1200):
        x = torch.randn(1, n, 2, 32)
        torch.testing.assert_close(g(x), f(x), rtol=0, atol=0)
    torch._dynamo.reset()


# ---- mae-fast info: the backend report ---------------------------------------------------------------

def test_info_runs():
    from mae_fast.info import report

    text = report()
    assert "attention" in text and "auto ->" in text and "torch" in text
    for op in ops.OPS:  # every op of the layer is probed, the fused LayerNorm included
        assert f"  {op} " in text, op
    from mae_fast.data.video import resolve_backend

    video = next(line for line in text.splitlines() if line.startswith("video "))
    assert f"auto -> {'PyAV' if resolve_backend('auto') == 'pyav' else 'torchcodec'}" in video


def test_info_and_auto_say_when_the_attention_preference_table_is_missing(monkeypatch, tmp_path):
    """An install without the measured table once ranked backends silently; now auto warns and info says so."""
    from mae_fast.info import report
    from mae_fast.ops.attention import attention_prefs

    line = next(x for x in report().splitlines() if x.startswith("attn prefs "))
    assert "measured on NVIDIA H100" in line  # the table the repository ships
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("MAE_FAST_ATTENTION_PREFS", str(missing))
    attention_prefs.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="attention preference table .*nope.json is unreadable"):
            assert attention_prefs() == {}
        line = next(x for x in report().splitlines() if x.startswith("attn prefs "))
        assert line.endswith(f"none measured in {missing}: auto ranks attention backends in their default order")
    finally:
        monkeypatch.delenv("MAE_FAST_ATTENTION_PREFS")
        attention_prefs.cache_clear()


def test_info_names_the_attention_tiling():
    from mae_fast.info import report
    from mae_fast.kernels import flash_attention as fa

    line = next(line for line in report().splitlines() if line.startswith("fa tiling "))
    assert line.endswith("split (default): head dim 80 -> 64 + 32 columns; launch options: single, wrap, equal; "
                         f"tuned configs: {len(fa.tuned_table())}")


@pytest.mark.parametrize("img_size,mask_ratio", [(None, 0.75), (40, 0.6)])
def test_info_model_shapes_are_the_ones_a_training_step_runs(monkeypatch, img_size, mask_ratio):
    """``mae-fast info --model`` reports the attention shapes of a step from the config alone: the same
    (tokens of keys, heads, head dim) the model's attention calls get."""
    import importlib

    import mae_fast
    from mae_fast.info import attention_shapes, main

    attn_mod = importlib.import_module("mae_fast.ops.attention")
    seen = set()
    real = attn_mod.attention

    def spy(q, k, v, **kw):
        seen.add(tuple(k.shape[1:]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mae_fast.models.mae.ops, "attention", spy)
    kw = {"img_size": img_size} if img_size else {}
    m = mae_fast.create_model("mae_vit_demo_patch8", **kw)
    side = img_size or m.patch_embed.grid_size[0] * 8
    m(torch.randn(2, 3, side, side), mask_ratio, masked_only=True)
    want = attention_shapes("mae_vit_demo_patch8", img_size, mask_ratio)
    assert seen == set(want.values())
    assert main(["--model", "mae_vit_demo_patch8", "--mask-ratio", str(mask_ratio)]
                + (["--img-size", str(img_size)] if img_size else [])) == 0
    assert main(["--model", "no_such_model"]) == 2


# ---- the shape of the op layer --------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_kernels_import_nothing_from_the_op_layer():
    for path in sorted((REPO / "kernels").glob("*.py")) + sorted((REPO / "csrc").glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(("mae_fast.ops", "..ops", ".ops")) or m == "mae_fast"}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_import_time_environment_flags_for_kernel_variants():
    """Kernel variants are launch parameters; the environment is read only by platform.py, dispatch.py (forcing),
    the preference table's path and the CUDA build switch, and never at import to pick a kernel."""
    sources = [*(REPO / "kernels").glob("*.py"), *(REPO / "csrc").glob("*.py"), *(REPO / "mae_fast" / "ops").glob("*.py"),
               *(REPO / "bench").glob("*.py"), *(REPO / "bench").glob("*.sh")]
    for path in sources:
        text = path.read_text()
        assert "MAE_FAST_FA_" not in text, path.name
        assert "importlib.reload" not in text, path.name
    for path in (REPO / "kernels").glob("*.py"):
        assert "os.environ" not in path.read_text(), path.name
    readers = {p.name for p in (REPO / "mae_fast" / "ops").glob("*.py") if "os.environ" in p.read_text()}
    assert readers == {"platform.py", "dispatch.py", "attention.py"}
    attention_src = (REPO / "mae_fast" / "ops" / "attention.py").read_text()
    assert attention_src.count("os.environ") == 1 and "MAE_FAST_ATTENTION_PREFS" in attention_src


def test_one_op_one_file():
    """The helper modules the op layer once spread an op over are gone; each kernels file holds its custom op."""
    ops_dir = REPO / "mae_fast" / "ops"
    assert sorted(p.name for p in ops_dir.glob("*.py")) == [
        "__init__.py", "attention.py", "dispatch.py", "hog.py", "layer_norm.py", "lean.py", "masking.py", "platform.py"]
    for name in ("flash_attention", "hog", "layer_norm", "masking"):
        assert "torch.library.custom_op" in (REPO / "kernels" / f"{name}.py").read_text(), name
