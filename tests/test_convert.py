"""Converting real timm and torchvision models: every SE module swapped, same outputs."""

import pytest
import timm
import torch
import torchvision

import se_fused
from conftest import BACKEND_DEVICES, interpreted

# (builder, number of SE modules it holds)
MODELS = {
    "timm seresnet50": (lambda: timm.create_model("seresnet50", pretrained=False), 16),
    "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False), 16),
    "timm mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100", pretrained=False), 8),
    "timm regnety_016": (lambda: timm.create_model("regnety_016", pretrained=False), 27),
    "torchvision mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), 9),
    "torchvision efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), 16),
}


# SE-ResNet-50 under the Triton interpreter would take minutes; it runs on every other backend.
CASES = [(name, backend, device) for backend, device in BACKEND_DEVICES for name in MODELS
         if not (interpreted(backend, device) and name == "timm seresnet50")]


@pytest.mark.parametrize("name,backend,device", CASES, ids=[f"{b}-{d}-{n}" for n, b, d in CASES])
def test_convert_model(name, backend, device):
    build, expected = MODELS[name]
    torch.manual_seed(0)
    model = build().eval().to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        before = model(x)
        assert se_fused.convert_se_modules(model, backend=backend) == expected
        assert sum(isinstance(m, se_fused.FusedSE) for m in model.modules()) == expected
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module,reason", [
    (timm.layers.SEModule(32, add_maxpool=True), "cannot convert SEModule: add_maxpool=True"),
    (timm.layers.SEModule(32, norm_layer=torch.nn.BatchNorm2d), "cannot convert SEModule: a norm layer"),
    (timm.layers.SEModule(32, act_layer=torch.nn.GELU), "ReLU or SiLU activations .* got GELU"),
    (torch.nn.Conv2d(8, 8, 1), "cannot convert Conv2d: not a recognised SE module"),
    (se_fused.FusedSE(8), "already fused"),
], ids=["add_maxpool", "norm", "gelu", "conv", "fused"])
def test_unsupported_modules_are_left_alone(module, reason):
    with pytest.raises(ValueError, match=reason):
        se_fused.FusedSE.from_module(module)
    model = torch.nn.Sequential(module)
    assert se_fused.convert_se_modules(model) == 0 and model[0] is module


def test_convert_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        se_fused.convert_se_modules(torch.nn.Sequential(se_fused.SEBlock(8)), backend="cudnn")


def test_converted_block_trains_like_the_original():
    torch.manual_seed(0)
    original = timm.layers.SEModule(48, rd_channels=12)
    fused = se_fused.FusedSE.from_module(original, backend="torch")
    x = torch.randn(3, 48, 5, 5, requires_grad=True)
    g = torch.randn_like(x)
    original(x).backward(g)
    fused(x.detach().requires_grad_()).backward(g)
    torch.testing.assert_close(fused.fc1.weight.grad, original.fc1.weight.grad)
    torch.testing.assert_close(fused.fc2.bias.grad, original.fc2.bias.grad)
