"""FusedSE as a drop-in for SEBlock: constructor, state_dict, outputs, backend choice."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import se_fused
from se_fused import FusedSE, SEBlock


def test_hidden_width_and_parameter_shapes():
    block = FusedSE(64, reduction=16)
    assert block.rd_channels == 4
    assert FusedSE(8, reduction=16).rd_channels == 1
    assert FusedSE(64, rd_channels=10).rd_channels == 10
    shapes = {k: tuple(v.shape) for k, v in SEBlock(64, rd_channels=10).state_dict().items()}
    # timm SEModule / torchvision SqueezeExcitation layout
    assert shapes == {"fc1.weight": (10, 64, 1, 1), "fc1.bias": (10,), "fc2.weight": (64, 10, 1, 1),
                      "fc2.bias": (64,)}
    assert set(FusedSE(64, bias=False).state_dict()) == {"fc1.weight", "fc2.weight"}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_state_dict_round_trip_and_same_outputs(backend, device):
    torch.manual_seed(0)
    ref = SEBlock(48, rd_channels=12, act="silu", gate="hard_sigmoid")
    fused = FusedSE(48, rd_channels=12, act="silu", gate="hard_sigmoid", backend=backend)
    fused.load_state_dict(ref.state_dict())
    back = SEBlock(48, rd_channels=12, act="silu", gate="hard_sigmoid")
    back.load_state_dict(fused.state_dict())
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    ref, fused = ref.to(device), fused.to(device)
    x = torch.randn(4, 48, 7, 5, device=device)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="act"):
        FusedSE(16, act="gelu")
    with pytest.raises(ValueError, match="gate"):
        FusedSE(16, gate="tanh")
    with pytest.raises(ValueError, match="backend"):
        FusedSE(16, backend="cudnn")
    with pytest.raises(ValueError, match="channels"):
        FusedSE(0)
    with pytest.raises(ValueError, match="rd_channels"):
        FusedSE(16, rd_channels=0)
    with pytest.raises(ValueError, match="reduction"):
        FusedSE(16, reduction=0)


def test_torch_backend_launches_no_kernel_of_ours():
    block = FusedSE(16, rd_channels=4, backend="torch")
    x = torch.randn(2, 16, 3, 3)
    with se_fused.count_kernel_launches() as launches:
        y = block(x)
    assert launches.count == 0
    torch.testing.assert_close(y, SEBlock.forward(block, x))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = textwrap.dedent("""
        import torch, se_fused
        x = torch.randn(2, 8, 3, 3)
        try:
            se_fused.FusedSE(8, rd_channels=2, backend="triton")(x)
        except RuntimeError as err:
            print("RAISED:", err)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "RAISED:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_batch_of_zero_returns_empty(device):
    block = FusedSE(8, rd_channels=2, backend="triton").to(device)
    x = torch.randn(0, 8, 4, 4, device=device, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
