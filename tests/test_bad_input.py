"""Bad input: a clear TypeError/ValueError naming the argument, before any kernel runs, the same
message from every backend, through the public API and through the ops themselves."""

import pytest
import torch

import se_fused
from conftest import ALL_BACKEND_DEVICES
from se_fused.ops import BACKEND_OPS


def _args(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(2, 8, 3, 3, generator=gen, dtype=dtype).to(device),
                fc1_weight=torch.randn(2, 8, 1, 1, generator=gen).to(device),
                fc1_bias=torch.randn(2, generator=gen).to(device),
                fc2_weight=torch.randn(8, 2, 1, 1, generator=gen).to(device),
                fc2_bias=torch.randn(8, generator=gen).to(device))


CASES = [
    ("x 3-D", dict(x=torch.randn(8, 3, 3)), ValueError, r"x must have 4 dimensions, got shape \(8, 3, 3\)"),
    ("x integer", dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int64)), TypeError,
     "x must be float16, bfloat16, float32 or float64, got torch.int64"),
    ("x empty spatial", dict(x=torch.randn(2, 8, 0, 3)), ValueError,
     r"x must have at least one channel and one spatial position, got shape \(2, 8, 0, 3\)"),
    ("fc1_weight channels", dict(fc1_weight=torch.randn(2, 7, 1, 1)), ValueError,
     r"fc1_weight must have shape \(2, 8\) or \(2, 8, 1, 1\) for x with 8 channels and fc1_weight with 2 outputs, "
     r"got \(2, 7, 1, 1\)"),
    ("fc1_weight 3-D", dict(fc1_weight=torch.randn(2, 8, 1)), ValueError,
     r"fc1_weight must have 2 or 4 dimensions, got shape \(2, 8, 1\)"),
    ("fc1_weight kernel 3x3", dict(fc1_weight=torch.randn(2, 8, 3, 3)), ValueError, "fc1_weight must have shape"),
    ("fc2_weight shape", dict(fc2_weight=torch.randn(8, 3)), ValueError, r"fc2_weight must have shape \(8, 2\)"),
    ("no hidden units", dict(fc1_weight=torch.randn(0, 8, 1, 1), fc1_bias=torch.randn(0),
                             fc2_weight=torch.randn(8, 0, 1, 1)), ValueError,
     r"fc1_weight must have at least one output \(hidden unit\), got shape \(0, 8, 1, 1\)"),
    ("fc1_bias shape", dict(fc1_bias=torch.randn(3)), ValueError, r"fc1_bias must have shape \(2,\), got \(3,\)"),
    ("fc2_bias 2-D", dict(fc2_bias=torch.randn(8, 1)), ValueError, r"fc2_bias must have 1 dimensions, got shape \(8, 1\)"),
    ("weight dtype", dict(fc2_weight=torch.randn(8, 2).double()), TypeError,
     "fc2_weight has dtype torch.float64; parameters must all be torch.float32 for x of dtype torch.float32"),
    ("integer bias", dict(fc1_bias=torch.ones(2, dtype=torch.int32)), TypeError, "fc1_bias has dtype torch.int32"),
    ("act", dict(act="gelu"), ValueError, "act must be one of 'relu', 'silu', got 'gelu'"),
    ("gate", dict(gate="tanh"), ValueError, "gate must be one of 'sigmoid', 'hard_sigmoid', got 'tanh'"),
]
IDS = [c[0] for c in CASES]


def _bad_args(device, override):
    args = dict(_args(device), act="relu", gate="sigmoid")
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in override.items()})
    return args


@pytest.mark.parametrize("name,override,error,message", CASES, ids=IDS)
def test_functional_rejects(name, override, error, message, any_backend_device):
    backend, device = any_backend_device
    args = _bad_args(device, override)
    with se_fused.count_kernel_launches() as launches, pytest.raises(error, match=message):
        se_fused.squeeze_excite(**args, backend=backend)
    assert launches.count == 0


@pytest.mark.parametrize("name,override,error,message", CASES, ids=IDS)
def test_ops_reject(name, override, error, message, any_backend_device):
    """The ops check on their own (they can be called directly), with the same words."""
    backend, device = any_backend_device
    args = _bad_args(device, override)
    with pytest.raises(error, match=message):
        BACKEND_OPS[backend].forward(*args.values())


def test_x_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        se_fused.squeeze_excite([[1.0]], *list(_args("cpu").values())[1:])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_parameters_on_another_device(backend):
    args = _args("cpu")
    args["fc2_bias"] = args["fc2_bias"].to("meta")
    with pytest.raises(ValueError, match="fc2_bias is on meta but x is on cpu; all tensors must share a device"):
        se_fused.squeeze_excite(**args, backend=backend)


def test_half_input_with_double_weights_is_rejected(any_backend_device):
    backend, device = any_backend_device
    args = {k: (v if k == "x" else v.double()) for k, v in _args(device, torch.float16).items()}
    with pytest.raises(TypeError, match="parameters must all be torch.float16 or torch.float32 for x of dtype"):
        se_fused.squeeze_excite(**args, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'cuda', 'cpp', 'triton', 'torch', got 'cudnn'"):
        se_fused.squeeze_excite(**_args("cpu"), backend="cudnn")


def test_module_rejects_wrong_channel_count():
    block = se_fused.FusedSE(16, rd_channels=4)
    with se_fused.count_kernel_launches() as launches, \
            pytest.raises(ValueError, match=r"FusedSE has 16 channels but x has 8 \(x of shape \(2, 8, 3, 3\)"):
        block(torch.randn(2, 8, 3, 3))
    assert launches.count == 0
