"""Fused residual add + LayerNorm: the Triton kernels (CPU: interpreter; GPU: compiled) against fp64 torch, and
the ``torch`` backend against the eager ops it replaces in the model.

Accuracy as for flash attention: the kernel's error vs fp64 must be within 2x (outputs) or 3x (gradients) of the
error PyTorch makes doing the same computation in the input dtypes, plus a floor of about an ulp.
"""
import importlib
import inspect
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mae_fast
from mae_fast import ops
from mae_fast.kernels import layer_norm as tln
from mae_fast.ops.dispatch import NoBackendError, describe, select_backend

ln_op = importlib.import_module("mae_fast.ops.layer_norm")  # the module (the package exports a function)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
GPU = pytest.mark.gpu
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so unwritten elements show."""
    def nan_alloc(shape, dtype=None, device=None, **kw):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tln, "_alloc", nan_alloc)
    if DEVICE.type == "cuda":
        monkeypatch.setenv("MAE_FAST_TRITON_UNVERIFIED", "1")


def _norm(D, affine, dtype, seed=0):
    """A LayerNorm with random (not 1/0) parameters; affine: "both", "weight" (no bias) or "none"."""
    norm = nn.LayerNorm(D, eps=1e-5, elementwise_affine=affine != "none", bias=affine == "both")
    g = torch.Generator().manual_seed(seed)
    for p in norm.parameters():
        noise = torch.randn(p.shape, generator=g)
        p.data = 1 + 0.5 * noise if p is norm.weight else 0.3 * noise
    return norm.to(DEVICE, dtype)


def _rand(shape, dtype, scale=1.0, shift=0.0):
    # a shifted mean so the centring matters; fp32 draws then cast, so every dtype sees the same values
    return (torch.randn(shape, device=DEVICE) * scale + shift).to(dtype)


def _run(x, branch, norm, out_dtype, dy, d_mid, backend):
    """(y, x_mid, dx, dbranch, dweight, dbias) through the public API and autograd."""
    x = x.detach().requires_grad_()
    branch = branch.detach().requires_grad_() if branch is not None else None
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    for p in params:
        p.grad = None
    if branch is None:
        y = ops.layer_norm(x, norm, out_dtype, backend=backend)
        x_mid, outs, grads = x.detach(), [y], [dy]
    else:
        x_mid, y = ops.add_layer_norm(x, branch, norm, out_dtype, backend=backend)
        outs, grads = [y, x_mid], [dy, d_mid]
    leaves = [x] + ([branch] if branch is not None else []) + params
    g = torch.autograd.grad(outs, leaves, [t.to(o.dtype) for t, o in zip(grads, outs)])
    dx, rest = g[0], list(g[1:])
    dbranch = rest.pop(0) if branch is not None else None
    dw = rest.pop(0) if norm.weight is not None else None
    db = rest.pop(0) if norm.bias is not None else None
    return dict(y=y.detach(), x_mid=x_mid.detach(), dx=dx, dbranch=dbranch, dweight=dw, dbias=db)


def _to64(norm):
    n64 = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.weight is not None,
                       bias=norm.bias is not None).to(DEVICE, FP64)
    for p, q in zip(n64.parameters(), norm.parameters()):
        p.data.copy_(q.data)
    return n64


def _check_as_torch(x, branch, norm, out_dtype, d_mid_dtype=FP32):
    """Triton vs fp64, bounded by the torch backend (same input dtypes) vs fp64; returns the Triton results."""
    dy = _rand(x.shape, FP32)
    d_mid = _rand(x.shape, FP32, 0.5) if branch is not None else None
    ref = _run(x.double(), None if branch is None else branch.double(), _to64(norm), FP64, dy.double(),
               None if d_mid is None else d_mid.double(), "torch")
    low = _run(x, branch, norm, out_dtype, dy, d_mid, "torch")
    tri = _run(x, branch, norm, out_dtype, dy, d_mid, "triton")
    expect = dict(y=out_dtype, x_mid=x.dtype, dx=x.dtype, dbranch=None if branch is None else branch.dtype,
                  dweight=None if norm.weight is None else norm.weight.dtype,
                  dbias=None if norm.bias is None else norm.bias.dtype)
    for name, mult in (("y", 2), ("x_mid", 2), ("dx", 3), ("dbranch", 3), ("dweight", 3), ("dbias", 3)):
        t, lo, r = tri[name], low[name], ref[name]
        if expect[name] is None:
            assert t is None and lo is None, name
            continue
        assert t.dtype == expect[name] and t.shape == r.shape, (name, t.dtype, t.shape)
        assert torch.isfinite(t).all(), f"{name}: non-finite (unwritten?) elements"
        # an ulp at the largest value (fp32: 8, for GPU division/sqrt and a different summation order)
        ulps = 8 if t.dtype == FP32 else 1
        floor = ulps * torch.finfo(t.dtype).eps * max(r.abs().max().item(), 1e-3)
        err = (t.double() - r).abs().max().item()
        err_torch = (lo.double() - r).abs().max().item()
        assert err <= mult * err_torch + floor, f"{name}: triton err {err:.3g} > {mult}x torch err {err_torch:.3g}"
    if branch is not None:
        assert torch.equal(tri["x_mid"], low["x_mid"])  # the add is rounded as eager rounds it
    return tri


# 37 rows: several row blocks at every width here, the last one part full
CASES = [  # rows (shape), D, x dtype, branch dtype (None: layer_norm), out dtype, affine
    ((1,), 40, FP32, BF16, BF16, "both"),
    ((7,), 100, FP32, BF16, BF16, "both"),
    ((2, 5), 392, FP32, FP32, FP32, "none"),
    ((37,), 1280, FP32, BF16, BF16, "both"),
    ((7,), 1000, BF16, BF16, BF16, "weight"),
    ((1,), 1280, FP16, FP16, FP16, "both"),
    ((3, 7), 40, FP16, FP16, FP32, "none"),
    ((37,), 100, BF16, None, BF16, "both"),
    ((7,), 392, FP32, None, BF16, "weight"),
    ((1,), 1000, FP32, None, FP32, "both"),
    ((2, 7), 1280, FP16, None, FP16, "none"),
    ((37,), 40, FP32, FP16, FP16, "both"),
]


@pytest.mark.parametrize("rows,D,x_dtype,branch_dtype,out_dtype,affine", CASES)
def test_matches_fp64_within_torch_error(rows, D, x_dtype, branch_dtype, out_dtype, affine):
    torch.manual_seed(hash((rows, D)) % 1000)
    x = _rand((*rows, D), x_dtype, 2.0, 0.7)
    branch = _rand((*rows, D), branch_dtype) if branch_dtype is not None else None
    _check_as_torch(x, branch, _norm(D, affine, FP32 if x_dtype == FP32 else x_dtype), out_dtype)


def test_widest_row_with_bf16_parameters():
    """D = MAX_D (one row per program, 16 warps); a bf16 stream and bf16 parameters (their grads in bf16)."""
    torch.manual_seed(1)
    D = tln.MAX_D
    x, branch = _rand((3, D), BF16, 3.0, -1.0), _rand((3, D), BF16)
    _check_as_torch(x, branch, _norm(D, "both", BF16), BF16)


def test_normalises_the_rounded_sum():
    """A bf16 stream: x_mid is rounded to bf16 and that (the stored x_mid, as eager) is what gets normalised."""
    torch.manual_seed(12)
    D = 392
    x, branch = _rand((7, D), BF16, 2.0, 0.5), _rand((7, D), BF16)
    norm = _norm(D, "both", BF16)
    x_mid, y = ops.add_layer_norm(x, branch, norm, FP32, backend="triton")
    assert torch.equal(x_mid, x + branch)
    ref = F.layer_norm(x_mid.double(), (D,), norm.weight.double(), norm.bias.double(), norm.eps)
    assert (y.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_eps_matters_for_low_variance_rows(eps):
    """Rows whose variance (~1e-5) is of the order of eps: the kernel must use the norm's eps, inside the sqrt (MAE's
    norms use 1e-6, nn.LayerNorm's default 1e-5 is the one the other tests use; unit-variance rows hide it)."""
    torch.manual_seed(13)
    D = 99
    norm = _norm(D, "both", FP32)
    norm.eps = eps
    x, branch = _rand((5, D), FP32, 3e-3, 0.01), _rand((5, D), FP32, 1e-3)
    _check_as_torch(x, branch, norm, FP32)
    _check_as_torch(x, None, norm, FP32)


def test_strided_rows_are_read_in_place():
    """x[:, 1:] (rows not evenly strided) as the model's first_query path gives it, a transposed dy."""
    torch.manual_seed(2)
    B, N, D = 3, 9, 100
    full = _rand((B, N, D), FP32, 1.5, 0.3)
    x = full[:, 2:]
    assert not x.is_contiguous()
    branch = _rand((B, N - 2, D), BF16)
    norm = _norm(D, "both", FP32)
    _check_as_torch(x, branch, norm, BF16)
    # the launcher reads the view through its strides (no copy of x) and gives contiguous outputs
    k = tln
    x3 = k._as_outer_inner(x)
    assert x3.data_ptr() == x.data_ptr() and x3.stride() == x.stride()
    y, x_mid, mean, rstd = k.add_layer_norm_forward(x, branch, norm.weight, norm.bias, norm.eps, BF16)
    assert y.is_contiguous() and x_mid.is_contiguous()
    torch.testing.assert_close(x_mid, x + branch, rtol=0, atol=0)
    # gradients that arrive as views: dy transposed, d_x_mid expanded over the batch
    dy = _rand((B, D, N - 2), BF16).transpose(1, 2)
    d_mid = _rand((1, N - 2, D), FP32).expand(B, -1, -1)
    dx, dbranch, dw, db = k.add_layer_norm_backward(dy, x_mid, mean, rstd, norm.weight, norm.bias, d_x_mid=d_mid,
                                                    branch_dtype=BF16)
    dx_c, dbranch_c, dw_c, db_c = k.add_layer_norm_backward(dy.contiguous(), x_mid, mean, rstd, norm.weight,
                                                            norm.bias, d_x_mid=d_mid.contiguous(), branch_dtype=BF16)
    for a, b in ((dx, dx_c), (dbranch, dbranch_c), (dw, dw_c), (db, db_c)):
        assert torch.equal(a, b)


def test_backward_is_deterministic_and_partials_sum_in_fixed_order():
    torch.manual_seed(3)
    rows, D = 61, 392  # 8 row tiles in backward: programs=1, 3, 50, 1000 below give 1, 3, 8, 8 partial rows
    x, branch = _rand((rows, D), FP32, 2.0), _rand((rows, D), BF16)
    norm = _norm(D, "both", FP32)
    k = tln
    y, x_mid, mean, rstd = k.add_layer_norm_forward(x, branch, norm.weight, norm.bias, norm.eps, BF16)
    dy, d_mid = _rand((rows, D), BF16), _rand((rows, D), FP32)

    def bwd(programs=None):
        return k.add_layer_norm_backward(dy, x_mid, mean, rstd, norm.weight, norm.bias, d_x_mid=d_mid,
                                         branch_dtype=BF16, programs=programs)

    first, second = bwd(), bwd()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # through autograd too (two backward passes of the same graph)
    xr, br = x.clone().requires_grad_(), branch.clone().requires_grad_()
    x_mid2, y2 = ops.add_layer_norm(xr, br, norm, BF16, backend="triton")
    loss = (y2.float() * dy.float()).sum() + (x_mid2 * d_mid).sum()
    g1 = torch.autograd.grad(loss, [xr, br, norm.weight, norm.bias], retain_graph=True)
    g2 = torch.autograd.grad(loss, [xr, br, norm.weight, norm.bias])
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    # any number of partial rows gives the same sums up to rounding (1 program: no partials to add)
    for programs in (1, 3, 50, 1000):
        other = bwd(programs)
        assert torch.equal(other[0], first[0]) and torch.equal(other[1], first[1])  # rows do not depend on it
        torch.testing.assert_close(other[2], first[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other[3], first[3], rtol=1e-5, atol=1e-5)


def test_kernels_use_no_atomics():
    """dweight/dbias are deterministic because the partial rows are summed in a fixed order. The interpreter runs
    programs one after another, so an atomic add into one row passes the test above on a CPU and races only on a GPU."""
    assert not re.findall(r"\btl\.atomic_\w+", inspect.getsource(tln))


def test_partial_gradients_skip_what_is_not_needed():
    torch.manual_seed(4)
    norm = _norm(40, "both", FP32)
    norm.weight.requires_grad_(False)
    x = _rand((5, 40), FP32).requires_grad_()
    branch = _rand((5, 40), BF16)  # no grad
    x_mid, y = ops.add_layer_norm(x, branch, norm, BF16, backend="triton")
    y.float().sum().backward()  # x_mid unused: its gradient is None, not zeros
    assert norm.weight.grad is None and norm.bias.grad is not None and x.grad is not None
    xr = x.detach().clone().requires_grad_()
    x_mid_r, y_r = ops.add_layer_norm(xr, branch, norm, BF16, backend="torch")
    y_r.float().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    # only x_mid used: the gradient passes straight through to x (dy is zeros)
    x2 = x.detach().clone().requires_grad_()
    x_mid2, _ = ops.add_layer_norm(x2, branch, norm, BF16, backend="triton")
    (3 * x_mid2).sum().backward()
    assert torch.equal(x2.grad, torch.full_like(x2, 3.0))


def test_empty_rows():
    norm = _norm(40, "both", FP32)
    x = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    branch = torch.randn(0, 40, device=DEVICE, dtype=BF16, requires_grad=True)
    x_mid, y = ops.add_layer_norm(x, branch, norm, BF16, backend="triton")
    assert y.shape == (0, 40) and y.dtype == BF16 and x_mid.shape == (0, 40)
    (y.float().sum() + x_mid.sum()).backward()
    assert torch.equal(norm.weight.grad, torch.zeros(40, device=DEVICE))
    assert branch.grad.shape == (0, 40) and branch.grad.dtype == BF16


def test_opcheck():
    torch.manual_seed(5)
    norm = _norm(100, "both", FP32)
    x, branch = _rand((2, 7, 100), FP32), _rand((2, 7, 100), BF16)
    x, branch = x.clone().requires_grad_(), branch.clone().requires_grad_()
    w, b = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    for args in ((x, branch, w, b, 1e-5, BF16), (x, None, w, None, 1e-5, FP32),
                 (x.detach()[:, 1:], None, None, None, 1e-6, BF16)):
        torch.library.opcheck(tln.add_layer_norm_fwd_op, args)
    y, x_mid, mean, rstd = tln.add_layer_norm_fwd_op(x.detach(), branch.detach(), w.detach(), b.detach(), 1e-5, BF16)
    dy, d_mid = _rand(x.shape, BF16), _rand(x.shape, FP32)
    torch.library.opcheck(tln.add_layer_norm_bwd_op, (dy, d_mid, x_mid, mean, rstd, w.detach(), b.detach(), BF16,
                                                      True, True))
    torch.library.opcheck(tln.add_layer_norm_bwd_op, (dy, None, x.detach(), mean, rstd, None, None, None,
                                                      False, False))


def test_compiles_fullgraph_with_backward():
    torch.manual_seed(6)
    norm = _norm(40, "both", FP32)
    x, branch = _rand((2, 5, 40), FP32), _rand((2, 5, 40), BF16)

    def step(x, branch):
        x_mid, y = ops.add_layer_norm(x, branch, norm, BF16, backend="triton")
        y2 = ops.layer_norm(x_mid, norm, BF16, backend="triton")
        return (x_mid * 0.5 + y.float() * y2.float()).sum()

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        xr, br = x.clone().requires_grad_(), branch.clone().requires_grad_()
        norm.weight.grad = norm.bias.grad = None
        fn(xr, br).backward()
        grads.append([xr.grad, br.grad, norm.weight.grad, norm.bias.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_torch_backend_is_the_eager_ops_under_bf16_autocast():  # CPU autocast here, CUDA's on a GPU
    """What Block.forward ran before: norm(x) and x + h, then the next Linear's autocast cast; bit for bit."""
    torch.manual_seed(7)
    D = 72
    norm, lin = _norm(D, "both", FP32), nn.Linear(D, 56).to(DEVICE)
    x = _rand((3, 11, D), FP32, 1.3, 0.2).requires_grad_()
    h = _rand((3, 11, D), BF16).requires_grad_()
    params = [x, h, norm.weight, norm.bias, lin.weight, lin.bias]
    g = _rand((3, 11, 56), BF16)

    def fused():
        y1 = ops.layer_norm(x, norm, backend="torch")
        x_mid, y2 = ops.add_layer_norm(x, h, norm, backend="torch")
        assert y1.dtype == y2.dtype == BF16 and x_mid.dtype == FP32
        return lin(y1) + lin(y2) * x_mid.sum()

    def eager():
        x_mid = x + h
        return lin(norm(x)) + lin(norm(x_mid)) * x_mid.sum()

    with torch.autocast(DEVICE.type, dtype=BF16):
        out_f, out_e = fused(), eager()
        assert torch.equal(F.layer_norm(x, (D,), norm.weight, norm.bias, norm.eps).to(BF16),
                           ops.layer_norm(x, norm, backend="torch"))
    assert torch.equal(out_f, out_e)
    for a, b in zip(torch.autograd.grad(out_f, params, g), torch.autograd.grad(out_e, params, g)):
        assert torch.equal(a, b)
    # no autocast: out_dtype is x's dtype, so the op is exactly norm(x)
    y = ops.layer_norm(x, norm, backend="torch")
    assert y.dtype == FP32 and torch.equal(y, norm(x))


def test_triton_under_autocast_matches_torch_backend():
    """Default out_dtype under autocast is the autocast dtype for both backends, and they agree."""
    torch.manual_seed(8)
    norm = _norm(100, "both", FP32)
    x, h = _rand((2, 9, 100), FP32), _rand((2, 9, 100), BF16)
    with torch.autocast(DEVICE.type, dtype=BF16):
        x_mid_t, y_t = ops.add_layer_norm(x, h, norm, backend="triton")
        x_mid_r, y_r = ops.add_layer_norm(x, h, norm, backend="torch")
        assert ops.layer_norm(x, norm, backend="triton").dtype == BF16
    assert y_t.dtype == y_r.dtype == BF16 and torch.equal(x_mid_t, x_mid_r)
    torch.testing.assert_close(y_t.float(), y_r.float(), rtol=0, atol=2 * 2 ** -8 * y_r.abs().max().item())


def test_dispatch_reasons_and_ranking(monkeypatch):
    norm = _norm(64, "both", FP32)
    x, h = torch.randn(4, 64), torch.randn(4, 64, dtype=BF16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = (x, h, norm.weight.cpu(), norm.bias.cpu(), 1e-6, BF16)
    assert select_backend("add_layer_norm", "auto", *args).name == "torch"  # interpreter ranks last
    assert select_backend("add_layer_norm", "triton", *args).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("needs a CUDA tensor" in r for r in describe("add_layer_norm", *args)["triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = describe("add_layer_norm", x.double(), h, None, None, 1e-6, FP64)["triton"]
    assert any("x dtype float64" in r for r in why) and any("out_dtype float64" in r for r in why)
    why = describe("add_layer_norm", x.to(BF16), torch.randn(4, 64), None, None, 1e-6, BF16)["triton"]
    assert any("wider than the stream" in r for r in why)
    big = torch.randn(2, tln.MAX_D + 1)
    assert any("too large" in r for r in describe("layer_norm", big, None, None, 1e-6, FP32)["triton"])
    with pytest.raises(NoBackendError, match="too large"):
        ops.layer_norm(big, nn.LayerNorm(tln.MAX_D + 1), backend="triton")
    with pytest.raises(ValueError, match="at most"):
        tln.add_layer_norm_forward(big, None, None, None, 1e-6)
    # on (fake) CUDA tensors: refused until verified on a GPU, unless asked for
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        xc = torch.empty(4, 64, device="cuda")
        hc = torch.empty(4, 64, device="cuda", dtype=BF16)
        cargs = (xc, hc, None, None, 1e-6, BF16)
        monkeypatch.setattr(ln_op, "GPU_VERIFIED", False)
        monkeypatch.delenv("MAE_FAST_TRITON_UNVERIFIED", raising=False)
        assert describe("add_layer_norm", *cargs)["triton"] == [
            "not yet verified on a GPU (MAE_FAST_TRITON_UNVERIFIED=1 runs it)"]
        assert select_backend("add_layer_norm", "auto", *cargs).name == "torch"
        monkeypatch.setenv("MAE_FAST_TRITON_UNVERIFIED", "1")
        assert select_backend("add_layer_norm", "auto", *cargs).name == "triton"  # ahead of torch on CUDA
        monkeypatch.delenv("MAE_FAST_TRITON_UNVERIFIED")
        monkeypatch.setattr(ln_op, "GPU_VERIFIED", True)
        assert select_backend("layer_norm", "auto", xc, None, None, 1e-6, BF16).name == "triton"


def test_bad_inputs():
    norm = nn.LayerNorm(40)
    x = torch.randn(2, 3, 40)
    with pytest.raises(ValueError, match="norm normalises over"):
        ops.layer_norm(x, nn.LayerNorm(39))
    with pytest.raises(ValueError, match="norm normalises over"):
        ops.add_layer_norm(x, x, nn.LayerNorm((3, 40)))
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.add_layer_norm(x, torch.randn(2, 3, 39), norm)
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.add_layer_norm(x, torch.randn(1, 3, 40), norm)  # no broadcasting
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.add_layer_norm(x, 1.0, norm)
    with pytest.raises(ValueError, match="branch is on meta"):
        ops.add_layer_norm(x, torch.randn(2, 3, 40, device="meta"), norm)
    with pytest.raises(ValueError, match="x must be floating point"):
        ops.layer_norm(torch.ones(2, 40, dtype=torch.int64), norm)
    with pytest.raises(ValueError, match="branch must be floating point"):
        ops.add_layer_norm(x, torch.ones(2, 3, 40, dtype=torch.int32), norm)
    with pytest.raises(ValueError, match="x must be a"):
        ops.layer_norm(torch.tensor(1.0), norm)
    with pytest.raises(ValueError, match="out_dtype must be a floating"):
        ops.layer_norm(x, norm, torch.int8)
    with pytest.raises(ValueError, match="norm weight is on meta"):
        ops.layer_norm(x, nn.LayerNorm(40, device="meta"))


def test_model_with_triton_norms_matches_torch_norms(monkeypatch):
    """A small MAE (cls + first_query decoder path included) with every block norm on the Triton backend."""
    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_small_patch16", img_size=32, depth=2, decoder_depth=2).to(DEVICE)
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 4, device=DEVICE)
    params = [p for p in m.parameters() if p.requires_grad]

    calls = []
    fwd = tln._forward_kernels  # what the eager path launches (the custom op, under torch.compile, too)
    monkeypatch.setattr(tln, "_forward_kernels", lambda x, branch, *a: calls.append(branch is None) or
                        fwd(x, branch, *a))

    def loss_and_grads(backend):
        with ops.use_backend(layer_norm=backend, add_layer_norm=backend):
            out = m(imgs, 0.75, noise, masked_only=True)
        return out.loss, torch.autograd.grad(out.loss, params)

    loss_t, grads_t = loss_and_grads("triton")
    # per stack: norm1; the fused add + norm2; the first block's last add fused into the second's norm1; its add +
    # norm2; the second block's last add fused into the final norm
    assert calls == [True, False, False, False, False] * 2
    loss_r, grads_r = loss_and_grads("torch")
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_t, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ---- GPU: the compiled kernels at ViT shapes (MAE_FAST_TRITON_UNVERIFIED=1 by the autouse fixture) ---------

@GPU
@NEEDS_CUDA
@pytest.mark.parametrize("rows,D", [(6960, 1280), (27768, 512), (256 * 50, 768)])
@pytest.mark.parametrize("residual", [True, False])
def test_gpu_vit_shapes_bf16(rows, D, residual):
    """Encoder ViT-H/14 at 476 px (24 x 290 rows), its decoder (24 x 1157), ViT-B/16 at 224 px (256 x 50)."""
    torch.manual_seed(9)
    x = _rand((rows, D), FP32, 2.0, 0.5)
    branch = _rand((rows, D), BF16) if residual else None
    tri = _check_as_torch(x, branch, _norm(D, "both", FP32), BF16)
    assert torch.isfinite(tri["dweight"]).all()


@GPU
@NEEDS_CUDA
def test_gpu_bf16_stream_and_strided_rows():
    torch.manual_seed(10)
    full = _rand((24, 290, 1280), BF16, 2.0)
    _check_as_torch(full[:, 1:], _rand((24, 289, 1280), BF16), _norm(1280, "both", BF16), BF16)


@GPU
@NEEDS_CUDA
def test_gpu_deterministic_backward():
    torch.manual_seed(11)
    k = tln
    norm = _norm(1280, "both", FP32)
    x, branch = _rand((6960, 1280), FP32), _rand((6960, 1280), BF16)
    y, x_mid, mean, rstd = k.add_layer_norm_forward(x, branch, norm.weight, norm.bias, norm.eps, BF16)
    dy, d_mid = _rand(x.shape, BF16), _rand(x.shape, FP32)
    runs = [k.add_layer_norm_backward(dy, x_mid, mean, rstd, norm.weight, norm.bias, d_x_mid=d_mid,
                                      branch_dtype=BF16) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@GPU
@NEEDS_CUDA
def test_gpu_model_under_autocast_matches_torch_norms(monkeypatch):
    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_base_patch16", img_size=64, depth=2, decoder_depth=2).cuda()
    imgs, noise = torch.randn(4, 3, 64, 64, device="cuda"), torch.rand(4, 16, device="cuda")
    params = [p for p in m.parameters() if p.requires_grad]

    def run(backend):
        with ops.use_backend(layer_norm=backend, add_layer_norm=backend), torch.autocast("cuda", dtype=BF16):
            out = m(imgs, 0.75, noise, masked_only=True)
        return out.loss, torch.autograd.grad(out.loss, params)

    loss_t, grads_t = run("triton")
    loss_r, grads_r = run("torch")
    torch.testing.assert_close(loss_t, loss_r, rtol=2e-2, atol=1e-3)
    for a, b in zip(grads_t, grads_r):
        assert torch.isfinite(a).all()
        rel = (a - b).norm() / b.norm().clamp_min(1e-12)
        assert rel < 5e-2, rel


# ---- compiled for an H100 (sm_90) on this GPU-less machine: no spills, 16-byte loads -------------------------

_COMPILE_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from compile_report import compile_only, ptxas_resources
from mae_fast.kernels import layer_norm as K

rows_out = []
for rows, D in ((6960, 1280), (27768, 512), (12800, 768), (4, 8192)):
    x, branch, w, b = torch.randn(rows, D), torch.randn(rows, D, dtype=torch.bfloat16), torch.randn(D), torch.randn(D)
    with compile_only(90) as compiled:  # launches compile for sm_90 and run nothing
        y, x_mid, mean, rstd = K.add_layer_norm_forward(x, branch, w, b, 1e-6, torch.bfloat16)
        K.add_layer_norm_backward(y, x_mid, mean, rstd, w, b, d_x_mid=x, branch_dtype=torch.bfloat16)
    for name, kernel, kw in compiled:
        regs, spill_st, spill_ld, _ = ptxas_resources(kernel.asm["ptx"], 90)
        rows_out.append(dict(kernel=name, D=D, registers=regs, spills=spill_st + spill_ld,
                             v4_loads=kernel.asm["ptx"].count("ld.global.v4"),
                             v4_stores=kernel.asm["ptx"].count("st.global.v4")))
open(sys.argv[2], "w").write(json.dumps(rows_out))
"""


def _compile_command(workdir) -> dict:
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(workdir / "triton-cache")  # compile for real, not from an earlier run's cache
    return {"compile": ([sys.executable, "-c", _COMPILE_SCRIPT, str(bench), str(workdir / "rows.json")], env)}


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton.backends.nvidia"),
                    reason="triton's NVIDIA backend is not installed")
@pytest.mark.background(commands=_compile_command)  # starts with the session's first test: tests/helpers/background.py
def test_kernels_compile_for_sm90_without_spills_and_with_vector_loads(background):
    import json

    rc, log = background.wait("compile")
    assert rc == 0, log[-3000:]
    rows = json.loads((background.workdir / "rows.json").read_text())
    assert len(rows) == 8
    for r in rows:
        assert r["registers"] > 0 and r["spills"] == 0, r
        assert r["v4_loads"] > 0 and r["v4_stores"] > 0, f"rows not read/written as 16-byte vectors: {r}"


# ---- the torch backend: the norm's eps ------------------------------------------------------------

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
