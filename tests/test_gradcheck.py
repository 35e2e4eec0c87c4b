"""torch.autograd.gradcheck and gradgradcheck of every backend in float64."""

import pytest
import torch

from se_fused import squeeze_excite
from se_fused.debug import force_schedule
from se_reference import Case, seeded


def _inputs(case: Case, device, channels_last: bool):
    gen = seeded(case, channels_last)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device).requires_grad_()

    x = rand(case.n, case.c, case.h, case.w)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w1, w2 = rand(case.r, case.c, 1, 1, scale=0.8), rand(case.c, case.r, scale=0.8)
    b1, b2 = (rand(case.r, scale=0.3), rand(case.c, scale=0.3)) if case.bias else (None, None)
    return x, w1, b1, w2, b2


def _check(check, case: Case, backend: str, inputs, device) -> bool:
    # Under Triton's CPU interpreter every launch costs tens of milliseconds: fast mode (random
    # projections of the Jacobian, a few evaluations per input instead of one per element).
    fast = device.type == "cpu" and backend == "triton"
    return check(_fn(case, backend), inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


def _fn(case: Case, backend: str):
    def fn(x, w1, b1, w2, b2):
        return squeeze_excite(x, w1, b1, w2, b2, act=case.act, gate=case.gate, backend=backend)
    return fn


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_gradcheck(act, gate, bias, channels_last, any_backend_device):
    backend, device = any_backend_device
    case = Case(2, 3, 2, 3, 2, act, gate, bias)
    assert _check(torch.autograd.gradcheck, case, backend, _inputs(case, device, channels_last), device)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_sample_spans_many_programs(channels_last, device):
    # 2 channel blocks x 2 spatial segments per sample, 2 samples per group, 3 programs.
    case = Case(3, 3, 2, 3, 2, "silu", "sigmoid")
    with force_schedule(split=True, block_c=2, block_p=4, tiles_per_item=1, group_size=2, num_programs=3):
        assert _check(torch.autograd.gradcheck, case, "triton", _inputs(case, device, channels_last), device)


@pytest.mark.parametrize("act,gate", [("silu", "sigmoid"), ("relu", "hard_sigmoid")])
def test_double_backward(act, gate, any_backend_device):
    """create_graph=True (a gradient penalty) differentiates the backward through PyTorch ops, on every backend."""
    backend, device = any_backend_device
    case = Case(2, 4, 2, 3, 3, act, gate)
    assert _check(torch.autograd.gradgradcheck, case, backend, _inputs(case, device, False), device)
