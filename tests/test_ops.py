"""The op layer: every backend's ops pass opcheck, the binding's argument checks, the backend choice."""

import pytest
import torch

import se_fused
from conftest import BACKEND_DEVICES
from se_fused.ops import BACKEND_OPS, extension_available

needs_extension = pytest.mark.skipif(not extension_available(), reason="se_fused._C is not built (CI requires it)")


def _op_args(device, dtype=torch.float32, n=3, c=12, r=5, h=4, w=6, bias=True, channels_last=False):
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + r)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w1 = (torch.randn(r, c, generator=gen, dtype=param_dtype) * 0.5).to(device)
    w2 = (torch.randn(c, r, generator=gen, dtype=param_dtype) * 0.5).to(device)
    b1 = torch.randn(r, generator=gen, dtype=param_dtype).to(device) if bias else None
    b2 = torch.randn(c, generator=gen, dtype=param_dtype).to(device) if bias else None
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_forward(bias, channels_last, any_backend_device):
    backend, device = any_backend_device
    args = _op_args(device, bias=bias, channels_last=channels_last)
    # schema, fake kernel, AOT dispatch; autograd lives in SqueezeExciteFunction (test_gradcheck.py)
    torch.library.opcheck(BACKEND_OPS[backend].forward, args + ("silu", "hard_sigmoid"))


@pytest.mark.parametrize("need_dx,need_weights", [(True, True), (True, False), (False, True)])
def test_opcheck_backward(need_dx, need_weights, any_backend_device):
    backend, device = any_backend_device
    x, w1, b1, w2, b2 = _op_args(device)
    ops = BACKEND_OPS[backend]
    _, z, a, e = ops.forward(x, w1, b1, w2, b2, "relu", "sigmoid")
    g = torch.randn_like(x)
    torch.library.opcheck(ops.backward, (g, x, w1, w2, z, a, e, "relu", "sigmoid", True, True, need_dx, need_weights))


def test_backprop_through_a_bare_op_is_an_error(any_backend_device):
    backend, device = any_backend_device
    x, w1, b1, w2, b2 = _op_args(device)
    y = BACKEND_OPS[backend].forward(x.requires_grad_(), w1, b1, w2, b2, "relu", "sigmoid")[0]
    with pytest.raises(RuntimeError, match="se_forward"):
        y.sum().backward()


@pytest.mark.parametrize("layout", ["transposed-hw", "strided-rows"])
def test_opcheck_copies_what_does_not_flatten(layout, any_backend_device):
    """x whose H and W do not flatten into one axis is copied inside the op; the fake kernel agrees on y's strides."""
    backend, device = any_backend_device
    x, w1, b1, w2, b2 = _op_args(device, h=6, w=6)
    x = x.transpose(2, 3) if layout == "transposed-hw" else torch.cat([x, x], 2)[:, :, ::2]
    ops = BACKEND_OPS[backend]
    torch.library.opcheck(ops.forward, (x, w1, b1, w2, b2, "relu", "sigmoid"))
    _, z, a, e = ops.forward(x, w1, b1, w2, b2, "relu", "sigmoid")
    torch.library.opcheck(ops.backward, (torch.randn_like(x), x, w1, w2, z, a, e, "relu", "sigmoid", True, True,
                                         True, True))


def _weight_view(w, kind):
    """w's values in another storage: 'transposed' (stored as its transpose), 'offset' (one element past a
    16-byte boundary, so no 16-byte pack of it is aligned)."""
    if kind == "transposed":
        return w.t().contiguous().t()
    flat = torch.empty(w.numel() + 1, dtype=w.dtype, device=w.device)
    view = flat[1:].view(w.shape)
    view.copy_(w)
    return view


@pytest.mark.parametrize("kind", ["transposed", "offset"])
@pytest.mark.parametrize("c,r", [(24, 8), (12, 5)], ids=["packable", "odd"])
def test_weights_of_any_strides_and_alignment(kind, c, r, any_backend_device):
    """Weights read in place whatever their strides and alignment (the ops take any strides; the C++
    kernel copies them contiguous, the others index them): the same outputs and gradients as from
    contiguous weights."""
    backend, device = any_backend_device
    x, w1, b1, w2, b2 = _op_args(device, c=c, r=r)
    ops = BACKEND_OPS[backend]
    g = torch.randn_like(x)
    results = []
    for v1, v2 in ((w1, w2), (_weight_view(w1, kind), _weight_view(w2, kind))):
        y, z, a, e = ops.forward(x, v1, b1, v2, b2, "relu", "sigmoid")
        results.append((y, z, a, e) + tuple(ops.backward(g, x, v1, v2, z, a, e, "relu", "sigmoid", True, True, True,
                                                         True)[:5]))
    names = ("y", "z", "a", "e", "dx", "dw1", "db1", "dw2", "db2")
    for name, strided, contiguous in zip(names, results[1], results[0]):
        torch.testing.assert_close(strided, contiguous, rtol=1e-5, atol=1e-6, msg=name)


def test_backward_ops_reject_a_mismatched_gradient(any_backend_device):
    backend, device = any_backend_device
    x, w1, b1, w2, b2 = _op_args(device)
    ops = BACKEND_OPS[backend]
    _, z, a, e = ops.forward(x, w1, b1, w2, b2, "relu", "sigmoid")
    with pytest.raises(ValueError, match=r"grad_y must have x's shape \(3, 12, 4, 6\), got \(1, 12, 4, 6\)"):
        ops.backward(x[:1], x, w1, w2, z, a, e, "relu", "sigmoid", True, True, True, True)
    with pytest.raises(TypeError, match="grad_y must have x's dtype torch.float32, got torch.float64"):
        ops.backward(x.double(), x, w1, w2, z, a, e, "relu", "sigmoid", True, True, True, True)
    if backend in ("cpp", "cuda"):  # the C++ ops also check the saved vectors they are handed
        with pytest.raises(ValueError, match="z must be a contiguous"):
            ops.backward(x, x, w1, w2, z[:1], a, e, "relu", "sigmoid", True, True, True, True)


@needs_extension
def test_auto_picks_the_compiled_kernels():
    from se_fused.functional import resolve_backend

    block = se_fused.FusedSE(16, rd_channels=4)
    assert resolve_backend("auto", "cpu") == "cpp"
    assert "runs 'cpp' on cpu" in repr(block)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        se_fused.FusedSE(16, rd_channels=4, backend="cuda")(torch.randn(1, 16, 2, 2))
    torch.testing.assert_close(block(torch.ones(2, 16, 3, 3)), se_fused.SEBlock.forward(block, torch.ones(2, 16, 3, 3)))


def test_every_op_is_registered_by_importing_the_package():
    import subprocess
    import sys

    code = "import torch, se_fused; print(sorted(n for n in dir(torch.ops.se_fused) if n.startswith('se_')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = {"se_forward_torch", "se_backward_torch", "se_forward_triton", "se_backward_triton"}
    if extension_available():
        expected |= {"se_forward", "se_backward"}
    assert expected <= set(eval(out.stdout)), out.stdout
