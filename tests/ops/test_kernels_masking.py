"""The masked-token kernels (mae_fast.kernels.masking: Triton; mae_fast.csrc.masking: CUDA, on a GPU) and their
custom ops against the torch reference backend.

Without a GPU the Triton kernels run on CPU tensors in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before mae_fast is imported), on small shapes: odd sizes, K=1, B=1, fp32/fp16/bf16. Outputs are
poisoned with NaN before the kernels write them so unwritten rows show. With a GPU the same tests run on CUDA
tensors.
"""
import inspect
import re

import pytest
import torch

from mae_fast.csrc import masking as cuda_masking
from mae_fast.kernels import masking as K_
from mae_fast.kernels.masking import inverse_positions
from mae_fast.ops import masking as M
from mae_fast.ops import platform
from mae_fast.ops.dispatch import NoBackendError, describe, select_backend

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
if not CUDA and not platform.interpreter():
    pytest.skip("the Triton kernels run on CPU tensors only in the interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

ROW_BACKENDS = ["triton", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def close(actual, expected, dtype=torch.float32, **kw):
    tol = dict(TOL[dtype])
    tol.update(kw)
    assert not torch.isnan(actual).any(), "NaN in kernel output (unwritten or poisoned rows)"
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def perm(B, L, gen=None):
    """(ids_shuffle, ids_restore) as in official MAE random_masking."""
    shuffle = torch.rand(B, L, generator=gen).argsort(dim=1)
    return shuffle.to(DEV), shuffle.argsort(dim=1).to(DEV)


def randn(*shape, dtype=torch.float32):
    return (torch.randn(*shape) + 0.5).to(dtype).to(DEV)  # never zeros; offset makes sums non-trivial


@pytest.fixture
def dirty_allocator():
    """On CUDA, leave NaN in the caching allocator so an unwritten output element reads as NaN."""
    if CUDA:
        junk = torch.full((64 << 20,), float("nan"), device=DEV)
        del junk
    yield


# ---- forward against the torch reference ------------------------------------------------------------

# each shape in one dtype (every dtype twice): the dtype and the shape exercise different parts of the kernel
GATHER_SHAPES = [(torch.float32, 1, 7, 20, 1), (torch.float16, 2, 9, 33, 4), (torch.bfloat16, 3, 16, 64, 16),
                 (torch.bfloat16, 2, 13, 8, 5), (torch.float16, 2, 5, 320, 2),  # 320: 64-wide blocks
                 (torch.float32, 2, 12, 24, 12)]  # K = L


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype,B,L,D,K", GATHER_SHAPES)
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_visible_forward(backend, dtype, B, L, D, K, with_pos, dirty_allocator):
    x = randn(B, L, D, dtype=dtype)
    shuffle, _ = perm(B, L)
    keep = shuffle[:, :K]
    pos = randn(1, L, D) if with_pos else None  # fp32 pos with a low-precision x: rounded like the reference
    out = M.gather_visible(x, keep, pos, backend=backend)
    assert out.shape == (B, K, D) and out.dtype == dtype
    close(out, M.gather_visible(x, keep, pos, backend="torch"), dtype)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype,B,L,D,K", GATHER_SHAPES)
@pytest.mark.parametrize("cls_token,with_pos", [(True, True), (False, False)])
def test_unshuffle_forward(backend, dtype, B, L, D, K, cls_token, with_pos, dirty_allocator):
    x_vis = randn(B, K + int(cls_token), D, dtype=dtype)
    _, restore = perm(B, L)
    mask_token = randn(1, 1, D)
    pos = randn(1, L + int(cls_token), D, dtype=dtype) if with_pos else None
    out = M.unshuffle_with_mask_token(x_vis, restore, mask_token, pos, cls_token=cls_token, backend=backend)
    ref = M.unshuffle_with_mask_token(x_vis, restore, mask_token, pos, cls_token=cls_token, backend="torch")
    assert out.shape == ref.shape and out.dtype == dtype
    close(out, ref, dtype)


def test_row_kernel_writes_every_element():
    """Poisoned output buffer: every element must be overwritten (fill rows, cls row and body)."""
    B, L, D, K = 2, 11, 24, 3
    x_vis = randn(B, 1 + K, D)
    _, restore = perm(B, L)
    mask_token, pos = randn(D), randn(1 + L, D)
    out = torch.full((B, 1 + L, D), float("nan"), device=DEV)
    K_.gather_rows(x_vis, restore, mask_token, pos, False, None, 1, K, L, out=out)
    close(out, M.unshuffle_with_mask_token(x_vis, restore, mask_token, pos, backend="torch"))


PATCH_CASES = [  # B, C, H, W, p, K
    (1, 3, 8, 12, 4, 1),
    (2, 3, 9, 15, 3, 7),
    (2, 1, 10, 10, 5, 4),
    (3, 2, 4, 8, 2, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,p,K", PATCH_CASES)
def test_patchify_gather_forward(dtype, B, C, H, W, p, K):
    imgs = randn(B, C, H, W, dtype=dtype)
    L = (H // p) * (W // p)
    keep = perm(B, L)[0][:, :K]
    out = torch.full((B, K, C * p * p), float("nan"), device=DEV, dtype=dtype)
    K_.launch_patchify_gather(imgs, keep, p, out=out)
    ref = M.patchify_gather(imgs, keep, p, backend="torch")
    close(out, ref, torch.float64 if dtype != torch.bfloat16 else dtype, rtol=0, atol=0)  # a pure copy: exact
    close(M.patchify_gather(imgs, keep.int(), p, backend="triton"), ref, dtype, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,norm_pix,B,C,H,W,p,mask_kind", [
    (torch.float32, True, 2, 3, 8, 12, 4, "float"), (torch.float16, False, 2, 3, 8, 12, 4, "bool"),
    (torch.bfloat16, True, 1, 3, 9, 9, 3, "bool"), (torch.float32, False, 1, 3, 9, 9, 3, "float"),
    (torch.float16, True, 3, 1, 10, 5, 5, "float"), (torch.bfloat16, False, 3, 1, 10, 5, 5, "bool")])
def test_masked_patch_mse_forward(dtype, norm_pix, B, C, H, W, p, mask_kind):
    imgs = randn(B, C, H, W, dtype=dtype)
    L, P = (H // p) * (W // p), C * p * p
    pred = randn(B, L, P, dtype=dtype)
    mask = torch.rand(B, L, device=DEV) < 0.75
    mask[0, 0] = True
    mask = mask if mask_kind == "bool" else mask.float()
    out = M.masked_patch_mse(pred, imgs, mask, p, norm_pix, backend="triton")
    assert out.shape == () and out.dtype == torch.float32
    ref = M.masked_patch_mse(pred, imgs, mask, p, norm_pix, backend="torch")
    close(out, ref, torch.float32, rtol=1e-5, atol=1e-6)  # same fp32 math on the same inputs


def test_masked_patch_mse_row_losses_are_written():
    B, C, H, W, p = 2, 3, 8, 8, 4
    imgs, pred = randn(B, C, H, W), randn(B, 4, 48)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]], device=DEV)
    row_loss = torch.full((B * 4,), float("nan"), device=DEV)
    loss = K_.launch_masked_patch_mse(pred, imgs, mask.reshape(-1), p, True, row_loss=row_loss)
    assert not torch.isnan(row_loss).any()
    assert (row_loss.reshape(B, 4)[mask == 0] == 0).all()
    close(loss, M.masked_patch_mse(pred, imgs, mask, p, True, backend="torch"), rtol=1e-5)


# ---- gradients --------------------------------------------------------------------------------------

def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out(out) if callable(grad_out) else grad_out)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_visible_grads_match_torch(backend, dtype, dirty_allocator):
    B, L, D, K = 2, 10, 24, 3
    x, pos = randn(B, L, D, dtype=dtype), randn(L, D)
    keep = perm(B, L)[0][:, :K]
    g = randn(B, K, D, dtype=dtype)
    got = _grads(lambda a, p: M.gather_visible(a, keep, p, backend=backend), (x, pos), g)
    ref = _grads(lambda a, p: M.gather_visible(a, keep, p, backend="torch"), (x, pos), g)
    close(got[0], ref[0], dtype)
    close(got[1], ref[1], dtype)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls_token", [True, False])
def test_unshuffle_grads_match_torch(backend, dtype, cls_token, dirty_allocator):
    B, L, D, K = 3, 13, 40, 4
    head = int(cls_token)
    x_vis, mask_token, pos = randn(B, head + K, D, dtype=dtype), randn(1, 1, D), randn(1, head + L, D, dtype=dtype)
    _, restore = perm(B, L)
    g = randn(B, head + L, D, dtype=dtype)

    def run(be):
        return _grads(lambda a, m, p: M.unshuffle_with_mask_token(a, restore, m, p, cls_token=cls_token, backend=be),
                      (x_vis, mask_token, pos), g)

    got, ref = run(backend), run("torch")
    close(got[0], ref[0], dtype)
    # mask token: a sum of B*(L-K) rows, the kernel in fp32 and the reference in the input dtype
    close(got[1], ref[1], dtype, rtol=5e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-1 if dtype == torch.bfloat16 else 1e-5)
    close(got[2], ref[2], dtype, rtol=5e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-1 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_mask_token_grad_is_deterministic(backend):
    B, L, D, K = 4, 70, 32, 9  # L > 64: several partial-sum chunks
    x_vis, mask_token = randn(B, 1 + K, D), randn(D)
    _, restore = perm(B, L)
    g = randn(B, 1 + L, D)
    runs = [_grads(lambda a, m: M.unshuffle_with_mask_token(a, restore, m, backend=backend), (x_vis, mask_token), g)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    exact = g.double()[:, 1:][restore >= K].sum(0)
    close(runs[0][1], exact, rtol=1e-5, atol=1e-5)


def test_kernels_use_no_atomics():
    """Determinism rests on fixed-order partial sums. The interpreter runs programs one after another, so an atomic
    add (mask-token partials summed into one row) passes every CPU run above and races only on a GPU: keep them out."""
    assert not re.findall(r"\btl\.atomic_\w+", inspect.getsource(K_))


def test_patchify_gather_grad_matches_torch():
    B, C, H, W, p, K = 2, 3, 8, 12, 4, 3
    imgs = randn(B, C, H, W)
    keep = perm(B, 6)[0][:, :K]
    g = randn(B, K, C * p * p)
    got = _grads(lambda a: M.patchify_gather(a, keep, p, backend="triton"), (imgs,), g)
    ref = _grads(lambda a: M.patchify_gather(a, keep, p, backend="torch"), (imgs,), g)
    close(got[0], ref[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_mse_grad_matches_torch(dtype, norm_pix):
    B, C, H, W, p = 2, 3, 9, 6, 3
    L, P = 6, 27
    imgs, pred = randn(B, C, H, W, dtype=dtype), randn(B, L, P, dtype=dtype)
    mask = (torch.rand(B, L, device=DEV) < 0.6).float()
    mask[1, 2] = 1.0
    got = _grads(lambda a: M.masked_patch_mse(a, imgs, mask, p, norm_pix, backend="triton"), (pred,), torch.tensor(1.7, device=DEV))
    ref = _grads(lambda a: M.masked_patch_mse(a, imgs, mask, p, norm_pix, backend="torch"), (pred,), torch.tensor(1.7, device=DEV))
    close(got[0], ref[0], dtype, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3 if dtype == torch.bfloat16 else 1e-6)
    assert (got[0][mask == 0] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_mse_fractional_weights_follow_the_official_formula(backend, norm_pix):
    """A mask of weights in [0, 1] (zeros included) gives the official sum(loss * mask) / sum(mask), forward and
    gradient, against fp64 on an odd grid."""
    B, C, H, W, p = 2, 3, 9, 15, 3
    L, P = 15, 27
    imgs, pred = randn(B, C, H, W), randn(B, L, P)
    mask = torch.rand(B, L, device=DEV)
    mask[mask < 0.3] = 0.0

    def official(pred):
        t = imgs.double().reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, L, P)
        if norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return (((pred - t) ** 2).mean(-1) * mask.double()).sum() / mask.double().sum()

    got = _grads(lambda a: M.masked_patch_mse(a, imgs, mask, p, norm_pix, backend=backend), (pred,),
                 torch.tensor(1.3, device=DEV))
    want = _grads(official, (pred.double(),), torch.tensor(1.3, device=DEV, dtype=torch.float64))
    close(M.masked_patch_mse(pred, imgs, mask, p, norm_pix, backend=backend).double(), official(pred.double()),
          torch.float32, rtol=1e-5, atol=1e-6)
    close(got[0].double(), want[0], torch.float32, rtol=1e-5, atol=1e-7)
    assert (got[0][mask == 0] == 0).all() and (got[0][mask > 0] != 0).all()


def test_masked_patch_mse_grad_poisoned():
    B, C, H, W, p = 2, 1, 4, 6, 2
    imgs, pred = randn(B, C, H, W), randn(B, 6, 4)
    mask = (torch.arange(B * 6, device=DEV) % 3 != 0).float()
    grad = torch.full_like(pred, float("nan"))
    K_.launch_masked_patch_mse_backward(torch.tensor(1.0, device=DEV), pred, imgs, mask, p, True, grad_pred=grad)
    ref = _grads(lambda a: M.masked_patch_mse(a, imgs, mask.reshape(B, 6), p, True, backend="torch"), (pred,),
                 torch.tensor(1.0, device=DEV))
    close(grad, ref[0], rtol=1e-5, atol=1e-6)


def _official_mae_loss_fp64(pred, imgs, mask, p, norm_pix):
    """forward_loss of the official MAE, in float64."""
    target = M.patchify(imgs.double(), p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred.double() - target) ** 2).mean(dim=-1)
    return (loss * mask.double()).sum() / mask.double().sum()


def test_masked_patch_mse_norm_pix_on_nearly_flat_patches():
    """Patches whose pixel variance is near the 1e-6 eps (flat sky, blank walls): there the eps and its place inside
    the square root decide the target, where unit-variance random images hide both. Loss and gradient vs fp64."""
    B, C, H, W, p = 2, 3, 9, 15, 3
    L, P = 15, 27
    gen = torch.Generator().manual_seed(5)
    std = torch.tensor([3e-4, 1e-3, 3e-3])[torch.randint(0, 3, (B, 1, H // p, 1, W // p, 1), generator=gen)]
    imgs = (0.4 + std * torch.randn(B, C, H // p, p, W // p, p, generator=gen)).reshape(B, C, H, W).to(DEV)
    pred = (torch.randn(B, L, P, generator=gen) + 0.3).to(DEV)
    mask = (torch.rand(B, L, generator=gen) < 0.7).float().to(DEV)
    mask[0, 0] = 1.0
    loss = M.masked_patch_mse(pred, imgs, mask, p, True, backend="triton")
    close(loss, _official_mae_loss_fp64(pred, imgs, mask, p, True), rtol=1e-4, atol=1e-6)
    got = _grads(lambda a: M.masked_patch_mse(a, imgs, mask, p, True, backend="triton"), (pred,),
                 torch.tensor(1.3, device=DEV))
    want = _grads(lambda a: _official_mae_loss_fp64(a, imgs, mask, p, True), (pred.double(),),
                  torch.tensor(1.3, device=DEV, dtype=torch.float64))
    close(got[0], want[0], rtol=1e-4, atol=1e-6)


def test_gradcheck_torch_reference_float64():
    """The reference the kernels are compared with is itself differentiated correctly."""
    dd = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    B, L, D, K = 2, 5, 3, 2
    shuffle, restore = perm(B, L)
    x, pos = torch.randn(B, L, D, **dd), torch.randn(L, D, **dd)
    assert torch.autograd.gradcheck(lambda a, p: M.gather_visible(a, shuffle[:, :K], p, backend="torch"), (x, pos))
    xv, mt, dp = torch.randn(B, 1 + K, D, **dd), torch.randn(1, 1, D, **dd), torch.randn(1 + L, D, **dd)
    assert torch.autograd.gradcheck(
        lambda a, m, p: M.unshuffle_with_mask_token(a, restore, m, p, backend="torch"), (xv, mt, dp))
    imgs = torch.randn(1, 2, 4, 6, **dd)
    assert torch.autograd.gradcheck(lambda a: M.patchify_gather(a, shuffle[:1, :3] % 6, 2, backend="torch"), (imgs,))
    pred = torch.randn(1, 6, 8, **dd)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 1]], device=DEV)
    # the reference loss computes in float32 by design. The loss is quadratic in pred, so central differences are
    # exact at any step: a coarse one keeps float32 rounding (which failed eps=1e-3 on some draws) out of the check
    assert torch.autograd.gradcheck(
        lambda a: M.masked_patch_mse(a, imgs.detach(), mask, 2, True, backend="torch"), (pred,), eps=1e-1, atol=1e-4)


# ---- torch.library integration ----------------------------------------------------------------------

def _op_samples(prefix):
    B, L, D, K = 2, 9, 16, 3
    shuffle, restore = perm(B, L)
    keep = shuffle[:, :K].contiguous()
    ns = torch.ops.mae_fast
    rg = dict(requires_grad=True)
    return [
        (getattr(ns, f"{prefix}_gather_visible"), (randn(B, L, D).requires_grad_(), keep, randn(L, D))),
        (getattr(ns, f"{prefix}_gather_visible"), (randn(B, L, D, dtype=torch.bfloat16), keep.int(), None)),
        (getattr(ns, f"{prefix}_gather_visible_backward"), (randn(B, K, D), keep, L)),
        (getattr(ns, f"{prefix}_unshuffle"), (randn(B, 1 + K, D).requires_grad_(), restore, randn(D).requires_grad_(),
                                              randn(1 + L, D), True)),
        (getattr(ns, f"{prefix}_unshuffle"), (randn(B, K, D, dtype=torch.float16), restore, randn(D), None, False)),
        (getattr(ns, f"{prefix}_unshuffle_backward"), (randn(B, 1 + L, D), restore, K, True)),
    ], rg


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_opcheck_row_ops(backend):
    if backend == "cuda":
        assert cuda_masking.unavailable() is None  # builds the extension (the ops are registered at import)
    samples, _ = _op_samples(backend)
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_opcheck_patch_ops():
    B, C, H, W, p = 2, 3, 8, 12, 4
    imgs = randn(B, C, H, W)
    keep = perm(B, 6)[0][:, :2].contiguous()
    torch.library.opcheck(torch.ops.mae_fast.triton_patchify_gather, (imgs.clone().requires_grad_(), keep, p))
    pred, mask = randn(B, 6, 48), (torch.rand(B * 6, device=DEV) < 0.5).float()
    mask[0] = 1.0
    torch.library.opcheck(torch.ops.mae_fast.triton_masked_patch_mse, (pred.clone().requires_grad_(), imgs, mask, p, True))
    torch.library.opcheck(torch.ops.mae_fast.triton_masked_patch_mse_backward,
                          (torch.tensor(1.0, device=DEV), pred, imgs, mask, p, False))


def _mae_like_step(imgs, ids_shuffle, ids_restore, mask, w_embed, pos, mask_token, dec_pos, w_pred, backend, p, K):
    tokens = M.patchify(imgs, p) @ w_embed                      # (B, L, D) "patch embedding"
    x = M.gather_visible(tokens, ids_shuffle[:, :K], pos, backend=backend, check_ids=False)
    x = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], dim=1)   # cls slot
    x = M.unshuffle_with_mask_token(torch.tanh(x), ids_restore, mask_token, dec_pos, backend=backend, check_ids=False)
    pred = x[:, 1:] @ w_pred
    vis = M.patchify_gather(imgs, ids_shuffle[:, :K], p, backend=backend, check_ids=False)
    return M.masked_patch_mse(pred, imgs, mask, p, True, backend=backend) + 1e-3 * vis.float().square().mean()


def test_compiled_step_has_no_graph_breaks():
    torch._dynamo.reset()
    B, C, H, W, p, D = 2, 3, 8, 12, 4, 16
    L, K, P = 6, 2, 48
    imgs = randn(B, C, H, W)
    shuffle, restore = perm(B, L)
    mask = torch.ones(B, L, device=DEV).scatter_(1, shuffle[:, :K], 0.0)
    params = [randn(P, D) * 0.1, randn(L, D), randn(D), randn(1 + L, D), randn(D, P) * 0.1]
    params = [t.requires_grad_(True) for t in params]
    backend = "triton"
    args = (imgs, shuffle, restore, mask, *params)

    def step(*a):
        loss = _mae_like_step(*a, backend, p, K)
        return loss, torch.autograd.grad(loss, a[4:])

    eager_loss, eager_grads = step(*args)
    ref_loss, ref_grads = (lambda: (lambda l: (l, torch.autograd.grad(l, args[4:])))(
        _mae_like_step(*args, "torch", p, K)))()
    close(eager_loss, ref_loss, rtol=1e-5)
    compiled = torch.compile(lambda *a: _mae_like_step(*a, backend, p, K), fullgraph=True,
                             backend="inductor" if CUDA else "aot_eager")
    loss = compiled(*args)  # fullgraph=True: any graph break raises
    grads = torch.autograd.grad(loss, args[4:])
    close(loss, eager_loss, rtol=1e-5)
    for a, b in zip(grads, eager_grads):
        close(a, b, rtol=1e-4, atol=1e-5)


# ---- property-based shapes ----------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None, derandomize=True)
@given(B=st.integers(1, 3), L=st.integers(1, 40), D=st.integers(1, 70), frac=st.floats(0.0, 1.0),
       cls_token=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_row_ops_random_shapes(B, L, D, frac, cls_token, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    K = max(1, min(L, round(frac * L)))
    shuffle, restore = perm(B, L, gen)
    x = (torch.randn(B, L, D, generator=gen) + 0.5).to(dtype).to(DEV)
    pos = (torch.randn(L, D, generator=gen)).to(DEV)
    close(M.gather_visible(x, shuffle[:, :K], pos, backend="triton"),
          M.gather_visible(x, shuffle[:, :K], pos, backend="torch"), dtype)
    head = int(cls_token)
    xv = x[:, : head + K] if head + K <= L else torch.cat([x[:, :1], x], 1)[:, : head + K]
    mt = torch.randn(D, generator=gen).to(DEV)
    close(M.unshuffle_with_mask_token(xv, restore, mt, None, cls_token=cls_token, backend="triton"),
          M.unshuffle_with_mask_token(xv, restore, mt, None, cls_token=cls_token, backend="torch"), dtype)


# ---- bad inputs: clear errors or loud NaN, never silent wrong answers -----------------------------------

@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_out_of_range_ids(backend):
    B, L, D = 2, 8, 16
    x = randn(B, L, D)
    ids = torch.tensor([[0, 3], [7, 8]], device=DEV)
    with pytest.raises(IndexError):
        M.gather_visible(x, ids, backend=backend)
    out = M.gather_visible(x, ids, backend=backend, check_ids=False)  # unchecked: NaN row, no OOB read
    assert torch.isnan(out[1, 1]).all() and not torch.isnan(out[:, 0]).any() and not torch.isnan(out[0]).any()
    restore = torch.stack([torch.arange(L), torch.arange(L)]).to(DEV)
    restore[0, 2] = -1
    with pytest.raises(IndexError):
        M.unshuffle_with_mask_token(randn(B, 3, D), restore, randn(D), backend=backend)
    out = M.unshuffle_with_mask_token(randn(B, 3, D), restore, randn(D), backend=backend, check_ids=False)
    assert torch.isnan(out[0, 3]).all() and not torch.isnan(out[1]).any()


def test_out_of_range_patch_ids():
    imgs = randn(1, 3, 8, 8)
    ids = torch.tensor([[1, 4]], device=DEV)
    with pytest.raises(IndexError):
        M.patchify_gather(imgs, ids, 4, backend="triton")
    out = M.patchify_gather(imgs, ids, 4, backend="triton", check_ids=False)
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, 0]).any()


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_wrong_id_dtype_is_rejected(backend):
    x = randn(1, 4, 8)
    with pytest.raises(TypeError):
        M.gather_visible(x, torch.tensor([[0.0, 1.0]], device=DEV), backend=backend)
    with pytest.raises(TypeError):
        M.patchify_gather(randn(1, 1, 4, 4), torch.tensor([[0.0]], device=DEV), 2, backend="triton")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_integer_pos_embed_or_mask_token_is_refused_not_mangled(backend):
    # the kernels read pos_embed / mask_token in their own dtype: an integer one (with bf16 rows, the pos rows were
    # silently dropped by the interpreter) goes to the torch backend under auto, and forcing the kernel names it
    B, L, D = 2, 7, 5
    x = randn(B, L, D, dtype=torch.bfloat16)
    keep, restore = perm(B, L)
    pos = torch.randint(1, 9, (L, D), device=DEV)
    with pytest.raises(NoBackendError, match="pos_embed dtype torch.int64"):
        M.gather_visible(x, keep[:, :3], pos, backend=backend)
    with pytest.raises(NoBackendError, match="mask_token dtype torch.int64"):
        M.unshuffle_with_mask_token(x[:, :4], restore, torch.randint(1, 9, (D,), device=DEV), backend=backend)
    assert select_backend("gather_visible", "auto", x, keep[:, :3], pos).name == "torch"
    want = x[torch.arange(B)[:, None], keep[:, :3].cpu()].float() + pos.cpu()[keep[:, :3].cpu()].to(x.dtype).float()
    close(M.gather_visible(x, keep[:, :3], pos), want.to(DEV), torch.bfloat16)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_non_contiguous_inputs(backend):
    B, L, D, K = 2, 9, 12, 4
    x = randn(B, D, L).transpose(1, 2)                     # (B, L, D), strided
    shuffle, restore = perm(B, L)
    keep = shuffle.t().contiguous().t()[:, :K]             # strided ids
    pos = randn(D, L).t()
    close(M.gather_visible(x, keep, pos, backend=backend), M.gather_visible(x, keep, pos, backend="torch"))
    xv = randn(B, D, 1 + K).transpose(1, 2)
    mt = randn(2 * D)[::2]
    close(M.unshuffle_with_mask_token(xv, restore, mt, backend=backend),
          M.unshuffle_with_mask_token(xv, restore, mt, backend="torch"))
    imgs = randn(B, 3, 12, 8).transpose(2, 3)              # (B, 3, 8, 12)
    keep6 = perm(B, 6)[0][:, :3]
    close(M.patchify_gather(imgs, keep6, 4, backend="triton"), M.patchify_gather(imgs, keep6, 4, backend="torch"))
    pred = randn(B, 48, 6).transpose(1, 2)
    mask = torch.ones(B, 6, device=DEV)
    close(M.masked_patch_mse(pred, imgs, mask, 4, True, backend="triton"),
          M.masked_patch_mse(pred, imgs, mask, 4, True, backend="torch"), rtol=1e-5)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_duplicate_ids_give_nan_grads_not_wrong_ones(backend):
    B, L, D = 2, 6, 8
    x = randn(B, L, D).requires_grad_(True)
    ids = torch.tensor([[1, 1, 4], [0, 5, 2]], device=DEV)  # batch 0 repeats a row
    out = M.gather_visible(x, ids, backend=backend)
    close(out, M.gather_visible(x, ids, backend="torch"))   # the forward is still well defined
    (grad,) = torch.autograd.grad(out, x, randn(B, 3, D))
    assert torch.isnan(grad[0]).all() and not torch.isnan(grad[1]).any()


def test_inverse_positions():
    ids = torch.tensor([[2, 0, 5], [1, 1, 3]])
    inv, bad = inverse_positions(ids, limit=4, n_dest=4, sentinel=9)
    assert inv.tolist() == [[1, 9, 0, 9], [9, 0, 9, 2]] and bad.tolist() == [False, True]


# ---- dispatch ------------------------------------------------------------------------------------------

def test_triton_takes_cpu_tensors_only_under_the_interpreter(monkeypatch):
    x, ids = torch.randn(1, 4, 8), torch.tensor([[1, 2]])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("needs CUDA tensors" in w for w in describe("gather_visible", x, ids, None)["triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert describe("gather_visible", x, ids, None)["triton"] == []


def test_auto_choice():
    x = randn(2, 5, 8)
    ids = torch.tensor([[0, 2], [4, 1]], device=DEV)
    chosen = select_backend("gather_visible", "auto", x, ids, None).name
    if CUDA:  # the CUDA extension goes first once something in this process has loaded it
        assert chosen == ("cuda" if cuda_masking.loaded() else "triton")
    else:
        assert chosen == "torch"  # CPU: the interpreter runs but auto prefers torch
    assert select_backend("masked_patch_mse", "auto", randn(1, 4, 12), randn(1, 3, 4, 4), torch.ones(1, 4, device=DEV),
                          2, True).name == ("triton" if CUDA else "torch")
    assert describe("gather_visible", x.double(), ids, None)["triton"]  # float64: reasons given


def test_cpu_reasons_without_interpreter(monkeypatch):
    monkeypatch.setattr(platform, "interpreter", lambda: False)
    why = describe("masked_patch_mse", torch.randn(1, 4, 12), torch.randn(1, 3, 4, 4), torch.ones(1, 4), 2, True)
    assert any("needs CUDA tensors" in w for w in why["triton"])
    if not CUDA:
        why = describe("gather_visible", torch.randn(1, 4, 8), torch.zeros(1, 2, dtype=torch.long), None)
        assert why["cuda"] == ["CUDA not available"]


def test_mse_with_image_grad_falls_back_to_torch():
    imgs = randn(1, 3, 4, 4).requires_grad_(True)
    pred, mask = randn(1, 4, 12), torch.ones(1, 4, device=DEV)
    with pytest.raises(NoBackendError, match="imgs requires grad"):
        M.masked_patch_mse(pred, imgs, mask, 2, True, backend="triton")
    assert select_backend("masked_patch_mse", "auto", pred, imgs, mask, 2, True).name == "torch"
