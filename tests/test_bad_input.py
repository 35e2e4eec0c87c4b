"""Bad input to the public API: a clear TypeError/ValueError naming the argument, before any kernel runs."""

import pytest
import torch

import se_fused


def _args(dtype=torch.float32):
    x = torch.randn(2, 8, 3, 3, dtype=dtype)
    return dict(x=x, fc1_weight=torch.randn(2, 8, 1, 1), fc1_bias=torch.randn(2), fc2_weight=torch.randn(8, 2, 1, 1),
                fc2_bias=torch.randn(8))


CASES = [
    ("x not a tensor", dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("x 3-D", dict(x=torch.randn(8, 3, 3)), ValueError, "x must have 4 dimensions"),
    ("x integer", dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int64)), TypeError, "x must be float16"),
    ("x empty spatial", dict(x=torch.randn(2, 8, 0, 3)), ValueError, "at least one channel and one spatial"),
    ("fc1_weight channels", dict(fc1_weight=torch.randn(2, 7, 1, 1)), ValueError, r"fc1_weight must have shape \(2, 8\)"),
    ("fc1_weight 3-D", dict(fc1_weight=torch.randn(2, 8, 1)), ValueError, "fc1_weight must have 2 or 4 dimensions"),
    ("fc1_weight kernel 3x3", dict(fc1_weight=torch.randn(2, 8, 3, 3)), ValueError, "fc1_weight must have shape"),
    ("fc2_weight shape", dict(fc2_weight=torch.randn(8, 3)), ValueError, r"fc2_weight must have shape \(8, 2\)"),
    ("fc1_bias shape", dict(fc1_bias=torch.randn(3)), ValueError, r"fc1_bias must have shape \(2,\)"),
    ("fc2_bias 2-D", dict(fc2_bias=torch.randn(8, 1)), ValueError, "fc2_bias must have 1 dimensions"),
    ("weight dtype", dict(fc2_weight=torch.randn(8, 2).double()), TypeError, "fc2_weight has dtype torch.float64"),
    ("integer bias", dict(fc1_bias=torch.ones(2, dtype=torch.int32)), TypeError, "fc1_bias has dtype torch.int32"),
    ("device", dict(fc2_bias=torch.randn(8, device="meta")), ValueError, "fc2_bias is on meta but x is on cpu"),
]


@pytest.mark.parametrize("name,override,error,message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_functional_rejects(name, override, error, message, backend):
    args = _args()
    args.update(override)
    with se_fused.count_kernel_launches() as launches, pytest.raises(error, match=message):
        se_fused.squeeze_excite(**args, backend=backend)
    assert launches.count == 0


def test_half_input_with_double_weights_is_rejected():
    args = _args(torch.float16)
    with pytest.raises(TypeError, match="parameters must all be torch.float16 or torch.float32"):
        se_fused.squeeze_excite(**{k: (v.double() if k != "x" else v) for k, v in args.items()})


@pytest.mark.parametrize("kwarg,value,message", [
    ("act", "gelu", "act must be one of 'relu', 'silu'"),
    ("gate", "tanh", "gate must be one of 'sigmoid', 'hard_sigmoid'"),
    ("backend", "cudnn", "backend must be one of"),
])
def test_functional_rejects_bad_names(kwarg, value, message):
    with pytest.raises(ValueError, match=message):
        se_fused.squeeze_excite(**_args(), **{kwarg: value})


def test_module_rejects_wrong_channel_count():
    block = se_fused.FusedSE(16, rd_channels=4)
    with pytest.raises(ValueError, match=r"fc1_weight must have shape \(4, 8\)"):
        block(torch.randn(2, 8, 3, 3))
