"""Memory-lean LayerNorm->Linear and LayerNorm->MLP against eager PyTorch: values, gradients, saved bytes."""

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

import mae_fast
from mae_fast import ops
from mae_fast.memory import saved_tensor_bytes
from mae_fast.ops.lean import layer_norm_linear_reference, layer_norm_mlp_reference, residual_layer_norm_mlp_reference


def _layers(D=40, hidden=72, out=56, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    norm, lin, mlp = nn.LayerNorm(D, eps=1e-6), nn.Linear(D, out), Mlp(D, hidden, act_layer=nn.GELU)
    for p in [*norm.parameters(), *lin.parameters(), *mlp.parameters()]:
        p.data.normal_(0, 0.3)  # non-trivial norm weights and biases
    return norm.to(dtype), lin.to(dtype), mlp.to(dtype)


def _saved_bytes(fn, *modules):
    return saved_tensor_bytes(fn, exclude=modules)


def test_saved_tensor_bytes_counts_unique_storages():
    x = torch.randn(6, 5, requires_grad=True)
    lin = nn.Linear(5, 3)
    y, n = saved_tensor_bytes(lambda: x.exp(), exclude=[lin])  # exp saves its output
    assert n == 6 * 5 * 4
    _, n = saved_tensor_bytes(lambda: lin(x), exclude=[lin])  # the input is saved, the weight excluded
    assert n == 6 * 5 * 4
    _, n = saved_tensor_bytes(lambda: x[:3].sin() + x[3:].sin())  # two views of one storage: counted once
    assert n == 6 * 5 * 4


def test_gradcheck_fp64():
    norm, lin, mlp = _layers(D=7, hidden=11, out=5)  # small and odd: gradcheck perturbs every element
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    params = [norm.weight, norm.bias, lin.weight, lin.bias]
    assert torch.autograd.gradcheck(
        lambda x, *p: ops.lean._LayerNormLinear.apply(x, p[0], p[1], 1e-6, p[2], p[3]), (x, *params))
    params = [norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    assert torch.autograd.gradcheck(
        lambda x, *p: ops.lean._LayerNormMlp.apply(x, p[0], p[1], 1e-6, *p[2:]), (x, *params))


@pytest.mark.parametrize("which", ["linear", "mlp"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_bf16_autocast_matches_eager_and_saves_less(which, device):
    norm, lin, mlp = (m.to(device) for m in _layers(dtype=torch.float32))
    x = torch.randn(3, 17, 40, device=device, requires_grad=True)  # fp32 residual stream, as under autocast
    if which == "linear":
        lean = lambda x: ops.layer_norm_linear(x, norm, lin)  # noqa: E731
        eager = lambda x: lin(norm(x))  # noqa: E731
        params = [*norm.parameters(), *lin.parameters()]
    else:
        lean = lambda x: ops.layer_norm_mlp(x, norm, mlp.fc1, mlp.fc2)  # noqa: E731
        eager = lambda x: mlp(norm(x))  # noqa: E731
        params = [*norm.parameters(), mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    g = torch.randn(3, 17, lin.out_features if which == "linear" else 40, device=device)

    def run(fn, dtype):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y, nbytes = _saved_bytes(lambda: fn(x), norm, lin, mlp)
        grads = torch.autograd.grad(y, [x, *params], g.to(y.dtype))
        return y, grads, nbytes

    y_lean, g_lean, b_lean = run(lean, torch.bfloat16)
    y_eager, g_eager, b_eager = run(eager, torch.bfloat16)
    y_ref, g_ref, _ = run(eager, torch.float32)
    assert y_lean.dtype == y_eager.dtype == torch.bfloat16
    assert torch.equal(y_lean, y_eager)  # forward: bit-identical to eager autocast
    for name, a, b, r in zip(["x"] + [str(i) for i in range(len(params))], g_lean, g_eager, g_ref):
        err, err_eager = (a.float() - r).abs().max().item(), (b.float() - r).abs().max().item()
        assert a.dtype == r.dtype, name
        assert err <= 2 * err_eager + 1e-3 * r.abs().max().item(), f"grad {name}: {err:.3g} vs eager {err_eager:.3g}"
    # eager keeps x (fp32), the bf16 normed copy (and for the MLP: fc1 out, GELU out); lean keeps x (+ fc1 out)
    n, D = 3 * 17, 40
    if which == "linear":
        assert b_lean < b_eager and b_eager - b_lean >= n * D * 2
    else:
        assert b_lean < b_eager and b_eager - b_lean >= n * D * 2 + n * 72 * 2


def _residual_layers(D=72, hidden=104, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    norm1, qkv, norm2, mlp = nn.LayerNorm(D, eps=1e-6), nn.Linear(D, D), nn.LayerNorm(D, eps=1e-6), Mlp(D, hidden)
    for p in [*norm1.parameters(), *qkv.parameters(), *norm2.parameters(), *mlp.parameters()]:
        p.data.normal_(0, 0.3)
    return norm1.to(dtype), qkv.to(dtype), norm2.to(dtype), mlp.to(dtype)


def _eager_residual_mlp(x, branch, norm, mlp):
    x_mid = x + branch
    return x_mid + mlp(norm(x_mid))


def _x_mid_saving_residual_mlp(x, branch, norm, fc1, fc2):  # what Block.forward did before residual_layer_norm_mlp
    x_mid = x + branch
    return x_mid + ops.layer_norm_mlp(x_mid, norm, fc1, fc2)


def test_residual_mlp_gradcheck_fp64():
    _, _, norm, mlp = _residual_layers(D=7, hidden=11, dtype=torch.float64)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    params = [norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    assert torch.autograd.gradcheck(
        lambda x, b, *p: ops.lean._ResidualLayerNormMlp.apply(x, b, p[0], p[1], 1e-6, *p[2:]), (x, branch, *params))


def test_residual_mlp_fp32_bit_identical_to_eager():
    _, _, norm, mlp = _residual_layers()
    x, branch = torch.randn(2, 13, 72), torch.randn(2, 13, 72)
    y = ops.residual_layer_norm_mlp(x, branch, norm, mlp.fc1, mlp.fc2)
    assert torch.equal(y, _eager_residual_mlp(x, branch, norm, mlp))
    p = [norm.weight, norm.bias, 1e-6, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    torch.testing.assert_close(y, residual_layer_norm_mlp_reference(x, branch, *p))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_residual_mlp_bf16_autocast_matches_eager_and_saves_less(device):
    """The second half of a lean block: fp32 stream x, bf16 attention branch from a Linear (as proj gives)."""
    norm1, proj, norm2, mlp = (m.to(device) for m in _residual_layers())
    x = torch.randn(2, 13, 72, device=device, requires_grad=True)
    params = [*proj.parameters(), *norm2.parameters(), *mlp.parameters()]
    g = torch.randn(2, 13, 72, device=device)
    residual_mlp = {
        "lean": lambda x, b: ops.residual_layer_norm_mlp(x, b, norm2, mlp.fc1, mlp.fc2),
        "x_mid": lambda x, b: _x_mid_saving_residual_mlp(x, b, norm2, mlp.fc1, mlp.fc2),
        "eager": lambda x, b: _eager_residual_mlp(x, b, norm2, mlp),
    }

    def run(which, dtype):
        def block_half():
            branch = ops.layer_norm_linear(x, norm1, proj)  # keeps x, as the attention half of a block does
            return residual_mlp[which](x, branch), branch
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            (y, branch), nbytes = _saved_bytes(block_half, norm1, proj, norm2, mlp)
        grads = torch.autograd.grad(y, [x, branch, *params], g)
        return y, grads, nbytes

    y_lean, g_lean, b_lean = run("lean", torch.bfloat16)
    y_mid, g_mid, b_mid = run("x_mid", torch.bfloat16)
    y_eager, g_eager, _ = run("eager", torch.bfloat16)
    y_ref, g_ref, _ = run("eager", torch.float32)
    assert y_lean.dtype == y_eager.dtype == torch.float32  # fp32 stream + bf16 MLP output, as eager
    assert torch.equal(y_lean, y_eager) and torch.equal(y_mid, y_eager)
    assert g_lean[1].dtype == g_eager[1].dtype == torch.bfloat16  # the branch's grad in the branch's dtype
    names = ["x", "branch"] + [f"param{i}" for i in range(len(params))]
    for name, a, b, r in zip(names, g_lean, g_eager, g_ref):
        err, err_eager = (a.float() - r).abs().max().item(), (b.float() - r).abs().max().item()
        assert a.dtype == b.dtype, name
        assert err <= 2 * err_eager + 1e-3 * r.abs().max().item(), f"grad {name}: {err:.3g} vs eager {err_eager:.3g}"
    # x_mid (fp32) is no longer kept; the bf16 branch is, and x is kept by layer_norm_linear anyway
    assert b_mid - b_lean >= 2 * 13 * 72 * 2, (b_mid, b_lean)


def test_fp32_matches_reference_and_compiles():
    norm, lin, mlp = _layers(dtype=torch.float32)
    x = torch.randn(2, 9, 40)
    torch.testing.assert_close(ops.layer_norm_linear(x, norm, lin),
                               layer_norm_linear_reference(x, norm.weight, norm.bias, 1e-6, lin.weight, lin.bias))
    torch.testing.assert_close(ops.layer_norm_mlp(x, norm, mlp.fc1, mlp.fc2),
                               layer_norm_mlp_reference(x, norm.weight, norm.bias, 1e-6, mlp.fc1.weight, mlp.fc1.bias,
                                                        mlp.fc2.weight, mlp.fc2.bias))
    xg = x.clone().requires_grad_()
    fn = torch.compile(lambda t: ops.layer_norm_mlp(t, norm, mlp.fc1, mlp.fc2), backend="aot_eager", fullgraph=True)
    fn(xg).square().sum().backward()
    x2 = x.clone().requires_grad_()
    mlp(norm(x2)).square().sum().backward()
    torch.testing.assert_close(xg.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    norm, lin, mlp = _layers(dtype=torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        ops.layer_norm_linear(torch.randn(2, 3, 41), nn.LayerNorm(41), lin)
    with pytest.raises(ValueError, match="norm weight must be"):
        ops.layer_norm_linear(torch.randn(2, 3, 40), nn.LayerNorm(39), lin)
    with pytest.raises(ValueError, match="fc2 takes"):
        ops.layer_norm_mlp(torch.randn(2, 3, 40), norm, mlp.fc1, nn.Linear(71, 40))
    x = torch.randn(2, 3, 40)
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.residual_layer_norm_mlp(x, torch.randn(2, 3, 39), norm, mlp.fc1, mlp.fc2)
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.residual_layer_norm_mlp(x, torch.randn(1, 3, 40), norm, mlp.fc1, mlp.fc2)  # no broadcasting
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.residual_layer_norm_mlp(x, 1.0, norm, mlp.fc1, mlp.fc2)
    with pytest.raises(ValueError, match="branch is on meta"):
        ops.residual_layer_norm_mlp(x, torch.randn(2, 3, 40, device="meta"), norm, mlp.fc1, mlp.fc2)
    with pytest.raises(ValueError, match="fc2 must give 40 outputs"):
        ops.residual_layer_norm_mlp(x, torch.randn(2, 3, 40), norm, mlp.fc1, nn.Linear(72, 41))
    with pytest.raises(ValueError, match="fc2 takes"):
        ops.residual_layer_norm_mlp(x, torch.randn(2, 3, 40), norm, mlp.fc1, nn.Linear(71, 40))


def test_norm_without_weight_must_still_normalise_over_the_last_dim():
    # a LayerNorm without affine parameters has no weight to compare: its normalized_shape must be checked,
    # or the op normalised over x's last dim while norm(x) normalises over others (or raises)
    _, lin, mlp = _layers(D=13, hidden=23, out=7)
    x = torch.randn(3, 5, 13, dtype=torch.float64)
    for norm in (nn.LayerNorm(12, elementwise_affine=False), nn.LayerNorm((5, 13), elementwise_affine=False)):
        norm = norm.double()
        with pytest.raises(ValueError, match="layer_norm_linear: norm normalises over"):
            ops.layer_norm_linear(x, norm, lin)
        with pytest.raises(ValueError, match="layer_norm_mlp: norm normalises over"):
            ops.layer_norm_mlp(x, norm, mlp.fc1, mlp.fc2)
        with pytest.raises(ValueError, match="residual_layer_norm_mlp: norm normalises over"):
            ops.residual_layer_norm_mlp(x, torch.randn_like(x), norm, mlp.fc1, mlp.fc2)
    norm = nn.LayerNorm(13, elementwise_affine=False).double()  # the matching one still runs, as eager
    torch.testing.assert_close(ops.layer_norm_linear(x, norm, lin), lin(norm(x)))
    with pytest.raises(TypeError, match="layer_norm_linear: x must be floating point"):
        ops.layer_norm_linear(torch.randint(0, 9, (3, 5, 13)), norm, lin)


def test_model_lean_activations_same_loss_and_grads_less_memory():
    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_small_patch16", img_size=64, depth=2, decoder_depth=2)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    params = [p for p in m.parameters() if p.requires_grad]
    out, b_plain = _saved_bytes(lambda: m(imgs, 0.75, noise, masked_only=True), m)
    grads = torch.autograd.grad(out.loss, params)
    m.set_lean_activations(True)
    out_lean, b_lean = _saved_bytes(lambda: m(imgs, 0.75, noise, masked_only=True), m)
    grads_lean = torch.autograd.grad(out_lean.loss, params)
    torch.testing.assert_close(out_lean.loss, out.loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_lean, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert b_lean < 0.79 * b_plain, (b_lean, b_plain)  # fp32: 0.782 measured


def test_model_lean_under_bf16_autocast_keeps_the_branch_not_the_mid_block_stream(monkeypatch):
    """Under autocast each lean block keeps its bf16 attention branch instead of the fp32 x + branch: 2 bytes
    less per element of every lean block's stream than the x_mid-saving composition."""
    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_small_patch16", img_size=64, depth=2, decoder_depth=2)
    m.set_lean_activations(True)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)

    def saved():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _saved_bytes(lambda: m(imgs, 0.75, noise, masked_only=True), m)[1]

    b_lean = saved()
    monkeypatch.setattr(ops, "residual_layer_norm_mlp",
                        _x_mid_saving_residual_mlp)
    b_x_mid = saved()
    # lean blocks: both encoder blocks (2 x (4 visible + cls) rows, D 384) and the first decoder block
    # (2 x (16 + cls) rows, D 512); the last decoder block queries only the masked rows and runs eagerly
    assert b_x_mid - b_lean >= 2 * (2 * 5 * 384 * 2) + 2 * 17 * 512 * 2, (b_x_mid, b_lean)


def test_lean_refuses_a_non_plain_mlp():
    m = mae_fast.create_model("mae_vit_demo_patch8")
    m.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="plain Linear-GELU-Linear"):
        m.set_lean_activations(True)


# ---- with the Triton fused (add +) LayerNorm (interpreter on the CPU) ---------------------------

# these run the Triton LayerNorm on CPU tensors, so only in the interpreter (the CPU CI); the GPU runs of the same
# kernels are test_layer_norm.py's
cpu_triton = pytest.mark.skipif(not ops.platform.interpreter(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("which", ["linear", "mlp", "residual"])
@pytest.mark.parametrize("amp", [False, True])
@cpu_triton
def test_lean_with_the_fused_layer_norm_matches_the_torch_path(which, amp, monkeypatch):
    """Where dispatch picks the Triton add_layer_norm, the lean ops run it: same output as the torch path up to
    rounding, and gradients at least as close to fp32 eager as 2x the torch path's own error (plus a floor)."""
    if amp:
        pytest.importorskip("triton")
    norm1, qkv, norm2, mlp = _residual_layers(D=72, hidden=104)
    x = torch.randn(2, 19, 72, requires_grad=True)
    branch = torch.randn(2, 19, 72, dtype=torch.bfloat16 if amp else torch.float32).requires_grad_()
    if which == "linear":
        fn, params = (lambda: ops.layer_norm_linear(x, norm1, qkv)), [*norm1.parameters(), *qkv.parameters()]
        ins = [x]
    elif which == "mlp":
        fn, params = (lambda: ops.layer_norm_mlp(x, norm2, mlp.fc1, mlp.fc2)), [*norm2.parameters(), *mlp.parameters()]
        ins = [x]
    else:
        fn = lambda: ops.residual_layer_norm_mlp(x, branch, norm2, mlp.fc1, mlp.fc2)  # noqa: E731
        params, ins = [*norm2.parameters(), *mlp.parameters()], [x, branch]
    wrt = [*ins, *params]

    def run(backend, autocast):
        seen = []
        orig = ops.lean._fused_forward
        monkeypatch.setattr(ops.lean, "_fused_forward", lambda *a: seen.append(1) or orig(*a))
        with ops.use_backend(layer_norm=backend, add_layer_norm=backend), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn()
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        return y, torch.autograd.grad(y, wrt, g), len(seen)

    y_f, g_f, n_fused = run("triton", amp)
    y_t, g_t, n_torch = run("torch", amp)
    y_r, g_r, _ = run("torch", False)  # fp32 eager math: the reference
    assert n_fused >= 2 and n_torch == 0  # forward and the backward's recompute ran the fused kernel
    tol = 2 ** -7 if amp else 1e-5
    torch.testing.assert_close(y_f.float(), y_t.float(), rtol=tol, atol=tol * y_t.abs().max().item())
    for i, (a, b, r) in enumerate(zip(g_f, g_t, g_r)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        err, err_torch = (a.float() - r).abs().max().item(), (b.float() - r).abs().max().item()
        assert err <= 2 * err_torch + (1e-3 if amp else 1e-5) * r.abs().max().item(), \
            f"grad {i}: fused {err:.3g} vs torch path {err_torch:.3g}"


@cpu_triton
def test_model_lean_with_the_fused_layer_norm_trains_like_plain_lean():
    model = mae_fast.create_model("mae_vit_demo_patch8", img_size=32)
    model.set_lean_activations(True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.num_patches)

    def loss_and_grads(backend):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(layer_norm=backend, add_layer_norm=backend):
            loss = model(imgs, 0.75, noise, masked_only=True).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_f, grads_f = loss_and_grads("triton")
    loss_t, grads_t = loss_and_grads("torch")
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_t.keys()
    for n in grads_t:
        torch.testing.assert_close(grads_f[n], grads_t[n], rtol=1e-4, atol=1e-5, msg=n)


# ---- gradients equal plain autograd's for every norm and linear variant ------------------------------

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
