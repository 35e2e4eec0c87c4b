"""The compiled ops (csrc/): opcheck, argument checks in the binding, backend choice."""

import pytest
import torch

import se_fused
from conftest import BACKEND_DEVICES
from se_fused.ops import extension_available

EXT_DEVICES = [d for b, d in BACKEND_DEVICES if b in ("cpp", "cuda")]

if not EXT_DEVICES:  # a pure-Python install (no compiler); CI sets SE_FUSED_REQUIRE_EXTENSION=1, see conftest
    pytest.skip("se_fused._C is not built, so there are no compiled ops to test", allow_module_level=True)


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


@pytest.fixture(params=EXT_DEVICES)
def ext_device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_forward(bias, channels_last, ext_device):
    x, w1, b1, w2, b2 = _op_args(ext_device, bias=bias, channels_last=channels_last)
    for t in (x, w1, w2, b1, b2):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.se_fused.se_forward.default, (x, w1, b1, w2, b2, "silu", "hard_sigmoid"))


@pytest.mark.parametrize("need_dx,need_weights", [(True, True), (True, False), (False, True)])
def test_opcheck_backward(need_dx, need_weights, ext_device):
    x, w1, b1, w2, b2 = _op_args(ext_device)
    _, z, a, e = torch.ops.se_fused.se_forward(x, w1, b1, w2, b2, "relu", "sigmoid")
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.se_fused.se_backward.default,
                          (g, x, w1, w2, z, a, e, "relu", "sigmoid", True, True, need_dx, need_weights))


@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_gradcheck_op(act, gate, ext_device):
    x, w1, b1, w2, b2 = _op_args(ext_device, torch.float64, n=2, c=4, r=3, h=2, w=3)
    inputs = tuple(t.requires_grad_() for t in (x, w1, b1, w2, b2))
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.se_fused.se_forward(*t, act, gate)[0], inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _bad(device):
    x, w1, b1, w2, b2 = _op_args(device)
    return dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2, act="relu", gate="sigmoid")


BAD_ARGUMENTS = [
    ("x 3-D", lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
    ("x integer", lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x must be float16"),
    ("fc1_weight channels", lambda a: a.update(fc1_weight=a["fc1_weight"][:, :-1]), ValueError, "fc1_weight must have shape"),
    ("fc1_weight 4-D", lambda a: a.update(fc1_weight=a["fc1_weight"][..., None, None]), ValueError, "fc1_weight must be 2-D"),
    ("fc2_weight shape", lambda a: a.update(fc2_weight=a["fc2_weight"][:-1]), ValueError, "fc2_weight must have shape"),
    ("fc1_bias shape", lambda a: a.update(fc1_bias=a["fc1_bias"][:-1]), ValueError, "fc1_bias must have shape"),
    ("fc2_bias shape", lambda a: a.update(fc2_bias=a["fc2_bias"][:-1]), ValueError, "fc2_bias must have shape"),
    ("fc2_weight dtype", lambda a: a.update(fc2_weight=a["fc2_weight"].double()), TypeError, "fc2_weight has dtype"),
    ("integer weight", lambda a: a.update(fc1_weight=a["fc1_weight"].to(torch.int64)), TypeError, "fc1_weight has dtype"),
    ("act", lambda a: a.update(act="gelu"), ValueError, "act must be"),
    ("gate", lambda a: a.update(gate="tanh"), ValueError, "gate must be"),
    ("H and W not flattenable", lambda a: a.update(x=a["x"].transpose(2, 3)), ValueError, "flattenable"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_binding_rejects_bad_arguments(name, mutate, error, message):
    args = _bad("cpu")
    mutate(args)
    with pytest.raises(error, match=message):
        torch.ops.se_fused.se_forward(*args.values())


if torch.cuda.is_available():  # a second real device to mismatch (meta tensors dispatch to the fake kernel)

    def test_binding_rejects_mixed_devices():
        args = _bad("cuda")
        args["fc2_bias"] = args["fc2_bias"].cpu()
        with pytest.raises(ValueError, match="fc2_bias is on cpu but x is on cuda"):
            torch.ops.se_fused.se_forward(*args.values())


def test_binding_backward_rejects_mismatched_grad():
    x, w1, b1, w2, b2 = _op_args("cpu")
    _, z, a, e = torch.ops.se_fused.se_forward(x, w1, b1, w2, b2, "relu", "sigmoid")
    with pytest.raises(ValueError, match="grad_y must have x's shape"):
        torch.ops.se_fused.se_backward(x[:1], x, w1, w2, z, a, e, "relu", "sigmoid", True, True, True, True)
    with pytest.raises(TypeError, match="grad_y must have x's dtype"):
        torch.ops.se_fused.se_backward(x.double(), x, w1, w2, z, a, e, "relu", "sigmoid", True, True, True, True)
    with pytest.raises(ValueError, match="z must be a contiguous"):
        torch.ops.se_fused.se_backward(x, x, w1, w2, z[:1], a, e, "relu", "sigmoid", True, True, True, True)


def test_auto_picks_the_compiled_kernels():
    block = se_fused.FusedSE(16, rd_channels=4)
    assert extension_available()
    from se_fused.functional import _choose_backend

    assert _choose_backend(torch.randn(1, 16, 2, 2), "auto") == "cpp"
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        se_fused.FusedSE(16, rd_channels=4, backend="cuda")(torch.randn(1, 16, 2, 2))
    torch.testing.assert_close(block(torch.ones(2, 16, 3, 3)), se_fused.SEBlock.forward(block, torch.ones(2, 16, 3, 3)))


def test_torch_compile_traces_the_op():
    x, w1, b1, w2, b2 = _op_args("cpu")

    def fn(x):
        return torch.ops.se_fused.se_forward(x, w1, b1, w2, b2, "relu", "sigmoid")[0] * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x))
